"""Playing episodes: the expert one task at a time, LM agents many tasks at once."""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from sad.agent import Generation, LMAgent, fit_context
from sad.environments import get_benchmark
from sad.envs.base import Environment, ExpertGaveUp, Observation, Task
from sad.metrics import action_agrees
from sad.react import Episode, ParsedOutput, Step, act_piece, parse_output, prompt_piece, reason_piece, step_pieces

log = logging.getLogger(__name__)


def _new_episode(task: Task, agent: str, prompt: str) -> Episode:
    return Episode(
        episode_id=f"{agent}:{task.task_id}", env=task.env, split=task.split, task_id=task.task_id,
        task_type=task.task_type, agent=agent, prompt=prompt, meta={"description": task.description},
    )


_TERMINAL = re.compile(r"^(finish\[|click\[buy now\])", re.IGNORECASE)


_SCORE_KEYS = ("em", "f1", "r_type", "r_price", "r_att", "r_option")


def final_scores(obs: Observation) -> dict[str, float]:
    """The benchmark's own scores from an episode's last observation (HotPotQA EM/F1, WebShop's parts)."""
    return {k: float(obs.info[k]) for k in _SCORE_KEYS if isinstance(obs.info.get(k), (int, float))}


_SEARCH = re.compile(r"^search\[(.+)\]$", re.IGNORECASE)


def can_perturb(action: str, admissible: list[str] | None) -> bool:
    """Mistakes are injected where the benchmark lists admissible actions, or into a search (as a
    misspelling), and never into or instead of an episode-ending action (an injected purchase or
    answer cannot be undone)."""
    if _TERMINAL.match(action):
        return False
    return bool(admissible) or bool(_SEARCH.match(action))


def misspell(rng: random.Random, text: str) -> str:
    """``text`` with one letter of its longest word dropped or two neighbouring letters swapped."""
    words = text.split(" ")
    i = max(range(len(words)), key=lambda k: (len(words[k]), -k))
    word = words[i]
    if len(word) < 3:
        return text + text[-1:]
    j = rng.randrange(1, len(word) - 1)
    words[i] = word[:j] + word[j + 1:] if rng.random() < 0.5 else word[:j - 1] + word[j] + word[j - 1] + word[j + 1:]
    return " ".join(words)


def repeat_previous(previous: Step | None, action: str) -> bool:
    """Whether an injected mistake may repeat the previous step (its thought and action) instead: the
    looping mistake small agents make most (ALFWorld's ``go to X`` where the agent already is, WebShop's
    click on the item it has open). Only an expert step that was valid and differs from the intended
    action is repeated, never a mistake or an episode-ending action."""
    return (previous is not None and previous.imitate and previous.valid
            and previous.action.lower() != action.lower() and not _TERMINAL.match(previous.action))


_NUMBERED = re.compile(r"[a-z]+ \d+")


def skipped_step(action: str, plan: list[str] | None, seen: str) -> str | None:
    """The planner's step after ``action`` when ``action`` is the plan's next one (ALFWorld) and every
    numbered thing it names (``tomato 2``) is in ``seen`` (what the agent has read): doing it now skips a
    step, the mistake a small agent makes most (``move fork 1 to drawer 2`` before ``open drawer 2``,
    ``take … from`` a place it has not gone to); the environment answers ``Nothing happens`` and the
    expert recovers with the skipped step."""
    if not plan or len(plan) < 2 or plan[0].lower() != action.lower() or _TERMINAL.match(plan[1]):
        return None
    if not all(name in seen for name in _NUMBERED.findall(plan[1])):
        return None  # the plan knows where a thing is before the agent has seen it
    return plan[1]


