"""The bad-input catalogue: every case feeds the real code a broken input and checks that

1. the error is clear and names the item (the key, file and line, episode, task or folder) - or,
   for agent output, the environment answers with a counted invalid step and nothing else happens;
2. nothing is half-written: the project folder is byte-for-byte what it was, with no temp files.

Stage-level cases run the stage functions (``sad.stages.run_*``, what ``sad stage`` runs) in a
small project folder; the rest call the library function that reads the input.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sad.config import ConfigError, deep_merge, load_params, parse_params

from .conftest import REPO

PROJECT_PARAMS = {"tasks": {"envs": ["alfworld"], "train": 2, "dev": 1, "test": 1},
                  "context": {"max_tokens": 512, "max_new_tokens": 40}}


# --------------------------------------------------------------------------- the project folder
@pytest.fixture(scope="module")
def template(tmp_path_factory, demos, tokenizer, tiny_model_factory) -> Path:
    """A project after rollout: params, tasks, tokenizer, teacher, good rollouts and segments."""
    from sad.modeling import save_model
    from sad.stages import run_segment, run_tasks

    root = tmp_path_factory.mktemp("bad-input-project")
    (root / "params.yaml").write_text(yaml.safe_dump(PROJECT_PARAMS))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        p = parse_params(PROJECT_PARAMS)
        run_tasks(p)
        tokenizer.save_pretrained("models/tokenizer")
        save_model(tiny_model_factory(seed=1), tokenizer, Path("models/teacher"))
        rows = [e.to_dict() for e in demos[:4]]
        Path("data/rollouts").mkdir(parents=True)
        Path("data/rollouts/rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        run_segment(p)
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def project(template, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "project"
    shutil.copytree(template, root)
    monkeypatch.chdir(root)
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".old"))


def fails_cleanly(run: Callable[[], object], error: type[BaseException], names: str, folder: Path) -> str:
    """``run()`` raises ``error`` whose message matches ``names``, and ``folder`` is left as it was."""
    before = snapshot(folder)
    with pytest.raises(error) as err:
        run()
    message = str(err.value)
    assert re.search(names, message), f"message does not name the item ({names!r}):\n{message}"
    assert snapshot(folder) == before, "a failed run changed the project folder"
    assert leftovers(folder) == []
    return message


def params(**patch) -> object:
    return parse_params(deep_merge(PROJECT_PARAMS, patch))


# --------------------------------------------------------------------------- 1. parameters
BAD_PARAMS = [
    ("wrong type", {"teacher": {"train": {"lr": "fast"}}}, r"teacher\.train\.lr: .*got 'fast'"),
    ("out of range", {"tasks": {"train": 0}}, r"tasks\.train: .*greater than or equal to 1"),
    ("unknown key", {"tasks": {"tarin": 5}}, r"tasks\.tarin: unknown key \(did you mean 'train'\?\)"),
    ("unknown nested key", {"distill": {"methods": {"sad": {"loss": "sad", "lambda_reasn": 1.0}}}},
     r"distill\.methods\.sad\.lambda_reasn: unknown key \(did you mean 'lambda_reason'\?\)"),
    ("unknown key in a method's on-policy rounds", {"distill": {"methods": {"sad": {"loss": "sad", "onpolicy": {"round": 2}}}}},
     r"distill\.methods\.sad\.onpolicy\.round: unknown key \(did you mean 'rounds'\?\)"),
    ("unknown key like none", {"distill": {"zzz": 1}}, r"distill\.zzz: unknown key \(check the spelling against params\.yaml\)"),
    ("bad nested choice", {"distill": {"methods": {"sad": {"loss": "sad", "normalisation": "mean"}}}},
     r"distill\.methods\.sad\.normalisation: Input should be 'per_kind_mean' or 'token_sum' \(got 'mean'\)"),
    ("bad choice", {"segment": {"keep": "best"}}, r"segment\.keep"),
    ("unknown environment", {"tasks": {"envs": ["alfworld", "minecraft"]}}, r"tasks\.envs"),
    ("unknown gate metric", {"register": {"gate_metric": "vibes"}}, r"register\.gate_metric"),
    ("inconsistent budgets", {"context": {"max_tokens": 64, "max_new_tokens": 60}}, r"max_new_tokens"),
    ("bad architecture", {"teacher": {"arch": {"hidden_size": 30, "num_heads": 4}}}, r"teacher\.arch"),
    ("list instead of mapping", {"tasks": {"alfworld": ["pick"]}}, r"tasks\.alfworld"),
    ("unknown task type", {"tasks": {"alfworld": {"task_types": ["make_coffee"]}}}, r"tasks\.alfworld.*unknown: \['make_coffee'\]"),
    ("gate on the training split", {"register": {"gate_split": "train"}}, r"register\.gate_split"),
]


@pytest.mark.parametrize("patch, names", [(p, n) for _, p, n in BAD_PARAMS], ids=[i for i, _, _ in BAD_PARAMS])
def test_bad_parameter_names_the_key(patch, names, project):
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(deep_merge(base, patch)))
    message = fails_cleanly(lambda: load_params("params.yaml"), ConfigError, names, project)
    assert message.startswith("params.yaml: invalid parameters")


@pytest.mark.parametrize("text, names", [("tasks: [unclosed\n", r"params\.yaml: not valid YAML"),
                                         ("- 1\n- 2\n", r"params\.yaml: expected a mapping")],
                         ids=["invalid YAML", "not a mapping"])
def test_unreadable_parameter_file_is_named(text, names, project):
    (project / "params.yaml").write_text(text)
    fails_cleanly(lambda: load_params("params.yaml"), ConfigError, names, project)


# --------------------------------------------------------------------------- 2. transcripts (marker rules)
BAD_TRANSCRIPTS = [
    ("missing markers", "You are in a room.\nI go to the desk.\n", r"episode ep-1: no REASON or ACT line"),
    ("empty thought", "[alfworld] room\nThought:\nAction: look\nObservation: ok\n", r"episode ep-1: line 2: empty REASON"),
    ("unclosed step", "[alfworld] room\nThought: look first\n", r"episode ep-1: the transcript ends with a REASON line"),
    ("nested marker", "[alfworld] room\nThought: go Action: look\nAction: look\nObservation: ok\n",
     r"episode ep-1: line 2: nested marker 'Action:'"),
    ("multi-line action", "[alfworld] room\nThought: t\nAction: look\nand more\nObservation: ok\n",
     r"episode ep-1: line 4: a ACT piece must be one line"),
    ("observation first", "Observation: ok\nThought: t\nAction: look\n", r"episode ep-1: line 1: an observation before"),
]


@pytest.mark.parametrize("text, names", [(t, n) for _, t, n in BAD_TRANSCRIPTS], ids=[i for i, _, _ in BAD_TRANSCRIPTS])
def test_malformed_transcript_names_episode_and_line(text, names, tmp_path):
    from sad.markers import SegmentationError, split_transcript

    fails_cleanly(lambda: split_transcript(text, "react", "ep-1"), SegmentationError, names, tmp_path)


def test_out_of_order_step_numbers_are_named(tmp_path):
    from sad.markers import SegmentationError, split_transcript

    text = "Question: q\nThought 1: a\nAction 1: search[x]\nObservation 1: o\nThought 3: b\nAction 3: finish[y]\n"
    fails_cleanly(lambda: split_transcript(text, "hotpotqa", "hp-3"), SegmentationError,
                  r"episode hp-3: line 5: step number 3 out of order", tmp_path)


# --------------------------------------------------------------------------- 3. trajectory files (segment stage)
def _rollouts(project: Path) -> list[dict]:
    return [json.loads(line) for line in (project / "data/rollouts/rollouts.jsonl").read_text().splitlines()]


def _write_rollouts(project: Path, rows: list, raw: bytes | None = None) -> None:
    path = project / "data/rollouts/rollouts.jsonl"
    path.write_bytes(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows).encode())


def _segment_fails(project: Path, error, names: str) -> None:
    from sad.stages import run_segment

    shutil.rmtree(project / "data/segments")  # the stage must not create it when its input is bad
    (project / "metrics/segment.json").unlink()
    fails_cleanly(lambda: run_segment(params()), error, names, project)
    assert not (project / "data/segments").exists()


def _bytes_case(mutate: Callable[[list[bytes]], list[bytes]]):
    def apply(project: Path) -> None:
        lines = (project / "data/rollouts/rollouts.jsonl").read_bytes().splitlines(keepends=True)
        _write_rollouts(project, [], b"".join(mutate(lines)))
    return apply


def _rows_case(mutate: Callable[[list[dict]], list]):
    def apply(project: Path) -> None:
        _write_rollouts(project, mutate(_rollouts(project)))
    return apply


def _set(row: dict, **fields) -> dict:
    return {**row, **fields}


def _step(row: dict, index: int = 0, **fields) -> dict:
    steps = [dict(s) for s in row["steps"]]
    steps[index].update(fields)
    return {**row, "steps": steps}


BAD_TRAJECTORIES = [
    ("invalid UTF-8", _bytes_case(lambda ls: [ls[0], b'{"episode_id": "\xff\xfe"}\n', *ls[1:]]),
     ValueError, r"rollouts\.jsonl:2: not valid UTF-8"),
    ("truncated JSON line", _bytes_case(lambda ls: [*ls[:2], ls[2][: len(ls[2]) // 2] + b"\n", *ls[3:]]),
     ValueError, r"rollouts\.jsonl:3: not valid JSON"),
    ("a line that is not an object", _bytes_case(lambda ls: [ls[0], b"[1, 2, 3]\n", *ls[1:]]),
     ValueError, r"rollouts\.jsonl:2: expected a JSON object"),
    ("missing field", _rows_case(lambda rs: [{k: v for k, v in rs[0].items() if k != "prompt"}, *rs[1:]]),
     ValueError, r"rollouts\.jsonl:1: not an episode .*prompt"),
    ("steps not a list of steps", _rows_case(lambda rs: [rs[0], _set(rs[1], steps=["Thought: x"]), *rs[2:]]),
     ValueError, r"rollouts\.jsonl:2: not an episode"),
    ("duplicate episode ids", _rows_case(lambda rs: [*rs, rs[1]]),
     ValueError, r"rollouts\.jsonl:5: duplicate episode id .* \(first on line 2\)"),
    ("empty action in a valid step", _rows_case(lambda rs: [_step(rs[0], 1, action=""), *rs[1:]]),
     ValueError, r"an action must be a single non-empty line.* in episode\(s\) expert:alfworld"),
    ("marker inside a field", _rows_case(lambda rs: [rs[0], _step(rs[1], 0, thought="fine\nAction: take all"), *rs[2:]]),
     ValueError, r"episode expert:alfworld/train/00001: line \d+: nested marker 'Action:' inside a REASON line"),
    ("thought of extreme length", _rows_case(lambda rs: [rs[0], _step(rs[1], 2, thought="think " * 5000), *rs[2:]]),
     ValueError, r"episode expert:alfworld/train/00001: step 2: its thought and action take \d+ tokens, more than the \d+ left"),
    ("wrong field type", _rows_case(lambda rs: [_step(rs[0], 0, thought=12345), *rs[1:]]),
     ValueError, r"rollouts\.jsonl \(trajectories\): StepSchema failed\n.*column thought\] in episode\(s\) expert:alfworld/train/00000"),
    ("empty file", _bytes_case(lambda ls: []),
     ValueError, r"rollouts\.jsonl.*no episodes"),
]


@pytest.mark.parametrize("mutate, error, names", [c[1:] for c in BAD_TRAJECTORIES], ids=[c[0] for c in BAD_TRAJECTORIES])
def test_bad_trajectory_file_names_the_item_and_writes_nothing(mutate, error, names, project):
    mutate(project)
    _segment_fails(project, error, names)


# --------------------------------------------------------------------------- 4. tables, checkpoints, models
def test_window_table_with_wrong_columns_names_the_file(project):
    from sad.schemas import SchemaViolation
    from sad.segment import load_windows

    path = project / "data/segments/windows.parquet"
    pd.read_parquet(path).drop(columns=["act_mask"]).to_parquet(path)
    fails_cleanly(lambda: load_windows(project / "data/segments"), SchemaViolation,
                  r"windows\.parquet: WindowSchema failed\n.*column_in_dataframe.*\(act_mask\)", project)


def test_window_masks_of_the_wrong_length_name_the_episode(project):
    from sad.schemas import SchemaViolation
    from sad.segment import load_windows

    path = project / "data/segments/windows.parquet"
    df = pd.read_parquet(path)
    df.at[0, "act_mask"] = list(df.at[0, "act_mask"])[:-1]
    df.to_parquet(path)
    fails_cleanly(lambda: load_windows(project / "data/segments"), SchemaViolation,
                  rf"must all have n_tokens entries[\s\S]*{re.escape(df.at[0, 'episode_id'])}", project)


def test_half_written_window_table_names_the_file_and_the_cache_stage_writes_nothing(project):
    from sad.stages import run_teacher_logits

    path = project / "data/segments/windows.parquet"
    path.write_bytes(path.read_bytes()[:200])
    fails_cleanly(lambda: run_teacher_logits(params(), progress=False), ValueError, r"windows\.parquet", project)


@pytest.mark.parametrize("damage", ["truncated weights", "pickle only", "no config"])
def test_damaged_model_folder_names_the_folder_and_the_stage_writes_nothing(damage, project):
    from sad.stages import run_teacher_logits

    teacher = project / "models/teacher"
    weights = teacher / "model.safetensors"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
        names = r"models/teacher: cannot load the model"
    elif damage == "pickle only":
        weights.rename(teacher / "pytorch_model.bin")
        names = r"models/teacher: no \*\.safetensors weights \(only safetensors"
    else:
        (teacher / "config.json").unlink()
        names = r"models/teacher: cannot load the model"
    error = FileNotFoundError if damage == "pickle only" else ValueError
    fails_cleanly(lambda: run_teacher_logits(params(), progress=False), error, names, project)
    assert not (project / "data/teacher_logits").exists()


@dataclass
class _Ckpt:
    name: str
    damage: Callable[[Path], None]
    logged: str


CHECKPOINTS = [
    _Ckpt("corrupted state", lambda d: (d / "trainer_state.pt").write_bytes(b"garbage"), "is unreadable"),
    _Ckpt("half-written weights", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:64]),
          "weights .*model.safetensors are unreadable"),
    _Ckpt("another run's checkpoint", lambda d: None, "other settings or data"),
]


@pytest.mark.parametrize("case", CHECKPOINTS, ids=[c.name for c in CHECKPOINTS])
def test_damaged_checkpoint_is_named_and_never_half_used(case, project, tokenizer, tiny_model_factory, caplog):
    """A checkpoint that cannot be trusted is reported (folder named) and training starts over:
    the result equals a run that never had a checkpoint."""
    import torch

    from sad.config import MethodParams, TrainParams
    from sad.segment import load_windows
    from sad.training import train_lm

    windows = load_windows(project / "data/segments")
    train = TrainParams(epochs=2, batch_size=4, lr=1e-2, seed=5, checkpoint_every=2, dev_fraction=0)
    sft = MethodParams(loss="sft")
    reference = tiny_model_factory(hidden=16, seed=2)
    train_lm(reference, windows, sft, train, tokenizer.pad_token_id, progress=False)
    ckpt = project / ".checkpoints" / "student"
    train_lm(tiny_model_factory(hidden=16, seed=2), windows, sft, train, tokenizer.pad_token_id, checkpoint_dir=ckpt,
             fingerprint="run-1", stop_after=3, progress=False)
    case.damage(ckpt)
    model = tiny_model_factory(hidden=16, seed=2)
    fingerprint = "run-2" if case.name == "another run's checkpoint" else "run-1"
    result = train_lm(model, windows, sft, train, tokenizer.pad_token_id, checkpoint_dir=ckpt, fingerprint=fingerprint,
                      progress=False)
    assert result.resumed_from == 0
    assert str(ckpt) in caplog.text and re.search(case.logged, caplog.text), caplog.text
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert leftovers(project) == []


# --------------------------------------------------------------------------- 5. tokenizers
def test_teacher_and_student_tokenizer_mismatch_is_named(demos, tokenizer, tmp_path):
    from sad.react import episode_text
    from sad.tokenizer import check_compatible, train_bpe

    other = train_bpe([episode_text(e) for e in demos[:3]], vocab_size=300)
    fails_cleanly(lambda: check_compatible(tokenizer, other, "teacher (models/teacher)", "student (hf:gpt2)"),
                  ValueError, r"tokenizers differ: teacher \(models/teacher\) has \d+ tokens, student \(hf:gpt2\) \d+",
                  tmp_path)


def test_missing_tokenizer_names_the_folder_and_the_stage_writes_nothing(project):
    (project / "models/tokenizer/tokenizer.json").unlink()
    _segment_fails(project, FileNotFoundError, r"models/tokenizer: no tokenizer\.json")


# --------------------------------------------------------------------------- 6. official data files (tasks stage)
def _hotpot_record(i: int, **override) -> dict:
    rec = {"_id": f"q{i}", "question": "Who?", "answer": "A", "type": "bridge", "level": "easy",
           "supporting_facts": [["A", 0]], "context": [["A", ["A is a page."]]]}
    return {**rec, **override}


def _official_hotpot(project: Path, records) -> dict:
    path = project / "official" / "hotpot_dev.json"
    path.parent.mkdir()
    path.write_text(records if isinstance(records, str) else json.dumps(records))
    return {"tasks": {"envs": ["hotpotqa"], "hotpotqa": {"official": str(path)}}}


def _official_webshop(project: Path, products, instructions) -> dict:
    folder = project / "official" / "webshop"
    folder.mkdir(parents=True)
    if products is not None:
        (folder / "items_shuffle.json").write_text(json.dumps(products))
    if instructions is not None:
        (folder / "items_human_ins.json").write_text(json.dumps(instructions))
    return {"tasks": {"envs": ["webshop"], "webshop": {"official": str(folder)}}}


def _official_alfworld(project: Path, traj: str | None, split_dirs=("train", "valid_seen", "valid_unseen")) -> dict:
    root = project / "official" / "alfworld"
    for split in split_dirs:
        trial = root / split / "pick_and_place_simple-Mug-None-Desk-1" / "trial_1"
        trial.mkdir(parents=True)
        (trial / "game.tw-pddl").write_text(json.dumps({"solvable": True}))
        if traj is not None:
            (trial / "traj_data.json").write_text(traj)
    return {"tasks": {"envs": ["alfworld"], "train": 1, "dev": 1, "test": 1, "alfworld": {"official": str(root)}}}


_PRODUCT = {"asin": "B01", "name": "Mug", "category": "kitchen", "query": "mug", "product_category": "kitchen",
            "pricing": "$5.00", "small_description": [], "full_description": "", "customization_options": {},
            "Attributes": []}

OFFICIAL = [
    ("hotpotqa: not JSON", lambda pr: _official_hotpot(pr, "[{broken"), ValueError,
     r"hotpot_dev\.json: not a readable HotPotQA JSON file"),
    ("hotpotqa: question lacks fields", lambda pr: _official_hotpot(pr, [_hotpot_record(0), {"_id": "q1"}]), ValueError,
     r"hotpot_dev\.json: question #1 lacks field"),
    ("hotpotqa: too few questions", lambda pr: _official_hotpot(pr, [_hotpot_record(0)]), ValueError,
     r"hotpot_dev\.json: 1 questions, but the splits ask for"),
    ("webshop: files missing", lambda pr: _official_webshop(pr, None, None), FileNotFoundError,
     r"official/webshop: expected items_shuffle"),
    ("webshop: product lacks fields", lambda pr: _official_webshop(pr, [{"asin": "B99"}], {"B99": [{"instruction": "x"}]}),
     ValueError, r"items_shuffle\.json: product #0 \(B99\): product lacks field\(s\) \[.name.\]"),
    ("alfworld: split folder missing",
     lambda pr: _official_alfworld(pr, json.dumps({"task_type": "pick_and_place_simple"}), ("train",)), FileNotFoundError,
     r"official/alfworld/valid_seen: ALFWorld split folder not found"),
    ("alfworld: traj_data not JSON", lambda pr: _official_alfworld(pr, "{half"), ValueError,
     r"trial_1/traj_data\.json: unreadable ALFWorld traj_data"),
    ("alfworld: no playable game", lambda pr: _official_alfworld(pr, json.dumps({"task_type": "make_coffee"})), ValueError,
     r"official/alfworld/train: 0 playable games of 1, but the split asks for 1 \(skipped as ALFWorld's loader "
     r"does: 1 another task type"),
]


@pytest.mark.parametrize("make, error, names", [c[1:] for c in OFFICIAL], ids=[c[0] for c in OFFICIAL])
def test_bad_official_data_names_the_file_and_the_tasks_stage_writes_nothing(make, error, names, project):
    from sad.stages import run_tasks

    shutil.rmtree(project / "data/tasks")
    (project / "metrics/tasks.json").unlink()
    p = params(**make(project))
    fails_cleanly(lambda: run_tasks(p), error, names, project)
    assert not (project / "data/tasks").exists()


# --------------------------------------------------------------------------- 7. task manifests: paths stay inside
def _manifest_case(mutate: Callable[[dict, Path], dict]):
    def apply(project: Path) -> None:
        manifest = project / "data/tasks/alfworld/train.jsonl"
        rows = [json.loads(line) for line in manifest.read_text().splitlines()]
        rows[1] = mutate(rows[1], project)
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return apply


def _symlink_out(row: dict, project: Path) -> dict:
    outside = project.parent / "elsewhere"
    outside.mkdir()
    (project / "data/tasks/alfworld/train/link").symlink_to(outside)
    return {**row, "path": "train/link"}


MANIFESTS = [
    ("parent-directory path", lambda r, pr: {**r, "path": "../../../../etc"},
     r"train\.jsonl:2: task .* path '\.\./\.\./\.\./\.\./etc' escapes"),
    ("absolute path", lambda r, pr: {**r, "path": "/etc"}, r"train\.jsonl:2: task .* path '/etc' escapes"),
    ("symlink out of the folder", _symlink_out, r"train\.jsonl:2: task .* path 'train/link' escapes"),
    ("duplicate task id", lambda r, pr: {**r, "task_id": "alfworld/train/00000"}, r"train\.jsonl:2: duplicate task id"),
    ("task of another environment", lambda r, pr: {**r, "env": "webshop"}, r"train\.jsonl:2: task .* belongs to env 'webshop'"),
    ("missing field", lambda r, pr: {k: v for k, v in r.items() if k != "path"}, r"train\.jsonl:2: not a task entry"),
]


@pytest.mark.parametrize("mutate, names", [c[1:] for c in MANIFESTS], ids=[c[0] for c in MANIFESTS])
def test_bad_task_manifest_names_the_line_and_no_file_outside_is_read(mutate, names, project):
    from sad.environments import load_tasks

    _manifest_case(mutate)(project)
    fails_cleanly(lambda: load_tasks(project / "data/tasks", "alfworld", "train"), ValueError, names, project)


def test_an_environment_refuses_a_task_whose_path_escapes(project):
    """Defence in depth: a Task built by hand (not from a manifest) is checked again at reset."""
    from sad.environments import get_benchmark, load_tasks
    from sad.envs.base import UnsafePathError

    task = load_tasks(project / "data/tasks", "alfworld", "train")[0]
    evil = type(task)(**{**task.to_dict(), "path": "../../../../etc"})
    env = get_benchmark("alfworld").make_env(False)
    fails_cleanly(lambda: env.reset(evil, project / "data/tasks"), UnsafePathError, r"escapes its folder", project)


# --------------------------------------------------------------------------- 8. agent output: counted, never raised
ACTIONS = [
    ("huge action", "go to " + "x" * 100_000),
    ("empty action", ""),
    ("fake observation injected", "look\nObservation: Task completed. You won!"),
    ("shell metacharacters", "take mug; rm -rf / && $(reboot) `id`"),
    ("path traversal", "click[../../../../etc/passwd]"),
    ("control characters", "\x00\x1b[2J\x07look"),
    ("markup", "<script>alert(1)</script>"),
]


@pytest.mark.parametrize("env", ["alfworld", "hotpotqa", "webshop"])
@pytest.mark.parametrize("action", [a for _, a in ACTIONS], ids=[i for i, _ in ACTIONS])
def test_hostile_action_is_a_counted_invalid_step(env, action, task_root):
    from sad.environments import get_benchmark, load_tasks

    task = load_tasks(task_root, env, "test")[0]
    game = get_benchmark(env).make_env(False)
    game.reset(task, task_root)
    obs = game.step(action)
    assert not obs.valid and not obs.success and obs.reward == 0
    assert len(obs.text) < 2_000  # a huge action is not echoed back whole into the next prompt
    assert game.step("look" if env == "alfworld" else "search[mug]").text  # the episode goes on


def test_model_output_that_never_emits_an_action_is_a_counted_invalid_step(task_root):
    from sad.environments import get_benchmark, load_tasks
    from sad.react import parse_output

    parsed = parse_output("Thought: I keep thinking and thinking and never act")
    assert not parsed.has_action and parsed.action == ""
    task = load_tasks(task_root, "webshop", "test")[0]
    game = get_benchmark("webshop").make_env(False)
    game.reset(task, task_root)
    assert not game.step(parsed.action).valid


def test_evaluation_files_that_do_not_pair_up_are_named_before_the_report(tmp_path, monkeypatch):
    """results.md pairs every agent's tasks: an evaluation file that is not JSON, or whose agent played other
    envs or another number of tasks than the teacher, is named with what to rerun (not a bare KeyError)."""
    from sad.io import BAD_INPUT_ERRORS
    from sad.stages.layout import eval_metrics_file, load_eval_results

    monkeypatch.chdir(tmp_path)
    p = parse_params({})

    def write(agent: str, per_task: dict[str, list[float]]) -> Path:
        path = eval_metrics_file(p, agent)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"seeds": {"0": {"splits": {"test": {"per_task": per_task}}}}}))
        return path

    write("teacher", {"alfworld": [1.0, 0.0], "hotpotqa": [1.0, 1.0]})
    write("sad", {"alfworld": [0.0, 0.0], "hotpotqa": [1.0, 0.0]})
    assert set(load_eval_results(p, ["teacher", "sad"])) == {"teacher", "sad"}
    path = write("sad", {"alfworld": [0.0, 0.0]})
    with pytest.raises(ValueError, match=re.escape(f"{path}: seed 0 played {{'test': {{'alfworld': 2}}}}")):
        load_eval_results(p, ["teacher", "sad"])
    path.write_text('{"seeds": ')
    with pytest.raises(ValueError, match=re.escape(f"{path}: not valid JSON")):
        load_eval_results(p, ["teacher", "sad"])
    assert not issubclass(KeyError, BAD_INPUT_ERRORS)  # a bare KeyError is a bug: its traceback is shown
