"""Where every stage reads and writes (the data layout under ``project.*_dir``), and small helpers
shared by the stages (fingerprints, file hashes, reading episode files).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from sad.config import Params
from sad.io import atomic_dir, read_jsonl_numbered, write_json_atomic
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
    outside every DVC-tracked folder)."""
    return Path(".checkpoints", *model_dir.parts)


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


def code_hash() -> str:
    """sha256[:16] over the ``sad`` package's Python source: a result kept for resuming is only reused by the
    code that wrote it."""
    root, h = Path(__file__).resolve().parents[1], hashlib.sha256()
    for path in sorted(q for q in root.rglob("*.py") if q.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def machine_fingerprint() -> dict[str, Any]:
    """What ``precision: auto`` and the libraries resolve differently from one machine to another."""
    import torch
    import transformers

    from sad.modeling import cpu_has_native_bf16

    return {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.cuda.is_available(),
            "cpu_bf16": cpu_has_native_bf16()}


def inputs_fingerprint(p: Params, *paths: Path) -> str:
    """A fingerprint of a stage's inputs: every parameter, the library's code, the machine's resolved
    precision and library versions, and the files under ``paths`` by name, size and modification time (a
    stage output is rewritten whenever it changes; nothing is read)."""
    files = []
    for root in map(Path, paths):
        found = sorted(q for q in root.rglob("*") if q.is_file()) if root.is_dir() else [root] if root.is_file() else []
        files += [(str(q), q.stat().st_size, q.stat().st_mtime_ns) for q in found]
    return fingerprint([str(q) for q in paths], files, p.model_dump(mode="json"), code_hash(), machine_fingerprint())


class FinishedSeeds:
    """The seeds a multi-seed stage has finished, kept under ``.checkpoints`` until the stage's output is
    written whole: a stage stopped during seed k resumes at seed k, not at the first one.

    Each seed keeps a folder (its part of the output) and a JSON record, valid only for the stage's
    ``inputs`` (a fingerprint of its input files, every parameter and :func:`code_hash`) and the seed's own
    ``key`` they were written with; anything else means: do the seed again.
    """

    def __init__(self, output: Path, inputs: str):
        self.root = checkpoint_dir(Path(output)) / "finished-seeds"
        self.inputs = inputs

    @classmethod
    def for_stage(cls, output: Path, p: Params, *paths: Path) -> FinishedSeeds | None:
        """Kept seeds for ``output`` with :func:`inputs_fingerprint` over ``paths``; None in a multi-process
        (``accelerate launch``) run, whose ranks would copy and clear them concurrently."""
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return None
        return cls(output, inputs_fingerprint(p, *paths))

    def load(self, seed: int | str, key: str, into: Path) -> dict[str, Any] | None:
        """The seed's record, its folder copied to ``into``; None if it was not finished with these inputs."""
        folder = self.root / f"seed{seed}"
        try:
            saved = json.loads((folder / "record.json").read_text())
        except (OSError, ValueError):
            return None
        if saved.get("key") != fingerprint(self.inputs, key) or not (folder / "files").is_dir():
            return None
        shutil.copytree(folder / "files", into, dirs_exist_ok=True)
        return saved["record"]

    def save(self, seed: int | str, key: str, files: Path, record: dict[str, Any]) -> None:
        """Keep the seed's finished folder and record (written whole, or not at all)."""
        with atomic_dir(self.root / f"seed{seed}") as tmp:
            shutil.copytree(files, tmp / "files")
            write_json_atomic(tmp / "record.json", {"key": fingerprint(self.inputs, key), "record": record})

    def clear(self) -> None:
        """Forget every kept seed (the stage's output now holds them), and the folders left empty."""
        shutil.rmtree(self.root, ignore_errors=True)
        for parent in self.root.parents:
            if len(parent.parts) < 2 or parent.parts[0] != ".checkpoints":  # only the folders below .checkpoints
                break
            try:
                parent.rmdir()
            except OSError:  # not empty (another model's checkpoints) or gone
                break


def dev_demos_file(p: Params) -> Path:
    """The expert's episodes on the dev tasks (no injected mistakes): the held-out states of step accuracy."""
    return p.path("data", "demos", "dev.jsonl")


def dagger_dir(p: Params) -> Path:
    """Where a DAgger run keeps its phases until the teacher is written (beside the checkpoints)."""
    return checkpoint_dir(teacher_dir(p).with_name(teacher_dir(p).name + "-dagger"))


def candidate_file(p: Params) -> Path:
    return p.path("reports", "candidate.json")


def mean_over_seeds(per_seed: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The mean of every numeric metric over seeds ({seed: metrics} -> metrics)."""
    keys = {k for m in per_seed.values() for k, v in m.items() if isinstance(v, (int, float))}
    return {k: sum(m[k] for m in per_seed.values() if k in m) / len(per_seed) for k in sorted(keys)}


def load_eval_results(p: Params, agents: list[str]) -> dict[str, dict[str, Any]]:
    """Each agent's evaluation metrics (metrics/eval/<agent>.json)."""
    out = {}
    for agent in agents:
        path = eval_metrics_file(p, agent)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (run 'sad stage evaluate --agent {agent}' first)")
        out[agent] = json.loads(path.read_text())
    return out


def load_scaling_results(p: Params) -> dict[str, dict[str, Any]]:
    """Each scaling size's metrics (metrics/scaling/<size>.json)."""
    out = {}
    for size in p.distill.scaling.sizes:
        path = p.path("metrics", "scaling", f"{size}.json")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (run 'sad stage scale --size {size}' first)")
        out[size] = json.loads(path.read_text())
    return out
