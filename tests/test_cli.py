"""The `sad` CLI as users run it: expert success on fresh generated tasks, env benchmark JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SAD = str(Path(sys.executable).with_name("sad"))


def _run(*args: str, cwd: Path) -> dict:
    result = subprocess.run([SAD, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("env,n", [("hotpotqa", 40), ("webshop", 40), ("alfworld", 6)])
def test_expert_cli_reports_success_on_generated_tasks(tmp_path, env, n):
    out = _run("expert", "--env", env, "--generate", "--n", str(n), "--json", cwd=tmp_path)
    assert out["env"] == env and out["episodes"] == n and out["generated"] is True
    assert out["success_rate"] == 1.0 and out["avg_reward"] == 1.0
    if env == "alfworld":
        assert set(out["success_by_task_type"]) == {
            "pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
            "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place"}


@pytest.mark.slow
def test_expert_cli_without_tasks_says_what_to_do(tmp_path):
    result = subprocess.run([SAD, "expert", "--env", "webshop", "--json"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "task manifest not found" in result.stderr and "--generate" in result.stderr


def test_a_pipeline_target_that_is_no_stage_fails_at_once_with_the_names_that_are(tmp_path, monkeypatch):
    """Before the lock, the servers and DVC (which would fail after a minute, retried): the stage names come from
    dvc.yaml with each foreach expanded over params.yaml; a --set without '=' is refused the same way."""
    import shutil

    from typer.testing import CliRunner

    from flows.cli import app, dvc_stage_names

    repo = Path(__file__).resolve().parents[1]
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(repo / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    names = dvc_stage_names(tmp_path / "dvc.yaml", tmp_path / "params.yaml")
    assert {"tasks", "evaluate_teacher", "distill@sad", "evaluate@token_kd", "scale@xs", "report"} <= set(names)
    result = CliRunner().invoke(app, ["pipeline", "evalute_teacher"])
    assert result.exit_code == 2 and "no dvc.yaml stage 'evalute_teacher'; did you mean evaluate_teacher" in result.output
    result = CliRunner().invoke(app, ["pipeline", "--set", "distill.train.lr"])
    assert result.exit_code == 2 and "expected KEY=VALUE" in result.output
    # a --set that makes the params invalid is refused with the key, as DVC would apply it
    result = CliRunner().invoke(app, ["pipeline", "--set", "distill.train.lr=fast"])
    assert result.exit_code == 2 and "--set distill.train.lr=fast" in result.output
    assert "distill.train.lr: Input should be a valid number" in result.output
    result = CliRunner().invoke(app, ["pipeline", "-S", "distill.train.lr=0.001", "-S", "distill.train.lrr=1"])
    assert result.exit_code == 2 and "no setting 'distill.train.lrr' in params.yaml; did you mean distill.train.lr" in result.output
    result = CliRunner().invoke(app, ["pipeline", "-S", "teacher.lora.r=8"])  # a setting under a null section
    assert result.exit_code == 2 and "To append to your config use +teacher.lora.r=8" in result.output
    result = CliRunner().invoke(app, ["pipeline", "-S", "evaluate.bootstrap=100,200"])  # a sweep: dvc exp run --queue
    assert result.exit_code == 2 and "dvc exp run --queue" in result.output
    assert not (tmp_path / ".retrain.lock").exists()  # refused before the single-flight lock


def test_a_stage_method_agent_or_size_typo_fails_before_any_flow_starts(tmp_path, monkeypatch):
    import shutil

    from typer.testing import CliRunner

    from flows.cli import app

    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    for args, message in ((["distill", "--method", "sda"], "unknown method 'sda'; params.yaml distill.methods has: sad, "),
                          (["evaluate", "--agent", "techer"], "unknown agent 'techer'; use 'teacher' or one of"),
                          (["scale", "--size", "xxl"], "unknown size 'xxl'; params.yaml distill.scaling.sizes has: xs")):
        result = CliRunner().invoke(app, ["stage", *args])
        assert result.exit_code == 2 and message in result.output, result.output


def test_a_source_folder_no_stage_lists_as_a_dep_is_named_with_the_line_to_add(tmp_path, monkeypatch):
    """dvc.yaml names the shipped folders; a heal or teacher folder of the user's own would not rerun its stage."""
    import shutil

    import yaml

    from flows.cli import untracked_sources
    from sad.config import load_params

    repo = Path(__file__).resolve().parents[1]
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(repo / name, tmp_path / name)
    for folder in ("assets/teacher", "assets/student_heal", "my/heal"):
        (tmp_path / folder).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert untracked_sources(load_params(tmp_path / "params.yaml"), tmp_path / "dvc.yaml") == []  # the default
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["distill"]["heal"]["source"] = "./my/heal/"
    (tmp_path / "hotpot_dev.json").write_text("[]")
    raw["tasks"]["hotpotqa"]["official"] = "hotpot_dev.json"
    raw["teacher"]["source"] = "assets/teacher/"  # the same folder, spelt otherwise
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    lines = untracked_sources(load_params(tmp_path / "params.yaml"), tmp_path / "dvc.yaml")
    assert len(lines) == 2 and lines[0].startswith("distill.heal.source: ./my/heal/ is not a dep of dvc.yaml stage "
                                                  "'student_init'") and "add `- ./my/heal/` to its deps" in lines[0]
    assert lines[1].startswith("tasks.hotpotqa.official: hotpot_dev.json is not a dep of dvc.yaml stage 'tasks'")


