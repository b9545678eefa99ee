"""The results report in the paper's layout: tables with 95% confidence intervals, SAD against
token-KD as a paired comparison, the scaling sweep, and PNG plots.

Inputs are the evaluate stage's JSON per agent (``metrics/eval/<agent>.json``: per-seed,
per-task success), the scaling stage's JSON per size and the distill stage's loss curves.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from sad.stats import Interval, bootstrap_ci, paired_comparison

AGENT_ORDER = ("teacher", "sft", "token_kd", "sad")
ENV_SCORE = {"hotpotqa": ("f1", "F1"), "webshop": ("avg_reward", "score")}


def order_agents(agents: list[str]) -> list[str]:
    known = [a for a in AGENT_ORDER if a in agents]
    return known + sorted(a for a in agents if a not in AGENT_ORDER)


def envs_of(results: dict[str, dict[str, Any]], split: str = "test") -> list[str]:
    return sorted({env for r in results.values() for env in r["splits"].get(split, {}).get("envs", {})})


def success_matrix(result: dict[str, Any], split: str, env: str | None = None) -> list[list[float]]:
    """[seeds][tasks] success of one agent (all envs concatenated when ``env`` is None)."""
    rows = []
    for seed_result in result["seeds"].values():
        per_task = seed_result["splits"][split]["per_task"]
        rows.append(list(per_task[env]) if env else [v for e in sorted(per_task) for v in per_task[e]])
    return rows


def task_envs(result: dict[str, Any], split: str, env: str | None = None) -> list[str]:
    """The env of each column of :func:`success_matrix` (the strata of a bootstrap over all envs)."""
    per_task = next(iter(result["seeds"].values()))["splits"][split]["per_task"]
    return [e for e in sorted(per_task) if env in (None, e) for _ in per_task[e]]


def success_interval(result: dict[str, Any], split: str, env: str | None, n_boot: int, confidence: float) -> Interval | None:
    rows = success_matrix(result, split, env)
    if not rows or not rows[0]:
        return None
    return bootstrap_ci(rows, n_boot, confidence, strata=task_envs(result, split, env))


def success_table(results: dict[str, dict[str, Any]], split: str, n_boot: int, confidence: float) -> str:
    """Rows: agents; columns: success per env (and overall) with CIs, the share of the teacher's overall
    success (point estimates), + each benchmark's own score."""
    envs = envs_of(results, split)
    header = ["agent", "seeds", *[f"{env} success %" for env in envs], "all envs success %", "share of teacher"]
    header += [f"{env} {label} (0-1)" for env, (_, label) in ENV_SCORE.items() if env in envs]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    teacher = success_interval(results["teacher"], split, None, n_boot, confidence) if "teacher" in results else None
    for agent in order_agents(list(results)):
        r = results[agent]
        row = [agent, str(len(r["seeds"]))]
        for env in [*envs, None]:
            ci = success_interval(r, split, env, n_boot, confidence)
            row.append(ci.fmt() if ci else "-")
        row.append(f"{100 * ci.mean / teacher.mean:.0f}%" if ci and teacher and teacher.mean > 0 else "-")
        for env, (key, _) in ENV_SCORE.items():
            if env in envs:
                m = r["splits"][split]["envs"].get(env, {})
                row.append(f"{m[key]:.2f}" if key in m else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def behaviour_table(results: dict[str, dict[str, Any]], split: str = "test") -> str:
    """Rows: agents; columns: size, CoT match, action agreement, steps, reasoning length, invalid
    actions, actions repaired (``agent.action_choice: repair``), episodes stopped stuck
    (``agent.stop_after_failures``), latency and throughput (means over seeds)."""
    teacher_params = results.get("teacher", {}).get("parameters")
    header = ["agent", "objective", "params", "compression", "CoT match", "action agreement", "avg steps",
              "tokens / thought", "reasoning tokens / episode", "invalid actions", "repaired actions", "stopped stuck",
              "latency / step (s)",
              "generated tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for agent in order_agents(list(results)):
        r = results[agent]
        o = r["splits"].get(split, {}).get("overall", {})
        params = r.get("parameters", 0)
        agreement = r.get("agreement")
        row = [
            agent, r.get("objective", "-"), f"{params:,}",
            f"{teacher_params / params:.1f}x" if teacher_params and params else "-",
            f"{100 * agreement['cot_match_rate']:.1f}%" if agreement else "-",
            f"{100 * agreement['action_agreement']:.1f}%" if agreement else "-",
            _num(o.get("avg_steps"), ".1f"), _num(o.get("avg_thought_tokens"), ".1f"),
            _num(o.get("avg_reasoning_tokens"), ".1f"), _pct(o.get("invalid_action_rate")),
            _pct(o.get("repaired_step_rate")), _pct(o.get("stuck_stop_rate")),
            _num(o.get("latency_per_step_s"), ".3f"), _num(o.get("generated_tokens_per_s"), ".0f"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def step_accuracy_table(results: dict[str, dict[str, Any]]) -> str:
    """Rows: agents; columns: step accuracy on the expert's dev states, overall and per env (means over seeds)."""
    envs = sorted({env for r in results.values() for env in r.get("step_accuracy", {}).get("envs", {})})
    header = ["agent", "all", *envs]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for agent in order_agents(list(results)):
        acc = results[agent].get("step_accuracy")
        if not acc:
            continue
        row = [agent, f"{100 * acc['step_accuracy']:.1f}%"]
        row += [f"{100 * acc['envs'][env]['step_accuracy']:.1f}%" if env in acc["envs"] else "-" for env in envs]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) if len(lines) > 2 else "No step accuracy (the demos stage wrote no dev episodes)."


def step_accuracy_by_kind_table(results: dict[str, dict[str, Any]]) -> str:
    """Rows: env and the expert action's verb (with its dev step count); columns: agents' step accuracy on those
    steps, means over seeds. Empty when no agent has per-kind numbers."""
    kinds: dict[tuple[str, str], int] = {}
    rates: dict[str, dict[tuple[str, str], float]] = {}
    for agent in order_agents(list(results)):
        seeds = (results[agent].get("step_accuracy") or {}).get("seeds") or {}
        per_kind: dict[tuple[str, str], list[float]] = {}
        for seed in seeds.values():
            for env, body in seed.get("envs", {}).items():
                for kind, r in body.get("by_kind", {}).items():
                    kinds[(env, kind)] = max(kinds.get((env, kind), 0), int(r["steps"]))
                    per_kind.setdefault((env, kind), []).append(r["step_accuracy"])
        if per_kind:
            rates[agent] = {key: sum(v) / len(v) for key, v in per_kind.items()}
    if not rates:
        return ""
    agents = list(rates)
    lines = ["| env | action | dev steps | " + " | ".join(agents) + " |", "|" + "---|" * (3 + len(agents))]
    for env, kind in sorted(kinds):
        row = [env, f"`{kind}`", str(kinds[(env, kind)])]
        row += [f"{100 * rates[a][(env, kind)]:.1f}%" if (env, kind) in rates[a] else "-" for a in agents]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def paired_section(results: dict[str, dict[str, Any]], a: str, b: str, split: str, n_boot: int,
                   confidence: float) -> tuple[str, dict[str, Any]]:
    """SAD against token-KD on the same tasks and seed indices: difference in success, its CI,
    the one-sided bootstrap p-value and win/loss counts, per env and overall."""
    if a not in results or b not in results:
        return f"(`{a}` or `{b}` is not among the methods: no paired comparison)", {}
    if len(results[a]["seeds"]) != len(results[b]["seeds"]):
        return f"(`{a}` and `{b}` have different seed counts: no paired comparison)", {}
    lines = [f"| env | {a} - {b} (success, points) | {ci_level(confidence)}% CI | P({a} not better) | wins / losses |",
             "|---|---|---|---|---|"]
    out: dict[str, Any] = {}
    for env in [*envs_of(results, split), None]:
        cmp = paired_comparison(success_matrix(results[a], split, env), success_matrix(results[b], split, env),
                                n_boot, confidence, strata=task_envs(results[a], split, env))
        d = cmp.difference
        name = env or "all envs"
        out[name] = cmp.as_dict()
        lines.append(f"| {name} | {100 * d.mean:+.1f} | [{100 * d.low:+.1f}, {100 * d.high:+.1f}] | "
                     f"{cmp.p_not_better:.3f} | {cmp.wins} / {cmp.losses} |")
    return "\n".join(lines), out


def ci_level(confidence: float) -> str:
    """``0.95`` -> ``"95"``, ``0.975`` -> ``"97.5"``."""
    return f"{100 * confidence:.10g}"


def verdict(comparison: dict[str, Any], a: str, b: str, confidence: float) -> str:
    """One plain sentence on whether ``a`` beats ``b`` overall."""
    overall = comparison.get("all envs")
    if not overall:
        return ""
    d = overall["difference"]
    level = ci_level(confidence)
    if overall.get("wins") == 0 and overall.get("losses") == 0:
        return (f"**No difference between {a} and {b}**: identical on every task and seed (0 won, 0 lost), "
                "so no interval can say which is better.")
    if d["low"] > 0:
        return (f"**{a} beats {b}**: +{100 * d['mean']:.1f} points of test success over all environments, "
                f"{level}% CI [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}].")
    if d["high"] < 0:
        return (f"**{a} is worse than {b}**: {100 * d['mean']:+.1f} points, {level}% CI "
                f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}].")
    return (f"**No significant difference between {a} and {b}**: {100 * d['mean']:+.1f} points of test success, "
            f"{level}% CI [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] includes 0.")


def scaling_points(results: dict[str, dict[str, Any]], scaling: dict[str, dict[str, Any]], method: str,
                   n_boot: int, confidence: float) -> list[dict[str, Any]]:
    """(size, parameters, test success CI) for the main student of ``method`` (first seed) and each sweep size."""
    points = []
    if method in results:
        r = results[method]
        first = next(iter(r["seeds"]))
        ci = bootstrap_ci([success_matrix({"seeds": {first: r["seeds"][first]}}, "test")[0]], n_boot, confidence,
                          strata=task_envs(r, "test"))
        points.append({"size": "main", "parameters": r["parameters"], "success": ci})
    for size, s in scaling.items():
        per_task = s["splits"]["test"]["per_task"]
        row = [v for e in sorted(per_task) for v in per_task[e]]
        envs = [e for e in sorted(per_task) for _ in per_task[e]]
        points.append({"size": size, "parameters": s["parameters"],
                       "success": bootstrap_ci([row], n_boot, confidence, strata=envs)})
    return sorted(points, key=lambda x: x["parameters"])


def scaling_table(points: list[dict[str, Any]], method: str, seed: int = 0) -> str:
    lines = [f"| student size | params | `{method}` test success % (seed {seed}) |", "|---|---|---|"]
    lines += [f"| {p['size']} | {p['parameters']:,} | {p['success'].fmt()} |" for p in points]
    return "\n".join(lines)


def task_type_table(results: dict[str, dict[str, Any]], split: str = "test") -> str:
    agents = order_agents(list(results))
    types = sorted({t for r in results.values() for t in r["splits"].get(split, {}).get("by_task_type", {})})
    lines = ["| task type | " + " | ".join(agents) + " |", "|---|" + "---|" * len(agents)]
    for t in types:
        cells = []
        for a in agents:
            v = results[a]["splits"].get(split, {}).get("by_task_type", {}).get(t)
            cells.append("-" if v is None else f"{100 * v:.0f}%")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Write a PNG atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    _figure().close(fig)
    tmp.replace(path)


def success_plot(results: dict[str, dict[str, Any]], path: Path, n_boot: int, confidence: float,
                 split: str = "test") -> None:
    """Grouped bars: success per environment (and over all) for every agent, with CI error bars."""
    plt = _figure()
    agents = order_agents(list(results))
    groups = [*envs_of(results, split), None]
    width = 0.8 / max(len(agents), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 0.4 * len(agents)), 3.8))
    for i, agent in enumerate(agents):
        cis = [success_interval(results[agent], split, env, n_boot, confidence) for env in groups]
        means = [100 * c.mean if c else 0 for c in cis]
        errors = [[100 * (c.mean - c.low) if c else 0 for c in cis], [100 * (c.high - c.mean) if c else 0 for c in cis]]
        xs = [g + (i - (len(agents) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, means, width, yerr=errors, capsize=3, label=agent, color="#555555" if agent == "teacher" else None)
    ax.set_xticks(range(len(groups)), [g or "all envs" for g in groups])
    ax.set_ylabel(f"{split} success (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Success by method and environment ({ci_level(confidence)}% CI over episodes and seeds)")
    ax.legend(fontsize=8, ncol=min(len(agents), 4))
    fig.tight_layout()
    _save(fig, path)


def scaling_plot(points: list[dict[str, Any]], method: str, teacher_success: float | None, path: Path) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    xs = [p["parameters"] for p in points]
    ys = [100 * p["success"].mean for p in points]
    err = [[100 * (p["success"].mean - p["success"].low) for p in points],
           [100 * (p["success"].high - p["success"].mean) for p in points]]
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{method} students")
    for p, x, y in zip(points, xs, ys):
        ax.annotate(p["size"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if teacher_success is not None:
        ax.axhline(100 * teacher_success, color="#555555", linestyle="--", label="teacher")
    ax.set_xscale("log")
    ax.set_xlabel("student parameters")
    ax.set_ylabel("test success (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Success against student size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def reasoning_plot(results: dict[str, dict[str, Any]], path: Path, split: str = "test") -> None:
    """Reasoning length per agent: tokens per thought and per episode."""
    plt = _figure()
    agents = order_agents(list(results))
    per_thought = [results[a]["splits"][split]["overall"].get("avg_thought_tokens", 0) for a in agents]
    per_episode = [results[a]["splits"][split]["overall"].get("avg_reasoning_tokens", 0) for a in agents]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.bar(agents, per_thought, color="#3b7dd8")
    ax1.set_title("tokens per thought")
    ax2.bar(agents, per_episode, color="#d8843b")
    ax2.set_title("reasoning tokens per episode")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"Reasoning length ({split})")
    fig.tight_layout()
    _save(fig, path)


def read_curves(folder: Path, methods: list[str]) -> dict[str, dict[int, list[tuple[int, float, str]]]]:
    """``metrics/curves/<method>.csv`` -> {method: {seed: [(step, loss, phase)]}} (phase: ``off-policy`` or
    ``round <r>`` of on-policy training; files without the column are all off-policy)."""
    out: dict[str, dict[int, list[tuple[int, float, str]]]] = {}
    for method in methods:
        path = folder / f"{method}.csv"
        if not path.is_file():
            continue
        with path.open() as fh:
            for row in csv.DictReader(fh):
                out.setdefault(method, {}).setdefault(int(row["seed"]), []).append(
                    (int(row["step"]), float(row["loss"]), row.get("phase") or "off-policy"))
    return out


def curves_plot(curves: dict[str, dict[int, list[tuple[int, float, str]]]], path: Path) -> None:
    """Training loss against step, one line per method and seed; a dotted line where an on-policy round starts."""
    plt = _figure()
    fig, axes = plt.subplots(1, max(len(curves), 1), figsize=(3.2 * max(len(curves), 1), 3.2), squeeze=False)
    for ax, (method, by_seed) in zip(axes[0], curves.items()):
        for seed, points in sorted(by_seed.items()):
            ax.plot([s for s, _, _ in points], [v for _, v, _ in points], label=f"seed {seed}", linewidth=1)
        first = next(iter(sorted(by_seed.items())))[1]
        for (_, _, before), (step, _, phase) in zip(first, first[1:]):
            if phase != before:
                ax.axvline(step, color="grey", linestyle=":", linewidth=1)
                ax.text(step, 1, f" {phase}", transform=ax.get_xaxis_transform(), fontsize=6, va="top")
        ax.set_title(method)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("training loss")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Learning curves (each method's own objective; on-policy rounds after the dotted lines)")
    fig.tight_layout()
    _save(fig, path)


def comparison_pairs(onpolicy_methods: list[str], ablations: tuple[str, ...] | list[str] = ()) -> list[tuple[str, str]]:
    """The paired comparisons of the report: SAD against token-KD, each on-policy method against
    off-policy SAD and token-KD, and each SAD ablation against full SAD (a negative difference: the
    part switched off helps)."""
    return [("sad", "token_kd"), *[(m, b) for m in onpolicy_methods for b in ("sad", "token_kd")],
            *[(m, "sad") for m in ablations if m != "sad"]]


def onpolicy_table(distill_metrics: dict[str, dict[str, Any]], envs: list[str]) -> str:
    """Per on-policy method, seed and round: what the student did on its own train episodes (success per
    env, invalid actions), how many the expert took over, the round's windows and expert labels."""
    lines = ["| method | seed | round | own success | " + " | ".join(envs) + " | invalid actions | taken over | "
             "own windows / all | expert labels | final loss |",
             "|---|---|---|---|" + "---|" * len(envs) + "---|---|---|---|---|"]
    unmeasured = False
    for method, metrics in sorted(distill_metrics.items()):
        for seed, m in sorted(metrics.get("seeds", {}).items()):
            r = 0
            while f"onpolicy_r{r}_episodes" in m:
                def get(key: str, r: int = r, m: dict = m) -> Any:
                    return m.get(f"onpolicy_r{r}_{key}")

                invalid = [get(f"{env}_invalid") for env in envs if get(f"{env}_invalid") is not None]
                unmeasured = unmeasured or get("success") is None
                row = [f"`{method}`", str(seed), str(r), _pct(get("success")),
                       *[_pct(get(f"{env}_success")) for env in envs],
                       _pct(sum(invalid) / len(invalid)) if invalid else "-", str(int(get("taken_over") or 0)),
                       f"{int(get('own_windows') or 0)} / {int(get('windows') or 0)}", str(int(get("expert_labels") or 0)),
                       f"{get('final_loss'):.4f}" if get("final_loss") is not None else "-"]
                lines.append("| " + " | ".join(row) + " |")
                r += 1
    if len(lines) <= 2:
        return "No on-policy method (a method with `onpolicy:` in distill.methods)."
    return "\n".join(lines) + ("" if not unmeasured else "\n\n\"-\": no episode the student played alone (with `takeover_start` and "
                               "`takeover_end` at 1.0 the expert shadows every episode and takes over at the "
                               "student's first mistake, so own success is not measured in the rounds).")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, spec: str) -> str:
    """A metric an evaluation did not record is "-", not 0."""
    return "-" if value is None else format(value, spec)


PLOTS = ("success.png", "scaling.png", "reasoning.png", "learning_curves.png")


def render_report(results: dict[str, dict[str, Any]], registry: dict[str, Any] | None, profile: str,
                  objectives: dict[str, str], scaling_md: str, paired: list[tuple[str, str, str, str]],
                  n_boot: int, confidence: float, onpolicy_md: str = "", gate_split: str = "dev") -> str:
    """results.md; ``paired``: (a, b, verdict, table) per paired comparison."""
    level = ci_level(confidence)
    by_kind = step_accuracy_by_kind_table(results)
    parts = [
        "# Structured Agent Distillation: results",
        "",
        f"Profile: `{profile}`. Held-out **test** tasks. Success in percent with {level}% bootstrap confidence "
        f"intervals over episodes and training seeds ({n_boot} resamples; success intervals at least the Wilson "
        f"interval over the tasks, so that no or every task won is not read as certain). The promotion gate uses "
        f"the {gate_split} split.",
        "Objective per method: " + "; ".join(f"`{m}`: {n}" for m, n in sorted(objectives.items())) + ".",
        "",
        "## Success (test)",
        "",
        success_table(results, "test", n_boot, confidence),
        "",
        "![success by method and environment](success.png)",
        "",
        "## Step accuracy (dev expert states)",
        "",
        "Share of the expert's dev steps where the agent, given exactly its play-time context, freely generates a "
        "thought and an action equal to the expert's" + ("; below it, by the expert action's verb (means over seeds)."
                                                         if by_kind else "."),
        "",
        step_accuracy_table(results),
        "",
        *([by_kind, ""] if by_kind else []),
        *[line for a, b, verdict_md, table_md in paired for line in (
            f"## `{a}` against `{b}` (paired: same tasks, same seed index)", "",
            *([verdict_md, ""] if verdict_md else []), table_md, "")],
        "## Behaviour (test; means over seeds)",
        "",
        "CoT match: share of the teacher's test steps where the student's thought, teacher-forced on the same "
        "context, has ROUGE-L F1 >= the threshold against the teacher's; action agreement: share where its action "
        "equals the teacher's.",
        "",
        behaviour_table(results, "test"),
        "",
        "![reasoning length](reasoning.png)",
        "",
        "## Student size",
        "",
        scaling_md,
        "",
        "![success against student size](scaling.png)",
        "",
        "## Success by task type (test)",
        "",
        task_type_table(results, "test"),
        "",
        "## Learning curves",
        "",
        "![learning curves](learning_curves.png)",
    ]
    if onpolicy_md:
        parts += ["", "## On-policy rounds (the students' own train episodes)", "", onpolicy_md]
    if "dev" in next(iter(results.values()), {}).get("splits", {}):
        parts += ["", "## Dev split", "", success_table(results, "dev", n_boot, confidence)]
    if registry:
        st = registry.get("standing", {})
        metric = st.get("gate_metric")
        value = st.get("gate_value", float("nan"))
        shown = f"{100 * value:.1f}%" if metric == "success_rate" else f"{value:.4f}"
        success = "" if metric == "success_rate" else f", success {100 * st.get('success_rate', 0):.1f}%"
        parts += ["", "## Registry candidate", "",
                  f"- `{registry.get('method')}` seed {registry.get('seed')}, on the {gate_split} split: {metric} "
                  f"{shown}{success} (teacher {100 * st.get('teacher_success_rate', 0):.1f}%)",
                  "- registered and gated by the retrain flow (`sad pipeline`); decision: `reports/registry.json`,"
                  " `sad registry list`"]
    return "\n".join(parts) + "\n"
