"""The registry against a real MLflow SQLite store: gates, register, promote, roll back."""

import pytest

from sad.config import RegisterParams, TrackingParams
from sad.registry import (CHALLENGER, CHAMPION, RegistryError, Standing, champion, check_gates, decision_of, find_version,
                          gate_and_promote, list_versions, promote, register_candidate, rollback, weights_hash)


def standing(value=0.4, success=0.4, envs=None, teacher=0.5, metric="success_rate"):
    return Standing(metric, value, success, envs or {"alfworld": success, "webshop": success}, teacher)


GATES = RegisterParams(min_improvement=0.0, max_env_regression=0.05, min_teacher_share=0.5)


def test_first_candidate_needs_only_the_teacher_share():
    ok, reasons = check_gates(standing(success=0.3, teacher=0.5), None, GATES)
    assert ok and any("no current champion" in r for r in reasons)
    ok, reasons = check_gates(standing(success=0.2, teacher=0.5), None, GATES)  # 0.2 < 0.5 x 0.5
    assert not ok and any(r.startswith("FAIL teacher share") for r in reasons)


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


def test_a_champion_gated_on_another_metric_is_not_compared():
    ok, reasons = check_gates(standing(metric="dev_ce"), standing(), RegisterParams(gate_metric="dev_ce"))
    assert not ok and any("not comparable" in r for r in reasons)


@pytest.fixture()
def tracking(tmp_path, monkeypatch):
    monkeypatch.delenv("SAD_MLFLOW_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return TrackingParams(uri=f"sqlite:///{tmp_path}/mlflow.db", artifacts=str(tmp_path / "artifacts"),
                          experiment="test", registered_model="test-student")


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
    promote(tracking, worse.version, "by hand")
    assert champion(tracking)[0] == worse.version
    with pytest.raises(RegistryError, match="no version '99'"):
        promote(tracking, "99", "typo")
    rows = list_versions(tracking)
    assert [r["version"] for r in rows] == ["3", "2", "1"] and "champion" in rows[1]["aliases"]

    # the champion loads through MLflow and generates text
    pipe = mlflow.transformers.load_model(f"models:/{name}@{CHAMPION}")
    out = pipe("[alfworld] You are in the middle of a room.", max_new_tokens=5, do_sample=False)
    assert isinstance(out[0]["generated_text"], str) and len(out[0]["generated_text"]) > 0
