"""Demos that teach recovery: repeated-step mistakes (loops) and the expert taking over from an
agent's own first mistake (DAgger with takeover)."""

from __future__ import annotations

import pytest

from sad.agent import Generation, stream_in_rounds
from sad.environments import load_tasks
from sad.rollout import play_expert, play_takeover


class ReplayAgent:
    """A policy that plays the expert's recorded actions for its first ``agree`` steps, then errs."""

    def __init__(self, tokenizer, demos, agree: int, wrong: str = "go to nowhere 9"):
        self.tokenizer, self.max_new_tokens, self.agree, self.wrong = tokenizer, 32, agree, wrong
        self.by_prompt = {tuple(tokenizer.encode(d.prompt)): d for d in demos}

    def generate(self, contexts: list[list[int]]) -> list[Generation]:
        out = []
        for ids in contexts:
            demo = next(d for p, d in self.by_prompt.items() if tuple(ids[:len(p)]) == p)
            step = self.tokenizer.decode(ids).count("Action:")
            action = demo.steps[step].action if step < self.agree else self.wrong
            out.append(Generation(f"Thought: I think.\nAction: {action}\n", 5, 0.0))
        return out

    def stream(self, contexts, on_block) -> None:  # play's continuous batching, in lockstep rounds
        stream_in_rounds(self.generate, contexts, on_block)

    def score_continuations(self, prefix: list[int], continuations: list[list[int]]) -> list[float]:
        """A repair's choice among the listed actions: ``look`` (which changes nothing), else the first."""
        return [float("look" in self.tokenizer.decode(c)) for c in continuations]


@pytest.mark.slow
def test_repeat_mistakes_replay_the_previous_step_and_are_recovered_from(task_root):
    tasks = load_tasks(task_root, "alfworld", "train")
    episodes = play_expert(tasks, task_root, perturb=0.3, seed=0, repeat_share=1.0)
    repeats = [(e, i) for e in episodes for i, s in enumerate(e.steps) if not s.imitate and i > 0 and e.steps[i - 1].imitate
               and (s.thought, s.action) == (e.steps[i - 1].thought, e.steps[i - 1].action)]
    assert len(repeats) >= 3, "too few repeated steps injected"
    for e, i in repeats:
        if e.steps[i].action.startswith("go to "):
            assert e.steps[i].observation == "Nothing happens."  # ALFWorld: already there
    assert all(e.success for e in episodes)
    # without repeat_share the default's demos are unchanged (same random draws)
    again = play_expert(tasks[:3], task_root, perturb=0.3, seed=0)
    assert [e.to_dict() for e in again] == [e.to_dict() for e in play_expert(tasks[:3], task_root, perturb=0.3, seed=0,
                                                                              repeat_share=0.0)]


def test_takeover_keeps_the_agents_first_mistake_and_the_expert_finishes(task_root, tokenizer, demos):
    tasks = load_tasks(task_root, "alfworld", "train")[:4]
    agent = ReplayAgent(tokenizer, demos[:4], agree=2)
    episodes = play_takeover(tasks, task_root, agent, max_tokens=100_000, batch_size=3)
    assert [e.task_id for e in episodes] == [t.task_id for t in tasks]
    for episode, demo in zip(episodes, demos[:4]):
        assert episode.meta["takeover_step"] == 2
        # while the agent agrees, the steps are the expert's own (loss on them)
        assert [(s.thought, s.action) for s in episode.steps[:2]] == [(s.thought, s.action) for s in demo.steps[:2]]
        assert all(s.imitate for s in episode.steps[:2])
        mistake = episode.steps[2]
        assert (mistake.action, mistake.thought, mistake.imitate, mistake.valid) == ("go to nowhere 9", "I think.", False, False)
        # then the expert recovers from the state the mistake led to and wins
        assert all(s.imitate for s in episode.steps[3:]) and episode.steps[3:]
        assert episode.success