def test_pipeline_set_overrides_are_the_params_its_source_folders_are_checked_on(tmp_path, monkeypatch):
    """`sad pipeline --set distill.heal.source=my/heal` runs a DVC experiment whose student_init reads my/heal:
    the source check sees the overridden params (applied as `dvc exp run -S` applies them), not params.yaml's."""
    import shutil

    from flows.cli import params_with_overrides, untracked_sources

    repo = Path(__file__).resolve().parents[1]
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(repo / name, tmp_path / name)
    (tmp_path / "my" / "heal").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    before = (tmp_path / "params.yaml").read_bytes()
    p = params_with_overrides(Path("params.yaml"), ["distill.heal.source=my/heal", "params.yaml:distill.train.lr=1e-4",
                                                    "other.yaml:x=1"])
    assert p.distill.heal.source == "my/heal" and p.distill.train.lr == 1e-4
    assert (tmp_path / "params.yaml").read_bytes() == before  # applied to a copy
    lines = untracked_sources(p, Path("dvc.yaml"))
    assert len(lines) == 1 and lines[0].startswith("distill.heal.source: my/heal is not a dep of dvc.yaml stage "
                                                  "'student_init'")
    assert params_with_overrides(Path("params.yaml"), []).distill.heal.source == "assets/student_heal"


@pytest.mark.slow
def test_env_benchmark_prints_reset_time_and_steps_per_second(tmp_path):
    out = _run("bench", "envs", "--env", "hotpotqa", "--env", "webshop", "--n", "10", "--json", cwd=tmp_path)
    assert set(out["envs"]) == {"hotpotqa", "webshop"}
    for name, m in out["envs"].items():
        assert m["episodes"] == 10 and m["steps"] >= 10, name
        assert m["steps_per_s"] > 0 and m["reset_ms_mean"] > 0 and m["expert_success_rate"] == 1.0


