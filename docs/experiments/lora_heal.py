"""Heal a folder's layer cut through LoRA adapters instead of every weight, and compare dev step accuracy of the
bare cut, the cut healed in every weight (the folder's models/student_init) and the LoRA-healed cut (what led to
profiles/heal.yaml and the shipped heal). Run alone in a folder where `sad profile takeover` ran up to student_init:
    python docs/experiments/lora_heal.py 0 0 0 --baselines     # bare cut and models/student_init
    python docs/experiments/lora_heal.py 32 0.002 1             # rank, lr, epochs; saves models_lora_heal/...
"""
import copy
import json
import sys
import time
from pathlib import Path

from sad.agent import LMAgent
from sad.config import LoraParams, load_params
from sad.evaluation import step_accuracy
from sad.modeling import load_model, play_dtype, save_model
from sad.pretrained import add_lora, layer_subset
from sad.segment import segment_episodes
from sad.stages.layout import demos_file, dev_demos_file, read_episodes
from sad.tokenizer import load_tokenizer
from sad.training import IMITATION, train_lm

r, lr, epochs = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
out = Path(f"models_lora_heal/heal_r{r}_lr{lr}_e{epochs}")
p = load_params("params.yaml")
tok = load_tokenizer(Path("models/tokenizer"))
card = json.loads(Path("models/student_init/card.json").read_text())
keep = card["layers_from_teacher"]
dev = read_episodes(dev_demos_file(p))

def acc(model, name):
    m = copy.deepcopy(model).to(play_dtype(p.agent.precision)).eval()
    agent = LMAgent(m, tok, p.context.max_new_tokens, temperature=0.0, seed=0)
    t = time.perf_counter()
    res = step_accuracy(agent, dev, p.context.max_tokens, p.context.history_steps, p.evaluate.batch_size, 0,
                        seed=p.project.seed, evict_to=p.context.evict_to)
    res.pop("outcomes", None)
    print(name, json.dumps({"step_accuracy": res["step_accuracy"], "steps": res["steps"],
                            "envs": {e: round(v["step_accuracy"], 3) for e, v in res["envs"].items()},
                            "seconds": round(time.perf_counter() - t, 1)}), flush=True)
    return res

if "--baselines" in sys.argv:
    teacher = load_model(Path("models/teacher"))
    acc(layer_subset(teacher, keep), "bare_cut")
    acc(load_model(Path("models/student_init")), "full_heal")
    sys.exit()

teacher = load_model(Path("models/teacher"))
cut = layer_subset(teacher, keep)
del teacher
model = add_lora(cut, LoraParams(r=r, alpha=2 * r), seed=0)
trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
demos = read_episodes(demos_file(p))
windows = segment_episodes(demos, tok, p.context.max_tokens, p.context.history_steps).windows.reset_index(drop=True)
dev_w = segment_episodes(dev, tok, p.context.max_tokens, p.context.history_steps).windows
train = p.distill.train.model_copy(update={"epochs": epochs, "lr": lr, "precision": p.distill.heal.precision,
                                           "eval_every": 0, "checkpoint_every": 0})
t = time.perf_counter()
result = train_lm(model, windows, IMITATION, train, tok.pad_token_id, dev_windows=dev_w, progress=True, desc=f"lora heal r{r}")
secs = time.perf_counter() - t
merged = model.merge_and_unload()
print("lora_heal", json.dumps({"r": r, "lr": lr, "epochs": epochs, "trainable": trainable, "adapter_mb_bf16": trainable * 2 / 1e6,
                               "steps": result.steps, "seconds": round(secs, 1), "dev": result.dev}), flush=True)
acc(merged, f"lora_heal_r{r}")
save_model(merged, tok, out, {"role": "student_init", "layers_from_teacher": keep, "healed": True, "lora_heal": {"r": r, "lr": lr}})
