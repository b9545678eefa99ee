"""Multi-process training without Prefect or MLflow, for ``accelerate launch``.

    torchrun --nproc_per_node 2 -m sad.launch distill --method sad                    # CPU, DDP over gloo
    accelerate launch --config_file configs/accelerate/ddp_gpu.yaml -m sad.launch distill --method sad
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m sad.launch teacher

Every process trains on its shard of each global batch; the main process writes the model
and the stage's metrics exactly where the DVC stage would (``dvc commit`` records them).
"""

from __future__ import annotations

import argparse
import json
import logging


def main(argv: list[str] | None = None) -> None:
    from accelerate import PartialState

    from sad.config import load_params
    from sad.stages import run_distill, run_teacher

    ap = argparse.ArgumentParser(prog="python -m sad.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["teacher", "distill"], help="which model to train")
    ap.add_argument("--method", help="distill: a key of distill.methods in params.yaml")
    ap.add_argument("--params", default="params.yaml", help="parameter file")
    args = ap.parse_args(argv)
    import torch

    state = PartialState(cpu=not torch.cuda.is_available())  # the same state train_lm's Accelerator will join
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING,
                        format=f"%(asctime)s rank{state.process_index} %(levelname)s %(name)s: %(message)s")
    p = load_params(args.params)
    if args.stage == "distill":
        if not args.method:
            ap.error("distill needs --method (one of: " + ", ".join(p.distill.methods) + ")")
        metrics = run_distill(p, args.method, progress=state.is_main_process)
    else:
        metrics = run_teacher(p, progress=state.is_main_process)
    if state.is_main_process:
        print(json.dumps({"processes": state.num_processes, **metrics}, indent=2, default=str))


if __name__ == "__main__":
    main()
