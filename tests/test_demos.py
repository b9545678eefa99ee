"""The expert's demos can be imitated: what each action copies is in the agent's context; injected
mistakes are realistic (valid actions, misspelled searches) and recovered from."""

from __future__ import annotations

import pytest

from sad.benchmarks import load_tasks
from sad.config import parse_params
from sad.rollout import play_expert


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Fresh tasks of every env and the expert's demos on them, with mistakes injected as in the default."""
    from sad.benchmarks import write_tasks

    root = tmp_path_factory.mktemp("demo-tasks")
    p = parse_params({"tasks": {"train": 30, "dev": 1, "test": 1, "alfworld": {"max_steps": 50}}})
    write_tasks(p, root)
    tasks = [t for env in ("hotpotqa", "webshop") for t in load_tasks(root, env, "train")]
    tasks += load_tasks(root, "alfworld", "train")[:8]
    return play_expert(tasks, root, perturb=0.3, seed=0)


def test_every_expert_action_argument_is_visible_in_the_agents_context(generated):
    from sad.metrics import hidden_arguments
    from sad.react import episode_text
    from sad.tokenizer import train_bpe

    tokenizer = train_bpe([episode_text(e) for e in generated], vocab_size=1024)
    hidden = hidden_arguments(generated, tokenizer, budget=1024 - 176)
    assert hidden == []
    steps = sum(1 for e in generated for s in e.steps if s.imitate)
    assert steps > 300


def test_injected_mistakes_are_realistic_and_recovered_from(generated):
    mistakes = {env: [s for e in generated if e.env == env for s in e.steps if not s.imitate]
                for env in ("alfworld", "hotpotqa", "webshop")}
    assert all(mistakes.values()), {env: len(m) for env, m in mistakes.items()}
    # WebShop: a wrong but valid click (or a misspelled search), never an invalid no-op
    assert all(s.valid for s in mistakes["webshop"])
    assert any(s.action.startswith("click[") for s in mistakes["webshop"])
    # HotPotQA: a misspelled search, followed by the exact title
    for e in generated:
        if e.env != "hotpotqa":
            continue
        for i, s in enumerate(e.steps):
            if not s.imitate:
                assert s.action.startswith("search[") and s.observation.startswith("Could not find")
                retry = next(t for t in e.steps[i + 1:] if t.imitate)  # the expert's next own step
                assert retry.action.startswith("search[") and retry.observation.split(" ")[:2] != ["Could", "not"]
    assert sum(e.success for e in generated) >= 0.95 * len(generated)


def test_tokenizer_tokenises_a_copied_word_like_its_source(generated):
    """A name inside brackets, after a space or a parenthesis ends in the same tokens (copy-friendly)."""
    from sad.react import episode_text
    from sad.tokenizer import train_bpe

    tok = train_bpe([episode_text(e) for e in generated], vocab_size=1024)
    name = tok.encode("Raul Elquin")
    for text in ("search[Raul Elquin]", "Thought: I need Raul Elquin", "(Raul Elquin)"):
        ids = tok.encode(text)
        assert any(ids[i:i + len(name)] == name for i in range(len(ids))), text
    assert tok.decode(tok.encode("click[B5D84C3B3D] \n x")) == "click[B5D84C3B3D] \n x"
