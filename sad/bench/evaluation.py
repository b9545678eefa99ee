"""Evaluation throughput: episodes/s with many episodes batched on the KV cache against one at a time,
and with the prefix store (each context reuses the keys/values of the prefix it shares with an earlier
one) against encoding every context from scratch: prefill tokens per generated token, before/after.

Both runs play the same freshly generated tasks (every environment, a short step cap so the
one-at-a-time run stays short) with the same model, greedy, in one process.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sad.config import Params


def _capped(p: Params, max_steps: int) -> Params:
    t = p.tasks
    tasks = t.model_copy(update={
        "alfworld": t.alfworld.model_copy(update={"max_steps": max_steps}),
        "hotpotqa": t.hotpotqa.model_copy(update={"max_steps": max_steps}),
        "webshop": t.webshop.model_copy(update={"max_steps": max_steps}),
    })
    return p.model_copy(update={"tasks": tasks})


def benchmark_evaluation(p: Params, model_dir: Path | None, per_env: int = 8, batch_size: int = 16,
                         max_steps: int = 5, compare_cache: bool = True) -> dict[str, Any]:
    """Play ``per_env`` test tasks per environment with ``batch_size`` episodes in flight, then one at a time."""
    import torch

    from sad.agent import LMAgent, PrefixStore
    from sad.bench.peak import matmul_peak_flops
    from sad.environments import generate_fresh
    from sad.evaluation import load_agent
    from sad.modeling import cpu_has_native_bf16
    from sad.rollout import PlayStats, play_agent

    dtype_names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    capped = _capped(p, max_steps)
    if model_dir is not None and (model_dir / "config.json").is_file():
        agent = load_agent(model_dir, p)
        model = f"{model_dir} (trained)"
    else:
        from sad.modeling import build_llama
        from sad.tokenizer import train_bpe

        tokenizer = train_bpe(["Thought: look around.\nAction: look\nObservation: nothing.\n"] * 20,
                              p.tokenizer.vocab_size, 1)
        agent = LMAgent(build_llama(p.teacher.arch, tokenizer, p.context.max_tokens), tokenizer, p.context.max_new_tokens)
        model = "untrained model of the teacher's size (no models/teacher)"
    out: dict[str, Any] = {"model": model, "episodes": per_env * len(p.tasks.envs), "max_steps": max_steps,
                           "max_new_tokens": p.context.max_new_tokens, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="sad-evalbench-") as tmp:
        root = Path(tmp)
        tasks = []
        for env in p.tasks.envs:  # each env writes under root/<env>/, as the tasks stage does
            tasks += generate_fresh(capped, env, "test", per_env, root)
        # Warm-up (untimed): the first play pays one-off costs (environment caches, allocator, kernels).
        play_agent(tasks, root, agent, "warm-up", p.context.max_tokens, batch_size, history_steps=p.context.history_steps,
                   evict_to=p.context.evict_to)
        capacity = agent.prefix_store.capacity if agent.prefix_store is not None else 64
        evict = p.context.evict_to
        # (label, batch size, static cache with row prefill, prefix reuse: True = contexts and generated blocks,
        #  "contexts" = contexts only, False = none, action choice, evict_to)
        runs = [("batched", batch_size, True, True, "free", evict), ("one_at_a_time", 1, True, True, "free", evict),
                ("batched_no_prefix_reuse", batch_size, True, False, "free", evict),
                ("batched_context_reuse_only", batch_size, True, "contexts", "free", evict),  # generated blocks not kept
                # choosing among the environment's valid actions: every step (admissible) or only the
                # steps whose generated action is not listed (repair)
                ("batched_admissible", batch_size, True, True, "admissible", evict),
                ("batched_repair", batch_size, True, True, "repair", evict)]
        # block eviction against a sliding context, whichever of the two the params play
        runs.append(("batched_block_eviction", batch_size, True, True, "free", 0.5) if evict == 1.0
                    else ("batched_sliding_context", batch_size, True, True, "free", 1.0))
        if compare_cache:  # the path before: one padded prefill with a mask, a growing (re-copied) KV cache
            runs.append(("batched_growing_cache", batch_size, False, False, "free", evict))
        # decoding attends over the whole preallocated static cache (its unwritten tail masked), as before
        runs.append(("batched_full_cache_attention", batch_size, True, True, "free", evict))
        played = next(agent.model.parameters()).dtype
        other = torch.float32 if played == torch.bfloat16 else (torch.bfloat16 if cpu_has_native_bf16() else None)
        # each run's model FLOP/s against the square-matmul peak of the dtype it plays in (as training's MFU)
        peaks = {dtype: matmul_peak_flops(dtype=dtype) for dtype in (played, other) if dtype is not None}
        out["generation_peak_flops_per_s"] = {dtype_names[dtype]: peak for dtype, peak in peaks.items()}
        if other is not None:  # the other dtype, for its time only (weights converted from the played ones)
            runs.append((f"batched_{dtype_names[other]}", batch_size, True, True, "free", evict))
        for label, size, new_path, reuse, choice, evict_to in runs:
            agent.sliced_attention = label != "batched_full_cache_attention"
            if other is not None and label == f"batched_{dtype_names[other]}":  # the last run
                saved = {k: v.clone() for k, v in agent.model.state_dict().items()}  # bf16 would round fp32 weights
                agent.model.to(other)
            agent.static_cache = agent.row_prefill = new_path
            agent.prefix_store = PrefixStore(capacity) if reuse else None  # empty: no run reuses another's contexts
            agent.keep_blocks = reuse is True
            agent.prefill_computed = agent.prefill_reused = 0
            stats = PlayStats()
            started = time.perf_counter()
            episodes = play_agent(tasks, root, agent, "bench", p.context.max_tokens, size, stats=stats,
                                  history_steps=p.context.history_steps, action_choice=choice, evict_to=evict_to)
            seconds = time.perf_counter() - started
            steps = sum(e.n_steps for e in episodes)
            out["runs"][label] = {"batch_size": size, "seconds": seconds, "episodes_per_s": len(episodes) / seconds,
                                  "steps": steps, "steps_per_s": steps / seconds,
                                  "generated_tokens_per_s": stats.tokens_per_second,
                                  "prefill_tokens_per_generated_token": agent.prefill_computed / max(stats.generated_tokens, 1),
                                  "prefill_reused_share": agent.prefill_reused / max(agent.prefill_computed + agent.prefill_reused, 1),
                                  "scored_steps": stats.scored_steps, "scoring_seconds": stats.scoring_seconds,
                                  # generation only: the prefixes admissible/repair scoring encodes are outside
                                  # both these counters and generation time
                                  **generation_flops(agent.model, stats, stats.prefill_computed, stats.prefill_reused,
                                                     len(episodes), peaks[next(agent.model.parameters()).dtype])}
    if other is not None:
        agent.model.to(played).load_state_dict(saved)
    b, one = out["runs"]["batched"], out["runs"]["one_at_a_time"]
    out["speedup_episodes_per_s"] = b["episodes_per_s"] / one["episodes_per_s"]
    # per step: equal to the episodes/s ratio when both play the same steps, and fair when they do not (bf16
    # rounding can end an episode a step earlier in one of them)
    out["speedup_steps_per_s"] = b["steps_per_s"] / one["steps_per_s"]
    out["same_steps"] = b["steps"] == one["steps"]
    fresh = out["runs"]["batched_no_prefix_reuse"]
    out["prefix_reuse_speedup"] = b["episodes_per_s"] / fresh["episodes_per_s"]
    out["prefill_tokens_cut"] = fresh["prefill_tokens_per_generated_token"] / max(b["prefill_tokens_per_generated_token"], 1e-9)
    out["same_steps"] = out["same_steps"] and fresh["steps"] == b["steps"]
    contexts_only = out["runs"]["batched_context_reuse_only"]
    out["prefill_tokens_cut_contexts_only"] = (fresh["prefill_tokens_per_generated_token"]
                                               / max(contexts_only["prefill_tokens_per_generated_token"], 1e-9))
    out["kept_blocks_speedup"] = b["episodes_per_s"] / contexts_only["episodes_per_s"]
    out["same_steps"] = out["same_steps"] and contexts_only["steps"] == b["steps"]
    # block eviction (the agent sees less history, so other contexts and other steps) against the same no-reuse
    # baseline, and its speed per step against the sliding context
    block, sliding = ((out["runs"]["batched_block_eviction"], b) if "batched_block_eviction" in out["runs"]
                      else (b, out["runs"]["batched_sliding_context"]))
    out["prefill_tokens_cut_block_eviction"] = (fresh["prefill_tokens_per_generated_token"]
                                                / max(block["prefill_tokens_per_generated_token"], 1e-9))
    out["block_eviction_step_speedup"] = block["steps_per_s"] / sliding["steps_per_s"]
    per_step = b["seconds"] / max(b["steps"], 1)  # other choices play other steps: cost per step, not per run
    for choice in ("admissible", "repair"):
        run = out["runs"][f"batched_{choice}"]
        out[f"{choice}_cost_per_step"] = run["seconds"] / max(run["steps"], 1) / per_step
        # on the steps that score (HotPotQA lists no actions, and repair scores only rejected ones): a free
        # step's cost plus the scoring's own time per scored step
        out[f"{choice}_cost_per_scored_step"] = (
            (per_step + run["scoring_seconds"] / run["scored_steps"]) / per_step if run["scored_steps"] else None)
        out[f"{choice}_scored_step_share"] = run["scored_steps"] / max(run["steps"], 1)
    if compare_cache:
        grow = out["runs"]["batched_growing_cache"]
        out["cache_path_speedup"] = b["episodes_per_s"] / grow["episodes_per_s"]
        out["same_steps"] = out["same_steps"] and grow["steps"] == b["steps"]
    full = out["runs"]["batched_full_cache_attention"]
    out["sliced_attention_speedup"] = b["episodes_per_s"] / full["episodes_per_s"]
    out["same_steps_sliced_attention"] = full["steps"] == b["steps"]
    out["play_dtype"] = dtype_names[played]
    if other is not None:  # bf16 against fp32 play, whichever is the params' (agent.precision)
        run = out["runs"][f"batched_{dtype_names[other]}"]
        bf16, fp32 = (b, run) if played == torch.bfloat16 else (run, b)
        out["bf16_play_speedup_per_step"] = bf16["steps_per_s"] / fp32["steps_per_s"]
    else:
        out["bf16_play_speedup_per_step"] = None  # no bf16 instructions on this CPU: not measured
    agent.static_cache = agent.row_prefill = agent.keep_blocks = agent.sliced_attention = True
    agent.prefix_store = PrefixStore(capacity)
    out["decode_batch_ceiling"] = decode_batch_ceiling(agent.model, batch_size, written=int(0.75 * p.context.max_tokens))
    return out


@contextlib.contextmanager
def sliced_decoding(model) -> Iterator[bool]:
    """Within the block, ``model`` (if it uses transformers' ``sdpa``) attends over the written KV-cache positions
    only, as :class:`sad.agent.LMAgent` decodes; yields whether it does (then pass ``kv_length``)."""
    from sad.agent import SLICED_SDPA, _register_sliced_sdpa

    config = model.config
    sliced = config._attn_implementation == "sdpa"
    if sliced:
        _register_sliced_sdpa()
        config._attn_implementation = SLICED_SDPA
    try:
        yield sliced
    finally:
        if sliced:
            config._attn_implementation = "sdpa"


def decode_step(model, rows: int, written: int, sliced: bool) -> Callable[[], None]:
    """One decode forward of ``model`` for ``rows`` rows, each with ``written`` positions in a static KV cache in
    the model's dtype (the next token's keys and values are written in place, at the same position each call)."""
    import inspect

    import torch
    from transformers import StaticCache

    from sad.agent import kv_heads_and_dim

    config = model.config
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    heads, head_dim = kv_heads_and_dim(config)
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    cache = StaticCache(config=config, max_cache_len=written + 1)
    cache.early_initialization(rows, heads, head_dim, dtype, device)
    inputs = {"input_ids": torch.ones(rows, 1, dtype=torch.long, device=device),
              "attention_mask": torch.ones(rows, written + 1, dtype=torch.long, device=device),
              "position_ids": torch.full((rows, 1), written, device=device), "use_cache": True, "logits_to_keep": 1,
              cache_arg: cache, **({"kv_length": written + 1} if sliced else {})}

    def step() -> None:
        for layer in cache.layers:
            layer.cumulative_length.fill_(written)
        model(**inputs)

    return step


def generation_flops(model, stats, prefill_computed: int, prefill_reused: int, episodes: int,
                     peak_flops_per_s: float) -> dict[str, float]:
    """A play's generation FLOPs against the machine's limit, approximately. Every token run through the model
    (generated or prefilled) costs ``inference_flops_per_token`` at the play's mean context: a step's context (its
    prefilled and reused tokens over the blocks generated) plus half a generated block (a prefilled token attends
    to fewer positions, and prefill computes no head outputs but the last: a few percent too many FLOPs).

    Returns the achieved FLOP/s over generation time, its share of the peak (``flop_utilisation``), and the
    generated tokens/s and episodes/s the play would reach at the peak with the same work per token and per
    episode (``*_at_peak``)."""
    from sad.bench.peak import inference_flops_per_token

    config = model.config
    parameters = sum(t.numel() for t in model.parameters())
    blocks = max(stats.blocks, 1)
    context = (prefill_computed + prefill_reused) / blocks + stats.generated_tokens / blocks / 2
    per_token = inference_flops_per_token(parameters, config.num_hidden_layers, config.hidden_size, context)
    flops = per_token * (stats.generated_tokens + prefill_computed)
    seconds = max(stats.generation_seconds, 1e-9)
    return {"mean_context_tokens": context, "model_flops_per_s": flops / seconds,
            "flop_utilisation": flops / seconds / peak_flops_per_s,
            "generated_tokens_per_s_at_peak": stats.generated_tokens * peak_flops_per_s / max(flops, 1.0),
            "episodes_per_s_at_peak": episodes * peak_flops_per_s / max(flops, 1.0)}


def decode_batch_ceiling(model, batch_size: int, written: int, repeats: int = 8) -> dict[str, Any]:
    """What batching can give decoding at most: one decode forward of ``model`` with ``batch_size`` rows against
    one row, each row with ``written`` cached positions (:func:`decode_step` under :func:`sliced_decoding`).
    ``tokens_per_s_ratio`` bounds the episodes/s that batching alone can add to play: prefill (one context at a
    time), block rounds that last as long as their longest block, and episodes that end at different steps only
    take from it."""
    import torch

    def step_ms(rows: int, sliced: bool) -> float:
        step = decode_step(model, rows, written, sliced)
        step()  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            step()
        return (time.perf_counter() - started) / repeats * 1000

    with torch.inference_mode(), sliced_decoding(model) as sliced:
        one, many = step_ms(1, sliced), step_ms(batch_size, sliced)
    return {"batch_size": batch_size, "written_positions": written, "step_ms_one_row": one, "step_ms_batch": many,
            "tokens_per_s_ratio": batch_size * one / many}


def benchmark_student_vs_teacher(p: Params, teacher_dir: Path, student_dir: Path, per_env: int = 4,
                                 batch_size: int = 16, max_steps: int = 5) -> dict[str, Any]:
    """Per-step latency and generated tokens/s of the teacher and a student on the same tasks (batched).

    Untrained models of the params' sizes stand in for missing folders (said in the output).
    """
    from sad.agent import LMAgent
    from sad.environments import generate_fresh
    from sad.evaluation import load_agent
    from sad.modeling import build_llama, count_parameters
    from sad.rollout import PlayStats, play_agent
    from sad.tokenizer import train_bpe

    capped = _capped(p, max_steps)
    stand_in = None
    agents = {}
    for name, folder, arch in (("teacher", teacher_dir, p.teacher.arch), ("student", student_dir, p.distill.student)):
        if (folder / "config.json").is_file():
            agents[name] = (load_agent(folder, p), f"{folder} (trained)")
        else:
            stand_in = stand_in or train_bpe(["Thought: look around.\nAction: look\nObservation: nothing.\n"] * 20,
                                             p.tokenizer.vocab_size, 1)
            model = build_llama(arch, stand_in, p.context.max_tokens)
            agents[name] = (LMAgent(model, stand_in, p.context.max_new_tokens), "untrained, params' size")
    out: dict[str, Any] = {"episodes": per_env * len(p.tasks.envs), "batch_size": batch_size, "max_steps": max_steps}
    with tempfile.TemporaryDirectory(prefix="sad-agentbench-") as tmp:
        root = Path(tmp)
        tasks = [t for env in p.tasks.envs for t in generate_fresh(capped, env, "test", per_env, root)]
        for name, (agent, source) in agents.items():
            stats = PlayStats()
            episodes = play_agent(tasks, root, agent, name, p.context.max_tokens, batch_size, stats=stats,
                                  history_steps=p.context.history_steps, evict_to=p.context.evict_to)
            steps = sum(e.n_steps for e in episodes)
            out[name] = {"model": source, "parameters": count_parameters(agent.model),
                         # a step's own time in the decode batch, from joining it to its block's end (continuous batching)
                         "latency_per_step_s": sum(s.latency_s for e in episodes for s in e.steps) / max(steps, 1),
                         "generation_s_per_episode_step": stats.generation_seconds / max(steps, 1),
                         "generated_tokens_per_s": stats.tokens_per_second, "steps": steps}
    t, st = out["teacher"], out["student"]
    out["student_speedup_tokens_per_s"] = st["generated_tokens_per_s"] / max(t["generated_tokens_per_s"], 1e-9)
    out["student_speedup_per_step"] = t["generation_s_per_episode_step"] / max(st["generation_s_per_episode_step"], 1e-9)
    return out
