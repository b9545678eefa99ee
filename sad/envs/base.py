"""The one interface every benchmark environment implements.

An environment plays one task at a time: ``reset(task)`` returns the first observation (the
task prompt), ``step(action)`` returns the next. Invalid actions never raise: they get the
benchmark's own response and ``Observation.valid`` is False, so the caller can count them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


def content_split(key: str, shares: Mapping[str, float], rest: str = "train") -> str:
    """The split a task belongs to from a hash of ``key`` (its content) alone: ``shares`` maps held-out
    splits to their share of all keys, the rest go to ``rest``. The same content lands in the same split
    whatever the split sizes, so no profile's train tasks are another profile's dev or test tasks."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8
    edge = 0.0
    for split, share in shares.items():
        edge += share
        if bucket < edge:
            return split
    return rest


@dataclass(frozen=True)
class Task:
    """One playable task, as listed in a split's manifest."""

    env: str
    split: str
    task_id: str
    path: str  # folder holding the task's files, relative to <tasks root>/<env>
    task_type: str
    description: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "env": self.env,
            "split": self.split,
            "task_id": self.task_id,
            "path": self.path,
            "task_type": self.task_type,
            "description": self.description,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Task:
        return cls(
            env=d["env"],
            split=d["split"],
            task_id=d["task_id"],
            path=d["path"],
            task_type=d["task_type"],
            description=d["description"],
            meta=dict(d.get("meta", {})),
        )


class UnsafePathError(ValueError):
    """A path read from a data file points outside the folder it must stay in."""


def contained_path(base: Path, relative: str, what: str) -> Path:
    """``base / relative``, resolved; raises :class:`UnsafePathError` naming ``what`` if it leaves ``base``
    (an absolute path, ``..`` segments, or a symlink pointing elsewhere)."""
    root = Path(base).resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise UnsafePathError(f"{what}: path {relative!r} escapes its folder {root} (paths in data files must stay inside it)")
    return target


def task_location(tasks_root: Path, task: Task) -> Path:
    """Where a task's files live: ``<tasks_root>/<env>/<task.path>``, never outside ``<tasks_root>/<env>``."""
    return contained_path(Path(tasks_root) / task.env, task.path, f"task {task.task_id}")


@dataclass
class Observation:
    """What the agent sees after reset or a step."""

    text: str
    done: bool = False
    success: bool = False
    reward: float = 0.0
    valid: bool = True  # False when the last action was not a legal command
    admissible: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Environment(Protocol):
    """A text environment that plays tasks of one benchmark."""

    name: str
    max_steps: int

    def reset(self, task: Task, tasks_root: Path) -> Observation: ...

    def step(self, action: str) -> Observation: ...


class ExpertGaveUp(Exception):
    """An expert ends a hopeless episode early (every way it knows has failed): the episode stops,
    unsuccessful, with this reason in its record, instead of repeating a failed action to the step cap."""


class Expert(Protocol):
    """A solver that writes a ReAct thought and an action for the current state (or raises
    :class:`ExpertGaveUp`)."""

    def reset(self, task: Task, first: Observation) -> None: ...

    def act(self, obs: Observation) -> tuple[str, str]: ...
