"""The registry against a real MLflow SQLite store: register, gate, promote."""

import pytest

from sad.config import TrackingParams
from sad.registry import CHALLENGER, CHAMPION, champion_version, decide, register_and_promote


def test_decide():
    assert decide(0.5, None, 0.0) == (True, "no current champion")
    assert decide(0.6, 0.5, 0.0)[0] is True
    assert decide(0.5, 0.5, 0.0)[0] is False
    assert decide(0.55, 0.5, 0.1)[0] is False


@pytest.fixture()
def tracking(tmp_path, monkeypatch):
    monkeypatch.delenv("SAD_MLFLOW_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return TrackingParams(uri=f"sqlite:///{tmp_path}/mlflow.db", artifacts=str(tmp_path / "artifacts"),
                          experiment="test", registered_model="test-student")


def test_champion_moves_only_for_a_better_student(tmp_path, tracking, tiny_model_factory, tokenizer):
    import mlflow

    from sad.modeling import save_model
    from sad.tracking import stage_run

    model_dir = tmp_path / "student"
    save_model(tiny_model_factory(), tokenizer, model_dir, {"method": "sad"})

    with stage_run(tracking, "register"):
        first = register_and_promote(model_dir, {"method": "sad"}, 0.4, tracking, 0.0)
    with stage_run(tracking, "register"):
        worse = register_and_promote(model_dir, {"method": "sft"}, 0.3, tracking, 0.0)
    assert first.promoted and not worse.promoted
    assert champion_version(tracking) == (first.version, 0.4)

    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(tracking.registered_model, CHALLENGER).version) == worse.version
    assert "does not beat" in client.get_model_version(tracking.registered_model, worse.version).tags["sad.promotion"]

    with stage_run(tracking, "register"):
        better = register_and_promote(model_dir, {"method": "token_kd"}, 0.5, tracking, 0.0)
    assert better.promoted and champion_version(tracking)[0] == better.version

    # the champion loads through MLflow and generates text
    pipe = mlflow.transformers.load_model(f"models:/{tracking.registered_model}@{CHAMPION}")
    out = pipe("[alfworld] You are in the middle of a room.", max_new_tokens=5, do_sample=False)
    assert isinstance(out[0]["generated_text"], str) and len(out[0]["generated_text"]) > 0
