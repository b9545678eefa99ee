"""Rule-based segmentation: property tests (hypothesis) over the three built-in formats."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sad.markers import MARKER_SETS, MarkerSet, SegmentationError, generated_text, split_transcript

FORMATS = sorted(MARKER_SETS)


def field_text(ms: MarkerSet, observation: bool = False):
    """One-line text that cannot be read as a marker of ``ms``."""
    chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\n")
    nested = re.compile(ms.nested)

    def ok(t: str) -> bool:
        if not t.strip() or nested.search(" " + t):
            return False
        # an unmarked observation must not look like a marked line
        return not any(re.match(rx, t.lstrip()) for rx in (ms.reason, ms.act, ms.observation or "(?!)"))

    return st.text(chars, min_size=1, max_size=30).filter(ok)


@st.composite
def trajectories(draw, ms: MarkerSet):
    prompt_lines = draw(st.lists(field_text(ms), min_size=1, max_size=3))
    n = draw(st.integers(1, 6))
    steps = []
    for _ in range(n):
        thought = draw(st.one_of(st.none(), field_text(ms)))
        steps.append((thought, draw(field_text(ms)), draw(field_text(ms, observation=True))))
    return "\n".join(prompt_lines) + "\n", steps


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_well_formed_trajectories_round_trip(fmt, data):
    ms = MARKER_SETS[fmt]
    prompt, steps = data.draw(trajectories(ms))
    text = ms.render(prompt, steps)
    pieces = split_transcript(text, ms, "ep-prop")
    # the pieces tile the text: start at 0, contiguous, end at its end
    assert pieces[0].start == 0 and pieces[-1].end == len(text)
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))
    assert pieces[0].kind == "prompt" and text[: pieces[0].end] == prompt
    # the generated characters are exactly the rendered thought and action lines, in order
    expected = []
    for n, (thought, action, _) in enumerate(steps, start=1):
        num = f" {n}" if ms.numbered else ""
        if fmt == "alfworld":
            expected += ([f"> think: {thought}\n"] if thought is not None else []) + [f"> {action}\n"]
        else:
            expected += ([f"Thought{num}: {thought}\n"] if thought is not None else []) + [f"Action{num}: {action}\n"]
    assert [text[p.start:p.end] for p in pieces if p.kind in ("reason", "act")] == expected
    assert generated_text(text, pieces) == "".join(expected)
    assert [p.kind for p in pieces if p.kind != "observation"].count("act") == len(steps)


def _break(fmt: str, text: str, how: str) -> str:
    lines = re.findall(r"[^\n]*\n|[^\n]+$", text)  # only "\n" ends a line (str.splitlines also splits on \r, \x1e, ...)
    ms = MARKER_SETS[fmt]
    if how == "empty_thought":
        i = next(i for i, line in enumerate(lines) if re.match(ms.reason, line))
        lines[i] = re.match(ms.reason, lines[i]).group(0) + "  \n"
    elif how == "nested":
        i = next(i for i, line in enumerate(lines) if re.match(ms.reason, line))
        inner = {"react": "Action:", "hotpotqa": "Action 1:", "alfworld": "> think:"}[fmt]
        lines[i] = lines[i].rstrip("\n") + f" {inner} go\n"
    elif how == "missing_action":
        i = next(i for i, line in enumerate(lines) if re.match(ms.reason, line))
        del lines[i + 1]
    elif how == "renumbered":
        i = next(i for i, line in enumerate(lines) if re.match(ms.reason, line))
        lines[i] = re.sub(r"\d+", "7", lines[i], count=1)
    elif how == "no_markers":
        lines = ["just some text\n", "and more\n"]
    return "".join(lines)


BREAKS = {
    "react": ["empty_thought", "nested", "missing_action", "no_markers"],
    "hotpotqa": ["empty_thought", "nested", "missing_action", "renumbered", "no_markers"],
    "alfworld": ["empty_thought", "nested", "no_markers"],
}
MESSAGES = {"empty_thought": "empty REASON", "nested": "nested marker", "missing_action": "ACT line",
            "renumbered": "out of order", "no_markers": "no REASON or ACT line"}


@pytest.mark.parametrize("fmt,how", [(f, h) for f in FORMATS for h in BREAKS[f]])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_malformed_trajectories_are_rejected_with_the_rule(fmt, how, data):
    ms = MARKER_SETS[fmt]
    prompt, steps = data.draw(trajectories(ms))
    steps[0] = ("first thought", steps[0][1], steps[0][2])  # every break needs a thought line to break
    bad = _break(fmt, ms.render(prompt, steps), how)
    with pytest.raises(SegmentationError, match=r"episode ep-bad: .*" + re.escape(MESSAGES[how])):
        split_transcript(bad, ms, "ep-bad")


def test_hotpotqa_numbered_transcript_by_hand():
    text = ("Question: Which magazine was started first?\n"
            "Thought 1: I need to search Arthur's Magazine.\nAction 1: Search[Arthur's Magazine]\n"
            "Observation 1: Arthur's Magazine (1844-1846) was an American literary periodical.\n"
            "Thought 2: It started in 1844.\nAction 2: Finish[Arthur's Magazine]\n")
    pieces = split_transcript(text, "hotpotqa", "hp-1")
    assert [p.kind for p in pieces] == ["prompt", "reason", "act", "observation", "reason", "act"]
    assert text[pieces[2].start:pieces[2].end] == "Action 1: Search[Arthur's Magazine]\n"
    assert [p.step for p in pieces] == [-1, 0, 0, 0, 1, 1]
    repeated = text.replace("Thought 2: It started in 1844.\nAction 2:", "Action 1: Search[Arthur's Magazine]\n"
                            "Observation 1: The same page.\nThought 2: It started in 1844.\nAction 2:")
    with pytest.raises(SegmentationError, match="step number 1 out of order"):  # a new step reusing number 1
        split_transcript(repeated, "hotpotqa", "hp-2")


def test_alfworld_think_lines_are_reason_and_commands_are_act():
    text = ("You are in the middle of a room.\nYour task is to: put a clean mug in coffeemachine.\n"
            "> think: First I need to find a mug.\nOK.\n> go to countertop 1\nOn the countertop 1, you see a mug 1.\n"
            "> take mug 1 from countertop 1\nYou pick up the mug 1 from the countertop 1.\n")
    pieces = split_transcript(text, "alfworld", "alf-1")
    assert [p.kind for p in pieces] == ["prompt", "reason", "observation", "act", "observation", "act", "observation"]
    assert [p.step for p in pieces] == [-1, 0, 0, 1, 1, 2, 2]


def test_custom_marker_set():
    ms = MarkerSet("mine", reason=r"THINK>", act=r"DO>", observation=r"ENV>", nested=r"(?:^|\s)(?:THINK|DO|ENV)>")
    text = "Task: x\nTHINK> plan\nDO> act[1]\nENV> done\n"
    assert [p.kind for p in split_transcript(text, ms, "c-1")] == ["prompt", "reason", "act", "observation"]


def test_unknown_marker_set_names_the_built_ins():
    with pytest.raises(SegmentationError, match="alfworld.*hotpotqa.*react"):
        split_transcript("Thought: x\n", "nope")
