"""Rule-based segmentation of ReAct transcripts into prompt / REASON / ACT / observation pieces.

A :class:`MarkerSet` says how a format marks each kind of line. Built-in sets:

* ``react`` - ``Thought: …`` / ``Action: …`` / ``Observation: …`` (the pipeline's own format);
* ``hotpotqa`` - ReAct's numbered ``Thought N: …`` / ``Action N: …`` / ``Observation N: …``;
* ``alfworld`` - ReAct's ALFWorld format: ``> think: …`` lines are REASON, other ``> …``
  lines are ACT (commands), and the unmarked lines after them are observations.

Other formats are a :class:`MarkerSet` built from regexes (``segment.markers`` in params).

:func:`split_transcript` assigns every character of a transcript to exactly one piece: the
text before the first marker is the prompt; a marker line starts a REASON or ACT piece that
ends with its line; everything the environment wrote is observation. Teacher-generated
characters are exactly those of REASON and ACT pieces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

PieceKind = Literal["prompt", "reason", "act", "observation"]


class SegmentationError(ValueError):
    """A transcript cannot be cut into spans (the message names the episode and the rule)."""


@dataclass(frozen=True)
class MarkerSet:
    """Line markers of one transcript format (regexes matched at the start of a line).

    ``observation=None`` means observations carry no marker: any unmarked line after a
    generated one is observation. ``numbered`` formats capture the step number in group 1 of
    each marker and must count 1, 2, 3, … with matching numbers. ``act_after_reason``
    requires an ACT line right after every REASON line (ReAct's Thought → Action).
    """

    name: str
    reason: str
    act: str
    observation: str | None
    numbered: bool = False
    act_after_reason: bool = True
    nested: str | None = None  # a regex that must not occur inside a generated line (a second marker)

    def compiled(self) -> tuple[re.Pattern, re.Pattern, re.Pattern | None]:
        return re.compile(self.reason), re.compile(self.act), re.compile(self.observation) if self.observation else None

    def render(self, prompt: str, steps: list[tuple[str | None, str, str]]) -> str:
        """Text of a transcript in this format; steps are (thought or None, action, observation)."""
        out = [prompt if prompt.endswith("\n") or not prompt else prompt + "\n"]
        for n, (thought, action, observation) in enumerate(steps, start=1):
            if self.name == "alfworld":
                if thought is not None:
                    out.append(f"> think: {thought}\nOK.\n")
                out.append(f"> {action}\n{observation}\n")
                continue
            num = f" {n}" if self.numbered else ""
            if thought is not None:
                out.append(f"Thought{num}: {thought}\n")
            out.append(f"Action{num}: {action}\nObservation{num}: {observation}\n")
        return "".join(out)


MARKER_SETS: dict[str, MarkerSet] = {
    "react": MarkerSet("react", reason=r"Thought:", act=r"Action:", observation=r"Observation:",
                       nested=r"(?:^|\s)(?:Thought|Action|Observation):"),
    "hotpotqa": MarkerSet("hotpotqa", reason=r"Thought (\d+):", act=r"Action (\d+):", observation=r"Observation (\d+):",
                          numbered=True, nested=r"(?:^|\s)(?:Thought|Action|Observation) \d+:"),
    "alfworld": MarkerSet("alfworld", reason=r"> think:", act=r"> (?!think:)", observation=None, act_after_reason=False,
                          nested=r"(?:^|\s)> think:"),
}


@dataclass(frozen=True)
class Piece:
    kind: PieceKind
    start: int  # character offsets into the transcript, end exclusive
    end: int
    step: int  # 0-based step a generated piece or observation belongs to; -1 for the prompt


def marker_set(spec: str | MarkerSet) -> MarkerSet:
    if isinstance(spec, MarkerSet):
        return spec
    if spec not in MARKER_SETS:
        raise SegmentationError(f"unknown marker set {spec!r}; built-in sets: {sorted(MARKER_SETS)}")
    return MARKER_SETS[spec]


def _lines(text: str) -> list[tuple[int, int]]:
    """(start, end) of each line, the newline included in the line."""
    return [(m.start(), m.end()) for m in re.finditer(r"[^\n]*\n|[^\n]+$", text)]


def split_transcript(text: str, markers: str | MarkerSet = "react", episode_id: str = "?",
                     allow_empty: bool = False) -> list[Piece]:
    """Cut ``text`` into pieces that cover it exactly, in order.

    Rejects (SegmentationError naming the episode, line and rule): no generated line at all,
    a REASON or ACT line with nothing after its marker (unless ``allow_empty``), a marker of
    this set inside a generated line (nested markers), a REASON line not followed by its ACT
    line where the format needs one, an observation before any generated line, and broken
    step numbering.
    """
    ms = marker_set(markers)
    reason_re, act_re, obs_re = ms.compiled()
    nested_re = re.compile(ms.nested) if ms.nested else None

    def fail(line_no: int, why: str) -> None:
        raise SegmentationError(f"episode {episode_id}: line {line_no + 1}: {why} ({ms.name} markers)")

    pieces: list[Piece] = []
    step = -1
    pending_reason = False  # a REASON line waits for its ACT line
    numbers: list[str] = []
    for line_no, (start, end) in enumerate(_lines(text)):
        line = text[start:end]
        kind: PieceKind | None = None
        match = None
        for k, rx in (("reason", reason_re), ("act", act_re)):
            match = rx.match(line)
            if match:
                kind = k
                break
        if kind is None and obs_re is not None:
            match = obs_re.match(line)
            if match:
                kind = "observation"
        if kind is None:
            if not pieces:
                continue  # still the prompt
            if obs_re is not None and pieces[-1].kind != "prompt":
                # an unmarked line continues the previous piece (multi-line thought or observation)
                last = pieces[-1]
                if last.kind in ("reason", "act"):
                    fail(line_no, f"a {last.kind.upper()} piece must be one line; unmarked line follows it")
                pieces[-1] = Piece(last.kind, last.start, end, last.step)
                continue
            if obs_re is None and pieces[-1].kind in ("reason", "act", "observation"):
                if pending_reason and ms.act_after_reason:
                    fail(line_no, "a REASON line must be followed by its ACT line")
                last = pieces[-1]
                if last.kind == "observation":
                    pieces[-1] = Piece("observation", last.start, end, last.step)
                else:
                    pieces.append(Piece("observation", start, end, step))
                pending_reason = False
                continue
            fail(line_no, "unexpected unmarked line")
        if not pieces:
            if start > 0:
                pieces.append(Piece("prompt", 0, start, -1))
            elif kind == "observation":
                fail(line_no, "an observation before any REASON or ACT line")
        if kind == "observation":
            if pending_reason and ms.act_after_reason:
                fail(line_no, "a REASON line must be followed by its ACT line before the observation")
            if not pieces or pieces[-1].kind not in ("act", "reason"):
                fail(line_no, "an observation must follow an ACT line")
            if ms.numbered and numbers and match.group(1) != numbers[-1]:
                fail(line_no, f"observation number {match.group(1)} does not match step {numbers[-1]}")
            pieces.append(Piece("observation", start, end, step))
            continue
        content = line[match.end():].strip()
        if not content and not allow_empty:
            fail(line_no, f"empty {kind.upper()} (nothing after the marker)")
        inner = nested_re.search(line[match.end():]) if nested_re else None
        if inner:
            fail(line_no, f"nested marker {inner.group(0).strip()!r} inside a {kind.upper()} line")
        starts_step = kind == "reason" or not pending_reason  # an ACT line after an observation is a new step
        if kind == "reason":
            if pending_reason and ms.act_after_reason:
                fail(line_no, "two REASON lines in a row: the first has no ACT line")
            step += 1
            pending_reason = True
        else:
            if not pending_reason:
                step += 1
            pending_reason = False
        if ms.numbered:
            number = match.group(1)
            if starts_step or not numbers or numbers[-1] != number:
                expected = str(len(numbers) + 1)
                if number != expected:
                    fail(line_no, f"step number {number} out of order (expected {expected})")
                numbers.append(number)
        pieces.append(Piece(kind, start, end, step))
    if not any(p.kind in ("reason", "act") for p in pieces):
        raise SegmentationError(f"episode {episode_id}: no REASON or ACT line found ({ms.name} markers: "
                                f"reason {ms.reason!r}, act {ms.act!r})")
    if pending_reason and ms.act_after_reason:
        raise SegmentationError(f"episode {episode_id}: the transcript ends with a REASON line and no ACT line "
                                f"(unclosed step, {ms.name} markers)")
    return pieces


def generated_text(text: str, pieces: list[Piece]) -> str:
    """The teacher-generated characters (REASON and ACT pieces), in order."""
    return "".join(text[p.start:p.end] for p in pieces if p.kind in ("reason", "act"))
