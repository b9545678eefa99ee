"""The expert's demos can be imitated: what each action copies is in the agent's context; injected
mistakes are realistic (valid actions, misspelled searches) and recovered from."""

from __future__ import annotations

import random

import pytest

from sad.config import parse_params
from sad.environments import load_tasks
from sad.rollout import play_expert


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Fresh tasks of every env and the expert's demos on them, with mistakes injected as in the default."""
    from sad.environments import write_tasks

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


def test_demos_stage_refuses_an_expert_below_the_floor_and_names_the_failed_tasks(generated, tmp_path):
    import copy

    from sad.stages import ExpertBelowFloor, demos_file, write_demos

    project = {"data_dir": str(tmp_path / "data"), "metrics_dir": str(tmp_path / "metrics")}
    p = parse_params({"project": project})
    episodes = copy.deepcopy([e for e in generated if e.env == "webshop"][:10])
    for e in episodes[:2]:  # two lost episodes: 80% won, below the default floor of 90%
        e.success = False
    with pytest.raises(ExpertBelowFloor, match=r"webshop: 8/10 won; failed webshop/train/\d+, webshop/train/\d+\. "
                                               r"Check the task data"):
        write_demos(p, episodes)
    assert not demos_file(p).exists()
    metrics = write_demos(parse_params({"project": project, "demos": {"min_success": 0.8}}), episodes)
    assert metrics["success_by_env"] == {"webshop": 0.8} and demos_file(p).exists()


def test_no_expert_repeats_a_failed_action_in_any_env(generated):
    """The loop guard of every env, checked over generated demos with injected mistakes: an expert step never
    repeats a failed step with nothing changed since, nor a search that found nothing."""
    from sad.rollout import repeats_a_failure

    repeats = [(e.task_id, s.action) for e in generated for i, s in enumerate(e.steps)
               if s.imitate and repeats_a_failure(e.steps[:i], s.action) is not None]
    assert repeats == []
    assert {e.env for e in generated} == {"alfworld", "hotpotqa", "webshop"} and all(e.success for e in generated)


def test_the_loop_guard_by_hand():
    from sad.react import Step
    from sad.rollout import repeats_a_failure

    def step(action, observation="ok", valid=True):
        return Step(thought="t", action=action, observation=observation, valid=valid)

    assert repeats_a_failure([step("open fridge 1", "Nothing happens.")], "open fridge 1") == 0
    # after a step that changed the state, the same command may succeed (ALFWorld: go there first)
    assert repeats_a_failure([step("open fridge 1", "Nothing happens."), step("go to fridge 1")], "open fridge 1") is None
    assert repeats_a_failure([step("jump[x]", "Invalid action: jump[x]", valid=False)], "JUMP[x]") == 0
    # a HotPotQA search that found nothing fails again, whatever happened since
    history = [step("search[Garden of]", "Could not find Garden of. Similar: []"), step("search[The Garden]")]
    assert repeats_a_failure(history, "search[Garden of]") == 0


def test_a_skipped_plan_step_is_a_mistake_only_with_what_the_agent_has_seen():
    """ALFWorld's mistake of doing the plan's next step too early (moving into a closed drawer), never
    one that names a thing the agent has not seen yet."""
    from sad.rollout import perturb_action, skipped_step

    plan = ["open drawer 2", "move fork 1 to drawer 2"]
    seen = "You pick up the fork 1 from the countertop 1. You arrive at drawer 2. The drawer 2 is closed."
    assert skipped_step("open drawer 2", plan, seen) == "move fork 1 to drawer 2"
    assert skipped_step("open drawer 2", plan, "You arrive at drawer 2.") is None  # fork 1 never read
    assert skipped_step("go to drawer 1", plan, seen) is None  # not the plan's next step (exploring)
    assert skipped_step("open drawer 2", plan[:1], seen) is None
    draws = [perturb_action(random.Random(i), "open drawer 2", ["open drawer 2", "go to drawer 1"],
                            "move fork 1 to drawer 2") for i in range(200)]
    assert 70 < draws.count("move fork 1 to drawer 2") < 130  # half the time, where there is one
    assert "open drawer 2" not in draws


def test_alfworld_demos_hold_skipped_steps_the_expert_recovers_from(generated):
    skipped = [(e, i) for e in generated if e.env == "alfworld" for i, s in enumerate(e.steps)
               if not s.imitate and s.observation == "Nothing happens." and s.action.startswith(("move ", "take "))]
    assert skipped
    for episode, i in skipped:
        assert episode.success and any(s.imitate for s in episode.steps[i + 1:])  # recovered (maybe after another mistake)
