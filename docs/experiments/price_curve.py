"""WebShop price verdicts along far more WebShop imitation: a learning curve (issue #15 probe).

Not part of the library. Run it where ``price_verdicts.py`` runs (a ``sad profile teacher`` folder in which
``dvc repro tokenizer`` has run):

    python docs/experiments/price_curve.py --demo-tasks 1200 --steps 400 --batch 8 --at 0,100,200,300

It continues the shipped teacher's adapter (``assets/teacher``, same rank) on the expert demos of ``--demo-tasks``
WebShop train tasks (lr ``--lr``, cosine, 5% warmup, the profile's ``teacher.train.precision``), and scores
``price_verdicts.real_verdicts`` (the 146 price checks of the WebShop test tasks' expert episodes) and the 150
drills under bf16 autocast at each step of ``--at`` and after the last step: one JSON line per evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import price_verdicts as pv  # noqa: E402

from sad.config import LoraParams, load_params  # noqa: E402
from sad.environments import load_tasks  # noqa: E402
from sad.pretrained import continue_lora  # noqa: E402
from sad.rollout import play_expert  # noqa: E402
from sad.segment import segment_episodes  # noqa: E402
from sad.stages.teacher import load_source_model  # noqa: E402
from sad.tokenizer import load_tokenizer  # noqa: E402
from sad.training import IMITATION, train_lm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo-tasks", type=int, default=1200, help="WebShop train tasks whose expert demos train it")
    ap.add_argument("--drills", type=int, default=0, help="short price drills mixed into the training windows")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--at", default="0,100,200,300", help="steps after which the verdicts are scored")
    ap.add_argument("--save", default="", help="folder for the trained adapter, with --full the whole model (none: not saved)")
    ap.add_argument("--adapter", default="assets/teacher", help="the shipped adapter it continues")
    ap.add_argument("--full", action="store_true",
                    help="merge the adapter into the base and train every weight (not only a rank-16 adapter)")
    args = ap.parse_args()
    at = {int(x) for x in args.at.split(",")}
    started = time.time()
    p, root = load_params("params.yaml"), Path("data/tasks")
    tok = load_tokenizer(Path("models/tokenizer"))
    model = continue_lora(load_source_model(p, tok), args.adapter, p.teacher.source,
                          LoraParams(**p.teacher.lora.model_dump()))
    if args.full:
        model = model.merge_and_unload()
        model.requires_grad_(True)
    print(json.dumps({"trainable_parameters": sum(t.numel() for t in model.parameters() if t.requires_grad)}),
          flush=True)

    def evaluate(step: int) -> None:
        was_training = model.training
        model.eval()
        t = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            verdicts = pv.real_verdicts(model, tok, p, root)
            drills = pv.drill_accuracy(model, tok)
        print(json.dumps({"step": step, **verdicts, "drill_accuracy": round(drills, 4), "eval_s": round(time.time() - t),
                          "elapsed_s": round(time.time() - started)}), flush=True)
        model.train(was_training)

    if 0 in at:
        evaluate(0)
    parts = [pv.drill_windows(tok, args.drills)] if args.drills else []
    demos = [e for e in play_expert(load_tasks(root, "webshop", "train")[: args.demo_tasks], root,
                                    perturb=0.15, seed=0, repeat_share=0.5) if e.success]
    parts.append(segment_episodes(demos, tok, p.context.max_tokens, p.context.history_steps, what="demos").windows)
    windows = pd.concat(parts, ignore_index=True)
    print(json.dumps({"windows": len(windows), "demo_episodes": len(demos), "tokens": int(windows["n_tokens"].sum())}),
          flush=True)
    train = p.teacher.train.model_copy(update={"epochs": args.steps * args.batch / len(windows), "batch_size": args.batch,
                                               "lr": args.lr, "warmup_ratio": 0.05, "seed": 2, "checkpoint_every": 0,
                                               "dev_fraction": 0.0})
    scored: set[int] = set()

    def on_log(step: int, record: dict) -> None:  # step: 0-based index of the update just made, every 10th
        if step in at and step > 0 and step not in scored and "loss" in record:
            scored.add(step)
            evaluate(step)

    train_lm(model, windows, IMITATION, train, tok.pad_token_id, progress=True, desc="verdicts", on_log=on_log)
    evaluate(args.steps)
    if args.save:
        model.save_pretrained(args.save)


if __name__ == "__main__":
    main()
