"""Where one decode step of a model's forward spends its time: step time, tokens/s, and the share of attention
(SDPA) and of the matmuls (torch.profiler), per batch size and number of written KV-cache positions, in bf16 with
the agent's sliced attention over a static cache (as `LMAgent` decodes). Run alone, in a project folder whose
pipeline has run up to the teacher stage: `python docs/experiments/decode_floor.py [model_dir]` (default
models/teacher); one JSON line per configuration."""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, StaticCache

from sad.agent import SLICED_SDPA, _register_sliced_sdpa

torch.set_num_threads(2)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else "models/teacher", dtype=torch.bfloat16).eval()
config = model.config
_register_sliced_sdpa()
config._attn_implementation = SLICED_SDPA
heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads


def decode_step_ms(written: int, batch: int) -> tuple[float, dict[str, float]]:
    """Mean milliseconds of one decode forward with ``batch`` rows and ``written`` cached positions, and the
    profiler's self time per op over three more."""
    cache = StaticCache(config=config, max_cache_len=written + 192)
    cache.early_initialization(batch, heads, head_dim, torch.bfloat16, "cpu")
    for layer in cache.layers:
        layer.cumulative_length.fill_(written)
    inputs = {"input_ids": torch.ones(batch, 1, dtype=torch.long), "attention_mask": torch.ones(batch, written + 1, dtype=torch.long),
              "position_ids": torch.full((batch, 1), written), "past_key_values": cache, "use_cache": True, "logits_to_keep": 1,
              "kv_length": written + 1}
    with torch.inference_mode():
        for _ in range(3):
            model(**inputs)
        started, n = time.perf_counter(), 10
        for _ in range(n):
            model(**inputs)
        ms = (time.perf_counter() - started) / n * 1000
        with torch.profiler.profile() as prof:
            for _ in range(3):
                model(**inputs)
    return ms, {e.key: e.self_cpu_time_total for e in prof.key_averages()}


for written in (300, 600):
    for batch in (1, 4, 16, 40):
        ms, self_time = decode_step_ms(written, batch)
        total = sum(self_time.values())
        print(json.dumps({"written": written, "batch": batch, "step_ms": round(ms, 1), "tokens_per_s": round(batch / ms * 1000, 1),
                          "attention_share": round(sum(v for k, v in self_time.items() if "scaled_dot_product" in k) / total, 2),
                          "mm_share": round(self_time.get("aten::mm", 0) / total, 2)}), flush=True)
