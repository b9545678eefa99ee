import pytest
import yaml

from sad.config import ConfigError, apply_profile, deep_merge, load_params, parse_params

from .conftest import REPO


def test_repository_params_and_profiles_are_valid():
    p = load_params(REPO / "params.yaml")
    assert p.tasks.envs == ["alfworld", "hotpotqa", "webshop"]
    assert set(p.distill.methods) == {"sad", "token_kd", "sft"}
    for profile in (REPO / "profiles").glob("*.yaml"):
        merged = apply_profile(yaml.safe_load((REPO / "params.yaml").read_text()), yaml.safe_load(profile.read_text()))
        parse_params(merged, str(profile))


def test_the_default_plays_the_shipped_teacher_as_it_was_trained():
    """The default uses assets/teacher as it is, with the context it was trained and measured with."""
    import json

    p = load_params(REPO / "params.yaml")
    card = json.loads((REPO / "assets" / "teacher" / "card.json").read_text())
    assert p.teacher.source == "assets/teacher" and p.teacher.finetune is False and p.teacher.dagger is None
    context = p.context.model_dump()
    assert {k: context[k] for k in card["context"]} == card["context"]
    # evict_to is how play drops old steps, not how the teacher was trained (training windows keep as many steps as
    # fit); the card measured it at 1.0, and the same 60 test tasks at 0.5 gave 37/60 against 35/60 (README "Performance")
    assert context["evict_to"] in (card["context"].get("evict_to", 1.0), 0.5)
    keep = p.distill.student_layers
    assert keep is not None and keep[-1] < card["arch"]["num_layers"] and len(keep) * 3 < card["arch"]["num_layers"]


def test_the_default_merges_the_shipped_heal_into_the_cut_it_was_trained_on():
    """assets/student_heal fits the default: the same layers of the same teacher (teacher.source's weights)."""
    import json

    from sad.stages.student_init import teacher_identity

    p = load_params(REPO / "params.yaml")
    card = json.loads((REPO / p.distill.heal.source / "card.json").read_text())
    assert p.distill.heal.epochs == 0 and card["role"] == "heal_adapter"
    assert card["layers_from_teacher"] == p.distill.student_layers
    import os

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert card["teacher"] == teacher_identity(p)
        dotted = p.model_copy(update={"teacher": p.teacher.model_copy(update={"source": "./" + p.teacher.source})})
        assert teacher_identity(dotted) == card["teacher"]  # the same folder, written another way
    finally:
        os.chdir(cwd)
    assert card["heal"]["demos"] >= 450 and card["recipe"] == "sad profile heal && dvc repro student_init && sad ship-heal"


def test_healing_here_and_a_shipped_heal_exclude_each_other():
    from pydantic import ValidationError

    from sad.config import HealParams

    with pytest.raises(ValidationError, match="set one of them"):
        HealParams(epochs=1.0, source="assets/student_heal")
    assert HealParams(epochs=1.0, source=None).source is None


def test_params_yaml_is_the_default_key_by_key(tmp_path):
    """One source of defaults: every key of the committed params.yaml equals the config module's default, so a
    partial params file (a test, a user's own) runs on the pipeline's own defaults."""
    import subprocess

    from sad.config import Params

    p = load_params(REPO / "params.yaml")
    if p.project.profile != "default":  # a profile applied in this checkout: check the committed file instead
        committed = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True)
        if committed.returncode != 0:
            pytest.skip(f"params.yaml holds profile {p.project.profile!r} and git cannot show the committed one")
        path = tmp_path / "params.yaml"
        path.write_text(committed.stdout)
        p = load_params(path)

    def differences(a, b, prefix=""):
        if isinstance(a, dict) and isinstance(b, dict):
            return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{prefix}{k}.")]
        return [] if a == b else [f"{prefix.rstrip('.')}: params.yaml {b!r}, sad/config.py {a!r}"]

    assert differences(Params().model_dump(), p.model_dump()) == []


def test_deep_merge_merges_dicts_and_replaces_leaves():
    assert deep_merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"b": 5}, "d": [2]}) == {"a": {"b": 5, "c": 2}, "d": [2]}


def test_a_profile_replaces_the_mappings_it_lists_and_merges_the_rest():
    base = {"distill": {"methods": {"sad": {"loss": "sad"}, "sft": {"loss": "sft"}}, "seeds": [0]}, "tasks": {"train": 20}}
    profile = {"distill": {"methods": {"sad_takeover": {"loss": "sad"}}}, "tasks": {"train": 150},
               "replace": ["distill.methods"]}
    assert apply_profile(base, profile) == {"distill": {"methods": {"sad_takeover": {"loss": "sad"}}, "seeds": [0]},
                                            "tasks": {"train": 150}}
    assert apply_profile(base, {"distill": {"methods": {"x": {}}}})["distill"]["methods"].keys() == {"sad", "sft", "x"}
    with pytest.raises(ConfigError, match=r"profiles/p.yaml: replace: distill.method must name a mapping"):
        apply_profile(base, {"distill": {"method": {}}, "replace": ["distill.method"]}, "profiles/p.yaml")
    with pytest.raises(ConfigError, match="expected a list of dotted paths"):
        apply_profile(base, {"replace": "distill.methods"})