def test_takeover_ends_an_episode_where_the_expert_gives_up_and_its_row_takes_the_next_task(task_root, tokenizer,
                                                                                              demos, monkeypatch):
    import dataclasses

    from sad import environments
    from sad.envs.alfworld import AlfworldExpert
    from sad.envs.base import ExpertGaveUp

    tasks = load_tasks(task_root, "alfworld", "train")[:4]
    give_up_at = {tasks[0].task_id: 0, tasks[2].task_id: 2}  # on the first state; after two agreed steps

    class GivingUp(AlfworldExpert):
        def reset(self, task, obs):
            self.give_up, self.labels = give_up_at.get(task.task_id), 0
            return super().reset(task, obs)

        def act(self, obs):
            if self.labels == self.give_up:
                raise ExpertGaveUp("no plan from here")
            self.labels += 1
            return super().act(obs)

    monkeypatch.setitem(environments.BENCHMARKS, "alfworld",
                        dataclasses.replace(environments.BENCHMARKS["alfworld"], make_expert=GivingUp))
    agent = ReplayAgent(tokenizer, demos[:4], agree=10_000)
    episodes = play_takeover(tasks, task_root, agent, 100_000, batch_size=2)
    assert [e.task_id for e in episodes] == [t.task_id for t in tasks]
    assert episodes[0].steps == [] and "expert_gave_up" in episodes[0].meta and not episodes[0].success
    assert [(s.thought, s.action) for s in episodes[2].steps] == [(s.thought, s.action) for s in demos[2].steps[:2]]
    assert "expert_gave_up" in episodes[2].meta and not episodes[2].success
    for episode, demo in ((episodes[1], demos[1]), (episodes[3], demos[3])):  # played whole, as the demo
        assert "expert_gave_up" not in episode.meta and episode.success
        assert [(s.thought, s.action) for s in episode.steps] == [(s.thought, s.action) for s in demo.steps]


def test_takeover_without_a_mistake_is_the_expert_demo(task_root, tokenizer, demos):
    tasks = load_tasks(task_root, "alfworld", "train")[:2]
    episodes = play_takeover(tasks, task_root, ReplayAgent(tokenizer, demos[:2], agree=10_000), 100_000, 2)
    for episode, demo in zip(episodes, demos[:2]):
        assert "takeover_step" not in episode.meta
        assert [(s.thought, s.action, s.observation) for s in episode.steps] == \
               [(s.thought, s.action, s.observation) for s in demo.steps]
        assert episode.success


def test_a_stuck_agent_stops_after_failed_steps_in_a_row_and_the_rate_is_reported(task_root, tokenizer, demos):
    """``stop_after_failures``: an agent that keeps sending a rejected action ends, lost, after that many
    unproductive steps in a row (failed, repaired, or an observation seen before); the expert's first steps
    (valid) do not count; off (0), it plays to the step cap."""
    import dataclasses

    from sad.metrics import summarize
    from sad.react import Step
    from sad.rollout import play_agent, trailing_unproductive

    ok, bad = Step("", "go to desk 1", "You arrive at desk 1."), Step("", "go to nowhere 9", "Nothing happens.")
    assert [trailing_unproductive(s) for s in ([], [ok], [bad, ok], [ok, bad, bad], [bad, bad, bad])] == [0, 0, 0, 2, 3]
    moved = Step("", "go to desk 2", "You arrive at desk 2.")  # a ping-pong between two places sees nothing new
    assert [trailing_unproductive(s) for s in ([ok, moved], [ok, moved, ok], [ok, moved, ok, moved])] == [0, 1, 2]

    uncapped = load_tasks(task_root, "alfworld", "test")[:2]
    tasks = [dataclasses.replace(t, meta={**t.meta, "max_steps": 12}) for t in uncapped]
    agent = ReplayAgent(tokenizer, play_expert(tasks, task_root), agree=2)
    stopped = play_agent(tasks, task_root, agent, "m", max_tokens=10**6, batch_size=2, stop_after_failures=4)
    assert [e.n_steps for e in stopped] == [6, 6] and all(e.meta["stopped_stuck"] and not e.success for e in stopped)
    assert all(trailing_unproductive(e.steps) == 4 and all(s.valid for s in e.steps[:2]) for e in stopped)
    assert summarize(stopped, tokenizer)["stuck_stop_rate"] == 1.0
    capped = play_agent(tasks, task_root, agent, "m", max_tokens=10**6, batch_size=2)
    assert [e.n_steps for e in capped] == [12, 12] and not any("stopped_stuck" in e.meta for e in capped)
    assert "stuck_stop_rate" not in summarize(capped, tokenizer)
    # an episode that ends on its own is not "stopped stuck" (the budget keeps every step for the replay's count)
    won = play_agent(uncapped, task_root, ReplayAgent(tokenizer, play_expert(uncapped, task_root), agree=99), "m",
                     max_tokens=10**6, batch_size=2, stop_after_failures=4)
    assert all(e.success and e.meta["stopped_stuck"] is False for e in won)
    assert summarize(won, tokenizer)["stuck_stop_rate"] == 0.0
    # with action_choice repair the wrong action is replaced by a listed one (valid), yet the agent is as stuck:
    # steps it needed repaired count toward the stop
    repaired = play_agent(tasks, task_root, agent, "m", max_tokens=10**6, batch_size=2, stop_after_failures=4,
                          action_choice="repair")
    assert [e.n_steps for e in repaired] == [6, 6] and all(e.meta["stopped_stuck"] for e in repaired)
    assert all([s.repaired_from for s in e.steps] == [None] * 2 + ["go to nowhere 9"] * 4 and
               e.meta["repaired_steps"] == 4 and e.steps[-1].action == "look" for e in repaired)
    assert trailing_unproductive([ok, dataclasses.replace(ok, repaired_from="go to desk 9")]) == 1
    # the file keeps what the agent generated where it was repaired, and nothing new where it was not
    from sad.react import Episode
    saved = repaired[0].to_dict()
    assert ["repaired_from" in s for s in saved["steps"]] == [False] * 2 + [True] * 4
    assert Episode.from_dict(saved).steps == repaired[0].steps