def perturb_action(rng: random.Random, action: str, admissible: list[str] | None, skip: str | None = None) -> str:
    """A realistic mistake the environment accepts: half the time the plan's next step done too early
    (``skip``, see :func:`skipped_step`) where there is one, else another admissible action (a wrong but
    valid click or command), the intended command with a wrong number, or a misspelled search."""
    if skip is not None and rng.random() < 0.5:
        return skip
    search = _SEARCH.match(action)
    if search and not admissible:
        return f"search[{misspell(rng, search.group(1))}]"
    others = [a for a in (admissible or []) if a.lower() != action.lower() and not _TERMINAL.match(a)]
    numbers = [] if "[" in action else list(re.finditer(r"\d+", action))  # ALFWorld's "mug 2" for "mug 1"
    if others and (not numbers or rng.random() < 0.5):
        return rng.choice(others)
    if numbers:
        m = rng.choice(numbers)
        return action[:m.start()] + str(int(m.group()) + rng.randint(1, 3)) + action[m.end():]
    return action + " now"


_NOT_FOUND = ("Could not find",)  # HotPotQA: a search that found no page fails again, whatever happened since


def failed(step: Step) -> bool:
    """A step the environment refused or answered with nothing: invalid, ``Nothing happens.`` (ALFWorld),
    ``Could not find ...`` (HotPotQA)."""
    return not step.valid or step.observation.startswith(("Nothing happens", *_NOT_FOUND))


def repeats_a_failure(steps: list[Step], action: str) -> int | None:
    """The index of an earlier failed step that ``action`` would repeat with nothing changed since (or a
    search that found nothing, which fails again regardless); None when it repeats no failure."""
    for i in range(len(steps) - 1, -1, -1):
        step = steps[i]
        if step.action.lower() == action.lower() and failed(step):
            return i
        if not failed(step):  # the state changed since: an older failure may succeed now
            break
    return next((i for i, s in enumerate(steps)
                 if s.action.lower() == action.lower() and s.observation.startswith(_NOT_FOUND)), None)


def trailing_unproductive(steps: list[Step]) -> int:
    """How many of the latest steps in a row brought nothing new: the environment refused them
    (:func:`failed`), the agent's own action was not a valid one and had to be repaired (``Step.repaired``),
    or the observation repeats one already seen in the episode (a loop: the same place, page or search again)."""
    first_seen: dict[str, int] = {}
    for i, step in enumerate(steps):
        first_seen.setdefault(step.observation, i)
    count = 0
    for i in range(len(steps) - 1, -1, -1):
        step = steps[i]
        if not (failed(step) or step.repaired or first_seen[step.observation] < i):
            break
        count += 1
    return count


def play_expert(tasks: list[Task], tasks_root: Path, progress: bool = False, perturb: float = 0.0,
                seed: int = 0, repeat_share: float = 0.0) -> list[Episode]:
    """The environment's expert plays each task; its thoughts and actions form the demos.

    With ``perturb`` > 0, each step after the first is, with that probability, replaced by a
    mistake (:func:`perturb_action`: a plan step skipped, another valid action, a misspelled search)
    that is executed but marked ``imitate=False``: learners see it as context and learn how the
    expert recovers from it (noise injection, as in DART).
    A ``repeat_share`` of those mistakes repeats the previous step, thought and action alike
    (:func:`repeat_previous`), so learners see how to get out of a loop.
    """
    episodes: list[Episode] = []
    by_env: dict[str, tuple[Environment, object]] = {}
    for task in tqdm(tasks, desc="expert", disable=not progress, unit="ep"):
        if task.env not in by_env:
            bench = get_benchmark(task.env)
            by_env[task.env] = (bench.make_env(True), bench.make_expert())
        env, expert = by_env[task.env]
        obs = env.reset(task, tasks_root)
        expert.reset(task, obs)  # type: ignore[attr-defined]
        episode = _new_episode(task, "expert", prompt_piece(task.env, obs.text))
        rng = random.Random(f"{seed}:{task.task_id}")
        while not obs.done:
            try:
                thought, action = expert.act(obs)  # type: ignore[attr-defined]
                repeated = repeats_a_failure(episode.steps, action)
                if repeated is not None:  # the loop guard of every env: never the same failure twice
                    raise ExpertGaveUp(f"would repeat {action}, which failed at step {repeated + 1}")
            except ExpertGaveUp as exc:
                episode.meta["expert_gave_up"] = str(exc)
                break
            imitate = True
            if perturb > 0 and episode.steps and can_perturb(action, obs.admissible) and rng.random() < perturb:
                previous = episode.steps[-1]
                if repeat_share > 0 and repeat_previous(previous, action) and rng.random() < repeat_share:
                    thought, action = previous.thought, previous.action
                else:
                    seen = episode.prompt + "".join(s.observation for s in episode.steps)
                    skip = skipped_step(action, obs.info.get("expert_plan"), seen)
                    action = perturb_action(rng, action, obs.admissible, skip)
                imitate = False
            obs = env.step(action)
            episode.steps.append(Step(thought=thought, action=action, observation=obs.text, valid=obs.valid,
                                      imitate=imitate))
        episode.success, episode.reward = obs.success, obs.reward
        episode.meta.update(final_scores(obs))
        episodes.append(episode)
    return episodes


