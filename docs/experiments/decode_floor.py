"""Where one decode step of a model's forward spends its time: step time, tokens/s, and the share of attention
(SDPA) and of the matmuls (torch.profiler), per batch size and number of written KV-cache positions, in bf16 with
the agent's sliced attention over a static cache (`sad.bench.evaluation.decode_step`, as `LMAgent` decodes). Run
alone, in a project folder whose pipeline has run up to the teacher stage: `python docs/experiments/decode_floor.py
[model_dir]` (default models/teacher); one JSON line per configuration."""

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from sad.bench.evaluation import decode_step, sliced_decoding

torch.set_num_threads(2)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else "models/teacher", dtype=torch.bfloat16).eval()
with torch.inference_mode(), sliced_decoding(model) as sliced:
    for written in (300, 600):
        for batch in (1, 4, 16, 40):
            step = decode_step(model, batch, written, sliced)
            for _ in range(3):
                step()
            started, n = time.perf_counter(), 10
            for _ in range(n):
                step()
            ms = (time.perf_counter() - started) / n * 1000
            with torch.profiler.profile() as prof:
                for _ in range(3):
                    step()
            self_time = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
            total = sum(self_time.values())
            print(json.dumps({"written": written, "batch": batch, "step_ms": round(ms, 1), "tokens_per_s": round(batch / ms * 1000, 1),
                              "attention_share": round(sum(v for k, v in self_time.items() if "scaled_dot_product" in k) / total, 2),
                              "mm_share": round(self_time.get("aten::mm", 0) / total, 2)}), flush=True)
