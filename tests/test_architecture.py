"""The shape of the code: the library stays free of the orchestrators, and no module imports back."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sad", "flows", "tasks")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for file in (REPO / package).rglob("*.py"):
            name = ".".join(file.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = file
    return out


def _imports(file: Path) -> set[str]:
    """Every module named by an import anywhere in ``file`` (top level or inside a function)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {n for n in _imports(f) if n in modules and n != m} for m, f in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_one_that_imports_it_back():
    graph = _graph()
    assert len(graph) > 40 and graph["flows.cli"]  # the graph was read
    assert _cycles(graph) == []


def test_the_cycle_finder_by_hand():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_library_imports_neither_prefect_nor_dvc():
    for name, file in _modules().items():
        if name.startswith("sad"):
            roots = {n.split(".")[0] for n in _imports(file)}
            assert not roots & {"prefect", "dvc"}, name


# ---------------------------------------------------------------- dvc.yaml's code deps are computed
def test_dvc_yaml_code_deps_are_the_computed_ones():
    from sad.stagegraph import with_code_deps

    committed = (REPO / "dvc.yaml").read_text()
    assert with_code_deps(committed) == committed, "dvc.yaml's sad/ deps are stale: run `sad dvc-deps`"


def test_every_dvc_stage_is_in_the_stage_graph_and_runs_real_modules():
    import yaml

    from sad.stagegraph import STAGE_ENTRIES, module_file

    assert set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]) == set(STAGE_ENTRIES)
    for stage, modules in STAGE_ENTRIES.items():
        assert all(module_file(m) is not None for m in modules), stage


def test_code_deps_follow_function_level_imports_and_skip_type_checking_ones():
    from sad.stagegraph import code_deps, imported_modules

    teacher = imported_modules("sad.stages.teacher")
    assert "sad.training" in teacher  # imported inside run_teacher
    assert "sad.envs.base" not in teacher  # only under `if TYPE_CHECKING:`
    distill = code_deps("distill")
    assert {"sad/losses.py", "sad/training.py", "sad/stages/distill.py", "sad/config.py"} <= set(distill)
    assert "sad/onpolicy.py" in distill and "sad/agent.py" in distill  # on-policy students play (imported in a function)
    assert "sad/stages/evaluate.py" not in distill and "sad/report.py" not in distill
    assert "sad/envs" in code_deps("tasks")  # every env module counts: the folder is the dep
    assert not any("tracking" in d for s in ("tasks", "distill", "evaluate") for d in code_deps(s))


def test_with_code_deps_keeps_data_deps_and_comments(tmp_path):
    from sad.stagegraph import code_deps, with_code_deps

    text = ("stages:\n  segment:\n    cmd: sad stage segment\n    deps:\n      - data/rollouts   # the teacher's\n"
            "      - sad/old_module.py\n    params:\n      - segment\n")
    out = with_code_deps(text)
    assert "      - data/rollouts   # the teacher's\n" in out and "old_module" not in out
    assert all(f"      - {d}\n" in out for d in code_deps("segment")) and out.endswith("      - segment\n")


def test_dvc_paths_follow_the_project_dir_keys(tmp_path):
    """dvc.yaml names no output folder literally: with `project.data_dir: elsewhere`, real DVC resolves
    every stage's data paths there."""
    import os
    import re
    import shutil
    import subprocess
    import sys

    text = (REPO / "dvc.yaml").read_text()
    assert not re.findall(r"^\s+- (data|models|metrics|reports)/", text, flags=re.M)
    shutil.copy2(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = (REPO / "params.yaml").read_text().replace("data_dir: data", "data_dir: elsewhere", 1)
    (tmp_path / "params.yaml").write_text(params)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = str(Path(sys.executable).parent / "dvc")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    dag = subprocess.run([dvc, "dag", "--outs", "--md"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert dag.returncode == 0, dag.stderr
    assert "elsewhere/tasks" in dag.stdout and "elsewhere/segments" in dag.stdout
    assert "data/tasks" not in dag.stdout and "models/teacher" in dag.stdout


def test_the_cli_stage_names_are_dvc_yaml_commands():
    """`sad stage NAME` runs exactly the stages dvc.yaml's commands name."""
    import re

    import yaml

    from flows.cli import Stage

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    commanded = {re.match(r"sad stage (\w+)", (s.get("do") or s)["cmd"]).group(1) for s in stages.values()}
    assert commanded == {s.value for s in Stage}


def test_every_stage_body_is_one_prefect_task_from_one_table():
    """tasks/stages.py builds a Prefect task for every stage body from one table (demos runs its shards as
    tasks instead); each task carries a policy of the one retry table and calls the body in sad.stages."""
    from flows.cli import Stage
    from sad import stages
    from tasks.stages import RETRY_POLICIES, STAGE_BODIES, STAGE_TASKS

    assert set(STAGE_TASKS) | {"demos"} == {s.value for s in Stage}
    for stage, (name, body, policy) in STAGE_BODIES.items():
        assert STAGE_TASKS[stage].name == name and STAGE_TASKS[stage].fn is body
        assert body is getattr(stages, f"run_{stage}") and body.__module__ == f"sad.stages.{stage}"
        assert STAGE_TASKS[stage].retries == RETRY_POLICIES[policy]["retries"]


def test_the_tree_is_clean_under_the_projects_ruff_configuration():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_bench_code_is_one_package_with_one_matmul_peak():
    bench = REPO / "sad" / "bench"
    assert not [f.name for f in (REPO / "sad").glob("*bench*.py")] and (bench / "__init__.py").is_file()
    peaks = [f.relative_to(REPO).as_posix() for f in REPO.glob("[sf]*/**/*.py")
             if any(isinstance(n, ast.FunctionDef) and "peak" in n.name and "matmul" in n.name for n in ast.walk(ast.parse(f.read_text())))]
    assert peaks == ["sad/bench/peak.py"]