@dataclass
class PlayStats:
    """Throughput of one ``play_agent`` call."""

    generation_seconds: float = 0.0
    generated_tokens: int = 0
    env_seconds: float = 0.0
    blocks: int = 0  # blocks generated (one per step; a redrawn step counts once)
    scored_steps: int = 0  # steps whose action was chosen by scoring the listed actions (admissible, repair)
    scoring_seconds: float = 0.0  # the time of that scoring (part of env_seconds)
    prefill_computed: int = 0  # generation contexts' tokens run through the model (the prefix store had no keys for them)
    prefill_reused: int = 0    # generation contexts' tokens whose keys and values came from the prefix store
    scoring_prefill_computed: int = 0  # the same for the prefixes that admissible/repair scoring encodes (not above)
    scoring_prefill_reused: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0

    @property
    def prefill_tokens_per_generated_token(self) -> float:
        return self.prefill_computed / self.generated_tokens if self.generated_tokens else 0.0

    @property
    def prefill_tokens_cut(self) -> float | None:
        """Generation contexts' tokens over those computed: how many times fewer tokens prefill ran than encoding
        every context from scratch (1.0 without reuse; None before any prefill). Scoring's prefill is not in it."""
        return (self.prefill_computed + self.prefill_reused) / self.prefill_computed if self.prefill_computed else None

    def add(self, other: PlayStats) -> None:
        """Accumulate another shard's numbers (shards run side by side: seconds are summed per worker)."""
        self.generation_seconds += other.generation_seconds
        self.generated_tokens += other.generated_tokens
        self.env_seconds += other.env_seconds
        self.blocks += other.blocks
        self.scored_steps += other.scored_steps
        self.scoring_seconds += other.scoring_seconds
        self.prefill_computed += other.prefill_computed
        self.prefill_reused += other.prefill_reused
        self.scoring_prefill_computed += other.scoring_prefill_computed
        self.scoring_prefill_reused += other.scoring_prefill_reused


# Plays tasks with an agent and returns (episodes in task order, stats): in-process by default,
# or sharded over workers by the orchestrator (flows/), which passes its own player to the stages.
Player = Callable[[list[Task], str], tuple[list[Episode], PlayStats]]


@dataclass
class _Slot:
    task: Task
    env: Environment
    episode: Episode
    prompt_ids: list[int]
    admissible: list[str] | None = None  # the latest observation's valid actions, where the benchmark lists them
    step_ids: list[list[int]] = field(default_factory=list)


ACTION_CHOICES = ("free", "admissible", "repair")


def choose_admissible(agent: LMAgent, context: list[int], parsed: ParsedOutput, admissible: list[str],
                      avoid: Callable[[str], bool] | None = None) -> ParsedOutput:
    """The admissible action the model finds most likely after ``context`` and its own generated thought
    (skipping those ``avoid`` names, unless it names them all)."""
    tok = agent.tokenizer
    prefix = context + tok.encode(reason_piece(parsed.thought), add_special_tokens=False)
    scores = agent.score_continuations(prefix, [tok.encode(act_piece(a), add_special_tokens=False) for a in admissible])
    allowed = [i for i in range(len(admissible)) if avoid is None or not avoid(admissible[i])] or list(range(len(admissible)))
    best = max(allowed, key=scores.__getitem__)
    return ParsedOutput(thought=parsed.thought, action=admissible[best], has_action=True)


