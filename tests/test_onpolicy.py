"""On-policy structured distillation (issue #18): the student's own episodes, scored by the teacher."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from sad.agent import Generation, stream_in_rounds
from sad.config import MethodParams, OnPolicyParams, parse_params
from sad.environments import load_tasks
from sad.onpolicy import (
    act_only,
    expert_labelled_episodes,
    mix_windows,
    play_round,
    round_summary,
    round_tasks,
    split_takeover,
)
from sad.segment import segment_episodes, transcript_pieces
from sad.training import collate, method_loss


class DemoAgent:
    """A scripted student: writes the expert demo's own thought and action for its first ``agree`` steps,
    then ``wrong`` (a block with no ``Action:`` when ``wrong`` is None)."""

    def __init__(self, tokenizer, demos, agree: int = 10_000, wrong: str | None = "go to nowhere 9"):
        self.tokenizer, self.max_new_tokens, self.agree, self.wrong = tokenizer, 32, agree, wrong
        self.by_prompt = {tuple(tokenizer.encode(d.prompt)): d for d in demos}

    def generate(self, contexts: list[list[int]], temperature: float | None = None) -> list[Generation]:
        out = []
        for ids in contexts:
            demo = next(d for p, d in self.by_prompt.items() if tuple(ids[:len(p)]) == p)
            step = self.tokenizer.decode(ids).count("Action:")
            if step < self.agree:
                text = f"Thought: {demo.steps[step].thought}\nAction: {demo.steps[step].action}\n"
            else:
                text = "Thought: I keep thinking and never act" if self.wrong is None else \
                    f"Thought: I think.\nAction: {self.wrong}\n"
            out.append(Generation(text, 5, 0.0))
        return out

    def stream(self, contexts, on_block) -> None:  # play's continuous batching, in lockstep rounds
        stream_in_rounds(self.generate, contexts, on_block)


def _params():
    return parse_params({"tasks": {"envs": ["alfworld"], "alfworld": {"max_steps": 8}},
                         "context": {"max_tokens": 32_768, "history_steps": 0}, "rollout": {"batch_size": 3},
                         "agent": {"action_choice": "free"}})  # the scripted student's blocks are sent as written


def test_a_student_that_writes_the_teachers_tokens_gets_the_off_policy_windows_and_loss(task_root, tokenizer, demos,
                                                                                          tiny_model_factory):
    tasks = load_tasks(task_root, "alfworld", "train")[:3]
    p = _params()
    own = play_round(DemoAgent(tokenizer, demos[:3]), tasks, task_root, p, 0.0, seed=0, round_index=0)
    assert [(s.thought, s.action, s.observation) for e in own for s in e.steps] == \
           [(s.thought, s.action, s.observation) for e in demos[:3] for s in e.steps]
    on = segment_episodes(own, tokenizer, 512).windows
    off = segment_episodes(demos[:3], tokenizer, 512).windows
    for col in ("input_ids", "reason_mask", "act_mask"):
        assert list(on[col]) == list(off[col])
    student, teacher = tiny_model_factory(hidden=16, seed=1), tiny_model_factory(hidden=32, seed=2)
    method = MethodParams(loss="sad", divergence="reverse_kl")
    losses = []
    for windows in (on, off):
        batch = collate(windows[["input_ids", "reason_mask", "act_mask"]].to_dict("records"), tokenizer.pad_token_id)
        with torch.no_grad():
            s = student(input_ids=batch["input_ids"]).logits
            t = teacher(input_ids=batch["input_ids"]).logits
        losses.append(method_loss(method, s, batch, t)[0].item())
    assert losses[0] == losses[1] and losses[0] > 0


def test_span_masks_tile_the_students_own_text_and_a_block_without_action_is_an_invalid_step(task_root, tokenizer, demos):
    tasks = load_tasks(task_root, "alfworld", "train")[:2]
    episodes = play_round(DemoAgent(tokenizer, demos[:2], agree=1, wrong=None), tasks, task_root, _params(), 0.0, 0, 0)
    for e in episodes:
        assert e.steps[0].valid and not any(s.valid for s in e.steps[1:]), "a block with no action must be invalid"
        assert all(s.action == "" for s in e.steps[1:])
    summary = round_summary(episodes, 0)
    n_steps = sum(e.n_steps for e in episodes)
    assert summary["alfworld_invalid"] == pytest.approx((n_steps - 2) / n_steps) and summary["success"] == 0
    # every REASON/ACT token of the student's text carries its mask, and nothing else does
    windows = segment_episodes(episodes, tokenizer, 100_000).windows
    for e, (_, w) in zip(episodes, windows.iterrows()):
        _, pieces, _ = transcript_pieces(e)
        ids = w["input_ids"]
        for kind, mask in (("reason", w["reason_mask"]), ("act", w["act_mask"])):
            masked = tokenizer.decode([t for t, m in zip(ids, mask) if m])
            assert masked == "".join(text for k, text in pieces if k == kind)


def test_the_mixture_and_takeover_schedules_by_hand(task_root):
    o = OnPolicyParams(rounds=3, fraction_start=1.0, fraction_end=0.5, takeover_start=0.6, takeover_end=0.0)
    assert [o.at_round(o.fraction_start, o.fraction_end, r) for r in range(3)] == [1.0, 0.75, 0.5]
    assert [o.at_round(o.takeover_start, o.takeover_end, r) for r in range(3)] == [0.6, 0.3, 0.0]
    assert OnPolicyParams(rounds=1, fraction_start=0.4, fraction_end=0.9).at_round(0.4, 0.9, 0) == 0.4
    import pandas as pd

    def frame(prefix, n):
        return pd.DataFrame({"episode_id": [f"{prefix}{i}" for i in range(n)], "window": 0, "success": True,
                             "n_tokens": 2, "input_ids": [[1, 2]] * n, "reason_mask": [[0, 1]] * n, "act_mask": [[0, 0]] * n})

    own, teacher = frame("own", 6), frame("teacher", 10)
    assert len(mix_windows(own, teacher, 1.0, 0, 0)) == 6
    mixed = mix_windows(own, teacher, 0.75, 0, 1)
    assert (mixed["episode_id"].str.startswith("teacher").sum(), len(mixed)) == (2, 8)
    assert mix_windows(own, teacher, 0.5, 0, 2)["episode_id"].str.startswith("teacher").sum() == 6
    assert len(mix_windows(own, teacher, 0.2, 0, 2)) == 16  # as far as the teacher's windows suffice
    tasks = load_tasks(task_root, "alfworld", "train")
    guided, alone = split_takeover(tasks, 0.5, seed=0, round_index=0)
    assert len(guided) == round(0.5 * len(tasks)) and {t.task_id for t in guided}.isdisjoint(t.task_id for t in alone)
    assert split_takeover(tasks, 0.5, 0, 0) == (guided, alone) and split_takeover(tasks, 0.5, 0, 1) != (guided, alone)
    blocks = [round_tasks({"alfworld": tasks}, 4, r) for r in range(2)]
    assert [t.task_id for t in blocks[0]] == [t.task_id for t in tasks[:4]]
    assert [t.task_id for t in blocks[1]] == [t.task_id for t in tasks[4:8]]


def test_expert_labels_put_the_experts_action_after_the_students_thought(task_root, tokenizer, demos):
    tasks = load_tasks(task_root, "alfworld", "train")[:2]
    episodes = play_round(DemoAgent(tokenizer, demos[:2], agree=2), tasks, task_root, _params(), 0.0, 0, 0)
    for episode, task, demo in zip(episodes, tasks, demos[:2]):
        labelled = expert_labelled_episodes(episode, task, task_root, limit=2)
        assert len(labelled) == 2
        first = labelled[0]
        assert first.meta["labelled_step"] == 2 and first.meta["student_action"] == "go to nowhere 9"
        assert [s.imitate for s in first.steps] == [False, False, True]
        assert (first.steps[-1].thought, first.steps[-1].action) == ("I think.", demo.steps[2].action)
        windows = act_only(segment_episodes(labelled, tokenizer, 100_000).windows)
        for _, w in windows.iterrows():
            assert sum(w["reason_mask"]) == 0
            assert tokenizer.decode([t for t, m in zip(w["input_ids"], w["act_mask"]) if m]).strip() == \
                   f"Action: {demo.steps[2].action}"


@pytest.mark.slow
def test_the_distill_stage_runs_on_policy_rounds_and_a_rerun_reproduces_their_data(rollout_project, tmp_path):
    from sad.stages import run_distill, run_rollout, run_segment

    project = Path(shutil.copytree(rollout_project, tmp_path / "project"))
    raw = {"tasks": {"envs": ["alfworld", "hotpotqa"], "train": 6, "dev": 1, "test": 1,
                     "alfworld": {"max_steps": 6}, "hotpotqa": {"max_steps": 4}},
           "context": {"max_tokens": 512, "max_new_tokens": 24}, "rollout": {"batch_size": 4},
           "distill": {"student_layers": None, "student": {"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                                                           "intermediate_size": 32},
                       "teacher_logits": {"mode": "online"}, "train": {"epochs": 1, "batch_size": 4},
                       "scaling": {"method": "onp"}, "curriculum": {"gamma": 0},
                       "methods": {"onp": {"loss": "sad", "onpolicy": {
                           "rounds": 2, "tasks": 4, "takeover_start": 0.5, "expert_labels": 1}},
                                   # DAgger with expert takeover: CE on the taken-over episodes, mixed with demos
                                   "dag": {"loss": "sad", "onpolicy": {
                                       "tasks": 2, "loss": "imitation", "mix": "demos", "fraction_start": 0.5,
                                       "takeover_start": 1.0, "takeover_end": 1.0}}}}}
    p = parse_params(raw)
    cwd = os.getcwd()
    os.chdir(project)
    try:
        run_rollout(p, progress=False)
        run_segment(p)
        out = run_distill(p, "onp", progress=False)
        student = Path("models/students/onp/seed0")
        rounds = [student / "onpolicy" / f"round-{r}.jsonl" for r in range(2)]
        first = [r.read_bytes() for r in rounds]
        card = json.loads((student / "card.json").read_text())
        assert [r["round"] for r in card["onpolicy_rounds"]] == [0, 1]
        agents = [[json.loads(line)["agent"] for line in r.read_text().splitlines()] for r in rounds]
        # four tasks a round; the expert's help decays from half of them to none
        assert sorted(agents[0]) == ["student-r0"] * 2 + ["takeover-r0"] * 2 and agents[1] == ["student-r1"] * 4
        assert all(r["episodes"] == 4 and r["own_windows"] > 0 for r in card["onpolicy_rounds"])
        assert "onpolicy_r1_own_windows" in out and "on-policy round" in card["objective"]
        assert not Path(".checkpoints").exists() or not any(Path(".checkpoints").rglob("onpolicy"))
        from sad.report import curves_plot, read_curves

        curves = read_curves(Path("metrics/curves"), ["onp"])
        phases = [phase for _, _, phase in curves["onp"][0]]
        assert phases[0] == "off-policy" and phases[-1] == "round 1" and "round 0" in phases
        steps = [step for step, _, _ in curves["onp"][0]]
        assert steps == sorted(steps)  # the curve goes on through the rounds
        curves_plot(curves, tmp_path / "curves.png")
        assert (tmp_path / "curves.png").stat().st_size > 1000
        run_distill(p, "onp", progress=False)  # from scratch again: the same student data, round by round
        assert [r.read_bytes() for r in rounds] == first
        from sad.environments import load_tasks
        from sad.io import write_jsonl_atomic
        from sad.rollout import play_expert
        from sad.stages import demos_file, tasks_root

        train_tasks = [t for env in p.tasks.envs for t in load_tasks(tasks_root(p), env, "train")]
        demos = play_expert(train_tasks, tasks_root(p))  # the expert's demos the DAgger round mixes in
        write_jsonl_atomic(demos_file(p), (e.to_dict() for e in demos))  # (cut at 6 ALFWorld steps: most lost)
        run_distill(p, "dag", progress=False)
        dag = json.loads(Path("models/students/dag/seed0/card.json").read_text())
        (summary,) = dag["onpolicy_rounds"]
        played = Path("models/students/dag/seed0/onpolicy/round-0.jsonl").read_text().splitlines()
        assert [json.loads(line)["agent"] for line in played] == ["takeover-r0"] * 2 and summary["episodes"] == 2
        assert summary["windows"] == 2 * summary["own_windows"]  # as many windows of the expert's demos
        assert "CE on the student's own steps and the expert's, mixed with the expert's demos" in dag["objective"]
    finally:
        os.chdir(cwd)


def test_onpolicy_settings_are_checked_with_clear_messages():
    from sad.config import ConfigError

    with pytest.raises(ConfigError, match="onpolicy needs a teacher"):
        parse_params({"distill": {"methods": {"x": {"loss": "sft", "onpolicy": {}}}, "scaling": {"method": "x"}}})
    with pytest.raises(ConfigError, match="fraction_start"):
        parse_params({"distill": {"methods": {"x": {"loss": "sad", "onpolicy": {"fraction_start": 0}}},
                                  "scaling": {"method": "x"}}})
    spec = parse_params({"distill": {"methods": {"x": {"loss": "sad", "onpolicy": {"rounds": 2, "expert_labels": 3}}},
                                     "scaling": {"method": "x"}}}).distill.methods["x"]
    assert spec.describe().endswith("then 2 on-policy round(s) (reverse_kl on the student's own tokens, expert labels x3)")
    dagger = parse_params({"distill": {"methods": {"x": {"loss": "sad", "onpolicy": {
        "loss": "imitation", "mix": "demos", "takeover_start": 1.0, "takeover_end": 1.0}}},
        "scaling": {"method": "x"}}}).distill.methods["x"]
    assert dagger.describe().endswith("then 1 on-policy round(s) (CE on the student's own steps and the expert's, "
                                      "mixed with the expert's demos, expert takeover 1->1)")
    with pytest.raises(ConfigError, match="mix"):
        parse_params({"distill": {"methods": {"x": {"loss": "sad", "onpolicy": {"mix": "teacher"}}},
                                  "scaling": {"method": "x"}}})


def test_the_report_compares_each_on_policy_method_and_tabulates_its_rounds():
    from sad.report import comparison_pairs, onpolicy_table

    assert comparison_pairs([]) == [("sad", "token_kd")]
    assert comparison_pairs(["onp"]) == [("sad", "token_kd"), ("onp", "sad"), ("onp", "token_kd")]
    assert comparison_pairs([], ["sad_act_only"]) == [("sad", "token_kd"), ("sad_act_only", "sad")]
    seed = {"onpolicy_r0_episodes": 4, "onpolicy_r0_success": 0.25, "onpolicy_r0_alfworld_success": 0.5,
            "onpolicy_r0_alfworld_invalid": 0.2, "onpolicy_r0_taken_over": 2, "onpolicy_r0_own_windows": 7,
            "onpolicy_r0_windows": 9, "onpolicy_r0_expert_labels": 3, "onpolicy_r0_final_loss": 0.5,
            "onpolicy_r1_episodes": 4, "onpolicy_r1_success": 0.5, "onpolicy_r1_own_windows": 5, "onpolicy_r1_windows": 5}
    table = onpolicy_table({"onp": {"seeds": {"0": seed}}}, ["alfworld", "hotpotqa"])
    rows = table.splitlines()[2:]
    assert rows[0] == "| `onp` | 0 | 0 | 25.0% | 50.0% | - | 20.0% | 2 | 7 / 9 | 3 | 0.5000 |"
    assert rows[1] == "| `onp` | 0 | 1 | 50.0% | - | - | - | 0 | 5 / 5 | 0 | - |"
    assert onpolicy_table({}, ["alfworld"]).startswith("No on-policy method")


def test_the_success_table_gives_each_agent_its_share_of_the_teachers_success():
    from sad.report import success_table

    def agent(per_task_by_seed):  # {seed: {env: [success per task]}}
        return {"seeds": {str(k): {"splits": {"test": {"per_task": v}}} for k, v in per_task_by_seed.items()},
                "splits": {"test": {"envs": {"alfworld": {}, "hotpotqa": {}}}}}

    results = {"teacher": agent({0: {"alfworld": [1, 1, 0, 0], "hotpotqa": [1, 1, 1, 1]}}),  # 6/8
               "sad": agent({0: {"alfworld": [1, 0, 0, 0], "hotpotqa": [1, 1, 0, 0]},          # 3/8
                             1: {"alfworld": [0, 0, 0, 0], "hotpotqa": [1, 1, 1, 0]}})}        # 3/8
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in success_table(results, "test", 200, 0.95)
            .splitlines()[2:]}
    header = success_table(results, "test", 200, 0.95).splitlines()[0].split(" | ")
    share = header.index("share of teacher")
    assert rows["teacher"][share] == "100%" and rows["sad"][share] == "50%"