def test_segment_text_cuts_a_numbered_transcript_and_rejects_a_broken_one(tmp_path):
    good = tmp_path / "t.txt"
    good.write_text("Question: q?\nThought 1: look.\nAction 1: Search[x]\nObservation 1: x is y.\n"
                    "Thought 2: done.\nAction 2: Finish[y]\n")
    result = subprocess.run([SAD, "segment-text", str(good), "--markers", "hotpotqa", "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    kinds = [p["kind"] for p in json.loads(result.stdout)]
    assert kinds == ["prompt", "reason", "act", "observation", "reason", "act"]
    bad = tmp_path / "bad.txt"
    bad.write_text("Question: q?\nThought 1: look.\nObservation 1: x\n")
    result = subprocess.run([SAD, "segment-text", str(bad), "--markers", "hotpotqa"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "bad.txt: line 3" in result.stderr and "ACT line" in result.stderr
    # an unknown marker set is refused before the file is read, with the sets named
    result = subprocess.run([SAD, "segment-text", str(good), "--markers", "foo"], capture_output=True, text=True, timeout=120)
    message = " ".join(result.stderr.replace("│", " ").split())  # the error box wraps at the terminal's width
    assert result.returncode == 2 and "'foo' is not one of 'react', 'hotpotqa', 'alfworld'" in message


def test_bench_reads_the_evaluation_prefill_cut_or_says_why_it_cannot(tmp_path):
    """`sad bench` takes issue #16's prefill cut of a whole evaluation from metrics/eval/teacher.json: a file from
    before the counters, or one that is not an evaluation's metrics, is skipped with the reason and its path."""
    from flows.bench import evaluation_prefill_cut
    from sad.config import parse_params

    p = parse_params({})
    path = tmp_path / "metrics" / "eval" / "teacher.json"
    assert "run the pipeline first" in evaluation_prefill_cut(p, tmp_path)["skipped"]
    path.parent.mkdir(parents=True)
    overall = {"success_rate": 0.5, "prefill_tokens_cut": 4.5, "prefill_tokens_per_generated_token": 1.9}
    path.write_text(json.dumps({"splits": {"test": {"overall": overall}}}))
    assert evaluation_prefill_cut(p, tmp_path) == {"file": "metrics/eval/teacher.json", "prefill_tokens_cut": 4.5,
                                                   "prefill_tokens_per_generated_token": 1.9}
    path.write_text(json.dumps({"splits": {"test": {"overall": {"success_rate": 0.5}}}}))
    assert "predates the prefill counters" in evaluation_prefill_cut(p, tmp_path)["skipped"]
    for bad in ("{not json", json.dumps({"splits": {"dev": {}}}), json.dumps({"splits": {"test": {"overall": [1]}}})):
        path.write_text(bad)
        skipped = evaluation_prefill_cut(p, tmp_path)["skipped"]
        assert str(path) in skipped and "not an evaluation metrics file" in skipped


@pytest.mark.slow
def test_bench_suite_prints_every_section_and_target(tmp_path):
    import shutil

    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(repo / "profiles", tmp_path / "profiles")
    assert subprocess.run([SAD, "profile", "tiny"], cwd=tmp_path, capture_output=True, timeout=120).returncode == 0
    out = _run("bench", "--quick", "--json", "--output", "bench.json", cwd=tmp_path)
    assert set(out) >= {"rollout", "training", "student_vs_teacher", "pipeline", "targets", "machine"}
    assert out["rollout"]["speedup_episodes_per_s"] > 0 and out["rollout"]["same_steps"] is True
    assert out["rollout"]["prefill_tokens_cut"] > 1  # the prefix store reused earlier contexts
    # keeping the generated blocks never encodes more than keeping the contexts alone (same greedy steps)
    assert out["rollout"]["prefill_tokens_cut"] >= out["rollout"]["prefill_tokens_cut_contexts_only"] > 1
    assert out["rollout"]["prefill_tokens_cut_block_eviction"] > 1 and out["rollout"]["block_eviction_step_speedup"] > 0
    assert out["rollout"]["admissible_cost_per_step"] > 0 and out["rollout"]["repair_cost_per_step"] > 0
    rollout = out["rollout"]
    assert rollout["speedup_steps_per_s"] == pytest.approx(rollout["runs"]["batched"]["steps_per_s"]
                                                          / rollout["runs"]["one_at_a_time"]["steps_per_s"])
    assert rollout["runs"]["batched_admissible"]["scored_steps"] > 0 and rollout["admissible_cost_per_scored_step"] > 1
    assert out["targets"]["admissible_cost_per_step"]["measured"] == rollout["admissible_cost_per_scored_step"]
    assert out["targets"]["rollout_batched_speedup"]["measured"] == rollout["speedup_steps_per_s"]
    # the same cut on the project's latest evaluate_teacher: this folder has none yet, so it is not judged
    assert "run the pipeline first" in out["pipeline"]["evaluate_teacher_prefill"]["skipped"]
    assert out["targets"]["prefill_tokens_cut_evaluate_teacher"] == {"measured": None, "target": ">= 4.0", "met": None}
    # decoding over the written cache only plays the same greedy steps (an untrained fp32 model here); bf16 play is
    # timed against it where the CPU has bf16 instructions
    assert out["rollout"]["same_steps_sliced_attention"] is True and out["rollout"]["sliced_attention_speedup"] > 0
    # each run's model FLOP/s against the matmul peak of the dtype it played in
    assert out["rollout"]["generation_peak_flops_per_s"]["fp32"] > 1e8
    assert all(0 < r["flop_utilisation"] < 1.5 and r["episodes_per_s_at_peak"] > r["episodes_per_s"]
               for r in out["rollout"]["runs"].values())
    ceiling = out["rollout"]["decode_batch_ceiling"]  # what batching can give decoding at most, same model
    assert ceiling["batch_size"] == 16 and ceiling["step_ms_batch"] > 0 and ceiling["tokens_per_s_ratio"] > 0
    from sad.modeling import cpu_has_native_bf16

    assert out["rollout"]["play_dtype"] == "fp32"
    assert (out["rollout"]["bf16_play_speedup_per_step"] is None) == (not cpu_has_native_bf16())
    assert out["targets"]["admissible_cost_per_step"]["target"] == "<= 2.0"
    mfu = out["training"]["mfu"]
    assert 0 < mfu["sft"] < 1.5 and mfu["matmul_peak_flops_per_s"] == max(mfu["peak_readings"]) > 1e8
    assert len(mfu["peak_readings"]) == 2 and mfu["peak_spread"] >= 0  # read before and after the training runs
    assert set(out["training"]["tokens_per_s"]) == {"sad", "token_kd", "sft", "sad_online", "token_kd_online", "teacher_sft"}
    setup = out["training"]["setup"]  # the tiny profile trains its teacher from scratch: teacher.arch, distill.student
    assert "from scratch" in setup["models"]["as"] and setup["teacher"]["layers"] == 1 and setup["student"]["hidden_size"] == 16
    assert 0 < out["training"]["mfu"]["teacher_sft"] < 1.5
    assert 0 < out["training"]["cache"]["bytes_ratio"] < 0.1
    assert out["student_vs_teacher"]["student"]["parameters"] < out["student_vs_teacher"]["teacher"]["parameters"]
    assert out["pipeline"]["prefect"]["flow_run_s"] > 0
    assert "skipped" in out["pipeline"]["noop_dvc_repro"]  # no pipeline has run in this folder
    assert "no MLflow store" in out["pipeline"]["stage_costs"]["skipped"] and not (tmp_path / "mlflow.db").exists()
    targets = out["targets"]
    assert targets["cache_bytes_ratio"]["met"] is (out["training"]["cache"]["bytes_ratio"] <= 0.05)
    assert targets["noop_dvc_repro_s"]["met"] is None
    assert targets["default_pipeline_s"]["met"] is None  # no pipeline has run: nothing to judge
    assert json.loads((tmp_path / "bench.json").read_text())["targets"] == targets


@pytest.mark.slow
def test_schedule_needs_a_server_and_a_valid_cron(tmp_path, monkeypatch):
    import os
    import shutil

    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", tmp_path / "params.yaml")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run([SAD, "schedule"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "prefect server start --host 127.0.0.1" in result.stderr
    env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"  # never contacted: the cron is checked first
    result = subprocess.run([SAD, "schedule", "--cron", "0 3 * *"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "not a valid cron expression" in result.stderr, result.stderr[-1500:]


@pytest.mark.slow
def test_registry_rollback_without_history_says_so(tmp_path):
    import shutil

    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", tmp_path / "params.yaml")
    result = subprocess.run([SAD, "registry", "rollback"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no previous champion" in result.stderr, result.stderr[-1500:]


@pytest.mark.slow
def test_bad_official_file_through_sad_stage_is_one_short_error(tmp_path):
    """A question lacking `context` in an official HotPotQA file: a few lines naming file and record, exit 2,
    no traceback (SAD_DEBUG=1 brings it back)."""
    import os

    import yaml

    records = [{"_id": f"q{i}", "question": "Who?", "answer": "x", "type": "bridge", "level": "easy",
                "supporting_facts": [["A", 0]], "context": [["A", ["x is here."]]]} for i in range(6)]
    del records[3]["context"]
    (tmp_path / "hotpot_dev.json").write_text(json.dumps(records))
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["tasks"].update({"envs": ["hotpotqa"], "train": 2, "dev": 1, "test": 1, "hotpotqa": {"official": "hotpot_dev.json"}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "SAD_DEBUG")}
    env["PREFECT_HOME"] = str(tmp_path / ".prefect")
    result = subprocess.run([SAD, "stage", "tasks"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2 and len(lines) <= 5, lines
    assert "hotpot_dev.json: question #3 lacks field(s) ['context']" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "tasks").exists()  # nothing half-written


def test_an_empty_registry_and_a_non_positive_task_count_say_so(tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from flows.cli import app

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}}))
    monkeypatch.chdir(tmp_path)
    for var in ("SAD_MLFLOW_URI", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    listed = CliRunner().invoke(app, ["registry", "list"])
    assert listed.exit_code == 0 and f"no versions of sad-student in sqlite:///{tmp_path}/mlflow.db" in listed.output
    played = CliRunner().invoke(app, ["expert", "--env", "hotpotqa", "--generate", "--n", "0"])
    assert played.exit_code == 2 and "--n" in played.output