def listed_action(parsed: ParsedOutput, admissible: list[str]) -> bool:
    """Whether the generated action is one of the environment's listed valid actions (case and spaces aside):
    ``repair`` sends it as generated, and scores the listed ones only when it is not."""
    return parsed.has_action and any(action_agrees(parsed.action, a) for a in admissible)


def needs_redraw(steps: list[Step], parsed: ParsedOutput) -> bool:
    """A generated block the loop guard draws again: it holds no action, or its action would repeat a
    failed step with nothing changed since (:func:`repeats_a_failure`). A greedy agent whose context did
    not change since that failure would otherwise send the same action until the step cap."""
    return not parsed.has_action or repeats_a_failure(steps, parsed.action) is not None


def redraw_failures(agent: LMAgent, contexts: list[list[int]], histories: list[list[Step]],
                    generations: list[Generation], draws: int, temperature: float,
                    stats: PlayStats | None = None) -> tuple[list[Generation], list[int]]:
    """The loop guard: rows whose block :func:`needs_redraw` are generated again, sampled at
    ``temperature``, up to ``draws`` times, all such rows in one batch per draw. Returns the final
    generation per row (its tokens and seconds summed over the draws: what the step cost) and the
    number of draws each row took."""
    final, redrawn = list(generations), [0] * len(generations)
    for _ in range(draws):
        rows = [r for r in range(len(final)) if needs_redraw(histories[r], parse_output(final[r].text))]
        if not rows:
            break
        again = agent.generate([contexts[r] for r in rows], temperature=temperature)
        if stats is not None:
            stats.generation_seconds += again[0].seconds
            stats.generated_tokens += sum(g.n_tokens for g in again)
        for r, gen in zip(rows, again):
            final[r] = Generation(gen.text, final[r].n_tokens + gen.n_tokens, final[r].seconds + gen.seconds)
            redrawn[r] += 1
    return final, redrawn


def _prefill_counts(agent) -> tuple[int, int]:
    """(context tokens computed, reused) so far by an agent's prefill; (0, 0) for one that counts none (a scripted
    agent with only ``stream``)."""
    return getattr(agent, "prefill_computed", 0), getattr(agent, "prefill_reused", 0)


