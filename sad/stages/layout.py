"""Where every stage reads and writes (the data layout under ``project.*_dir``), and small helpers
shared by the stages (fingerprints, file hashes, reading episode files).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sad.config import Params
from sad.io import read_jsonl_numbered
from sad.react import Episode

STUDENT_AGENTS_DIR = "students"


def tasks_root(p: Params) -> Path:
    return p.path("data", "tasks")


def demos_file(p: Params) -> Path:
    return p.path("data", "demos", "demos.jsonl")


def tokenizer_dir(p: Params) -> Path:
    return p.path("models", "tokenizer")


def pretrained_dir(p: Params) -> Path:
    return p.path("models", "pretrained")


def teacher_dir(p: Params) -> Path:
    return p.path("models", "teacher")


def student_init_dir(p: Params) -> Path:
    """The student every method starts from (the teacher's cut, healed): the ``student_init`` stage's output."""
    return p.path("models", "student_init")


def rollouts_file(p: Params) -> Path:
    return p.path("data", "rollouts", "rollouts.jsonl")


def segments_dir(p: Params) -> Path:
    return p.path("data", "segments")


def teacher_logits_dir(p: Params) -> Path:
    return p.path("data", "teacher_logits")


def checkpoint_dir(model_dir: Path) -> Path:
    """Where training checkpoints of ``model_dir`` live until the model is written (git-ignored,
    outside every DVC-tracked folder), also for an absolute ``model_dir`` (its anchor is dropped)."""
    return Path(".checkpoints", *model_dir.parts[1 if model_dir.is_absolute() else 0:])


def fingerprint(*parts: Any) -> str:
    """A short hash of settings and data that a checkpoint must match to be resumed."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_main_process() -> bool:
    """False on the other ranks of a multi-process (accelerate launch) run: only rank 0 writes."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def student_dir(p: Params, method: str, seed: int | None = None) -> Path:
    """``models/students/<method>`` (all seeds) or ``…/<method>/seed<k>`` (one student)."""
    base = p.path("models", STUDENT_AGENTS_DIR, method)
    return base if seed is None else base / f"seed{seed}"


def scaling_dir(p: Params, size: str) -> Path:
    return p.path("models", "scaling", size)


def eval_metrics_file(p: Params, agent: str) -> Path:
    return p.path("metrics", "eval", f"{agent}.json")


def read_episodes(path: Path) -> list[Episode]:
    """Episodes of a JSON-lines file; a malformed row or a repeated episode id names the file and line."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: not found (run the stage that writes it first)")
    episodes: list[Episode] = []
    first_line: dict[str, int] = {}
    for lineno, row in read_jsonl_numbered(path):
        try:
            episode = Episode.from_dict(row)
        except (TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"{path}:{lineno}: not an episode ({exc})") from None
        if episode.episode_id in first_line:
            raise ValueError(f"{path}:{lineno}: duplicate episode id {episode.episode_id!r} "
                             f"(first on line {first_line[episode.episode_id]})")
        first_line[episode.episode_id] = lineno
        episodes.append(episode)
    if not episodes:
        raise ValueError(f"{path}: no episodes (the stage that wrote it produced none; check its log)")
    return episodes


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def dir_hash(folder: str | Path) -> str:
    """sha256[:16] over a folder's files: their relative names and contents, in name order."""
    root, h = Path(folder), hashlib.sha256()
    for path in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def dev_demos_file(p: Params) -> Path:
    """The expert's episodes on the dev tasks (no injected mistakes): the held-out states of step accuracy."""
    return p.path("data", "demos", "dev.jsonl")


def dagger_dir(p: Params) -> Path:
    """Where a DAgger run keeps its phases until the teacher is written (beside the checkpoints)."""
    return checkpoint_dir(teacher_dir(p).with_name(teacher_dir(p).name + "-dagger"))


def candidate_file(p: Params) -> Path:
    return p.path("reports", "candidate.json")


def mean_over_seeds(per_seed: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The mean of every numeric metric over the seeds that report it ({seed: metrics} -> metrics): a seed kept from
    an earlier run (a resumed stage) may lack a metric that a newer library adds."""
    values: dict[str, list[float]] = {}
    for metrics in per_seed.values():
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                values.setdefault(k, []).append(v)
    return {k: sum(values[k]) / len(values[k]) for k in sorted(values)}


def load_eval_results(p: Params, agents: list[str]) -> dict[str, dict[str, Any]]:
    """Each agent's evaluation metrics (metrics/eval/<agent>.json)."""
    out, files = {}, {}
    for agent in agents:
        path = files[agent] = eval_metrics_file(p, agent)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (run 'sad stage evaluate --agent {agent}' first)")
        try:
            out[agent] = json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}); rerun 'sad stage evaluate --agent {agent}'") from None
    check_same_tasks(out, files)
    return out


def check_same_tasks(results: dict[str, dict[str, Any]], files: dict[str, Path]) -> None:
    """Every agent's every seed played the same splits and environments, with as many tasks each, as the first
    agent's first seed (the paired comparisons and the table need it); else a ValueError naming the file."""
    def shape(seed_result: dict[str, Any]) -> dict[str, dict[str, int]]:
        return {split: {env: len(v) for env, v in r.get("per_task", {}).items()}
                for split, r in seed_result.get("splits", {}).items()}

    reference = None
    for agent, result in results.items():
        seeds = result.get("seeds") or {}
        if not seeds:
            raise ValueError(f"{files[agent]}: no seeds' results (rerun 'sad stage evaluate --agent {agent}')")
        for seed, seed_result in seeds.items():
            mine = shape(seed_result)
            if reference is None:
                reference = (agent, seed, mine)
            elif mine != reference[2]:
                raise ValueError(f"{files[agent]}: seed {seed} played {mine} (split: env: tasks), {reference[0]} seed "
                                 f"{reference[1]} {reference[2]}; evaluate every agent on the same tasks (rerun "
                                 f"'sad stage evaluate --agent {agent}' with the same params)")


def load_scaling_results(p: Params) -> dict[str, dict[str, Any]]:
    """Each scaling size's metrics (metrics/scaling/<size>.json)."""
    out = {}
    for size in p.distill.scaling.sizes:
        path = p.path("metrics", "scaling", f"{size}.json")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (run 'sad stage scale --size {size}' first)")
        out[size] = json.loads(path.read_text())
    return out
