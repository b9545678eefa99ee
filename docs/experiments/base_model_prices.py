"""Can a base model compare a price with a budget? WebShop's price checks scored by any causal LM (issue #15 probe).

Not part of the library. Three steps (the first in a ``sad profile teacher`` folder after ``dvc repro tokenizer``,
as ``price_verdicts.py``):

    python docs/experiments/base_model_prices.py extract checks.jsonl
    python docs/experiments/base_model_prices.py score checks.jsonl --model models/pretrained         # a HF folder
    python docs/experiments/base_model_prices.py score checks.jsonl --model DIR --gguf-file F.gguf    # a GGUF file
    python docs/experiments/base_model_prices.py score checks.jsonl --adapter assets/teacher          # the teacher
    python docs/experiments/base_model_prices.py ask --model DIR [--gguf-file F.gguf]

``extract`` writes, as text, the 146 price checks ``price_verdicts.real_verdicts`` scores (the WebShop test tasks'
expert episodes: the play-time context and the expert's thought; each check's cut is where ``$P`` ends). ``score``
reads ``logit(' yes') - logit(' no')`` right after each price in the model's own tokenizer (zero-shot for a base
model; ``--adapter``: the LoRA teacher over the folder's base with its domain tokenizer, which reproduces
``real_verdicts``) and prints accuracy, the AUC of that difference (free of the yes/no bias) and the accuracy of the
best single threshold. ``ask`` poses the 150 held-out drills of ``price_verdicts.drill`` as plain questions (``Is
$97.93 under 40 dollars?``), bare and in the model's chat template: the comparison with no page around it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from price_verdicts import VERDICT, drill  # noqa: E402


def extract(out: Path) -> None:
    from sad.agent import forced_items
    from sad.config import load_params
    from sad.environments import load_tasks
    from sad.react import reason_piece
    from sad.rollout import play_expert
    from sad.tokenizer import load_tokenizer

    p, root = load_params("params.yaml"), Path("data/tasks")
    tok = load_tokenizer(Path("models/tokenizer"))
    items = forced_items(tok, play_expert(load_tasks(root, "webshop", "test"), root), p.context.max_tokens,
                         p.context.history_steps)
    rows = []
    for it in items:
        if not re.search(r"Under (\d+) dollars", it["thought"]):
            continue
        thought = reason_piece(it["thought"])
        checks = [{"cut": len("Thought: ") + v.start(2) - 1, "truth": v.group(2)} for v in VERDICT.finditer(it["thought"])]
        for c in checks:
            assert thought[c["cut"]:].startswith(" " + c["truth"]), (it["episode_id"], it["step"])
        if checks:
            rows.append({"episode_id": it["episode_id"], "step": it["step"], "context_ids": it["context"],
                         "context": tok.decode(it["context"], skip_special_tokens=False), "thought": thought,
                         "checks": checks})
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out)
    print(json.dumps({"thoughts": len(rows), "checks": sum(len(r["checks"]) for r in rows), "file": str(out)}))


def load(model_dir: str, gguf_file: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    return (AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval(),
            AutoTokenizer.from_pretrained(model_dir, **kw))


def load_teacher(adapter: str):
    from sad.config import LoraParams, load_params
    from sad.pretrained import continue_lora
    from sad.stages.teacher import load_source_model
    from sad.tokenizer import load_tokenizer

    p = load_params("params.yaml")
    tok = load_tokenizer(Path("models/tokenizer"))
    model = continue_lora(load_source_model(p, tok), adapter, p.teacher.source, LoraParams(**p.teacher.lora.model_dump()))
    return model.merge_and_unload().eval(), tok


def separation(diffs: list[float], truths: list[bool]) -> dict[str, float]:
    """Accuracy of ``diff > 0``, the AUC of ``diff`` for ``yes`` and the best single threshold's accuracy."""
    pos = [d for d, t in zip(diffs, truths) if t]
    neg = [d for d, t in zip(diffs, truths) if not t]
    auc = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))
    best = max(sum((d > th) == t for d, t in zip(diffs, truths)) for th in [min(diffs) - 1, *diffs]) / len(diffs)
    return {"accuracy": round(sum((d > 0) == t for d, t in zip(diffs, truths)) / len(diffs), 4),
            "auc": round(auc, 4), "best_threshold_accuracy": round(best, 4)}


