"""Eager vs torch.compile (inductor): one training step (forward, backward, AdamW) of the default's 8-layer student shape
(SmolLM2 layers, the domain vocabulary; random weights: speed only). Usage: python docs/experiments/compile_step.py [SEQ_LEN]"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

CONFIG = LlamaConfig(vocab_size=2026, hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
                     num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)


def time_steps(compiled: bool, batch: int, seq_len: int, steps: int = 4) -> dict[str, float]:
    """Seconds of the first step (compilation included) and the median of ``steps`` more."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIG, attn_implementation="sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compiled else model
    ids = torch.randint(0, CONFIG.vocab_size, (batch, seq_len))

    def step() -> float:
        started = time.perf_counter()
        forward(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - started

    first = step()
    times = sorted(step() for _ in range(steps))
    return {"first_step_s": round(first, 2), "median_step_s": round(times[len(times) // 2], 3)}


if __name__ == "__main__":
    seq_len = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    out = {mode: time_steps(mode == "compiled", 4, seq_len) for mode in ("eager", "compiled")}
    out["speedup"] = round(out["eager"]["median_step_s"] / out["compiled"]["median_step_s"], 3)
    print(json.dumps(out))