def test_the_teacher_stage_runs_a_dagger_round_and_resumes_without_replaying(tmp_path, monkeypatch, demos):
    """teacher.dagger: imitation, then the teacher plays its block of train tasks with the expert taking over,
    then training goes on over those episodes and a sample of demos; the card and metrics say what happened."""
    import json

    from sad import rollout, training
    from sad.config import parse_params
    from sad.environments import write_tasks
    from sad.modeling import read_card
    from sad.stages import dagger_dir, demos_file, run_pretrained, run_teacher, run_tokenizer, tasks_root, teacher_dir

    monkeypatch.chdir(tmp_path)
    train = {"epochs": 1, "batch_size": 4, "lr": 0.01, "dev_fraction": 0.0}
    p = parse_params({"tasks": {"train": 3, "dev": 1, "test": 1, "envs": ["alfworld"]},
                      "context": {"max_tokens": 512, "max_new_tokens": 16},
                      "tokenizer": {"vocab_size": 400},
                      "distill": {"student_layers": None},
                      "teacher": {"source": None, "finetune": True,
                                  "arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
                                  "train": train,
                                  "dagger": {"tasks": {"alfworld": 2}, "demos": 3, "train": train}}})
    write_tasks(p, tasks_root(p))
    demos_file(p).parent.mkdir(parents=True)
    demos_file(p).write_text("".join(json.dumps(e.to_dict()) + "\n" for e in demos))
    run_pretrained(p)
    run_tokenizer(p)
    real_train_lm, real_play = training.train_lm, rollout.play_takeover
    calls: list[str] = []

    def train_lm(*args, crash: bool = False, **kwargs):
        calls.append(kwargs["desc"])
        if crash and kwargs["desc"].startswith("teacher dagger"):
            raise KeyboardInterrupt("killed during the dagger round's training")
        return real_train_lm(*args, **kwargs)

    def play_takeover(*args, **kwargs):
        calls.append("play")
        return real_play(*args, **kwargs)

    monkeypatch.setattr(rollout, "play_takeover", play_takeover)
    monkeypatch.setattr(training, "train_lm", lambda *a, **k: train_lm(*a, crash=True, **k))
    with pytest.raises(KeyboardInterrupt):
        run_teacher(p, progress=False)
    assert calls == ["teacher", "play", "teacher dagger 0"]
    monkeypatch.setattr(training, "train_lm", train_lm)
    import sad.modeling

    def copy_fails(*args, **kwargs):
        raise OSError("disk full while the teacher folder is written")

    with monkeypatch.context() as m:  # a crash while the teacher is written: no folder, the phases stay
        m.setattr(sad.modeling, "copy_files_into", copy_fails)
        with pytest.raises(OSError):
            run_teacher(p, progress=False)
    assert calls[3:] == ["teacher dagger 0"]  # resumed: neither imitation nor the round's play is redone
    assert not teacher_dir(p).exists() and (dagger_dir(p) / "round-0" / "takeover.jsonl").is_file()
    metrics = run_teacher(p, progress=False)
    assert calls[4:] == []  # the round's trained phase is loaded
    assert not dagger_dir(p).exists()  # the phases kept for resuming are gone once the teacher is written
    episodes = [json.loads(line) for line in (teacher_dir(p) / "dagger" / "round-0.jsonl").read_text().splitlines()]
    assert [e["task_id"] for e in episodes] == ["alfworld/train/00000", "alfworld/train/00001"]
    mistakes = [e for e in episodes if "takeover_step" in e["meta"]]
    assert metrics["dagger0_episodes"] == 2 and metrics["dagger0_alfworld_mistake_rate"] == len(mistakes) / 2
    for e in mistakes:  # the agent's mistake carries no loss; the expert's recovery does
        k = e["meta"]["takeover_step"]
        assert not e["steps"][k]["imitate"] and all(s["imitate"] for s in e["steps"][k + 1:])
    assert read_card(teacher_dir(p))["dagger"]["rounds"][0]["episodes"] == 2


