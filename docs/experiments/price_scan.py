"""WebShop results pages: does the teacher check prices better when its thought checks every listed price, or
when it is also trained on the same real pages under other budgets? (issue #15; docs/measurements.md "price scan")

Not part of the library: run it, like docs/experiments/price_verdicts.py, from a pipeline folder made with
``sad profile teacher2`` in which ``sad pipeline tokenizer`` has run (it reads params.yaml, data/tasks,
models/pretrained and models/tokenizer), with the repository on PYTHONPATH:

    python docs/experiments/price_scan.py --scan all --steps 60 --batch 8                      # every listed price checked
    python docs/experiments/price_scan.py --scan orig --budget-windows 1 --steps 60 --batch 8  # + the pages under other budgets
    python docs/experiments/price_scan.py --scan orig                                           # the shipped teacher as it is

It continues the shipped adapter (rank 16) on the expert's demos of ``--demo-tasks`` WebShop train tasks (with
``--scan all`` the expert's results-page thought lists every item of the page, not only those up to the one it
opens; ``--budget-windows 1`` adds, per results page of those demos, one window of the same page with the task's
budget replaced everywhere by another, the loss only on each item's `` no``/`` yes``), then reports as JSON:

* ``verdicts``: on the WebShop test tasks' expert episodes, teacher-forced after the play-time context, whether
  `` yes`` or `` no`` is likelier at each price check, by position: ``before`` the item the expert opens, the
  ``chosen`` one, ``after`` it (``--scan all`` only); ``verdict_acc_upto_chosen`` is comparable across formats;
* ``page_step_acc``: on the same results pages, the share where the freely generated thought+action's action
  equals the expert's (item clicks and page turns).
"""
import argparse
import copy
import json
import random
import re
import time
from pathlib import Path

import pandas as pd
import torch

from sad.agent import LMAgent, forced_items
from sad.config import LoraParams, load_params
from sad.environments import load_tasks
from sad.envs import webshop as W
from sad.evaluation import _generate_blocks
from sad.metrics import action_agrees
from sad.pretrained import continue_lora
from sad.react import reason_piece
from sad.rollout import play_expert
from sad.segment import segment_episodes
from sad.stages.teacher import load_source_model
from sad.tokenizer import load_tokenizer
from sad.training import IMITATION, train_lm

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--adapter", default="assets/teacher", help="the LoRA teacher to start from")
ap.add_argument("--scan", choices=("orig", "all"), default="orig",
                help="the expert's results-page thought: items up to the opened one, or all")
ap.add_argument("--budget-windows", type=int, default=0,
                help="extra windows per results page of the demos, under another budget")
ap.add_argument("--demo-tasks", type=int, default=600)
ap.add_argument("--steps", type=int, default=0)
ap.add_argument("--batch", type=int, default=8)
args = ap.parse_args()
steps, batch, demo_tasks = args.steps, args.batch, args.demo_tasks
torch.manual_seed(0)
BUDGETS = (5, 10, 20, 30, 40, 50, 75, 100, 150)
MAXNEW = 320  # generation budget on a results page (a thought that checks 10 items is about 200-250 tokens)


def verdict_of(price: float, upper: float, asin: str, chosen: str | None, rejected: set[str]) -> str:
    if price > upper:
        return "no"
    if asin == chosen:
        return "yes"
    return "yes, rejected" if asin in rejected else "yes, a weaker match"


def scan_every_item(self, hits, chosen):
    """WebShopExpert._price_scan, but every listed item, not only those up to the opened one."""
    parts = [f"{asin} ${price:.2f} {verdict_of(price, self.upper, asin, chosen, self.rejected)}" for asin, _, price in hits]
    return f"{self._budget()}: {', '.join(parts)}."


ORIG_CHOOSE = W.WebShopExpert._choose


def choose_with_full_scan(self, goal, obs, clickable):
    """WebShopExpert._choose; a page where no item fits is scanned too before saying so."""
    thought, action = ORIG_CHOOSE(self, goal, obs, clickable)
    if thought.startswith(self._budget() + ": no "):
        thought = self._price_scan(W.parse_results(obs.text), None) + " No item" + thought.split(": no item", 1)[1]
    return thought, action


if args.scan == "all":
    W.WebShopExpert._price_scan = scan_every_item
    W.WebShopExpert._choose = choose_with_full_scan


def with_budget(text: str, old: float, new: int) -> str:
    text = text.replace(f"lower than {old:.2f} dollars", f"lower than {new:.2f} dollars")
    return re.sub(rf"([Uu]nder ){old:.0f}( dollars)", rf"\g<1>{new}\g<2>", text)


