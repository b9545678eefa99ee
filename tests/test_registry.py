"""The registry against a real MLflow SQLite store: gates, register, promote, roll back."""

from unittest import mock

import pytest

from sad.config import RegisterParams, TrackingParams
from sad.registry import (
    CHALLENGER,
    CHAMPION,
    RegistryError,
    Standing,
    champion,
    check_gates,
    decision_markdown,
    decision_of,
    decision_summary,
    find_version,
    gate_and_promote,
    list_versions,
    load_version,
    promote,
    register_candidate,
    rollback,
    weights_hash,
)


def standing(value=0.4, success=0.4, envs=None, teacher=0.5, metric="success_rate", invalid=0.0, per_task=None):
    return Standing(metric, value, success, envs or {"alfworld": success, "webshop": success}, teacher, invalid,
                    per_task or {})


def paired(successes: list[int], prefix: str = "dev") -> Standing:
    """A success-rate standing with per-task results (task ids dev-0, dev-1, ...)."""
    rate = sum(successes) / len(successes)
    return standing(rate, rate, teacher=rate, per_task={f"{prefix}-{i}": float(v) for i, v in enumerate(successes)})


GATES = RegisterParams(min_improvement=0.0, max_env_regression=0.05, min_teacher_share=0.5)


def test_a_first_candidate_needs_only_to_pass_the_floors():
    ok, reasons = check_gates(standing(success=0.3, teacher=0.5), None, GATES)
    assert ok and any("no current champion" in r for r in reasons)
    ok, reasons = check_gates(standing(success=0.2, teacher=0.5), None, GATES)  # 0.2 < 0.5 x 0.5
    assert not ok and any(r.startswith("FAIL floor teacher share: success 0.200 < register.min_teacher_share 0.5 x "
                                       "teacher 0.500 = 0.250") for r in reasons)
    ok, reasons = check_gates(standing(success=0.3, invalid=0.4), None, GATES)
    assert not ok and "FAIL floor invalid actions: 0.400 > register.max_invalid_action_rate 0.3" in reasons


def test_the_best_of_several_students_needs_a_wider_interval_to_beat_the_champion():
    """The candidate is the best of methods x seeds on the gate split: its interval is widened for them
    (Bonferroni), so a win that is significant for one student may not be for the best of 21."""
    import dataclasses

    champ = paired([1, 0] * 10)
    one = paired([1] * 14 + [0, 1, 0, 1, 0, 1])  # 17/20
    lines = {}
    for k in (1, 21):
        ok, reasons = check_gates(dataclasses.replace(one, candidates=k), champ, GATES)
        lines[k] = next(r for r in reasons if "significance" in r)
    low = {k: float(line.split("[")[1].split(",")[0]) for k, line in lines.items()}
    assert low[21] < low[1]
    assert "99.5% CI (register.confidence 90% for the best of 21 students)" in lines[21]
    assert "90% CI [" in lines[1] and "best of" not in lines[1]


def test_a_zero_success_candidate_fails_the_success_floor_even_against_a_zero_teacher():
    ok, reasons = check_gates(standing(0.0, 0.0, teacher=0.0), None, RegisterParams())
    assert not ok
    assert reasons[0] == ("FAIL floor success: overall 0.000, alfworld 0.000, webshop 0.000 not all >= "
                          "register.min_success 0.1")
    assert reasons[1].startswith("PASS floor teacher share")  # 0 >= 0.5 x 0: only the absolute floor catches it


def test_an_insignificant_win_keeps_the_champion_and_a_clear_one_is_promoted():
    champ = paired([1, 0] * 10)  # 10/20
    narrow = paired([1, 0] * 9 + [1, 1])  # 11/20: better by a point estimate, not significantly
    ok, reasons = check_gates(narrow, champ, GATES)
    line = next(r for r in reasons if "significance" in r)
    assert not ok and line.startswith("FAIL significance: success_rate 0.5500 vs champion 0.5000: paired difference "
                                      "(higher is better) +0.0500, 90% CI [")
    assert "over 20 tasks (champion's results stored), the interval does not lie above register.min_improvement 0.0" in line
    clear = paired([1] * 18 + [0, 1])  # 19/20
    ok, reasons = check_gates(clear, champ, GATES)
    line = next(r for r in reasons if "significance" in r)
    assert ok and line.startswith("PASS significance") and "lies above register.min_improvement 0.0" in line
    low = float(line.split("CI [")[1].split(",")[0])
    assert low > 0
    assert not check_gates(clear, champ, RegisterParams(min_improvement=0.9, max_env_regression=1.0))[0]