def test_dagger_rounds_play_consecutive_blocks_of_train_tasks_from_first_block(tmp_path, monkeypatch):
    """Round r plays block first_block + r of each env's train tasks, wrapping around the split, so a
    teacher trained further (teacher.init) can play tasks its earlier rounds did not."""
    from sad.config import parse_params
    from sad.environments import write_tasks
    from sad.stages import tasks_root
    from sad.stages.teacher import dagger_tasks

    monkeypatch.chdir(tmp_path)
    dagger = {"tasks": {"hotpotqa": 2, "webshop": 0}}
    p = parse_params({"tasks": {"train": 5, "dev": 1, "test": 1, "envs": ["hotpotqa", "webshop"]},
                      "distill": {"student_layers": None}, "teacher": {"source": None, "finetune": True, "dagger": dagger}})
    write_tasks(p, tasks_root(p))
    ids = [[t.task_id for t in dagger_tasks(p, r)] for r in range(3)]
    assert ids == [["hotpotqa/train/00000", "hotpotqa/train/00001"], ["hotpotqa/train/00002", "hotpotqa/train/00003"],
                   ["hotpotqa/train/00004", "hotpotqa/train/00000"]]
    q = parse_params({"tasks": p.tasks.model_dump(), "distill": {"student_layers": None},
                      "teacher": {"source": None, "finetune": True, "dagger": {**dagger, "first_block": 1}}})
    assert [t.task_id for t in dagger_tasks(q, 0)] == ids[1]


def test_an_overruled_expert_still_makes_the_move_whose_action_never_ran(task_root):
    """Takeover and DAgger labels ask the expert at each state, then run the student's action instead of the
    expert's where they differ: the expert must not believe its own action ran (HotPotQA once skipped a hop and
    quoted the student's page as evidence; WebShop counted a query never sent as tried)."""
    from sad.environments import get_benchmark
    from sad.rollout import expert_overruled

    bench = get_benchmark("hotpotqa")
    for task in load_tasks(task_root, "hotpotqa", "train"):  # the first question with two pages to search
        env, expert = bench.make_env(True), bench.make_expert()
        obs = env.reset(task, task_root)
        expert.reset(task, obs)
        searches = [arg for verb, arg in expert._plan if verb == "search"]
        if len(searches) >= 2:
            break
    first, second = searches[:2]
    assert expert.act(obs)[1] == f"search[{first}]"
    expert_overruled(expert)
    obs = env.step(f"search[{second}]")  # the student searched the other page first
    thought, action = expert.act(obs)
    assert action == f"search[{first}]" and "Next I need" not in thought  # nothing quoted from the student's page
    expert_overruled(expert)
    obs = env.step(f"search[{first[:-1]}]")  # then misspelled it
    thought, action = expert.act(obs)
    assert action == f"search[{first}]" and thought.startswith("There is no page named")
    done = [action]
    while not obs.done:
        obs = env.step(action)
        if obs.done:
            break
        action = expert.act(obs)[1]
        done.append(action)
    assert obs.success and f"search[{second}]" in done  # every hop made, the answer right

    bench = get_benchmark("webshop")
    task = load_tasks(task_root, "webshop", "train")[0]
    env, expert = bench.make_env(True), bench.make_expert()
    start = env.reset(task, task_root)
    expert.reset(task, start)
    proposed = expert.act(start)
    expert_overruled(expert)
    assert expert.searches == [] and expert.act(start) == proposed  # the query still untried
