"""Each DVC stage's code dependencies, computed from what its modules import inside ``sad/``.

A stage's code is its module in :mod:`sad.stages` plus every library module reachable from it by
imports (top-level or inside a function, transitively; ``if TYPE_CHECKING:`` imports do not run and
do not count). A parent package's ``__init__`` counts only when it is imported by name: importing
``sad.stages.distill`` also runs ``sad/stages/__init__.py``, which only re-exports.
``sad dvc-deps`` writes the result into dvc.yaml's ``deps`` (the ``sad/…`` entries); a test fails
when the committed file differs. Logging to MLflow (:mod:`sad.tracking`) changes no stage output,
so no stage depends on it.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

from sad.io import MissingEntryError

LIBRARY = Path(__file__).resolve().parent
ROOT = LIBRARY.parent

# The library modules each stage runs. Beyond its own module: the Prefect task layer plays the
# expert's shards with sad.rollout.play_expert (demos) and agents' shards with
# sad.evaluation.play_model (rollout, evaluate) on workers (tasks/stages.py).
STAGE_ENTRIES: dict[str, tuple[str, ...]] = {
    "tasks": ("sad.stages.tasks",),
    "demos": ("sad.stages.demos", "sad.rollout"),
    "pretrained": ("sad.stages.pretrained",),
    "tokenizer": ("sad.stages.tokenizer",),
    "teacher": ("sad.stages.teacher",),
    "rollout": ("sad.stages.rollout", "sad.evaluation"),
    "segment": ("sad.stages.segment",),
    "teacher_logits": ("sad.stages.teacher_logits",),
    "student_init": ("sad.stages.student_init",),
    "distill": ("sad.stages.distill",),
    "evaluate_teacher": ("sad.stages.evaluate", "sad.evaluation"),
    "evaluate": ("sad.stages.evaluate", "sad.evaluation"),
    "scale": ("sad.stages.scale",),
    "select": ("sad.stages.select",),
    "report": ("sad.stages.report",),
}


def module_file(module: str) -> Path | None:
    """The file of a library module (``sad.a.b`` -> sad/a/b.py or sad/a/b/__init__.py), None if not one."""
    if module != "sad" and not module.startswith("sad."):
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Import statements that run, skipping ``if TYPE_CHECKING:`` bodies."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for child in node.orelse for n in _import_nodes_of(child))
            continue
        yield from _import_nodes_of(node)


def _import_nodes_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    else:
        yield from _import_nodes(node)


@cache
def imported_modules(module: str) -> frozenset[str]:
    """Library modules that ``module`` imports directly (``from sad.x import y`` names sad.x.y when y is
    a module, else sad.x)."""
    file = module_file(module)
    if file is None:
        return frozenset()
    names: set[str] = set()
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    for node in _import_nodes(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
            continue
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            names.add(sub if module_file(sub) is not None else base)
    return frozenset(n for n in names if module_file(n) is not None and n != module)


def stage_modules(stage: str) -> set[str]:
    """Every library module a stage runs (its entries and all they import, transitively)."""
    if stage not in STAGE_ENTRIES:
        raise MissingEntryError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_ENTRIES)}")
    seen: set[str] = set()
    todo = list(STAGE_ENTRIES[stage])
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(imported_modules(module) - seen)
    return seen


def code_deps(stage: str) -> list[str]:
    """dvc.yaml ``deps`` paths for a stage's code: a package folder when every module in it counts, else files."""
    files = {module_file(m).relative_to(ROOT).as_posix() for m in stage_modules(stage)}
    out: set[str] = set()
    for folder in sorted({Path(f).parent for f in files}, key=lambda d: len(d.parts), reverse=True):
        if folder == Path("sad"):
            continue
        members = {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).glob("*.py")}
        if members and members <= files:
            files -= members
            out.add(folder.as_posix())
    return sorted(out | files)


_STAGE = re.compile(r"^  (\w+):\s*(#.*)?$")
_DEPS = re.compile(r"^(\s+)deps:\s*$")
_ITEM = re.compile(r"^(\s+)- (\S+)")


def with_code_deps(dvc_yaml: str) -> str:
    """dvc.yaml's text with each stage's ``sad/…`` deps replaced by :func:`code_deps` (other deps, their
    comments and the rest of the file stay as they are). A stage the graph does not know is an error."""
    lines = dvc_yaml.splitlines(keepends=True)
    out: list[str] = []
    stage: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        match = _STAGE.match(line)
        if match:
            stage = match.group(1)
        deps = _DEPS.match(line)
        out.append(line)
        i += 1
        if not deps or stage is None:
            continue
        if stage not in STAGE_ENTRIES:
            raise ValueError(f"dvc.yaml: stage {stage!r} has no entry in sad/stagegraph.py STAGE_ENTRIES "
                             "(add the modules it runs there)")
        indent = None
        while i < len(lines) and (item := _ITEM.match(lines[i])):
            indent = item.group(1)
            if not item.group(2).startswith("sad/"):
                out.append(lines[i])
            i += 1
        indent = indent or deps.group(1) + "  "
        out.extend(f"{indent}- {path}\n" for path in code_deps(stage))
    return "".join(out)
