"""Eager vs torch.compile (inductor): one training step (forward, backward, AdamW) of the default's 8-layer student shape
(SmolLM2 layers, the domain vocabulary; random weights: speed only). Usage: python docs/experiments/compile_step.py [SEQ_LEN]"""
import time, json, sys
import torch
from transformers import LlamaConfig, AutoModelForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=2026, hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
                  num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
B, T = 4, int(sys.argv[1]) if len(sys.argv) > 1 else 512
out = {}
for mode in ("eager", "compiled"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = torch.compile(model) if mode == "compiled" else model
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    def step():
        t = time.perf_counter()
        loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward(); opt.step(); opt.zero_grad()
        return time.perf_counter() - t
    t0 = time.perf_counter(); first = step(); warm = time.perf_counter() - t0
    times = [step() for _ in range(4)]
    out[mode] = {"first_step_s": round(first, 2), "median_step_s": round(sorted(times)[2], 3)}
    print(mode, out[mode], flush=True)
out["speedup"] = round(out["eager"]["median_step_s"] / out["compiled"]["median_step_s"], 3)
print(json.dumps(out))
