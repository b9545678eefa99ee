"""Training benchmark: tokens/s per method and the top-k teacher cache against online teacher logits.

All figures come from one run on the same synthetic windows (shaped like the pipeline's: a
prompt, then REASON/ACT/observation spans, lengths up to ``context.max_tokens``) and the
project's teacher and student: the pretrained teacher's architecture and its layer-subset student
when ``teacher.source`` is set (weights randomly initialised: only the shapes matter), else
``teacher.arch`` and ``distill.student``. Each configuration runs in a fresh subprocess so that its
peak memory (``VmHWM``, see :func:`_rss_mb`) is its own.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd


def synthetic_windows(n: int, vocab: int, max_tokens: int, seed: int = 0) -> pd.DataFrame:
    """Windows of 40-100% of ``max_tokens`` tokens: a prompt, then steps of REASON (~20 tokens),
    ACT (~8) and observation (~30) pieces; masks on REASON/ACT."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = rng.randint(int(0.4 * max_tokens), max_tokens)
        reason, act = [0] * length, [0] * length
        pos = rng.randint(40, 120)
        while pos < length:
            for mask, size in ((reason, rng.randint(10, 30)), (act, rng.randint(4, 12)), (None, rng.randint(15, 45))):
                end = min(length, pos + size)
                if mask is not None:
                    mask[pos:end] = [1] * (end - pos)
                pos = end
        rows.append({"episode_id": f"ep{i}", "window": 0, "input_ids": [rng.randrange(4, vocab) for _ in range(length)],
                     "reason_mask": reason, "act_mask": act})
    return pd.DataFrame(rows)


