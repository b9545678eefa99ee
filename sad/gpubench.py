"""Accelerator benchmark (at most a few minutes): training MFU and rollout throughput in bf16.

    python -m sad.gpubench --json            # on a CUDA machine: bf16, the card's matmul peak measured here
    python -m sad.gpubench --device cpu      # the same code path on CPU (fp32), e.g. as a smoke test

Sizes are the default params' teacher and student (or ``--params``); data are synthetic windows
shaped like the pipeline's, so no pipeline run is needed. Figures are measured in this run only.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 4096, seconds: float = 2.0) -> float:
    """Best FLOP/s of an n x n matmul on ``device`` in ``dtype``."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - started) / 10)
    return 2.0 * n ** 3 / best


def train_mfu(model, vocab: int, batch: int, seq: int, steps: int, device: torch.device, dtype: torch.dtype,
              peak: float) -> dict[str, Any]:
    """Imitation steps on random tokens [batch, seq]; FLOP/s = (6N + 6 L d S) x tokens/s."""
    from sad.modeling import count_parameters
    from sad.perf import train_flops_per_token

    model.to(device=device, dtype=dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(4, vocab, (batch, seq), device=device)
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            _sync(device)
            started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    seconds = time.perf_counter() - started
    tokens_per_s = steps * batch * seq / seconds
    cfg = model.config
    flops = train_flops_per_token(count_parameters(model), cfg.num_hidden_layers, cfg.hidden_size, seq) * tokens_per_s
    return {"tokens_per_s": tokens_per_s, "flops_per_s": flops, "mfu": flops / peak, "batch": batch, "seq": seq}


def rollout_throughput(model, vocab: int, contexts: int, context_len: int, new_tokens: int,
                       device: torch.device) -> dict[str, Any]:
    """Generated tokens/s of the agent's generation loop: ``contexts`` at once against one at a time
    (random contexts, a stand-in tokenizer; rows never stop early)."""
    from sad.agent import LMAgent

    class _Tok:  # the agent needs the vocabulary (for newline ids), pad/eos ids and decode
        pad_token_id, eos_token_id = 0, -1

        def get_vocab(self):
            return {f"t{i}": i for i in range(vocab)}

        def convert_tokens_to_string(self, tokens):
            return "".join(tokens)

        def decode(self, ids):
            return " ".join(map(str, ids))

    model.eval()
    agent = LMAgent(model, _Tok(), new_tokens)
    rng = torch.Generator().manual_seed(0)
    ctxs = [torch.randint(4, vocab, (context_len,), generator=rng).tolist() for _ in range(contexts)]
    agent.generate(ctxs[:2])
    out = {}
    for label, groups in (("batched", [ctxs]), ("one_at_a_time", [[c] for c in ctxs[:4]])):
        _sync(device)
        started = time.perf_counter()
        tokens = sum(g.n_tokens for group in groups for g in agent.generate(group))
        _sync(device)
        seconds = time.perf_counter() - started
        out[label] = {"tokens_per_s": tokens / seconds, "seconds": seconds, "rows": sum(len(g) for g in groups)}
    out["speedup"] = out["batched"]["tokens_per_s"] / out["one_at_a_time"]["tokens_per_s"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from sad.config import load_params
    from sad.modeling import build_llama

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    p = load_params(args.params)
    vocab, seq = p.tokenizer.vocab_size, p.context.max_tokens

    class _Stub:
        pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

        def __len__(self):
            return vocab

    peak = matmul_peak(device, dtype, n=4096 if device.type == "cuda" else 1024, seconds=2.0 if device.type == "cuda" else 1.0)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "dtype": str(dtype).replace("torch.", ""), "matmul_peak_flops_per_s": peak}
    for name, arch, batch in (("student", p.distill.student, 64 if device.type == "cuda" else 4),
                              ("teacher", p.teacher.arch, 32 if device.type == "cuda" else 2)):
        model = build_llama(arch, _Stub(), seq, seed=0)
        out[f"train_{name}"] = train_mfu(model, vocab, batch, seq, args.steps if device.type == "cuda" else 3,
                                         device, dtype, peak)
        out[f"rollout_{name}"] = rollout_throughput(model.to(device, dtype), vocab, 64 if device.type == "cuda" else 8,
                                                    seq // 2, 32 if device.type == "cuda" else 8, device)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
