import pytest
import yaml

from sad.config import ConfigError, deep_merge, load_params, parse_params

from .conftest import REPO


def test_repository_params_and_profiles_are_valid():
    p = load_params(REPO / "params.yaml")
    assert p.tasks.envs == ["alfworld", "hotpotqa", "webshop"]
    assert set(p.distill.methods) == {"sad", "token_kd", "sft"}
    for profile in (REPO / "profiles").glob("*.yaml"):
        merged = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), yaml.safe_load(profile.read_text()))
        parse_params(merged, str(profile))


def test_student_is_at_least_four_times_smaller_by_default():
    from sad.modeling import build_llama, count_parameters
    from sad.tokenizer import train_bpe

    p = load_params(REPO / "params.yaml")
    tok = train_bpe(["Thought: a\nAction: b\n"] * 10, vocab_size=300)
    vocab = p.tokenizer.vocab_size
    teacher = count_parameters(build_llama(p.teacher.arch, tok, p.context.max_tokens, vocab_size=vocab))
    student = count_parameters(build_llama(p.distill.student, tok, p.context.max_tokens, vocab_size=vocab))
    assert teacher >= 4 * student


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"teacher": {"train": {"lr": -1}}}, "teacher.train.lr"),
        ({"teacher": {"train": {"lr": "fast"}}}, "teacher.train.lr"),
        ({"tasks": {"train": 0}}, "tasks.train"),
        ({"tasks": {"tarin": 5}}, "tasks.tarin"),
        ({"distill": {"methods": {"sad": {"loss": "sad", "normalisation": "mean"}}}}, "distill.methods.sad.normalisation"),
        ({"teacher": {"arch": {"hidden_size": 30, "num_layers": 1, "num_heads": 4, "intermediate_size": 64}}}, "teacher.arch"),
        ({"segment": {"keep": "best"}}, "segment.keep"),
        ({"context": {"max_tokens": 64, "max_new_tokens": 60}}, "max_new_tokens"),
        ({"tasks": {"alfworld": {"task_types": ["make_coffee"]}}}, "tasks.alfworld"),
        ({"register": {"gate_split": "train"}}, "register.gate_split"),
    ],
)
def test_bad_params_name_the_key(patch, key):
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    with pytest.raises(ConfigError) as err:
        parse_params(deep_merge(base, patch), "params.yaml")
    assert key in str(err.value)
    assert str(err.value).startswith("params.yaml: invalid parameters")


def test_unreadable_params_files_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(listy)


def test_deep_merge_merges_dicts_and_replaces_leaves():
    assert deep_merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"b": 5}, "d": [2]}) == {"a": {"b": 5, "c": 2}, "d": [2]}


def test_envs_are_checked_with_the_key_named():
    from sad.config import ConfigError, parse_params

    with pytest.raises(ConfigError, match="tasks.envs"):
        parse_params({"tasks": {"envs": ["alfworld", "minecraft"]}})
    with pytest.raises(ConfigError, match="without repeats"):
        parse_params({"tasks": {"envs": ["webshop", "webshop"]}})
    with pytest.raises(ConfigError, match="tasks.hotpotqa.max_steps"):
        parse_params({"tasks": {"hotpotqa": {"max_steps": 0}}})
