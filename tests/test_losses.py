import pytest
import torch
import torch.nn.functional as F

from sad import losses


def _logits(seed: int, shape=(2, 5, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def test_forward_kl_is_zero_on_identical_distributions():
    logits = _logits(0)
    assert torch.allclose(losses.forward_kl(logits, logits.clone()), torch.zeros(2, 5), atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_forward_kl_equals_torch_kl_div(temperature):
    student, teacher = _logits(1), _logits(2)
    ours = losses.forward_kl(student, teacher, temperature)
    reference = F.kl_div(
        F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
        reduction="none", log_target=True,
    ).sum(-1) * temperature**2
    assert torch.allclose(ours, reference, atol=1e-6)
    assert (ours >= 0).all()


def test_masked_tokens_contribute_nothing_to_gradients():
    student = _logits(3).requires_grad_(True)
    teacher = _logits(4)
    reason = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    act = torch.tensor([[0, 0, 0, 1, 0], [0, 1, 0, 0, 0]])
    per_token = losses.forward_kl(student, teacher)
    loss = losses.sad_loss(per_token, reason, act)
    loss.backward()
    outside = (reason + act) == 0
    assert torch.count_nonzero(student.grad[outside]) == 0
    assert torch.count_nonzero(student.grad[~outside]) > 0


def test_per_kind_mean_matches_hand_computation():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    reason = torch.tensor([[1, 1, 1, 0]])
    act = torch.tensor([[0, 0, 0, 1]])
    # reason mean = 2, act mean = 4 -> 0.5 * 2 + 2 * 4
    got = losses.sad_loss(per_token, reason, act, lambda_reason=0.5, lambda_act=2.0, normalisation="per_kind_mean")
    assert got.item() == pytest.approx(0.5 * 2 + 2.0 * 4)


def test_token_sum_matches_hand_computation():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    reason = torch.tensor([[1, 1, 1, 0]])
    act = torch.tensor([[0, 0, 0, 1]])
    # (0.5 * (1+2+3) + 2 * 4) / 4 generated tokens
    got = losses.sad_loss(per_token, reason, act, lambda_reason=0.5, lambda_act=2.0, normalisation="token_sum")
    assert got.item() == pytest.approx((0.5 * 6 + 2.0 * 4) / 4)


def test_per_kind_mean_and_token_sum_differ_when_kinds_differ_in_length():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 5.0]])
    reason, act = torch.tensor([[1, 1, 1, 0]]), torch.tensor([[0, 0, 0, 1]])
    a = losses.sad_loss(per_token, reason, act, normalisation="per_kind_mean")
    b = losses.sad_loss(per_token, reason, act, normalisation="token_sum")
    assert a.item() == pytest.approx(6.0) and b.item() == pytest.approx(2.0)


def test_empty_masks_give_zero_not_nan():
    per_token = torch.ones(1, 3)
    zero = torch.zeros(1, 3, dtype=torch.long)
    assert losses.sad_loss(per_token, zero, zero).item() == 0.0
    assert losses.token_kd_loss(per_token, zero).item() == 0.0


def test_unknown_normalisation_is_rejected():
    with pytest.raises(ValueError, match="per_kind_mean"):
        losses.sad_loss(torch.ones(1, 2), torch.ones(1, 2), torch.zeros(1, 2), normalisation="mean")


def test_sft_loss_is_cross_entropy_on_masked_positions():
    logits = _logits(5, (1, 3, 7))
    targets = torch.tensor([[1, 2, 3]])
    mask = torch.tensor([[0, 1, 1]])
    expected = F.cross_entropy(logits[0, 1:], targets[0, 1:])
    assert losses.sft_loss(logits, targets, mask).item() == pytest.approx(expected.item(), rel=1e-5)


def test_shift_aligns_next_token_targets():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    ids = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    l, t = losses.shift(logits, ids)
    assert l.shape == (2, 3, 3) and t.tolist() == [[11, 12, 13], [21, 22, 23]]