def play_agent(
    tasks: list[Task],
    tasks_root: Path,
    agent: LMAgent,
    agent_name: str,
    max_tokens: int,
    batch_size: int,
    progress: bool = False,
    on_episode: Callable[[Episode], None] | None = None,
    stats: PlayStats | None = None,
    history_steps: int = 0,
    action_choice: str = "free",
    redraws: int = 0,
    redraw_temperature: float = 0.7,
    stop_after_failures: int = 0,
    evict_to: float = 1.0,
) -> list[Episode]:
    """Play ``tasks`` with ``agent``, keeping up to ``batch_size`` episodes in flight.

    The agent sees the prompt and the latest ``history_steps`` steps (0: as many as fit in
    ``max_tokens``; when they stop fitting, the oldest go until the history fills ``evict_to`` of the
    room, :func:`sad.agent.history_start`). Batching is continuous (:meth:`LMAgent.stream`): as soon as a row's
    block ends its step is played and the episode's next context joins the running decode batch; a finished
    episode's row takes the next task. Results come back in the order of ``tasks``.

    ``action_choice``: ``free`` sends the generated action; ``admissible`` keeps the generated thought
    and, where the environment lists its valid actions (ALFWorld's commands, WebShop's clickables),
    sends the one the model finds most likely after that thought (:meth:`LMAgent.score_continuations`);
    ``repair`` sends the generated action when it is listed there, and the most likely listed one only
    when it is not (so it costs free generation's time except on the steps it repairs).

    ``redraws`` > 0 turns on the loop guard (:func:`redraw_failures`): a block with no action, or whose
    action would repeat a failure with nothing changed since, is sampled again (at ``redraw_temperature``)
    up to that many times; an admissible choice then skips actions that would repeat a failure.
    ``episode.meta["redrawn_steps"]`` counts the steps that needed it.

    ``stop_after_failures`` > 0 ends an episode, lost, once that many steps in a row brought nothing new
    (failed, repaired, or an observation seen before: :func:`trailing_unproductive`): a stuck agent stops early
    instead of looping to the step cap, and
    ``episode.meta["stopped_stuck"]`` says whether it did.
    """
    if action_choice not in ACTION_CHOICES:
        raise ValueError(f"action_choice must be one of {ACTION_CHOICES}, got {action_choice!r}")
    tokenizer = agent.tokenizer
    budget = max_tokens - agent.max_new_tokens
    queue = list(enumerate(tasks))
    free_envs: dict[str, list[Environment]] = {}
    slots: dict[int, _Slot] = {}
    results: dict[int, Episode] = {}
    bar = tqdm(total=len(tasks), desc=f"play {agent_name}", disable=not progress, unit="ep")

    def open_slot(index: int, task: Task) -> None:
        pool = free_envs.setdefault(task.env, [])
        env = pool.pop() if pool else get_benchmark(task.env).make_env(False)
        obs = env.reset(task, tasks_root)
        prompt = prompt_piece(task.env, obs.text)
        slots[index] = _Slot(task, env, _new_episode(task, agent_name, prompt), tokenizer.encode(prompt, add_special_tokens=False),
                             admissible=obs.admissible)

    def context_of(index: int) -> list[int]:
        slot = slots[index]
        history = slot.step_ids[-history_steps:] if history_steps else slot.step_ids
        return fit_context(slot.prompt_ids, history, budget, evict_to)

    def play_step(index: int, context: list[int], gen: Generation, draws: int) -> bool:
        """Send the block's action (after the action choice) and record the step; True when the episode ended."""
        slot = slots[index]
        parsed = parse_output(gen.text)
        if action_choice == "repair":
            slot.episode.meta.setdefault("repaired_steps", 0)
        repaired_from = None
        if action_choice != "free" and slot.admissible and \
                not (action_choice == "repair" and listed_action(parsed, slot.admissible)):
            history = slot.episode.steps
            avoid = (lambda action, steps=history: repeats_a_failure(steps, action) is not None) if redraws else None
            scoring_started, counted_before = time.perf_counter(), _prefill_counts(agent)
            chosen = choose_admissible(agent, context, parsed, slot.admissible, avoid)
            if stats is not None:
                stats.scored_steps += 1
                stats.scoring_seconds += time.perf_counter() - scoring_started
                computed, reused = _prefill_counts(agent)
                stats.scoring_prefill_computed += computed - counted_before[0]
                stats.scoring_prefill_reused += reused - counted_before[1]
            if action_choice == "repair":  # steps whose generated action was not a listed one
                slot.episode.meta["repaired_steps"] += 1
                repaired_from = parsed.action if parsed.has_action else ""
            parsed = chosen
        if redraws:
            slot.episode.meta["redrawn_steps"] = slot.episode.meta.get("redrawn_steps", 0) + (draws > 0)
        obs = slot.env.step(parsed.action)
        slot.admissible = obs.admissible
        step = Step(thought=parsed.thought, action=parsed.action, observation=obs.text,
                    valid=obs.valid and parsed.has_action, generated_tokens=gen.n_tokens, latency_s=gen.seconds,
                    repaired_from=repaired_from)
        slot.episode.steps.append(step)
        slot.step_ids.append(tokenizer.encode("".join(text for _, text in step_pieces(step)), add_special_tokens=False))
        stuck = bool(stop_after_failures) and not obs.done and \
            trailing_unproductive(slot.episode.steps) >= stop_after_failures
        if not (obs.done or stuck or slot.episode.n_steps >= slot.env.max_steps):
            return False
        if stop_after_failures:
            slot.episode.meta["stopped_stuck"] = stuck
        slot.episode.success, slot.episode.reward = obs.success, obs.reward
        slot.episode.meta.update(final_scores(obs))
        results[index] = slot.episode
        free_envs[slot.task.env].append(slot.env)
        del slots[index]
        bar.update(1)
        if on_episode:
            on_episode(slot.episode)
        return True

    contexts: dict[int, list[int]] = {}

    def on_block(index: int, gen: Generation) -> list[tuple[int, list[int]]]:
        """A block ended (continuous batching): play its step, return what that row generates next."""
        draws = 0
        if redraws:  # generation time: inside the stream's wall time, outside the env time below
            (gen,), (draws,) = redraw_failures(agent, [contexts[index]], [slots[index].episode.steps], [gen], redraws,
                                               redraw_temperature)
        env_started = time.perf_counter()
        if stats is not None:
            stats.blocks += 1
            stats.generated_tokens += gen.n_tokens  # every draw's tokens
        following: list[tuple[int, list[int]]] = []
        if not play_step(index, contexts.pop(index), gen, draws):
            following = [(index, context_of(index))]
        elif queue:
            open_slot(*queue[0])
            following = [(queue[0][0], context_of(queue.pop(0)[0]))]
        contexts.update(following)
        if stats is not None:
            stats.env_seconds += time.perf_counter() - env_started
        return following

    while queue and len(slots) < batch_size:
        open_slot(*queue.pop(0))
    contexts.update((index, context_of(index)) for index in slots)
    started = time.perf_counter()
    env_before = stats.env_seconds if stats is not None else 0.0
    counted_before = _prefill_counts(agent)
    scoring_before = (stats.scoring_prefill_computed, stats.scoring_prefill_reused) if stats is not None else (0, 0)
    agent.stream(list(contexts.items()), on_block)
    if stats is not None:  # the stream's wall time less the steps played inside it
        stats.generation_seconds += time.perf_counter() - started - (stats.env_seconds - env_before)
        computed, reused = _prefill_counts(agent)  # less what scoring (inside the stream) encoded
        stats.prefill_computed += computed - counted_before[0] - (stats.scoring_prefill_computed - scoring_before[0])
        stats.prefill_reused += reused - counted_before[1] - (stats.scoring_prefill_reused - scoring_before[1])
    bar.close()
    return [results[i] for i in range(len(tasks))]