def _rss_mb() -> float:
    """This process's peak resident memory in MB: ``VmHWM`` of /proc/self/status where there is one (a child
    started by fork+exec inherits its parent's ``ru_maxrss``, so that would report the parent's peak), else
    ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tokenizer_stub(vocab: int):
    class _Tok:  # build_llama only needs the special ids and the size
        pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

        def __len__(self) -> int:
            return vocab

    return _Tok()


def project_model_configs(p) -> dict[str, Any] | None:
    """The Hugging Face configs (dicts) of the teacher and of the student the project distils, when its
    teacher is a pretrained model (``teacher.source``) and its students keep ``distill.student_layers``
    of the teacher's layers: the teacher stage's model if the pipeline has run (domain vocabulary and
    all), else the pretrained stage's, else the source itself (a GGUF base through the model cache).
    None otherwise: the from-scratch ``teacher.arch`` / ``distill.student`` are then what runs."""
    from transformers import AutoConfig

    from sad.pretrained import PER_LAYER_CONFIG_LISTS
    from sad.stages.layout import pretrained_dir, teacher_dir

    if p.teacher.source is None or p.distill.student_layers is None:
        return None
    folder = next((d for d in (teacher_dir(p), pretrained_dir(p)) if (d / "config.json").is_file()), None)
    origin = str(folder) if folder else p.teacher.source
    if folder is None:
        from sad.pretrained import gguf_converted, model_source

        source = model_source(p.teacher.source)
        source = model_source(source.base) if source.base else source
        folder = gguf_converted(source) if source.gguf_file else source.folder
    teacher = AutoConfig.from_pretrained(str(folder)).to_dict()
    layers = p.distill.student_layers
    student = {**teacher, "num_hidden_layers": layers if isinstance(layers, int) else len(layers)}
    for key in PER_LAYER_CONFIG_LISTS:  # per-layer lists follow the layer count
        if isinstance(teacher.get(key), list):
            student[key] = teacher[key][:student["num_hidden_layers"]]
    return {"teacher": teacher, "student": student, "from": origin}


def _build(config: dict[str, Any] | None, arch: dict[str, Any], tok, max_tokens: int, seed: int):
    """A randomly initialised model: of a Hugging Face config dict, or of :class:`ArchParams` fields."""
    import torch

    if config is None:
        from sad.config import ArchParams
        from sad.modeling import build_llama

        return build_llama(ArchParams(**arch), tok, max_tokens, seed=seed)
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(config)
    hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config)


def _shape(config: dict[str, Any] | None, arch: dict[str, Any]) -> tuple[int, int]:
    """(layers, hidden size) of a model :func:`_build` makes from the same arguments."""
    if config is None:
        return arch["num_layers"], arch["hidden_size"]
    return config["num_hidden_layers"], config["hidden_size"]


def run_config(config: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this process: build the top-k cache (``mode: build``) into
    ``cache_dir``, or train ``steps`` steps of one method against the online teacher or the cache."""
    import torch

    from sad.config import MethodParams, TrainParams
    from sad.teacher_cache import build_topk_cache, load_cache, save_cache
    from sad.training import CachedTeacher, train_lm

    torch.manual_seed(0)
    tok = _tokenizer_stub(config["vocab"])
    windows = synthetic_windows(config["windows"], config["vocab"], config["max_tokens"])
    windows["cache_row"] = range(len(windows))
    base_rss = _rss_mb()
    out: dict[str, Any] = {}
    if config["mode"] == "peak":  # the peak of the dtype training's matmuls run in (bf16 under autocast)
        from sad.bench.peak import matmul_peak_flops
        from sad.training import mixed_precision

        autocast = mixed_precision(config["precision"], torch.cuda.is_available()) == "bf16"
        dtype = torch.bfloat16 if autocast else torch.float32
        return {"matmul_flops_per_s": matmul_peak_flops(dtype=dtype), "threads": torch.get_num_threads(),
                "dtype": str(dtype).removeprefix("torch.")}
    if config["mode"] == "build":  # as the teacher_logits stage: the teacher's forward in its precision's dtype
        from sad.modeling import play_dtype

        teacher = _build(config.get("teacher_config"), config["teacher"], tok, config["max_tokens"], seed=1)
        cache_dtype = play_dtype(config["cache_precision"], setting="distill.teacher_logits.precision", compute_bound=True)
        teacher = teacher.to(cache_dtype)
        started = time.perf_counter()
        cache = build_topk_cache(teacher, windows, config["top_k"], [1.0], 0, "bench", batch_size=config["teacher_batch"],
                                 progress=False)
        out["build_s"] = time.perf_counter() - started
        save_cache(cache, windows, config["cache_dir"])
        out.update({"cache_bytes": cache.nbytes, "full_logits_bytes": cache.full_logits_bytes(),
                    "positions": int(cache.offsets[-1]), "peak_rss_mb": _rss_mb()})
        return out
    teacher, cached = None, None
    if config["needs_teacher"] and config["mode"] == "online":
        teacher = _build(config.get("teacher_config"), config["teacher"], tok, config["max_tokens"], seed=1)
    if config["needs_teacher"] and config["mode"] == "cached":
        cached = CachedTeacher(load_cache(config["cache_dir"], "bench"))
    trained = "teacher" if config.get("train_teacher") else "student"  # whose training is timed
    student = _build(config.get(f"{trained}_config"), config[trained], tok, config["max_tokens"], seed=2)
    train = TrainParams(epochs=1, batch_size=config["batch_size"], lr=1e-3, dev_fraction=0, precision=config["precision"])
    result = train_lm(student, windows, MethodParams(**config["method"]), train, 0, teacher=teacher,
                      cached=cached, progress=False, log_every=10**9)
    from sad.bench.peak import train_flops_per_token
    from sad.modeling import count_parameters

    layers, hidden = _shape(config.get(f"{trained}_config"), config[trained])
    mean_len = float(windows["input_ids"].map(len).mean())
    flops_per_token = train_flops_per_token(count_parameters(student), layers, hidden, mean_len)
    out.update({"train_s": result.seconds, "tokens": result.tokens, "tokens_per_s": result.tokens_per_second,
                "student_flops_per_s": flops_per_token * result.tokens_per_second, "mean_seq_len": mean_len,
                "steps": result.steps, "parameters": count_parameters(student), "layers": layers, "hidden_size": hidden,
                "peak_rss_mb": _rss_mb(), "rss_over_baseline_mb": _rss_mb() - base_rss})
    return out