def test_sad_profile_writes_the_profiles_methods_as_the_whole_set(tmp_path, monkeypatch):
    """`sad profile takeover` (replace: [distill.methods]) leaves exactly the profile's methods, and the
    comments of params.yaml elsewhere."""
    import shutil

    from typer.testing import CliRunner

    from flows.cli import app

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["profile", "takeover"])
    assert result.exit_code == 0, result.output
    written = (tmp_path / "params.yaml").read_text()
    p = load_params(tmp_path / "params.yaml")
    assert list(p.distill.methods) == ["sad", "token_kd", "sft", "sad_takeover"] and p.project.profile == "takeover"
    assert "# Every knob of the SAD pipeline" in written and "replace:" not in written
    result = CliRunner().invoke(app, ["profile", "heal"])  # on top of another: both named
    assert result.exit_code == 0 and "on top of profile 'takeover'" in result.output, result.output
    assert load_params(tmp_path / "params.yaml").project.profile == "takeover+heal"
    result = CliRunner().invoke(app, ["profile", "takover"])
    assert result.exit_code == 2 and "no profile 'takover'" in result.output and "takeover, teacher" in result.output


def test_envs_are_checked_with_the_key_named():
    from sad.config import parse_params

    with pytest.raises(ConfigError, match="tasks.envs"):
        parse_params({"tasks": {"envs": ["alfworld", "minecraft"]}})
    with pytest.raises(ConfigError, match="without repeats"):
        parse_params({"tasks": {"envs": ["webshop", "webshop"]}})
    with pytest.raises(ConfigError, match="tasks.hotpotqa.max_steps"):
        parse_params({"tasks": {"hotpotqa": {"max_steps": 0}}})
    with pytest.raises(ConfigError, match="evaluate.splits names each split once"):
        parse_params({"evaluate": {"splits": ["dev", "test", "test"]}})


def test_kd_temperatures_must_be_cached_so_a_new_method_never_reruns_teacher_logits():
    """teacher_logits caches the listed temperatures, not those of the methods: dvc.yaml gives it no method params."""
    p = parse_params({"distill": {"teacher_logits": {"temperatures": [2.0, 1.0]},
                                  "methods": {"sad": {"loss": "sad"}, "hot": {"loss": "token_kd", "temperature": 2.0}}}})
    assert p.distill.temperatures() == [1.0, 2.0]
    with pytest.raises(ConfigError, match=r"'hot': 2\.0.*distill\.teacher_logits\.temperatures \[1\.0\]; add it there"):
        parse_params({"distill": {"methods": {"sad": {"loss": "sad"}, "hot": {"loss": "token_kd", "temperature": 2.0}}}})
    # SFT needs no teacher, and a teacher run online computes any temperature
    parse_params({"distill": {"methods": {"sad": {"loss": "sad"}, "sft": {"loss": "sft", "temperature": 3.0}}}})
    parse_params({"distill": {"teacher_logits": {"mode": "online"},
                              "methods": {"sad": {"loss": "sad"}, "hot": {"loss": "token_kd", "temperature": 2.0}}}})
    with pytest.raises(ConfigError, match="distinct and > 0"):
        parse_params({"distill": {"teacher_logits": {"temperatures": [1.0, 1.0]}}})
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["teacher_logits"]
    assert stage["params"] == ["distill.teacher_logits"]


def test_sad_ablations_are_recognised_for_their_paired_comparison_with_sad():
    from sad.config import MethodParams

    assert MethodParams(loss="sad", lambda_act=0.0).is_sad_ablation
    assert MethodParams(loss="sad", lambda_reason=0.0).is_sad_ablation
    assert MethodParams(loss="sad", curriculum=False).is_sad_ablation
    assert not MethodParams(loss="sad").is_sad_ablation
    assert not MethodParams(loss="token_kd", curriculum=False).is_sad_ablation
    assert not MethodParams(loss="sad", lambda_act=0.0, onpolicy={"rounds": 1}).is_sad_ablation


@pytest.mark.parametrize("override, message", [
    ({"register": {"gate_metric": "dev_ce"}, "distill": {"train": {"dev_fraction": 0.0}}},
     "register.gate_metric dev_ce is measured on held-out training windows, but distill.train.dev_fraction is 0"),
    ({"register": {"gate_metric": "f1"}, "tasks": {"envs": ["alfworld", "webshop"]}},
     "register.gate_metric f1 is HotPotQA's answer F1, but tasks.envs has no hotpotqa"),
    ({"context": {"max_tokens": 128, "max_new_tokens": 64}},
     r"context.max_new_tokens \(64\) must be less than half of context.max_tokens \(128\)"),
    ({"retrain": {"cron": "garbage!!"}}, r"'garbage!!' is no cron expression: five fields"),
])
def test_settings_that_would_fail_late_are_refused_at_once_with_the_keys_named(override, message):
    with pytest.raises(ConfigError, match=message):
        parse_params(override)


def test_valid_settings_near_those_edges_pass():
    assert parse_params({"context": {"max_tokens": 129, "max_new_tokens": 64}}).context.max_new_tokens == 64
    for cron in ("@daily", "@weekly", "*/15 * * * *", "0 3 * * sun"):
        assert parse_params({"retrain": {"cron": cron}}).retrain.cron == cron