def test_every_decision_names_each_gate_with_value_threshold_and_interval():
    from sad.registry import Decision

    ok, reasons = check_gates(paired([1] * 18 + [0, 1]), paired([1, 0] * 10), GATES)
    assert [r.split(":")[0] for r in reasons] == ["PASS floor success", "PASS floor teacher share", "PASS floor invalid actions",
                                                  "PASS significance", "PASS no environment's success drops by more than "
                                                  "register.max_env_regression 0.05"]
    decision = Decision("2", ok, reasons, "1", "2", {})
    text = decision_markdown(decision)
    assert decision_summary(decision) == "v2 promoted to @champion (was v1): every gate passed"
    assert text.count("| PASS |") == 5 and "register.min_success 0.1" in text and "90% CI [" in text
    kept = Decision("3", False, ["FAIL floor success: overall 0.000 not all >= register.min_success 0.1"], "2", "2", {})
    assert decision_summary(kept) == ("v3 not promoted, @champion stays v2: FAIL floor success: overall 0.000 not all >= "
                                      "register.min_success 0.1")


def test_gate_metric_must_beat_the_champion_by_the_margin():
    assert check_gates(standing(0.5, 0.5), standing(0.4, 0.4), GATES)[0]
    ok, reasons = check_gates(standing(0.4, 0.4), standing(0.4, 0.4), GATES)  # a tie is not a win
    assert not ok and any("does not beat" in r for r in reasons)
    margin = RegisterParams(min_improvement=0.2)
    assert not check_gates(standing(0.55, 0.55), standing(0.4, 0.4), margin)[0]


def test_lower_is_better_metrics_gate_in_their_direction():
    gates = RegisterParams(gate_metric="dev_ce")
    better = standing(value=2.0, metric="dev_ce")
    worse = standing(value=3.0, metric="dev_ce")
    assert check_gates(better, worse, gates)[0]
    ok, reasons = check_gates(worse, better, gates)
    assert not ok and any("lower is better" in r for r in reasons)


def test_an_environment_regressing_beyond_the_tolerance_blocks_promotion():
    champ = standing(0.40, 0.40, {"alfworld": 0.6, "webshop": 0.2})
    cand = standing(0.45, 0.45, {"alfworld": 0.5, "webshop": 0.4})  # better overall, alfworld -0.10
    ok, reasons = check_gates(cand, champ, GATES)
    assert not ok and any("alfworld -0.100" in r for r in reasons)
    assert check_gates(cand, champ, RegisterParams(max_env_regression=0.15))[0]


def test_a_replayed_champion_is_compared_env_by_env_on_the_candidates_tasks_not_its_stored_ones():
    """The champion's stored results came from other tasks (tasks.dev changed): its replay on the candidate's
    tasks decides the per-environment regression gate too, not only the paired significance gate."""
    tasks = [f"{env}/dev/{i:05d}" for env in ("alfworld", "webshop") for i in range(10)]
    mine = dict(zip(tasks, [1.0] * 2 + [0.0] * 8 + [1.0] * 9 + [0.0]))  # alfworld 0.2, webshop 0.9
    cand = standing(0.55, 0.55, {"alfworld": 0.2, "webshop": 0.9}, per_task=mine)
    champ = standing(0.5, 0.5, {"alfworld": 0.6, "webshop": 0.4})  # stored on other tasks
    replayed = dict(zip(tasks, [1.0] * 2 + [0.0] * 8 + [0.0] * 10))  # there: alfworld 0.2, webshop 0.0
    gates = RegisterParams(min_improvement=0.0, max_env_regression=0.05)
    ok, reasons = check_gates(cand, champ, gates, replayed, "replayed")
    assert ok and reasons[-1].startswith("PASS no environment") and "replayed on the candidate's tasks" in reasons[-1]
    worse_there = dict(replayed, **{f"alfworld/dev/{i:05d}": 1.0 for i in range(2, 6)})  # champion alfworld 0.6 there
    ok, reasons = check_gates(cand, champ, gates, worse_there, "replayed")
    assert not ok and "alfworld -0.400" in reasons[-1]


def test_a_champion_gated_on_another_metric_is_not_compared():
    ok, reasons = check_gates(standing(metric="dev_ce"), standing(), RegisterParams(gate_metric="dev_ce"))
    assert not ok and any("not comparable" in r for r in reasons)