@dataclass
class _Shadowed:
    """An agent episode with the expert shadowing it in the same environment."""

    task: Task
    env: Environment
    expert: object
    episode: Episode
    prompt_ids: list[int]
    obs: Observation
    step_ids: list[list[int]] = field(default_factory=list)


def expert_overruled(expert) -> None:
    """Tell ``expert`` that the action its last ``act`` proposed did not run (another agent's did), so that its
    plan does not skip that step (HotPotQA: a search never made; WebShop: a query never sent). Experts that
    re-plan from each observation alone (ALFWorld) have nothing to undo."""
    undo = getattr(expert, "overruled", None)
    if undo is not None:
        undo()


def _expert_finishes(slot: _Shadowed) -> Episode:
    """The expert plays ``slot``'s episode from its current state to the end; its steps carry the loss."""
    obs, episode = slot.obs, slot.episode
    while not obs.done and episode.n_steps < slot.env.max_steps:
        try:
            thought, action = slot.expert.act(obs)  # type: ignore[attr-defined]
            repeated = repeats_a_failure(episode.steps, action)
            if repeated is not None:
                raise ExpertGaveUp(f"would repeat {action}, which failed at step {repeated + 1}")
        except ExpertGaveUp as exc:
            episode.meta["expert_gave_up"] = str(exc)
            break
        obs = slot.env.step(action)
        episode.steps.append(Step(thought=thought, action=action, observation=obs.text, valid=obs.valid))
    episode.success, episode.reward = obs.success, obs.reward
    episode.meta.update(final_scores(obs))
    return episode


