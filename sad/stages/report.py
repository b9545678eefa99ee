"""Stage ``report``: results.md and the plots."""

from __future__ import annotations

import json
from typing import Any

from sad.config import Params
from sad.io import write_json_atomic, write_text_atomic
from sad.stages.layout import candidate_file, load_eval_results, load_scaling_results


def run_report(p: Params) -> dict[str, Any]:
    """results.md in the paper's layout, with CIs, the paired comparisons (SAD vs token-KD, each on-policy
    method vs SAD and token-KD, each SAD ablation vs SAD), the on-policy rounds and plots."""
    from sad import report as r

    agents = ["teacher", *p.distill.methods]
    results = load_eval_results(p, agents)
    scaling = load_scaling_results(p)
    n_boot, confidence = p.evaluate.bootstrap, p.evaluate.confidence
    registry_file = candidate_file(p)
    registry = json.loads(registry_file.read_text()) if registry_file.is_file() else None
    objectives = {m: s.describe() for m, s in p.distill.methods.items()}
    onpolicy = [m for m, spec in p.distill.methods.items() if spec.onpolicy is not None]
    ablations = [m for m, spec in p.distill.methods.items() if spec.is_sad_ablation]
    paired, overall = [], {}
    for a, b in r.comparison_pairs(onpolicy, ablations):
        table_md, comparison = r.paired_section(results, a, b, "test", n_boot, confidence)
        paired.append((a, b, r.verdict(comparison, a, b, confidence), table_md))
        overall[f"{a}_vs_{b}"] = comparison.get("all envs", {})
    onpolicy_md = r.onpolicy_table({m: json.loads(p.path("metrics", "distill", f"{m}.json").read_text()) for m in onpolicy},
                                   r.envs_of(results)) if onpolicy else ""
    method = p.distill.scaling.method
    points = r.scaling_points(results, scaling, method, n_boot, confidence)
    teacher_success = results["teacher"]["splits"]["test"]["overall"]["success_rate"]
    reports = p.path("reports")
    r.success_plot(results, reports / "success.png", n_boot, confidence)
    r.scaling_plot(points, method, teacher_success, reports / "scaling.png")
    r.reasoning_plot(results, reports / "reasoning.png")
    r.curves_plot(r.read_curves(p.path("metrics", "curves"), list(p.distill.methods)), reports / "learning_curves.png")
    text = r.render_report(results, registry, p.project.profile, objectives,
                           r.scaling_table(points, method, p.distill.seeds[0]), paired, n_boot, confidence, onpolicy_md,
                           p.registration.gate_split)
    write_text_atomic(reports / "results.md", text)
    summary = {
        "test_success": {a: res["splits"]["test"]["overall"]["success_rate"] for a, res in results.items()},
        "sad_vs_token_kd": overall["sad_vs_token_kd"],
        "paired": overall,
        "scaling": {pt["size"]: {"parameters": pt["parameters"], "success": pt["success"].mean} for pt in points},
    }
    write_json_atomic(p.path("metrics", "report.json"), summary)
    return summary
