"""Merge the metrics of one pipeline run per seed into one folder, so that ``sad stage report`` there
reports every method over all its seeds (issue #18: each seed was run in its own copy of a project
folder, ``distill.seeds: [s]``, on the same teacher, tasks and data).

    python docs/experiments/merge_seeds.py --into /tmp/combo /tmp/tk /tmp/tk1 /tmp/tk2 \
        --methods sad token_kd sft sad_takeover_wide
    cd /tmp/combo && sad stage report

For every method it merges ``metrics/eval/<m>.json`` and ``metrics/distill/<m>.json`` (the per-seed
entries side by side, the means recomputed the way the stages compute them), concatenates
``metrics/curves/<m>.csv`` and links ``data/eval/<m>/seed<s>``; the teacher's metrics must be the
same in every folder (checked on the test success per task). ``--into`` must be a copy of the first
folder; its ``params.yaml`` gets ``distill.seeds`` and ``distill.methods`` restricted to what was merged.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any

import yaml

from sad.io import write_json_atomic, write_text_atomic
from sad.stages.evaluate import aggregate_seeds, mean_step_accuracy
from sad.stages.layout import mean_over_seeds


def _read(folder: Path, kind: str, method: str) -> dict[str, Any]:
    path = folder / "metrics" / kind / f"{method}.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (run 'sad stage {'evaluate --agent' if kind == 'eval' else 'distill --method'} "
                         f"{method}' in {folder} first)")
    return json.loads(path.read_text())


def _merged_eval(parts: list[dict[str, Any]]) -> dict[str, Any]:
    seeds: dict[str, Any] = {}
    for part in parts:
        for seed, body in part["seeds"].items():
            if seed in seeds:
                raise SystemExit(f"seed {seed} of {part['agent']} found in two folders")
            seeds[seed] = body
    out = {**parts[0], "seeds": seeds, "splits": aggregate_seeds({s: b["splits"] for s, b in seeds.items()})}
    accuracy = {s: v for part in parts if "step_accuracy" in part for s, v in part["step_accuracy"]["seeds"].items()}
    if accuracy:
        out["step_accuracy"] = mean_step_accuracy(accuracy)
    agreement = {s: v for part in parts if "agreement" in part for s, v in part["agreement"]["seeds"].items()}
    if agreement:
        out["agreement"] = {**parts[0]["agreement"], "seeds": agreement,
                            "cot_match_rate": sum(a["cot_match_rate"] for a in agreement.values()) / len(agreement),
                            "action_agreement": sum(a["action_agreement"] for a in agreement.values()) / len(agreement)}
    return out


def _merged_distill(parts: list[dict[str, Any]]) -> dict[str, Any]:
    seeds = {s: m for part in parts for s, m in part["seeds"].items()}
    return {**parts[0], **mean_over_seeds(seeds), "seeds": seeds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="project folders, one pipeline run per seed")
    ap.add_argument("--into", type=Path, required=True, help="a copy of the first folder, where the merge is written")
    ap.add_argument("--methods", nargs="+", required=True, help="methods to merge (each evaluated in every folder)")
    ap.add_argument("--allow-missing", action="store_true",
                    help="merge a method from the folders that have it (at least the first), e.g. a method whose "
                         "later seeds have not run yet; its seed count then differs and the report skips its pairs")
    args = ap.parse_args()
    into = args.into
    teacher = [_read(f, "eval", "teacher")["seeds"] for f in args.folders]
    if any(t != teacher[0] for t in teacher[1:]):
        raise SystemExit("the folders' teacher evaluations differ: they are not runs of one project")
    all_seeds: set[int] = set()
    for method in args.methods:
        folders = args.folders
        if args.allow_missing:
            folders = [f for f in args.folders if (f / "metrics" / "eval" / f"{method}.json").is_file()
                       and (f / "metrics" / "distill" / f"{method}.json").is_file()]
            if args.folders[0] not in folders:
                raise SystemExit(f"{method}: not evaluated in {args.folders[0]}, the folder --into copies")
            for skipped in sorted(set(args.folders) - set(folders)):
                print(f"{method}: not evaluated in {skipped}, left out")
        evals = [_read(f, "eval", method) for f in folders]
        distills = [_read(f, "distill", method) for f in folders]
        merged = _merged_eval(evals)
        write_json_atomic(into / "metrics" / "eval" / f"{method}.json", merged)
        write_json_atomic(into / "metrics" / "distill" / f"{method}.json", _merged_distill(distills))
        rows: list[dict[str, str]] = []
        for folder in folders:
            rows += list(csv.DictReader((folder / "metrics" / "curves" / f"{method}.csv").open()))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["step", "seed", "loss", "phase"])
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(into / "metrics" / "curves" / f"{method}.csv", buf.getvalue())
        for index, (folder, part) in enumerate(zip(folders, evals)):
            for seed in part["seeds"]:
                link = into / "data" / "eval" / method / f"seed{seed}"
                source = (folder / "data" / "eval" / method / f"seed{seed}").resolve()
                if index == 0 or link.resolve() == source:  # the first folder's episodes are in its copy already
                    if not link.is_dir():
                        raise SystemExit(f"{link}: missing; --into must be a copy of {folder}")
                    continue
                if link.is_symlink() or link.exists():
                    raise SystemExit(f"{link}: exists and is not {source}; remove it first")
                link.symlink_to(source)
        seeds = sorted(int(s) for s in merged["seeds"])
        all_seeds.update(seeds)
        print(f"{method}: seeds {seeds}, test success {merged['splits']['test']['overall']['success_rate']:.3f}")
    params_file = into / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["distill"]["seeds"] = sorted(all_seeds)
    params["distill"]["methods"] = {m: params["distill"]["methods"][m] for m in args.methods}
    write_text_atomic(params_file, yaml.safe_dump(params, sort_keys=False))
    print(f"{params_file}: distill.seeds {sorted(all_seeds)}, methods {args.methods}; now run 'sad stage report' there")


if __name__ == "__main__":
    main()