def _in_subprocess(config: dict[str, Any]) -> dict[str, Any]:
    code = "import json,sys; from sad.bench.training import run_config; print(json.dumps(run_config(json.loads(sys.argv[1]))))"
    # -P and PYTHONPATH: the child imports the same `sad` as this process, whatever folder it runs in.
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the `sad` package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH", "")] if p)}
    done = subprocess.run([sys.executable, "-P", "-c", code, json.dumps(config)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark configuration {config['name']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark_training(p, steps: int = 12, batch_size: int = 4, max_tokens: int | None = None,
                       progress=None, isolated: bool = True) -> dict[str, Any]:
    """Tokens/s of sad, token_kd and sft, and the cache against online teacher logits (one run).

    Every training configuration makes one pass over the same ``steps * batch_size`` windows, each in a
    fresh process (``isolated``: its peak RSS is its own), or all in this one (a quick check of the
    plumbing: peak RSS then includes the configurations before it).
    """
    import tempfile

    epochs = p.distill.train.epochs
    models = project_model_configs(p)
    with tempfile.TemporaryDirectory(prefix="sad-trainbench-") as tmp:
        common = {
            "vocab": models["teacher"]["vocab_size"] if models else p.tokenizer.vocab_size,
            "max_tokens": max_tokens or p.context.max_tokens,
            "teacher": p.teacher.arch.model_dump(), "student": p.distill.student.model_dump(),
            "teacher_config": models and models["teacher"], "student_config": models and models["student"],
            "top_k": p.distill.teacher_logits.top_k, "teacher_batch": p.distill.teacher_logits.batch_size,
            "precision": p.distill.train.precision, "cache_precision": p.distill.teacher_logits.precision,
            "steps": steps, "batch_size": batch_size,
            "windows": steps * batch_size, "cache_dir": str(Path(tmp) / "cache"),
        }
        configs = [
            {"name": "matmul_peak", "mode": "peak", "needs_teacher": False},
            {"name": "cache_build", "mode": "build", "needs_teacher": True},
            {"name": "sad_cached", "method": {"loss": "sad"}, "mode": "cached", "needs_teacher": True},
            {"name": "token_kd_cached", "method": {"loss": "token_kd"}, "mode": "cached", "needs_teacher": True},
            {"name": "sft", "method": {"loss": "sft"}, "mode": "online", "needs_teacher": False},
            {"name": "sad_online", "method": {"loss": "sad"}, "mode": "online", "needs_teacher": True},
            {"name": "token_kd_online", "method": {"loss": "token_kd"}, "mode": "online", "needs_teacher": True},
            {"name": "teacher_sft", "method": {"loss": "sft"}, "mode": "online", "needs_teacher": False,
             "train_teacher": True},
            # the peak again after the training runs: a single 1-second reading can land low (a busy or
            # throttled moment) and make every MFU look high
            {"name": "matmul_peak_after", "mode": "peak", "needs_teacher": False},
        ]
        runs = {}
        for c in configs:
            if progress:
                progress(c["name"])
            runs[c["name"]] = _in_subprocess({**common, **c}) if isolated else run_config({**common, **c})
    peak, build, sad_c, kd_c, sft, sad_o, kd_o, teacher_sft, peak_after = (runs[c["name"]] for c in configs)
    readings = [peak["matmul_flops_per_s"], peak_after["matmul_flops_per_s"]]
    peak_flops = max(readings)  # MFU against the higher reading: the conservative one
    # The three-method sweep (sad, token_kd, sft), one pass each, then projected to distill.train.epochs:
    # online, both KD methods run the teacher at every step; cached, one build serves both.
    one_pass_online = sad_o["train_s"] + kd_o["train_s"] + sft["train_s"]
    one_pass_cached = build["build_s"] + sad_c["train_s"] + kd_c["train_s"] + sft["train_s"]
    proj_online = epochs * one_pass_online
    proj_cached = build["build_s"] + epochs * (sad_c["train_s"] + kd_c["train_s"] + sft["train_s"])
    return {
        "setup": {**{k: v for k, v in common.items() if k not in ("teacher", "student", "cache_dir", "teacher_config",
                                                                 "student_config")},
                  "models": ({"from": models["from"], "as": "the project's teacher and its layer-subset student"}
                             if models else {"as": "teacher.arch and distill.student (from scratch)"}),
                  "teacher": {k: teacher_sft[k] for k in ("parameters", "layers", "hidden_size")},
                  "student": {k: sft[k] for k in ("parameters", "layers", "hidden_size")}, "epochs": epochs,
                  "data": "synthetic windows shaped like the pipeline's (prompt, REASON/ACT/observation spans)",
                  "threads": __import__("torch").get_num_threads()},
        "runs": runs,
        "tokens_per_s": {"sad": sad_c["tokens_per_s"], "token_kd": kd_c["tokens_per_s"], "sft": sft["tokens_per_s"],
                         "sad_online": sad_o["tokens_per_s"], "token_kd_online": kd_o["tokens_per_s"],
                         "teacher_sft": teacher_sft["tokens_per_s"]},
        "sad_overhead_vs_token_kd": kd_c["tokens_per_s"] / sad_c["tokens_per_s"] - 1.0,
        # Student FLOP/s (6N + attention, on real tokens) over a square matmul's FLOP/s in the dtype training's
        # matmuls use (bf16 under autocast: distill.train.precision), same run and threads.
        "mfu": {"matmul_peak_flops_per_s": peak_flops, "dtype": peak["dtype"], "peak_readings": readings,
                "peak_spread": max(readings) / min(readings) - 1.0,
                "sft": sft["student_flops_per_s"] / peak_flops, "sad_cached": sad_c["student_flops_per_s"] / peak_flops,
                "token_kd_cached": kd_c["student_flops_per_s"] / peak_flops,
                "teacher_sft": teacher_sft["student_flops_per_s"] / peak_flops},
        "cache": {
            "bytes": build["cache_bytes"], "full_logits_bytes": build["full_logits_bytes"],
            "bytes_ratio": build["cache_bytes"] / build["full_logits_bytes"],
            "build_s": build["build_s"],
            "kd_step_speedup_vs_online": sad_c["tokens_per_s"] / sad_o["tokens_per_s"],
            "sweep_one_pass_online_s": one_pass_online, "sweep_one_pass_cached_s": one_pass_cached,
            "sweep_one_pass_time_saved": 1.0 - one_pass_cached / one_pass_online,
            f"sweep_{epochs:g}_epochs_time_saved_projected": 1.0 - proj_cached / proj_online,
            "peak_rss_mb": {"train_online": sad_o["peak_rss_mb"], "train_cached": sad_c["peak_rss_mb"],
                            "cache_build": build["peak_rss_mb"], "train_sft": sft["peak_rss_mb"]},
        },
    }


def benchmark_precision(config, batch_size: int = 4, seq_len: int = 512, steps: int = 4, seed: int = 0) -> dict[str, Any]:
    """One training step (forward, backward, AdamW) of a causal LM built from ``config`` (a transformers
    config; random weights: speed only), in fp32 and under CPU bf16 autocast, timed alternately so that
    both see the same machine load. Returns the median seconds and tokens/s per precision, the bf16
    speedup, and each dtype's measured matmul peak (the ceiling autocast could reach)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sad.bench.peak import matmul_peak_flops
    from sad.training import fused_adamw

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adamw(list(model.parameters())))
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))

    def step(bf16: bool) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - started

    step(False), step(True)  # warm-up
    times: dict[str, list[float]] = {"fp32": [], "bf16_autocast": []}
    for _ in range(steps):
        times["fp32"].append(step(False))
        times["bf16_autocast"].append(step(True))
    out: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()), "batch_size": batch_size,
                           "seq_len": seq_len, "threads": torch.get_num_threads()}
    for name, values in times.items():
        median = sorted(values)[len(values) // 2]
        out[name] = {"step_s": round(median, 4), "tokens_per_s": round(batch_size * seq_len / median, 1)}
    out["bf16_speedup"] = round(out["fp32"]["step_s"] / out["bf16_autocast"]["step_s"], 3)
    out["matmul_peak_gflops"] = {"fp32": round(matmul_peak_flops(dtype=torch.float32) / 1e9, 1),
                                 "bf16": round(matmul_peak_flops(dtype=torch.bfloat16) / 1e9, 1)}
    return out
