"""The comparison report: one row per agent, a markdown table and a success plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

AGENT_ORDER = ("teacher", "sft", "token_kd", "sad")


def _order(agents: list[str]) -> list[str]:
    known = [a for a in AGENT_ORDER if a in agents]
    return known + sorted(a for a in agents if a not in AGENT_ORDER)


def env_cell(env: str, m: dict[str, float] | None) -> str:
    """Success rate (episodes), plus the benchmark's own score: HotPotQA F1, WebShop mean reward."""
    if not m:
        return "-"
    cell = f"{100 * m['success_rate']:.1f}% ({int(m['episodes'])})"
    if "f1" in m:
        cell += f", F1 {m['f1']:.2f}"
    elif env == "webshop":
        cell += f", score {m.get('avg_reward', 0.0):.2f}"
    return cell


def results_table(results: dict[str, dict[str, Any]], split: str = "test") -> str:
    """Markdown table from ``{agent: evaluation metrics}`` (the evaluate stage's JSON)."""
    agents = _order(list(results))
    envs = sorted({env for r in results.values() for env in r["splits"].get(split, {}).get("envs", {})})
    teacher_params = results.get("teacher", {}).get("parameters")
    header = ["agent", "method", "params", "compression"]
    header += [{"hotpotqa": "hotpotqa EM", "webshop": "webshop success"}.get(env, f"{env} success") for env in envs]
    header += ["avg steps", "reasoning tokens / episode", "tokens / thought", "invalid actions", "latency / step (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for agent in agents:
        r = results[agent]
        overall = r["splits"].get(split, {}).get("overall", {})
        params = r.get("parameters", 0)
        compression = f"{teacher_params / params:.1f}x" if teacher_params and params else "-"
        row = [agent, r.get("method", "-"), f"{params:,}", compression]
        for env in envs:
            row.append(env_cell(env, r["splits"][split]["envs"].get(env)))
        row += [
            f"{overall.get('avg_steps', 0):.1f}",
            f"{overall.get('avg_reasoning_tokens', 0):.1f}",
            f"{overall.get('avg_thought_tokens', 0):.1f}",
            f"{100 * overall.get('invalid_action_rate', 0):.1f}%",
            f"{overall.get('latency_per_step_s', 0):.3f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def task_type_table(results: dict[str, dict[str, Any]], split: str = "test") -> str:
    agents = _order(list(results))
    types = sorted({t for r in results.values() for t in r["splits"].get(split, {}).get("by_task_type", {})})
    lines = ["| task type | " + " | ".join(agents) + " |", "|---|" + "---|" * len(agents)]
    for t in types:
        cells = []
        for a in agents:
            v = results[a]["splits"].get(split, {}).get("by_task_type", {}).get(t)
            cells.append("-" if v is None else f"{100 * v:.0f}%")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def success_plot(results: dict[str, dict[str, Any]], path: Path, split: str = "test") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = _order(list(results))
    values = [100 * results[a]["splits"].get(split, {}).get("overall", {}).get("success_rate", 0.0) for a in agents]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(agents, values, color=["#555555" if a == "teacher" else "#3b7dd8" for a in agents])
    ax.bar_label(bars, fmt="%.1f%%")
    ax.set_ylabel(f"success rate on {split} (%)")
    ax.set_ylim(0, max(100, max(values, default=0) * 1.15))
    ax.set_title("Success by agent")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def render_report(results: dict[str, dict[str, Any]], registry: dict[str, Any] | None, profile: str,
                  normalisation: dict[str, str]) -> str:
    parts = [
        "# Structured Agent Distillation: results",
        "",
        f"Profile: `{profile}`. Held-out **test** tasks; the gate for promotion uses the dev split.",
        "Objective per method (divergence, weights, normalisation): "
        + "; ".join(f"`{m}`: {n}" for m, n in sorted(normalisation.items())) + ".",
        "",
        results_table(results, "test"),
        "",
        "## Success by task type (test)",
        "",
        task_type_table(results, "test"),
        "",
        "![success](success.png)",
    ]
    if "dev" in next(iter(results.values()), {}).get("splits", {}):
        parts += ["", "## Dev split", "", results_table(results, "dev")]
    if registry:
        parts += ["", "## Registry", "", f"- candidate: `{registry.get('candidate')}`"
                  f" (dev success {registry.get('challenger_value', 0):.3f})",
                  f"- registered version: {registry.get('version')}; promoted to champion: "
                  f"{registry.get('promoted')} ({registry.get('reason')})"]
    return "\n".join(parts) + "\n"