@torch.no_grad()
def score(checks_file: Path, model, tok, domain: bool) -> dict:
    """``domain``: ``tok`` is the teacher's domain tokenizer, so the stored context ids are used as they are."""
    yes, no = (tok.encode(w, add_special_tokens=False) for w in (" yes", " no"))
    assert len(yes) == 1 and len(no) == 1, "' yes' and ' no' must be one token each"
    diffs, truths = [], []
    for row in map(json.loads, checks_file.read_text().splitlines()):
        head = row["context_ids"] if domain else []
        text = row["thought"] if domain else row["context"] + row["thought"]
        base = 0 if domain else len(row["context"])
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ends = [e for _, e in enc["offset_mapping"]]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(torch.tensor([head + enc["input_ids"]])).logits[0].float()
        for c in row["checks"]:
            if base + c["cut"] not in ends:
                raise SystemExit(f"{row['episode_id']} step {row['step']}: no token ends where the price does")
            at = len(head) + ends.index(base + c["cut"])
            diffs.append(float(logits[at, yes[0]] - logits[at, no[0]]))
            truths.append(c["truth"] == "yes")
    said = [d > 0 for d in diffs]
    return {"checks": len(diffs), **separation(diffs, truths), "within_budget": sum(truths),
            "yes_over_budget": sum(s and not t for s, t in zip(said, truths)),
            "no_within": sum(t and not s for s, t in zip(said, truths))}


@torch.no_grad()
def ask(model, tok, n: int = 150) -> dict:
    out = {}
    for style in ("bare", "chat") if tok.chat_template else ("bare",):  # a base model may have no chat template
        rng, diffs, truths = random.Random(999), [], []
        for _ in range(n):
            prefix, verdict = drill(rng)
            upper, price = re.match(r"Thought: Under (\d+) dollars: \S+ \$(\S+)", prefix).groups()
            question = f"Is ${price} under {upper} dollars? Answer yes or no."
            if style == "bare":
                text, words = f"Question: {question}\nAnswer:", (" yes", " Yes", " no", " No")
            else:
                text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
                words = ("yes", "Yes", "no", "No")
            ids = [tok.encode(w, add_special_tokens=False)[0] for w in words]
            row = model(torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits[0, -1]
            diffs.append(float(torch.logsumexp(row[ids[:2]], 0) - torch.logsumexp(row[ids[2:]], 0)))
            truths.append(verdict == " yes")
        out[style] = separation(diffs, truths)
    return {"drills": n, "within_budget": sum(truths), **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["extract", "score", "ask"])
    ap.add_argument("checks", nargs="?", default="checks.jsonl", help="the checks file (extract writes it)")
    ap.add_argument("--model", default="", help="a transformers folder (with --gguf-file: the GGUF's folder)")
    ap.add_argument("--gguf-file", default="")
    ap.add_argument("--adapter", default="", help="score the LoRA teacher in this folder over the profile's base")
    args = ap.parse_args()
    started = time.time()
    if args.what == "extract":
        extract(Path(args.checks))
        return
    model, tok = load_teacher(args.adapter) if args.adapter else load(args.model, args.gguf_file)
    result = score(Path(args.checks), model, tok, bool(args.adapter)) if args.what == "score" else ask(model, tok)
    print(json.dumps({"model": args.adapter or args.gguf_file or args.model, "what": args.what,
                      "parameters": sum(t.numel() for t in model.parameters()), **result,
                      "seconds": round(time.time() - started)}))


if __name__ == "__main__":
    main()