@pytest.fixture()
def tracking(tmp_path, monkeypatch):
    monkeypatch.delenv("SAD_MLFLOW_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return TrackingParams(uri=f"sqlite:///{tmp_path}/mlflow.db", artifacts=str(tmp_path / "artifacts"),
                          experiment="test", registered_model="test-student")


@pytest.mark.slow
def test_register_gate_promote_and_roll_back(tmp_path, tracking, tiny_model_factory, tokenizer):
    import mlflow

    from sad.modeling import save_model
    from sad.tracking import stage_run

    dirs = []
    for seed in range(3):
        d = tmp_path / f"student{seed}"
        save_model(tiny_model_factory(seed=seed), tokenizer, d, {"method": "sad"})
        dirs.append(d)
    gates = RegisterParams()

    def retrain(model_dir, s):
        with stage_run(tracking, "retrain"):
            version = register_candidate(model_dir, {"method": "sad", "seed": 0}, s, tracking)
        return gate_and_promote(tracking, version, s, gates)

    with stage_run(tracking, "retrain"):  # registered, then a crash before the gates ran
        ungated = register_candidate(dirs[0], {"method": "sad", "seed": 0}, standing(0.4, 0.4), tracking)
    assert decision_of(tracking, ungated) is None and champion(tracking) is None
    first = gate_and_promote(tracking, ungated, standing(0.4, 0.4), gates)  # what the retried flow does
    assert first.promoted and first.champion_before is None and champion(tracking)[0] == first.version
    worse = retrain(dirs[1], standing(0.3, 0.3))
    assert not worse.promoted and champion(tracking)[0] == first.version  # champion unchanged
    client = mlflow.MlflowClient()
    name = tracking.registered_model
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == worse.version
    assert "does not beat" in client.get_model_version(name, worse.version).tags["sad.promotion"]
    assert find_version(tracking, weights_hash(dirs[1])) == worse.version
    assert "method `sad`" in client.get_model_version(name, worse.version).description  # the model card

    better = retrain(dirs[2], standing(0.5, 0.5))
    assert better.promoted and champion(tracking)[0] == better.version
    assert champion(tracking)[1].gate_value == 0.5

    assert rollback(tracking) == (better.version, first.version)
    assert champion(tracking)[0] == first.version
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(tracking)
    assert list_versions(tracking.model_copy(update={"registered_model": "nothing-yet"})) == []  # not a traceback
    promote(tracking, f"v{worse.version}", "by hand, as `sad registry list` prints it")
    assert "the gates had decided: kept champion" in decision_of(tracking, worse.version)  # their record stays
    promote(tracking, worse.version, "by hand, again")  # no second step in the history
    assert decision_of(tracking, worse.version).count("the gates had decided") == 1
    assert champion(tracking)[0] == worse.version
    assert rollback(tracking) == (worse.version, first.version)  # a real step back, not v2 -> v2
    promote(tracking, worse.version, "by hand")
    # the store fails on the second of a rollback's two registry writes (alias, history): running it again
    # still goes back to the previous champion, never forward to the version it rolled back from
    writes = []
    real_alias, real_tag = mlflow.MlflowClient.set_registered_model_alias, mlflow.MlflowClient.set_registered_model_tag

    def second_write_fails(real):
        def write(self, *args, **kwargs):
            writes.append(args)
            if len(writes) == 2:
                raise mlflow.exceptions.MlflowException("the store went away")
            return real(self, *args, **kwargs)
        return write

    with mock.patch.object(mlflow.MlflowClient, "set_registered_model_alias", second_write_fails(real_alias)), \
            mock.patch.object(mlflow.MlflowClient, "set_registered_model_tag", second_write_fails(real_tag)):
        with pytest.raises(mlflow.exceptions.MlflowException):
            rollback(tracking)
    assert len(writes) == 2 and rollback(tracking)[1] == first.version and champion(tracking)[0] == first.version
    # a hand promotion whose alias write fails leaves no history entry of a version that never was champion
    with mock.patch.object(mlflow.MlflowClient, "set_registered_model_alias",
                           side_effect=mlflow.exceptions.MlflowException("the store went away")):
        with pytest.raises(mlflow.exceptions.MlflowException):
            promote(tracking, better.version, "by hand")
    assert champion(tracking)[0] == first.version
    with pytest.raises(RegistryError, match="no previous champion"):  # not "to v{better}"
        rollback(tracking)
    promote(tracking, worse.version, "by hand")
    rollback(tracking)
    promote(tracking, worse.version, "by hand, after a rollback")  # the gates' verdict survives both
    assert "the gates had decided: kept champion" in decision_of(tracking, worse.version)
    with pytest.raises(RegistryError, match="no version '99'"):
        promote(tracking, "99", "typo")
    rows = list_versions(tracking)
    assert [r["version"] for r in rows] == ["3", "2", "1"] and "champion" in rows[1]["aliases"]

    # the champion loads through MLflow and generates text
    pipe = mlflow.transformers.load_model(f"models:/{name}@{CHAMPION}")
    prompt = "[alfworld] You are in the middle of a room."
    text = pipe(prompt, max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt) and len(text) > len(prompt), text  # the prompt, then what the champion wrote