def budget_windows(demos, k, tok, budget_tokens, hist):
    """Extra windows on real results pages of the train demos, the task's budget replaced (prompt, history and
    thought) by another; loss only on each listed item's verdict token (no / yes against the new budget)."""
    rng, rows = random.Random(1), []
    for ep in demos:
        m = re.search(r"price lower than (\d+\.\d\d) dollars", ep.prompt)
        if not m:
            continue
        old = float(m.group(1))
        for i, st in enumerate(ep.steps):
            if i == 0 or not st.imitate or not re.match(r"Under \d+ dollars: B", st.thought):
                continue
            hits = W.parse_results(ep.steps[i - 1].observation)
            for j in range(k):
                new = rng.choice([b for b in BUDGETS if b != round(old)])
                e2 = copy.deepcopy(ep)
                e2.prompt = with_budget(e2.prompt, old, new)
                e2.steps = e2.steps[: i + 1]
                for s2 in e2.steps:
                    s2.thought, s2.observation = with_budget(s2.thought, old, new), with_budget(s2.observation, old, new)
                ctx = forced_items(tok, [e2], budget_tokens, hist)[-1]["context"]
                spans, text = [], f"Thought: Under {new} dollars: "
                for n, (asin, _, price) in enumerate(hits):
                    text += f"{asin} ${price:.2f}"
                    v = " no" if price > new else " yes"
                    spans.append((len(text), len(text) + len(v)))
                    text += v + (", " if n < len(hits) - 1 else ".")
                enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
                ids = enc["input_ids"]
                mask = [int(any(a <= s0 < b for a, b in spans)) for s0, _ in enc["offset_mapping"]]
                rows.append({"episode_id": f"aug{ep.episode_id}-{i}-{j}", "window": 0, "success": True,
                             "n_tokens": len(ctx) + len(ids), "input_ids": ctx + ids,
                             "reason_mask": [0] * len(ctx) + mask, "act_mask": [0] * (len(ctx) + len(ids))})
    return pd.DataFrame(rows)


started = time.time()
p, root = load_params("params.yaml"), Path("data/tasks")
tok = load_tokenizer(Path("models/tokenizer"))
model = continue_lora(load_source_model(p, tok), args.adapter, p.teacher.source, LoraParams(r=16, alpha=32))
out = dict(vars(args))
context_budget = p.context.max_tokens - p.context.max_new_tokens  # as at play
if steps:
    demos = [e for e in play_expert(load_tasks(root, "webshop", "train")[:demo_tasks], root, perturb=0.15, seed=0,
                                    repeat_share=0.5) if e.success]
    windows = segment_episodes(demos, tok, p.context.max_tokens, p.context.history_steps, what="demos").windows
    if args.budget_windows:
        extra = budget_windows(demos, args.budget_windows, tok, context_budget, p.context.history_steps)
        out["aug_windows"], out["aug_verdict_tokens"] = len(extra), int(extra.reason_mask.map(sum).sum())
        windows = pd.concat([windows, extra], ignore_index=True)
    train = p.teacher.train.model_copy(update={"epochs": steps * batch / len(windows), "batch_size": batch, "seed": 2,
                                               "checkpoint_every": 0, "dev_fraction": 0.0})
    t = time.time()
    train_lm(model, windows, IMITATION, train, tok.pad_token_id, progress=True, desc="scan")
    out.update(windows=len(windows), train_s=round(time.time() - t))
model.eval()
episodes = play_expert(load_tasks(root, "webshop", "test"), root)
# (1) teacher-forced verdicts, by position against the chosen item
items = forced_items(tok, episodes, context_budget, p.context.history_steps)
yes, no = tok.encode(" yes")[0], tok.encode(" no")[0]
stats: dict[str, list[int]] = {}
with torch.no_grad():
    for it in items:
        if not re.match(r"Under (\d+) dollars", it["thought"]):
            continue
        seen_chosen = False
        piece = reason_piece(it["thought"])
        enc = tok(piece, return_offsets_mapping=True, add_special_tokens=False)
        starts = {a: k for k, (a, _) in enumerate(enc["offset_mapping"])}
        full = model(torch.tensor([it["context"] + enc["input_ids"]])).logits[0]  # one forward per thought
        for v in re.finditer(r"\$(\d+(?:\.\d+)?) (yes|no)(,|\.)?( a weaker| rejected)?", it["thought"]):
            kind = "chosen" if (v.group(2) == "yes" and not v.group(4)) else ("after" if seen_chosen else "before")
            c = len("Thought: ") + v.start(2) - 1
            prefix = piece[:c]
            if c in starts and enc["input_ids"][starts[c]] in (yes, no) and tok.encode(prefix) == enc["input_ids"][:starts[c]]:
                logits = full[len(it["context"]) + starts[c] - 1]  # the same tokens as the prefix alone
            else:
                logits = model(torch.tensor([it["context"] + tok.encode(prefix)])).logits[0, -1]
            said, truth = bool(logits[yes] > logits[no]), v.group(2) == "yes"
            s = stats.setdefault(kind, [0, 0, 0, 0])  # checks, right, yes over budget, no within budget
            s[0] += 1
            s[1] += said == truth
            s[2] += said and not truth
            s[3] += truth and not said
            seen_chosen |= kind == "chosen"
out["verdicts"] = {k: {"n": s[0], "acc": round(s[1] / s[0], 4), "yes_over": s[2], "no_within": s[3]} for k, s in stats.items()}
upto = [stats[k] for k in ("before", "chosen") if k in stats]
out["verdict_acc_upto_chosen"] = round(sum(s[1] for s in upto) / sum(s[0] for s in upto), 4)
# (2) results-page steps, freely generated from the play-time context
page = [it for it in items if re.match(r"Under (\d+) dollars", it["thought"])]
agent = LMAgent(model, tok, max_new_tokens=MAXNEW)
rows = [{"kind": "item" if re.match(r"click\[B", it["action"], re.I) else "other",
         "ok": bool(parsed.has_action and action_agrees(parsed.action, it["action"]))}
        for it, parsed in _generate_blocks(agent, page, 16, True, "results pages")]
df = pd.DataFrame(rows)
out["page_steps"], out["page_step_acc"] = len(df), round(df.ok.mean(), 4)
out["page_step_acc_by_kind"] = {k: [int(g.ok.sum()), len(g)] for k, g in df.groupby("kind")}
out["seconds"] = round(time.time() - started)
print(json.dumps(out), flush=True)
