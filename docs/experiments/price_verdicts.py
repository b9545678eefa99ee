"""WebShop price verdicts of a LoRA teacher: can it tell that ``$97.93`` is over ``Under 40 dollars``?

The experiment behind docs/measurements.md "price verdicts" (issue #15). Not part of the library: run it from
a pipeline folder made with ``sad profile teacher`` (or teacher2) in which ``sad pipeline tokenizer`` has run
(it reads params.yaml, data/tasks, models/pretrained and models/tokenizer):

    python docs/experiments/price_verdicts.py --adapter assets/teacher                    # the shipped teacher as it is
    python docs/experiments/price_verdicts.py --adapter assets/teacher --drills 800 --steps 50 --batch 16
    python docs/experiments/price_verdicts.py --adapter assets/teacher --drills 2000 --demo-tasks 600 --steps 60 --batch 8

It continues the adapter (same rank) on ``--demo-tasks`` WebShop train tasks' expert demos and/or ``--drills``
short drills (``Thought: Under 40 dollars: B0E6C516ED $97.93`` -> `` no``; budgets as WebShop draws them,
prices uniform in 4-160 dollars), then reports, as JSON:

* ``drill_accuracy``: greedy verdicts on 150 held-out drills (no page, no title: the comparison alone);
* ``real_accuracy``: on every price verdict the expert writes in the WebShop *test* tasks' episodes, the
  teacher's play-time context plus the expert's thought up to the price, whether ``' yes'`` or ``' no'`` is
  likelier; ``yes_over_budget`` / ``no_within`` count the two kinds of error.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import pandas as pd
import torch

from sad.agent import forced_items
from sad.config import LoraParams, load_params
from sad.environments import load_tasks
from sad.pretrained import continue_lora
from sad.react import reason_piece
from sad.rollout import play_expert
from sad.segment import segment_episodes
from sad.stages.teacher import load_source_model
from sad.tokenizer import load_tokenizer
from sad.training import IMITATION, train_lm

BUDGETS = (5, 10, 20, 30, 40, 50, 75, 100, 150)
VERDICT = re.compile(r"\$(\d+(?:\.\d+)?) (yes|no)")


def drill(rng: random.Random) -> tuple[str, str]:
    upper, price = rng.choice(BUDGETS), round(rng.uniform(4, 160), 2)
    asin = "B" + "".join(rng.choice("0123456789ABCDEF") for _ in range(9))
    return f"Thought: Under {upper} dollars: {asin} ${price:.2f}", " no" if price > upper else " yes"


def drill_windows(tok, n: int) -> pd.DataFrame:
    rng, rows = random.Random(0), []
    for i in range(n):
        a, b = (tok.encode(x) for x in drill(rng))
        rows.append({"episode_id": f"drill{i}", "window": 0, "success": True, "n_tokens": len(a) + len(b),
                     "input_ids": a + b, "reason_mask": [0] * len(a) + [1] * len(b), "act_mask": [0] * (len(a) + len(b))})
    return pd.DataFrame(rows)


@torch.no_grad()
def drill_accuracy(model, tok, n: int = 150) -> float:
    rng, right = random.Random(999), 0
    for _ in range(n):
        prefix, verdict = drill(rng)
        ids = torch.tensor([tok.encode(prefix)])
        out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
        said = re.search(r"\b(yes|no)\b", tok.decode(out[0, ids.shape[1]:]))
        right += bool(said and " " + said.group(1) == verdict)
    return right / n


@torch.no_grad()
def real_verdicts(model, tok, p, root: Path) -> dict[str, float | int]:
    episodes = play_expert(load_tasks(root, "webshop", "test"), root)
    items = forced_items(tok, episodes, p.context.max_tokens, p.context.history_steps)
    yes, no = tok.encode(" yes")[0], tok.encode(" no")[0]
    right = total = yes_over = no_within = 0
    for it in items:
        if not re.search(r"Under (\d+) dollars", it["thought"]):
            continue
        for v in VERDICT.finditer(it["thought"]):
            prefix = reason_piece(it["thought"])[: len("Thought: ") + v.start(2) - 1]
            logits = model(torch.tensor([it["context"] + tok.encode(prefix)])).logits[0, -1]
            said, truth = bool(logits[yes] > logits[no]), v.group(2) == "yes"
            total += 1
            right += said == truth
            yes_over += said and not truth
            no_within += truth and not said
    return {"real_verdicts": total, "real_accuracy": round(right / total, 4), "yes_over_budget": yes_over,
            "no_within": no_within}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", default="assets/teacher", help="the LoRA teacher to start from")
    ap.add_argument("--demo-tasks", type=int, default=0, help="WebShop train tasks whose expert demos train it")
    ap.add_argument("--drills", type=int, default=0, help="short price drills that train it")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    args = ap.parse_args()
    started = time.time()
    p, root = load_params("params.yaml"), Path("data/tasks")
    tok = load_tokenizer(Path("models/tokenizer"))
    model = continue_lora(load_source_model(p, tok), args.adapter, p.teacher.source, LoraParams(**p.teacher.lora.model_dump()))
    if args.steps:
        parts = [drill_windows(tok, args.drills)] if args.drills else []
        if args.demo_tasks:
            demos = [e for e in play_expert(load_tasks(root, "webshop", "train")[: args.demo_tasks], root,
                                            perturb=0.15, seed=0, repeat_share=0.5) if e.success]
            parts.append(segment_episodes(demos, tok, p.context.max_tokens, p.context.history_steps, what="demos").windows)
        windows = pd.concat(parts, ignore_index=True)
        train = p.teacher.train.model_copy(update={"epochs": args.steps * args.batch / len(windows), "batch_size": args.batch,
                                                   "seed": 2, "checkpoint_every": 0, "dev_fraction": 0.0})
        train_lm(model, windows, IMITATION, train, tok.pad_token_id, progress=True, desc="verdicts")
    model.eval()
    print(json.dumps({**vars(args), "drill_accuracy": round(drill_accuracy(model, tok), 4),
                      **real_verdicts(model, tok, p, root), "seconds": round(time.time() - started)}))


if __name__ == "__main__":
    main()
