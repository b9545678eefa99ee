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
