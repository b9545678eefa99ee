"""Stage ``scale@<size>``: success against student size (one extra student per size)."""

from __future__ import annotations

from typing import Any

from sad.config import Params
from sad.io import write_json_atomic
from sad.stages.distill import _train_student, distill_inputs
from sad.stages.layout import scaling_dir, tasks_root


def run_scale(p: Params, size: str, progress: bool = True) -> dict[str, Any]:
    """One point of the scaling sweep: ``distill.scaling.method`` at student size ``size``
    (first seed), evaluated on the test split."""
    from sad.evaluation import evaluate_agent, load_agent

    if size not in p.distill.scaling.sizes:
        raise ValueError(f"unknown size {size!r}; distill.scaling.sizes has {sorted(p.distill.scaling.sizes)}")
    method, seed = p.distill.scaling.method, p.distill.seeds[0]
    inputs = distill_inputs(p, method)
    metrics, _ = _train_student(p, inputs, p.distill.scaling.sizes[size], seed, scaling_dir(p, size),
                                f"{method}@{size}", progress=progress)
    test_only = p.model_copy(update={"evaluate": p.evaluate.model_copy(update={"splits": ["test"]})})
    res, _ = evaluate_agent(scaling_dir(p, size), method, test_only, tasks_root(p), progress=progress,
                            agent=load_agent(scaling_dir(p, size), p))
    out = {"size": size, "method": method, "seed": seed, "arch": p.distill.scaling.sizes[size].model_dump(),
           "parameters": metrics["parameters"], "train": metrics, "splits": res["splits"]}
    write_json_atomic(p.path("metrics", "scaling", f"{size}.json"), out)
    return out