def test_a_zero_success_first_candidate_is_registered_but_never_champion(tmp_path, tracking, tiny_model_factory, tokenizer):
    import mlflow

    from sad.modeling import save_model
    from sad.tracking import stage_run

    save_model(tiny_model_factory(seed=0), tokenizer, tmp_path / "s0", {"method": "sad"})
    zero = standing(0.0, 0.0, teacher=0.0, invalid=0.9)
    with stage_run(tracking, "retrain"):
        version = register_candidate(tmp_path / "s0", {"method": "sad", "seed": 0}, zero, tracking)
    decision = gate_and_promote(tracking, version, zero, RegisterParams())
    assert not decision.promoted and champion(tracking) is None and find_version(tracking, weights_hash(tmp_path / "s0")) == version
    assert decision_summary(decision).startswith("v1 not promoted, no @champion yet: FAIL floor success")
    mv = mlflow.MlflowClient().get_model_version(tracking.registered_model, version)
    assert mv.tags["sad.promotion"].startswith("not promoted, no champion yet: FAIL floor success")
    assert "## Promotion decision" in mv.description and "| FAIL |" in mv.description  # where people look
    assert "method `sad`" in mv.description  # the model card stays above it


def test_the_champions_stored_results_are_reused_and_replayed_when_missing(tmp_path, tracking, tiny_model_factory, tokenizer):
    from sad.modeling import save_model
    from sad.tracking import stage_run

    for seed in range(4):
        save_model(tiny_model_factory(seed=seed), tokenizer, tmp_path / f"s{seed}", {"method": "sad"})
    gates = RegisterParams(max_env_regression=1.0)
    calls: list[tuple[str, list[str]]] = []
    replayed_as = 0.0

    def replay(version, task_ids):
        calls.append((version, task_ids))
        model, tok = load_version(tracking, version)  # the champion, loaded back through MLflow
        assert model.config.hidden_size == 32 and tok.eos_token_id == tokenizer.eos_token_id
        return {t: replayed_as for t in task_ids}

    def retrain(seed, s):
        with stage_run(tracking, "retrain"):
            version = register_candidate(tmp_path / f"s{seed}", {"method": "sad", "seed": seed}, s, tracking)
        return gate_and_promote(tracking, version, s, gates, replay=replay)

    first = retrain(0, paired([1, 0] * 10))
    assert first.promoted and not calls
    second = retrain(1, paired([1] * 18 + [0, 1]))  # same tasks: the champion's stored results serve
    assert second.promoted and not calls and "champion's results stored" in second.reason
    third = retrain(2, paired([1] * 20, prefix="newdev"))  # other tasks: the champion is replayed on them
    assert calls == [(second.version, [f"newdev-{i}" for i in sorted(range(20), key=str)])]
    assert third.promoted and "champion's results replayed" in third.reason
    replayed_as = 1.0  # the replayed values decide: a champion that wins every replayed task is not beaten
    fourth = retrain(3, paired([1] * 20, prefix="otherdev"))
    assert not fourth.promoted and "champion's results replayed" in fourth.reason and "does not lie above" in fourth.reason


def test_replay_plays_a_model_on_the_gate_tasks(rollout_project, tokenizer, tiny_model_factory, monkeypatch):
    from sad.config import load_params
    from sad.environments import load_tasks
    from sad.stages import replay_per_task, tasks_root

    monkeypatch.chdir(rollout_project)
    p = load_params(rollout_project / "params.yaml")
    ids = [t.task_id for env in p.tasks.envs for t in load_tasks(tasks_root(p), env, "dev")]
    found = replay_per_task(p, tiny_model_factory(hidden=32, seed=4), tokenizer, ids)
    assert sorted(found) == sorted(ids) and set(found.values()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="not in"):
        replay_per_task(p, tiny_model_factory(hidden=32, seed=4), tokenizer, ["no-such-task"])
