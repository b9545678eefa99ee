"""Resuming a multi-seed stage: each finished seed is kept until the stage's output is written whole, and
reused by a rerun only with the same parameters, code, inputs and machine choices."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from sad.config import Params
from sad.io import atomic_dir, write_json_atomic
from sad.stages.layout import checkpoint_dir, fingerprint


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

    from sad.modeling import cpu_bf16_is_fast, cpu_has_native_bf16

    return {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.cuda.is_available(),
            "cpu_bf16": cpu_has_native_bf16(), "cpu_bf16_fast": cpu_bf16_is_fast()}


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
