import pytest
import torch

from sad.config import MethodParams, TrainParams
from sad.segment import segment_episodes
from sad.training import collate, length_grouped_batches, method_loss, train_lm


@pytest.fixture(scope="module")
def windows(demos, tokenizer):
    return segment_episodes(demos, tokenizer, 512).windows


def test_length_grouped_batches_cover_every_index_once():
    lengths = [5, 1, 9, 3, 7, 2, 8]
    batches = length_grouped_batches(lengths, batch_size=3, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert length_grouped_batches(lengths, 3, 0) == batches


def test_collate_pads_right_and_masks_padding():
    rows = [{"input_ids": [5, 6, 7], "reason_mask": [0, 1, 0], "act_mask": [0, 0, 1]},
            {"input_ids": [5], "reason_mask": [0], "act_mask": [0]}]
    b = collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["act_mask"].tolist() == [[0, 0, 1], [0, 0, 0]]


@pytest.mark.parametrize("loss", ["sad", "token_kd", "sft"])
def test_each_method_trains_a_student_and_lowers_its_loss(loss, windows, tokenizer, tiny_model_factory):
    teacher = tiny_model_factory(hidden=32, layers=1, seed=1)
    student = tiny_model_factory(hidden=16, layers=1, seed=2)
    method = MethodParams(loss=loss)
    batch = collate(windows[["input_ids", "reason_mask", "act_mask"]].head(4).to_dict("records"), tokenizer.pad_token_id)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        before, _ = method_loss(method, student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch, t_logits)
    result = train_lm(student, windows, method, TrainParams(epochs=3, batch_size=4, lr=1e-2), tokenizer.pad_token_id,
                      teacher=teacher, progress=False)
    with torch.no_grad():
        after, parts = method_loss(method, student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch, t_logits)
    assert result.steps > 0 and result.tokens > 0
    assert after.item() < before.item()
    if loss == "sad":
        assert set(parts) == {"kl_reason", "kl_act"}


def test_kd_methods_require_teacher_logits(windows, tokenizer, tiny_model_factory):
    student = tiny_model_factory()
    batch = collate(windows[["input_ids", "reason_mask", "act_mask"]].head(2).to_dict("records"), tokenizer.pad_token_id)
    logits = student(input_ids=batch["input_ids"]).logits
    with pytest.raises(ValueError, match="teacher logits"):
        method_loss(MethodParams(loss="sad"), logits, batch, None)


def test_training_is_deterministic_for_a_seed(windows, tokenizer, tiny_model_factory):
    runs = []
    for _ in range(2):
        model = tiny_model_factory(seed=3)
        train_lm(model, windows, MethodParams(loss="sft"), TrainParams(epochs=1, batch_size=4, seed=7), tokenizer.pad_token_id, progress=False)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])
