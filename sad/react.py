"""The ReAct transcript: episodes, how they render to text, and how model output parses.

A transcript is a list of pieces, each of one kind:

* ``prompt`` - the environment tag and the first observation (context, no loss);
* ``reason`` - ``"Thought: …\\n"`` written by the agent (a [REASON] span);
* ``act`` - ``"Action: …\\n"`` written by the agent (an [ACT] span);
* ``observation`` - ``"Observation: …\\n"`` from the environment (context, no loss).

Every piece ends with a newline, and byte-level BPE never merges across a newline, so the
pieces' character boundaries are always token boundaries.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

PieceKind = Literal["prompt", "reason", "act", "observation"]
GENERATED_KINDS: tuple[str, ...] = ("reason", "act")

THOUGHT = "Thought:"
ACTION = "Action:"
OBSERVATION = "Observation:"


@dataclass
class Step:
    thought: str
    action: str
    observation: str
    valid: bool = True
    generated_tokens: int = 0
    latency_s: float = 0.0
    imitate: bool = True  # False for injected mistakes: context for learners, never a target
    repaired_from: str | None = None  # action_choice repair: the generated action, not a listed one; ``action`` was sent

    @property
    def repaired(self) -> bool:
        """Whether the agent's own action was not a listed valid one and a listed one was sent instead."""
        return self.repaired_from is not None


@dataclass
class Episode:
    episode_id: str
    env: str
    split: str
    task_id: str
    task_type: str
    agent: str
    prompt: str
    steps: list[Step] = field(default_factory=list)
    success: bool = False
    reward: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for step in d["steps"]:  # only repaired steps carry the key: other episodes' files are as before
            if step["repaired_from"] is None:
                del step["repaired_from"]
        d["n_steps"] = self.n_steps
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Episode:
        steps = [Step(**s) for s in d.get("steps", [])]
        keys = {"episode_id", "env", "split", "task_id", "task_type", "agent", "prompt", "success", "reward", "meta"}
        return cls(steps=steps, **{k: d[k] for k in keys if k in d})


def one_line(text: str) -> str:
    """Collapse whitespace so a field can never break the line structure of a transcript."""
    return " ".join(str(text).split())


def prompt_piece(env: str, first_observation: str) -> str:
    return f"[{env}] {one_line(first_observation)}\n"


def reason_piece(thought: str) -> str:
    return f"{THOUGHT} {one_line(thought)}\n"


def act_piece(action: str) -> str:
    return f"{ACTION} {one_line(action)}\n"


def observation_piece(observation: str) -> str:
    return f"{OBSERVATION} {one_line(observation)}\n"


def step_pieces(step: Step) -> list[tuple[PieceKind, str]]:
    return [("reason", reason_piece(step.thought)), ("act", act_piece(step.action)),
            ("observation", observation_piece(step.observation))]


def episode_pieces(episode: Episode) -> list[tuple[PieceKind, str]]:
    """The whole transcript as (kind, text) pieces, in order."""
    pieces: list[tuple[PieceKind, str]] = [("prompt", episode.prompt)]
    for step in episode.steps:
        pieces.extend(step_pieces(step))
    return pieces


def episode_text(episode: Episode) -> str:
    return "".join(text for _, text in episode_pieces(episode))


@dataclass(frozen=True)
class ParsedOutput:
    thought: str
    action: str
    has_action: bool


_ACTION_LINE = re.compile(rf"(?:^|\n){re.escape(ACTION)}[ \t]*([^\n]*)")
_THOUGHT_TEXT = re.compile(rf"{re.escape(THOUGHT)}(.*?)(?=\n{re.escape(ACTION)}|$)", re.S)
_INLINE_MARKER = re.compile(r"(?:^|\s)(?:Thought|Action|Observation):")


def _cut_at_marker(text: str) -> str:
    """Drop what follows a marker written inside a field (``Thought: a Action: b`` keeps ``a``),
    so a stored field never holds a second marker and transcripts always segment cleanly."""
    m = _INLINE_MARKER.search(text)
    return text[: m.start()] if m else text


def parse_output(text: str) -> ParsedOutput:
    """Parse one generated ``Thought: …\\nAction: …\\n`` block.

    Output with no ``Action:`` line gives ``has_action=False`` and an empty action: the agent
    loop sends it anyway and the environment counts it as invalid.
    """
    m = _ACTION_LINE.search(text)
    action = one_line(_cut_at_marker(m.group(1))) if m else ""
    t = _THOUGHT_TEXT.search(text[: m.start() + 1] if m else text)
    thought = one_line(_cut_at_marker(t.group(1))) if t else ""
    return ParsedOutput(thought=thought, action=action, has_action=bool(m and action))
