import pandas as pd
import pytest

from sad.markers import SegmentationError
from sad.react import Episode, Step, episode_pieces, episode_text, parse_output
from sad.schemas import SchemaViolation, SpanSchema, WindowSchema, validate
from sad.segment import episode_windows, segment_episodes, tokenize_episode


def _episode(eid="agent:alfworld/train/00001", n_steps=3, success=True) -> Episode:
    steps = [Step(thought=f"I will check cabinet {i}.", action=f"go to cabinet {i}", observation=f"You arrive at cabinet {i}.")
             for i in range(1, n_steps + 1)]
    return Episode(episode_id=eid, env="alfworld", split="train", task_id="alfworld/train/00001",
                   task_type="pick_and_place_simple", agent="agent",
                   prompt="[alfworld] You are in the middle of a room. Your task is to: put a mug in cabinet.\n",
                   steps=steps, success=success)


def test_parse_output_reads_thought_and_action():
    out = parse_output("Thought: I need a mug. I will check cabinet 1.\nAction: go to cabinet 1\n")
    assert out.thought == "I need a mug. I will check cabinet 1."
    assert out.action == "go to cabinet 1" and out.has_action


def test_parse_output_without_action_is_flagged():
    out = parse_output("Thought: I am thinking forever")
    assert not out.has_action and out.action == "" and out.thought == "I am thinking forever"


def test_parse_output_keeps_only_the_action_line():
    out = parse_output("Thought: x\nAction: open fridge 1\nObservation: made up")
    assert out.action == "open fridge 1"


def test_generated_spans_cover_the_generated_text_exactly(tokenizer):
    ep = _episode()
    windows, spans = episode_windows(ep, tokenizer, max_tokens=512)
    assert len(windows) == 1
    text = episode_text(ep)
    generated = "".join(t for kind, t in episode_pieces(ep) if kind in ("reason", "act"))
    covered = "".join(text[s["char_start"]:s["char_end"]] for s in spans)
    assert covered == generated
    w = windows[0]
    for s in spans:
        mask = w["reason_mask"] if s["kind"] == "reason" else w["act_mask"]
        assert all(mask[i] == 1 for i in range(s["tok_start"], s["tok_end"]))
        decoded = tokenizer.decode(w["input_ids"][s["tok_start"]:s["tok_end"]])
        assert decoded == text[s["char_start"]:s["char_end"]]
    # prompt and observation tokens carry no mask
    assert sum(w["reason_mask"]) + sum(w["act_mask"]) == sum(s["tok_end"] - s["tok_start"] for s in spans)


def test_long_episodes_are_cut_into_windows_within_budget(tokenizer):
    ep = _episode(n_steps=30)
    windows, spans = episode_windows(ep, tokenizer, max_tokens=128)
    assert len(windows) > 1
    assert all(w["n_tokens"] <= 128 for w in windows)
    prompt_len = len(tokenizer.encode(ep.prompt))
    assert all(w["input_ids"][:prompt_len] == tokenizer.encode(ep.prompt) for w in windows)
    assert sum(1 for s in spans if s["kind"] == "act") == 30  # every action lands in exactly one window


def test_segment_episodes_validates_all_tables(demos, tokenizer):
    from sad.schemas import SpanSchema, StepSchema, WindowSchema, validate

    seg = segment_episodes(demos, tokenizer, max_tokens=1024)
    assert len(seg.windows) >= len(demos)
    assert set(seg.spans["kind"]) == {"reason", "act"}
    assert seg.steps["episode_id"].nunique() == len(demos)
    for table, schema in ((seg.steps, StepSchema), (seg.spans, SpanSchema), (seg.windows, WindowSchema)):
        validate(table, schema, schema.__name__)  # what the pipeline writes passes its own schemas
    # the masks tile the spans exactly: per window and kind, masked tokens = span tokens, all inside spans
    for kind, mask in (("reason", "reason_mask"), ("act", "act_mask")):
        spans = seg.spans[seg.spans["kind"] == kind]
        span_tokens = (spans["tok_end"] - spans["tok_start"]).groupby([spans["episode_id"], spans["window"]]).sum()
        mask_tokens = seg.windows.set_index(["episode_id", "window"])[mask].map(sum)
        assert span_tokens.reindex(mask_tokens.index, fill_value=0).tolist() == mask_tokens.tolist()


def test_straddling_token_is_reported_with_the_episode():
    from sad.tokenizer import train_bpe

    # A tokenizer that learned "maxThought" as one token, and a prompt that lacks its final newline:
    # the marker is no longer at a line start, so the rule-based split rejects the episode first.
    tok = train_bpe(["maxThought: go\n"] * 50, vocab_size=300, min_frequency=2)
    ep = _episode(eid="broken-episode", n_steps=1)
    ep.prompt = "[alfworld] max"
    with pytest.raises(SegmentationError, match="broken-episode.*do not match"):
        tokenize_episode(ep, tok)