def play_takeover(tasks: list[Task], tasks_root: Path, agent: LMAgent, max_tokens: int, batch_size: int,
                  history_steps: int = 0, progress: bool = False, evict_to: float = 1.0) -> list[Episode]:
    """Demos from the agent's own mistakes (DAgger with expert takeover).

    The agent plays each task while the expert shadows it, labelling every state it reaches (up to
    ``batch_size`` episodes in flight, batched continuously as in :func:`play_agent`). While the
    agent's action equals the expert's, the step is kept as the expert's (loss on it, as in a demo). At the
    first step where they differ, the agent's own thought and action are kept as a mistake
    (``imitate=False``: context, no loss) and the expert takes over from the state the mistake led to, to
    the end of the episode. The result teaches recovery from the states the agent actually reaches, which
    injected mistakes (:func:`play_expert` with ``perturb``) only approximate. Episodes come back in the
    order of ``tasks``; ``meta["takeover_step"]`` is the index of the agent's mistake (absent: none).
    """
    from sad.metrics import action_agrees

    tokenizer = agent.tokenizer
    budget = max_tokens - agent.max_new_tokens
    queue = list(enumerate(tasks))
    slots: dict[int, _Shadowed] = {}
    results: dict[int, Episode] = {}
    bar = tqdm(total=len(tasks), desc="takeover", disable=not progress, unit="ep")

    labels: dict[int, tuple[str, str]] = {}

    def labelled(index: int) -> bool:
        """The expert's action in the slot's state goes to ``labels``; False when it gives up (no label for this
        state: the episode ends here, unsuccessful)."""
        slot = slots[index]
        try:
            labels[index] = slot.expert.act(slot.obs)  # type: ignore[attr-defined]
            return True
        except ExpertGaveUp as exc:
            slot.episode.meta["expert_gave_up"] = str(exc)
            results[index] = slots.pop(index).episode
            bar.update(1)
            return False

    def open_slot(index: int, task: Task) -> None:
        bench = get_benchmark(task.env)
        env, expert = bench.make_env(True), bench.make_expert()
        obs = env.reset(task, tasks_root)
        expert.reset(task, obs)  # type: ignore[attr-defined]
        prompt = prompt_piece(task.env, obs.text)
        slots[index] = _Shadowed(task, env, expert, _new_episode(task, "takeover", prompt),
                                 tokenizer.encode(prompt, add_special_tokens=False), obs)

    def context_of(index: int) -> list[int]:
        slot = slots[index]
        return fit_context(slot.prompt_ids, slot.step_ids[-history_steps:] if history_steps else slot.step_ids,
                           budget, evict_to)

    def next_context(index: int | None = None) -> list[tuple[int, list[int]]]:
        """What a row generates next: episode ``index``'s next state if it goes on and the expert labels it,
        else the first labelled state of the next queued task (none when the queue is empty)."""
        if index is not None and index in slots and labelled(index):
            return [(index, context_of(index))]
        while queue:
            index, task = queue.pop(0)
            open_slot(index, task)
            if labelled(index):
                return [(index, context_of(index))]
        return []

    def on_block(index: int, gen: Generation) -> list[tuple[int, list[int]]]:
        """The agent's block for the labelled state: kept as the expert's step while they agree; at the first
        difference the agent's step is kept as a mistake and the expert plays the episode to its end."""
        slot, (thought, action) = slots[index], labels.pop(index)
        parsed = parse_output(gen.text)
        deviates = not (parsed.has_action and action_agrees(parsed.action, action))
        if deviates:
            thought, action = parsed.thought, parsed.action
            expert_overruled(slot.expert)
        slot.obs = slot.env.step(action)
        step = Step(thought=thought, action=action, observation=slot.obs.text, valid=slot.obs.valid and not
                    (deviates and not parsed.has_action), imitate=not deviates)
        slot.episode.steps.append(step)
        slot.step_ids.append(tokenizer.encode("".join(text for _, text in step_pieces(step)), add_special_tokens=False))
        if deviates:
            slot.episode.meta["takeover_step"] = slot.episode.n_steps - 1
        if deviates or slot.obs.done or slot.episode.n_steps >= slot.env.max_steps:
            results[index] = _expert_finishes(slots.pop(index))
            bar.update(1)
        return next_context(index)

    first: list[tuple[int, list[int]]] = []
    while queue and len(first) < batch_size:
        first += next_context()
    agent.stream(first, on_block)
    bar.close()
    return [results[i] for i in range(len(tasks))]
