"""A child process for the fault tests: runs real pipeline work so the parent can SIGKILL it.

    python tests/fault_worker.py train <workdir> <checkpoint_dir> <out_dir> [seconds_per_step]
    python tests/fault_worker.py stage <project_dir> <stage> [name=value ...]   # e.g. method=sft
    python tests/fault_worker.py write <jsonl_path> <rows>      # blocks half-way until killed

Each mode prints ``READY`` once its inputs are loaded, just before the work starts.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STUDENT = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}
TEACHER = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


def ready() -> None:
    print("READY", flush=True)


def train(workdir: Path, checkpoint: Path, out: Path, seconds_per_step: float = 0.0) -> None:
    """The SAD objective with an online teacher, checkpoints every 2 steps; the final weights go to ``out``."""
    import pandas as pd
    import torch

    from sad.config import ArchParams, MethodParams, TrainParams
    from sad.modeling import build_llama, save_model
    from sad.tokenizer import load_tokenizer
    from sad.training import train_lm

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(workdir / "tokenizer")
    windows = pd.read_parquet(workdir / "windows.parquet")
    teacher = build_llama(ArchParams(**TEACHER), tokenizer, 512, seed=1)
    student = build_llama(ArchParams(**STUDENT), tokenizer, 512, seed=2)
    params = TrainParams(epochs=2, batch_size=4, lr=1e-2, seed=5, checkpoint_every=2, dev_fraction=0)

    def slow(step: int, record: dict) -> None:
        time.sleep(seconds_per_step)

    ready()
    result = train_lm(student, windows, MethodParams(loss="sad", lambda_reason=0.5), params, tokenizer.pad_token_id,
                      teacher=teacher, checkpoint_dir=checkpoint, fingerprint="fault-test", on_log=slow, log_every=1,
                      progress=False)
    save_model(student, tokenizer, out, {"resumed_from": result.resumed_from, "steps": result.steps})
    print(f"DONE resumed_from={result.resumed_from} steps={result.steps}", flush=True)


def stage(project: Path, name: str, *options: str) -> None:
    """One stage function of sad.stages on the project's params.yaml (what ``sad stage`` runs inside its flow),
    with keyword arguments given as ``name=value``."""
    import inspect

    from sad import stages
    from sad.config import load_params

    os.chdir(project)
    p = load_params("params.yaml")
    run = getattr(stages, f"run_{name}")
    kwargs = {"progress": False} if "progress" in inspect.signature(run).parameters else {}
    kwargs.update(option.split("=", 1) for option in options)
    ready()
    print("DONE", run(p, **kwargs), flush=True)


def write(path: Path, rows: int) -> None:
    """Write ``rows`` JSON lines atomically, stalling after half of them (the parent kills us there)."""
    from sad.io import write_jsonl_atomic

    def slow_rows():
        for i in range(rows):
            if i == rows // 2:
                ready()
                time.sleep(600)
            yield {"row": i}

    write_jsonl_atomic(path, slow_rows())


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "train":
        train(Path(args[0]), Path(args[1]), Path(args[2]), float(args[3]) if len(args) > 3 else 0.0)
    elif mode == "stage":
        stage(Path(args[0]), args[1], *args[2:])
    elif mode == "write":
        write(Path(args[0]), int(args[1]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