def test_overlapping_spans_fail_the_schema_naming_the_episode():
    df = pd.DataFrame([
        {"episode_id": "ep-7", "window": 0, "span": 0, "kind": "reason", "char_start": 0, "char_end": 10, "tok_start": 0, "tok_end": 5},
        {"episode_id": "ep-7", "window": 0, "span": 1, "kind": "act", "char_start": 8, "char_end": 20, "tok_start": 4, "tok_end": 9},
    ])
    with pytest.raises(SchemaViolation, match=r"ep-7") as err:
        validate(df, SpanSchema, "spans")
    assert "must not overlap" in str(err.value)


def test_non_disjoint_masks_fail_the_window_schema():
    df = pd.DataFrame([{"episode_id": "ep-9", "window": 0, "success": True, "n_tokens": 3,
                        "input_ids": [1, 2, 3], "reason_mask": [0, 1, 1], "act_mask": [0, 0, 1]}])
    with pytest.raises(SchemaViolation, match="ep-9") as err:
        validate(df, WindowSchema, "windows")
    # a check of whole rows: one line for the one bad row, not one per column
    assert str(err.value).splitlines()[1:] == [
        "  - check masks must be binary and disjoint (m_r + m_a <= 1) in episode(s) ep-9: 1 failure(s)"]


def test_wrong_columns_fail_the_schema():
    df = pd.DataFrame([{"episode_id": "ep-1", "window": 0, "tokens": [1]}])
    with pytest.raises(SchemaViolation, match="WindowSchema") as err:
        validate(df, WindowSchema, "windows")
    for column in ("input_ids", "reason_mask", "act_mask"):  # every missing column is named, not only the first
        assert column in str(err.value)


def test_every_later_window_shows_its_first_step_the_whole_step_before_it_as_at_play(tokenizer):
    """At play an agent always sees its latest step whole (the observation its next thought reacts to): a
    window packed to the brim gave the first step of every later window at most a head of that step."""
    from sad.react import step_pieces

    ep = _episode(n_steps=30)
    windows, _ = episode_windows(ep, tokenizer, max_tokens=160)
    prompt = tokenizer.encode(ep.prompt)
    assert len(windows) > 2
    for w in windows[1:]:
        first = next(i for i, (r, a) in enumerate(zip(w["reason_mask"], w["act_mask"], strict=True)) if r or a)
        context = tokenizer.decode(w["input_ids"][len(prompt):first])
        loss_step = next(k for k, st in enumerate(ep.steps) if tokenizer.decode(w["input_ids"][first:]).startswith(
            "".join(t for _, t in step_pieces(st))[:40]))
        assert context.endswith("".join(t for _, t in step_pieces(ep.steps[loss_step - 1]))), (w["window"], context)


def test_a_window_after_a_long_step_keeps_that_steps_head_as_at_play(tokenizer):
    """History is never dropped wholesale: when the step before a window does not fit, its head is kept
    (thought and action first), exactly as sad.agent.fit_context keeps the latest step at play."""
    from sad.agent import fit_context
    from sad.react import step_pieces

    ep = _episode(n_steps=3)
    ep.steps[1].observation = "You see " + ", ".join(f"a mug {i}" for i in range(200)) + "."
    windows, _ = episode_windows(ep, tokenizer, max_tokens=160)
    prompt = tokenizer.encode(ep.prompt)
    last = windows[-1]
    assert last["input_ids"][:len(prompt)] == prompt
    step1 = tokenizer.encode("".join(t for _, t in step_pieces(ep.steps[1])))
    after_prompt = last["input_ids"][len(prompt):]
    # the window of step 3 starts with the head of step 2 (no loss on it), then step 3 itself
    assert step1[:8] == after_prompt[:8]
    assert sum(last["reason_mask"][:len(prompt) + 8]) == 0
    # and it is what the agent would see at play with the same room
    room = len(last["input_ids"]) - len(prompt) - len(tokenizer.encode("".join(t for _, t in step_pieces(ep.steps[2]))))
    assert room > 0 and fit_context(prompt, [step1], len(prompt) + room) == last["input_ids"][:len(prompt) + room]


def test_rejected_steps_as_context_carry_no_loss_and_stay_in_the_window(tokenizer):
    from sad.stages.segment import without_loss_on_rejected_steps

    ep = _episode(n_steps=3)
    ep.steps[1].valid = False
    ep.steps[1].observation = "Nothing happens."
    learnt = without_loss_on_rejected_steps(ep)
    assert [s.imitate for s in learnt.steps] == [True, False, True] and ep.steps[1].imitate  # the original is unchanged
    (full,), _ = episode_windows(ep, tokenizer, max_tokens=512)
    (ctx,), spans = episode_windows(learnt, tokenizer, max_tokens=512)
    assert ctx["input_ids"] == full["input_ids"]  # the rejected step is still seen
    assert sum(ctx["act_mask"]) < sum(full["act_mask"]) and sum(ctx["reason_mask"]) < sum(full["reason_mask"])
    assert len(spans) == 4  # reason + act of steps 0 and 2 only
