"""On-policy structured distillation (issue #18): the student learns on its own trajectories.

A round plays, scores and trains. The student plays train tasks with the agent loop of the evaluation
(:func:`sad.rollout.play_agent`: batched, KV cache, the same action choice and loop guard); its transcripts
are cut into REASON/ACT spans by the same marker rules (:mod:`sad.segment`; a block with no ``Action:`` is
an invalid step of the episode, rendered as the agent saw it); the teacher scores the student's own tokens
(an online forward per batch) and the method's loss, with ``onpolicy.divergence``, trains the student on
them, mixed with the teacher's rollouts (a ``fraction`` of own windows; ``mix: demos``: the expert's demos;
``loss: imitation``: CE on the windows' targets instead of the teacher's scores). Two helps, scheduled over the
rounds: on a share of the tasks the expert takes over at the student's first mistake
(:func:`sad.rollout.play_takeover`), and DAgger labels (``expert_labels``): the expert replays the
student's episode and, at states where its action differs, the student's thought followed by the
expert's action is a CE target (:func:`expert_labelled_episodes`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from sad.config import Params
from sad.envs.base import ExpertGaveUp, Task
from sad.react import Episode, Step

log = logging.getLogger(__name__)


def round_tasks(tasks_by_env: dict[str, list[Task]], n: int, round_index: int) -> list[Task]:
    """The tasks a round plays: all of them (``n`` = 0), else ``n`` spread evenly over the envs, each
    round taking the next block of every env's train tasks (wrapping around)."""
    if n == 0:
        return [t for tasks in tasks_by_env.values() for t in tasks]
    envs = [e for e, tasks in tasks_by_env.items() if tasks]
    out: list[Task] = []
    for i, env in enumerate(envs):
        pool, share = tasks_by_env[env], n // len(envs) + (1 if i < n % len(envs) else 0)
        out += [pool[(round_index * share + j) % len(pool)] for j in range(min(share, len(pool)))]
    return out


def split_takeover(tasks: list[Task], share: float, seed: int, round_index: int) -> tuple[list[Task], list[Task]]:
    """(tasks where the expert takes over at the student's first mistake, tasks the student plays alone):
    a seeded ``share`` of ``tasks``, drawn anew each round."""
    chosen = set(random.Random(f"onpolicy:{seed}:{round_index}").sample(range(len(tasks)), round(share * len(tasks))))
    return [t for i, t in enumerate(tasks) if i in chosen], [t for i, t in enumerate(tasks) if i not in chosen]


def play_round(agent, tasks: list[Task], tasks_root: Path, p: Params, takeover_share: float, seed: int,
               round_index: int, progress: bool = False) -> list[Episode]:
    """The student's episodes of one round, in the order of ``tasks`` (ids ``student-r<r>:<task>`` and
    ``takeover-r<r>:<task>``). Timings are zeroed so that the round's data is the same on a rerun."""
    from sad.rollout import play_agent, play_takeover

    guided, alone = split_takeover(tasks, takeover_share, seed, round_index)
    name = f"student-r{round_index}"
    episodes = play_agent(alone, tasks_root, agent, name, p.context.max_tokens, p.rollout.batch_size, progress=progress,
                          history_steps=p.context.history_steps, action_choice=p.agent.action_choice,
                          redraws=p.agent.redraws, redraw_temperature=p.agent.redraw_temperature,
                          stop_after_failures=p.agent.stop_after_failures, evict_to=p.context.evict_to)
    if guided:
        helped = play_takeover(guided, tasks_root, agent, p.context.max_tokens, p.rollout.batch_size,
                               p.context.history_steps, progress=progress, evict_to=p.context.evict_to)
        episodes += [replace(e, episode_id=f"takeover-r{round_index}:{e.task_id}", agent=f"takeover-r{round_index}")
                     for e in helped]
    order = {t.task_id: i for i, t in enumerate(tasks)}
    episodes.sort(key=lambda e: order[e.task_id])
    for e in episodes:
        e.steps = [replace(s, latency_s=0.0) for s in e.steps]
    return episodes


def expert_labelled_episodes(episode: Episode, task: Task, tasks_root: Path, limit: int) -> list[Episode]:
    """DAgger labels for one of the student's own episodes: the expert replays it in a fresh environment and,
    at up to ``limit`` states where its action differs from the student's, gives an episode that ends there
    with the student's thought and the expert's action (the only step with a loss; the steps before are
    context). Replay stops where the expert gives up or the environment no longer answers as it did."""
    from sad.environments import get_benchmark
    from sad.metrics import action_agrees
    from sad.rollout import expert_overruled

    bench = get_benchmark(task.env)
    env, expert = bench.make_env(True), bench.make_expert()
    obs = env.reset(task, tasks_root)
    expert.reset(task, obs)  # type: ignore[attr-defined]
    out: list[Episode] = []
    for s, step in enumerate(episode.steps):
        if len(out) >= limit:
            break
        try:
            _, label = expert.act(obs)  # type: ignore[attr-defined]
        except ExpertGaveUp:
            break
        if not action_agrees(step.action, label):
            expert_overruled(expert)  # the student's action runs below, not the label
            context = [replace(x, imitate=False) for x in episode.steps[:s]]
            target = Step(thought=step.thought, action=label, observation="", imitate=True)
            out.append(replace(episode, episode_id=f"{episode.episode_id}:label{s}", steps=[*context, target],
                               meta={**episode.meta, "labelled_step": s, "student_action": step.action}))
        obs = env.step(step.action)
        if obs.text != step.observation:
            log.warning("expert labels: %s replays differently at step %d; labels stop there", episode.episode_id, s)
            break
    return out


def act_only(windows: pd.DataFrame) -> pd.DataFrame:
    """The windows with their REASON loss removed: only the ACT tokens (the expert's action) are targets."""
    out = windows.copy()
    out["reason_mask"] = out["reason_mask"].map(lambda m: [0] * len(m))
    return out


def mix_windows(own: pd.DataFrame, teacher: pd.DataFrame, fraction: float, seed: int, round_index: int) -> pd.DataFrame:
    """A round's training windows: all of the student's ``own`` and a seeded sample of the ``teacher``'s
    rollout windows, so that own windows make ``fraction`` of the mix (as far as the teacher's suffice)."""
    n_teacher = min(len(teacher), round(len(own) * (1 - fraction) / fraction))
    sample = teacher.sample(n=n_teacher, random_state=random.Random(f"mix:{seed}:{round_index}").randrange(2**31))
    columns = ["episode_id", "window", "success", "n_tokens", "input_ids", "reason_mask", "act_mask"]
    return pd.concat([own[columns], sample[columns]], ignore_index=True)


def round_summary(episodes: list[Episode], round_index: int) -> dict[str, Any]:
    """What the student did on its own in a round: success and invalid actions per env (its episodes
    without takeover), and how many the expert took over."""
    out: dict[str, Any] = {"round": round_index, "episodes": len(episodes),
                           "taken_over": sum("takeover_step" in e.meta for e in episodes)}
    own = [e for e in episodes if e.agent.startswith("student")]
    for env in sorted({e.env for e in own}):
        eps = [e for e in own if e.env == env]
        steps = [s for e in eps for s in e.steps]
        out[f"{env}_success"] = sum(e.success for e in eps) / len(eps)
        out[f"{env}_invalid"] = sum(not s.valid for s in steps) / max(len(steps), 1)
    if own:
        out["success"] = sum(e.success for e in own) / len(own)
    return out
