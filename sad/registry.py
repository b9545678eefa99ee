"""The MLflow model registry: register a candidate student, gate it against the champion, promote,
roll back.

Every registered version carries its *standing* as tags (gate metric and value, overall and
per-environment success, the teacher's success, a hash of its weights). ``@challenger`` marks the
newest version; ``@champion`` moves only when :func:`check_gates` passes, or by hand
(:func:`promote`). Each move is appended to the registered model's champion history, which
:func:`rollback` walks back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sad.config import GATE_METRICS, RegisterParams, TrackingParams
from sad.tracking import SESSION_ENV

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
STANDING_TAG = "sad.standing"
WEIGHTS_TAG = "sad.weights_sha256"
DECISION_TAG = "sad.promotion"
HISTORY_TAG = "sad.champion_history"
GATES_TAG = "sad.gates"  # the gates' verdict and reasons, written by gate_and_promote only
GATED_IN_TAG = "sad.gated_in"  # the session (sad.tracking.SESSION_ENV) of the retrain that gated the version

PIP_REQUIREMENTS = ["torch", "transformers", "tokenizers", "safetensors"]


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (no such version, nothing to roll back to)."""


@dataclass(frozen=True)
class Standing:
    """What the gates compare: a student's numbers on the gate split, and the teacher's.

    ``per_task`` holds the gate metric on each task of the split (task id -> value) when the metric
    is defined per task (:data:`PER_TASK_METRICS`): what makes a paired, significant comparison possible.
    ``candidates``: how many students (methods x seeds) it was picked from as the best on that same split;
    the comparison with the champion widens its interval for them (Bonferroni), since the best of several
    equal students beats the champion by chance more often than one does.
    """

    gate_metric: str
    gate_value: float
    success_rate: float
    env_success: dict[str, float] = field(default_factory=dict)
    teacher_success_rate: float = 0.0
    invalid_action_rate: float = 0.0
    per_task: dict[str, float] = field(default_factory=dict)
    candidates: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Standing:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


# Gate metrics with a value per task (episode): their champion comparison is paired and bootstrapped.
PER_TASK_METRICS = ("success_rate", "avg_reward", "f1")


def per_task_values(episodes, metric: str) -> dict[str, float]:
    """{task id: ``metric`` on that task's episode} for a :data:`PER_TASK_METRICS` metric ({} otherwise)."""
    if metric == "success_rate":
        return {ep.task_id: 1.0 if ep.success else 0.0 for ep in episodes}
    if metric == "avg_reward":
        return {ep.task_id: float(ep.reward) for ep in episodes}
    if metric == "f1":
        return {ep.task_id: float(ep.meta["f1"]) for ep in episodes if "f1" in ep.meta}
    return {}


@dataclass(frozen=True)
class Decision:
    version: str
    promoted: bool
    reasons: list[str]
    champion_before: str | None
    champion_after: str | None
    standing: dict[str, Any]

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def _floors(candidate: Standing, gates: RegisterParams) -> list[tuple[bool, str]]:
    """The absolute floors every candidate must pass, champion or not: (passed, line) per floor."""
    lows = {"overall": candidate.success_rate, **candidate.env_success}
    below = {k: v for k, v in lows.items() if v + 1e-12 < gates.min_success}
    shown = ", ".join(f"{k} {v:.3f}" for k, v in lows.items())
    floors = [(not below, f"{'PASS' if not below else 'FAIL'} floor success: {shown} "
                          f"{'>=' if not below else 'not all >='} register.min_success {gates.min_success}")]
    share = gates.min_teacher_share * candidate.teacher_success_rate
    ok = candidate.success_rate + 1e-12 >= share
    floors.append((ok, f"{'PASS' if ok else 'FAIL'} floor teacher share: success {candidate.success_rate:.3f} "
                       f"{'>=' if ok else '<'} register.min_teacher_share {gates.min_teacher_share} x teacher "
                       f"{candidate.teacher_success_rate:.3f} = {share:.3f}"))
    ok = candidate.invalid_action_rate <= gates.max_invalid_action_rate + 1e-12
    floors.append((ok, f"{'PASS' if ok else 'FAIL'} floor invalid actions: {candidate.invalid_action_rate:.3f} "
                       f"{'<=' if ok else '>'} register.max_invalid_action_rate {gates.max_invalid_action_rate}"))
    return floors


def _versus_champion(candidate: Standing, champion: Standing, gates: RegisterParams,
                     champion_per_task: dict[str, float] | None, source: str) -> tuple[bool, str]:
    """The gate metric against the champion's: a paired bootstrap interval of the difference on the
    same tasks must lie above ``min_improvement``; a point estimate where no per-task values exist."""
    from sad.stats import paired_comparison

    metric = candidate.gate_metric
    higher = GATE_METRICS[metric]
    direction = "higher" if higher else "lower"
    theirs = champion_per_task if champion_per_task is not None else champion.per_task
    tasks = sorted(candidate.per_task)
    if metric in PER_TASK_METRICS and tasks and all(t in theirs for t in tasks):
        sign = 1.0 if higher else -1.0
        mine_values = [[sign * candidate.per_task[t] for t in tasks]]
        their_values = [[sign * theirs[t] for t in tasks]]
        k = max(1, candidate.candidates)
        confidence = 1.0 - (1.0 - gates.confidence) / k  # Bonferroni over the students the candidate was picked from
        envs = [t.split("/", 1)[0] if "/" in t else "" for t in tasks]  # task ids are <env>/<split>/<n>
        cmp = paired_comparison(mine_values, their_values, n_boot=gates.bootstrap, confidence=confidence, strata=envs)
        d = cmp.difference
        ok = d.low > gates.min_improvement
        verdict = "lies above" if ok else "does not lie above"
        level = (f"{confidence:.1%} CI (register.confidence {gates.confidence:.0%} for the best of {k} students)"
                 if k > 1 else f"{gates.confidence:.0%} CI")
        return ok, (f"{'PASS' if ok else 'FAIL'} significance: {metric} {candidate.gate_value:.4f} vs champion "
                    f"{champion.gate_value:.4f}: paired difference ({direction} is better) {d.mean:+.4f}, "
                    f"{level} [{d.low:+.4f}, {d.high:+.4f}] over {len(tasks)} tasks "
                    f"(champion's results {source}), the interval {verdict} register.min_improvement {gates.min_improvement}")
    gain = (candidate.gate_value - champion.gate_value) * (1 if higher else -1)
    why = ("no per-task values for this metric" if metric not in PER_TASK_METRICS
           else "the champion's per-task results for these tasks are unavailable")
    ok = gain > gates.min_improvement
    return ok, (f"{'PASS' if ok else 'FAIL'} {metric} {candidate.gate_value:.4f} {'beats' if ok else 'does not beat'} "
                f"champion {champion.gate_value:.4f} by more than register.min_improvement {gates.min_improvement} "
                f"({direction} is better, point estimate: {why})")


def check_gates(candidate: Standing, champion: Standing | None, gates: RegisterParams,
                champion_per_task: dict[str, float] | None = None, source: str = "stored") -> tuple[bool, list[str]]:
    """Whether ``candidate`` may replace ``champion``, and one line per gate with its value,
    threshold and (where paired) interval.

    Floors, always: success overall and in every environment >= ``min_success``; success >=
    ``min_teacher_share`` x the teacher's; invalid-action rate <= ``max_invalid_action_rate``.
    Against a champion: the gate metric's paired difference on the same tasks has its confidence
    interval above ``min_improvement`` (``champion_per_task``, e.g. replayed, overrides the champion's
    stored values; ``source`` says which); no environment's success drops by more than
    ``max_env_regression``.
    """
    floors = _floors(candidate, gates)
    passed = all(ok for ok, _ in floors)
    reasons = [line for _, line in floors]
    if champion is None:
        reasons.append("PASS no current champion: the floors decide")
        return passed, reasons
    metric = candidate.gate_metric
    if champion.gate_metric != metric:
        reasons.append(f"FAIL the champion was gated on {champion.gate_metric}, the candidate on {metric}: "
                       "not comparable (promote by hand with `sad registry promote`)")
        return False, reasons
    ok, line = _versus_champion(candidate, champion, gates, champion_per_task, source)
    passed &= ok
    reasons.append(line)
    theirs_by_env, basis = champion.env_success, ""
    if champion_per_task and metric == "success_rate":  # replayed on the candidate's tasks: compare env by env there
        theirs_by_env = env_means({t: champion_per_task[t] for t in candidate.per_task if t in champion_per_task})
        basis = f" ({source} on the candidate's tasks)"
    elif champion_per_task:
        basis = " (the champion's stored per-environment success: its replay measured the gate metric only)"
    drops = {env: theirs_by_env[env] - value for env, value in candidate.env_success.items()
             if env in theirs_by_env and theirs_by_env[env] - value > gates.max_env_regression + 1e-12}
    if drops:
        passed = False
        reasons.append("FAIL environments regress beyond register.max_env_regression " + str(gates.max_env_regression)
                       + basis + ": " + ", ".join(f"{env} -{d:.3f}" for env, d in sorted(drops.items())))
    else:
        reasons.append(f"PASS no environment's success drops by more than register.max_env_regression "
                       f"{gates.max_env_regression}{basis}")
    return passed, reasons


def env_means(per_task: dict[str, float]) -> dict[str, float]:
    """{env: mean value} of per-task values keyed by task ids of the form ``<env>/<split>/<n>``."""
    by_env: dict[str, list[float]] = {}
    for task_id, value in per_task.items():
        by_env.setdefault(task_id.split("/", 1)[0], []).append(value)
    return {env: sum(values) / len(values) for env, values in by_env.items()}


def weights_hash(model_dir: Path) -> str:
    """sha256 over the folder's safetensors files (what identifies a trained student)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _client(tracking: TrackingParams):
    from mlflow import MlflowClient

    from sad.tracking import configure

    configure(tracking)
    return MlflowClient()


def _version_standing(mv) -> Standing | None:
    text = mv.tags.get(STANDING_TAG)
    return Standing.from_json(text) if text else None


def champion(tracking: TrackingParams) -> tuple[str, Standing | None] | None:
    """(version, standing) of the current ``@champion``, or None."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking)
    try:
        mv = client.get_model_version_by_alias(tracking.registered_model, CHAMPION)
    except MlflowException:
        return None
    return str(mv.version), _version_standing(mv)


def find_version(tracking: TrackingParams, weights_sha256: str) -> str | None:
    """The registered version holding exactly these weights, if any."""
    client = _client(tracking)
    # no catch-all here: a store that fails to answer must not read as "not registered" (the same weights
    # would be registered twice); its error fails the task, which Prefect retries
    versions = client.search_model_versions(f"name='{tracking.registered_model}'")
    for mv in versions:
        if mv.tags.get(WEIGHTS_TAG) == weights_sha256:
            return str(mv.version)
    return None


def load_version(tracking: TrackingParams, version: str):
    """(model, tokenizer) of a registered version, loaded through MLflow (e.g. to replay the champion)."""
    import mlflow

    _client(tracking)
    parts = mlflow.transformers.load_model(f"models:/{tracking.registered_model}/{version}", return_type="components")
    return parts["model"].eval(), parts["tokenizer"]


def decision_of(tracking: TrackingParams, version: str) -> str | None:
    """The promotion decision recorded on ``version``, or None if it was never gated."""
    return _client(tracking).get_model_version(tracking.registered_model, version).tags.get(DECISION_TAG)


def register_candidate(model_dir: Path, card: dict[str, Any], standing: Standing, tracking: TrackingParams) -> str:
    """Log the student in the active MLflow run (transformers flavor, tokenizer and model card
    included), register it, tag its standing and point ``@challenger`` at it. Returns the version.
    """
    import mlflow

    from sad.modeling import load_model
    from sad.tokenizer import load_tokenizer

    client = _client(tracking)
    name = tracking.registered_model
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    card = {**card, "standing": asdict(standing)}
    tags = {STANDING_TAG: standing.to_json(), WEIGHTS_TAG: weights_hash(model_dir),
            "sad.gate_metric": standing.gate_metric, "sad.gate_value": str(standing.gate_value)}
    for key in ("method", "seed", "objective", "data_hash", "dvc_lock_sha256", "git_commit"):
        if key in card:
            tags[f"sad.{key}"] = str(card[key])
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="model",
        task="text-generation",
        pip_requirements=PIP_REQUIREMENTS,
        model_config={"max_new_tokens": 64, "do_sample": False},
        metadata={"sad_card": json.dumps(card, sort_keys=True)},
    )
    mlflow.log_dict(card, "model_card.json")
    # the version is created with its tags (weights hash, standing): a stop right after still finds it by hash,
    # so the retried task gates it instead of registering the same weights again
    version = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
    client.update_model_version(name, version, description=model_card_markdown(card))
    client.set_registered_model_alias(name, CHALLENGER, version)
    log.info("registered %s v%s (@%s)", name, version, CHALLENGER)
    return version


def complete_registration(tracking: TrackingParams, version: str, card: dict[str, Any], standing: Standing) -> None:
    """Finish the registration of a version found by its weights but never gated (a stop or a store error
    right after ``register_model``): its model card and ``@challenger``, as ``register_candidate`` sets them."""
    client = _client(tracking)
    name = tracking.registered_model
    if not (client.get_model_version(name, version).description or "").strip():
        client.update_model_version(name, version, description=model_card_markdown({**card, "standing": asdict(standing)}))
    client.set_registered_model_alias(name, CHALLENGER, version)


def model_card_markdown(card: dict[str, Any]) -> str:
    """A short human-readable model card for the registry's version description."""
    standing = card.get("standing", {})
    lines = [f"SAD student: method `{card.get('method')}`, seed {card.get('seed')}",
             f"objective: {card.get('objective', '-')}",
             f"parameters: {card.get('parameters', '-')}, compression vs teacher: {card.get('compression', '-')}",
             f"data hash: {card.get('data_hash', '-')}, dvc.lock sha256: {card.get('dvc_lock_sha256', '-')}",
             f"git commit: {card.get('git_commit', '-')}"]
    if standing:
        lines.append(f"{standing['gate_metric']}: {standing['gate_value']:.4f}; success {standing['success_rate']:.3f} "
                     f"(teacher {standing['teacher_success_rate']:.3f}); by env: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in sorted(standing.get("env_success", {}).items())))
    return "\n\n".join(lines)


def _history(client, name: str) -> list[str]:
    from mlflow.exceptions import MlflowException

    try:
        rm = client.get_registered_model(name)
    except MlflowException:  # nothing registered yet
        return []
    text = rm.tags.get(HISTORY_TAG)
    return json.loads(text) if text else []


def gates_verdict(tracking: TrackingParams, version: str) -> str | None:
    """What the promotion gates decided for ``version`` (kept whatever is promoted or rolled back later), or
    None if it was never gated."""
    tags = _client(tracking).get_model_version(tracking.registered_model, version).tags
    decision = tags.get(DECISION_TAG) or ""
    return tags.get(GATES_TAG) or (decision if decision.startswith(("kept", "not promoted")) else None)


def promote(tracking: TrackingParams, version: str, reason: str, by_hand: bool = True) -> None:
    """Point ``@champion`` at ``version`` and record the move (by the gates, ``by_hand=False``, or by hand:
    then the gates' verdict on the version, if any, stays in the recorded decision)."""
    client = _client(tracking)
    name = tracking.registered_model
    from mlflow.exceptions import MlflowException

    version = str(version).strip().removeprefix("v")  # `sad registry list` prints versions as v3
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"{name} has no version {version!r} (see `sad registry list`)") from None
    history = _history(client, name)
    # the alias first, then the history: if the history write fails, the champion's entry is missing (a
    # rollback then goes back to a real earlier champion, and promoting again adds it); history first, a
    # failed alias write would leave an entry of a version that never was champion for a rollback to go to
    client.set_registered_model_alias(name, CHAMPION, version)
    if not history or history[-1] != version:  # promoting the champion again adds no step to roll back
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history + [version]))
    gates = client.get_model_version(name, version).tags.get(GATES_TAG) if by_hand else None
    if gates and not gates.startswith("promoted"):  # promoted by hand over the gates: their verdict stays readable
        reason = f"{reason}; the gates had decided: {gates}"
    client.set_model_version_tag(name, version, DECISION_TAG, "promoted: " + reason)
    log.info("%s v%s is @%s: %s", name, version, CHAMPION, reason)


Replay = Callable[[str, list[str]], dict[str, float]]  # (champion version, task ids) -> {task id: value}


def gate_and_promote(tracking: TrackingParams, version: str, standing: Standing, gates: RegisterParams,
                     replay: Replay | None = None) -> Decision:
    """Check the gates for ``version`` against the current champion; move ``@champion`` if they pass.

    The champion's stored per-task results are reused when they cover the candidate's tasks; else
    ``replay`` plays the champion on them (without it the comparison falls back to point estimates,
    and says so). The decision and its reasons are written on the version's tags and description.
    """
    client = _client(tracking)
    current = champion(tracking)
    before = current[0] if current else None
    if before == version:
        if decision_of(tracking, version) is None:  # this gating moved the alias, then stopped: it promoted
            earlier = [v for v in _history(client, tracking.registered_model) if v != version]
            reason = "promoted: the gates passed and @champion moved before the gating was interrupted"
            client.set_model_version_tag(tracking.registered_model, version, DECISION_TAG, reason)
            return Decision(version, True, [reason], earlier[-1] if earlier else None, version, asdict(standing))
        return Decision(version, False, ["already the champion"], before, before, asdict(standing))
    champ = current[1] if current else None
    theirs, source = None, "stored"
    if (champ is not None and replay is not None and standing.gate_metric in PER_TASK_METRICS and standing.per_task
            and not all(t in champ.per_task for t in standing.per_task)):
        log.info("the champion v%s has no stored results for these %d tasks: replaying it", before, len(standing.per_task))
        theirs, source = replay(before, sorted(standing.per_task)), "replayed"
    promoted, reasons = check_gates(standing, champ, gates, theirs, source)
    if current is not None and champ is None:
        promoted, reasons = False, reasons + [f"FAIL champion v{before} has no recorded standing"]
    verdict = "promoted" if promoted else ("kept champion" if before else "not promoted, no champion yet")
    client.set_model_version_tag(tracking.registered_model, version, GATES_TAG, f"{verdict}: " + "; ".join(reasons))
    session = os.environ.get(SESSION_ENV)
    if session:  # a retry of this retrain (same session) reports this decision, a later retrain "unchanged"
        client.set_model_version_tag(tracking.registered_model, version, GATED_IN_TAG, session)
    if promoted:
        promote(tracking, version, "; ".join(reasons), by_hand=False)
    else:
        client.set_model_version_tag(tracking.registered_model, version, DECISION_TAG, f"{verdict}: " + "; ".join(reasons))
    after = version if promoted else before
    decision = Decision(version, promoted, reasons, before, after, asdict(standing))
    try:  # the decision is taken and recorded: a failure to describe it must not make a retry misreport it
        mv = client.get_model_version(tracking.registered_model, version)
        base = (mv.description or "").split("\n\n## Promotion decision")[0]
        client.update_model_version(tracking.registered_model, version, description=base + "\n\n" + decision_markdown(decision))
    except Exception as exc:  # noqa: BLE001 - any store error
        log.warning("v%s: the decision is recorded in its tags, but its description was not updated (%s)", version, exc)
    log.info("gates for v%s: %s -> %s", version, "; ".join(reasons), "promoted" if promoted else "not promoted")
    return decision


def decision_of_this_retrain(tracking: TrackingParams, version: str, standing: dict[str, Any]) -> Decision | None:
    """The decision the running retrain (its session, ``sad.tracking.SESSION_ENV``) already took for
    ``version``, rebuilt from the version's tags: what a retried register-and-gate reports. None when an
    earlier retrain gated it (or no session is set)."""
    session = os.environ.get(SESSION_ENV)
    client = _client(tracking)
    tags = client.get_model_version(tracking.registered_model, version).tags
    if not session or tags.get(GATED_IN_TAG) != session:
        return None
    verdict, _, reasons = (tags.get(GATES_TAG) or tags.get(DECISION_TAG) or "").partition(": ")
    current = champion(tracking)
    holder = current[0] if current else None
    if verdict == "promoted" and holder == version:
        earlier = [v for v in _history(client, tracking.registered_model) if v != version]
        return Decision(version, True, reasons.split("; "), earlier[-1] if earlier else None, version, standing)
    return Decision(version, False, reasons.split("; "), holder, holder, standing)


def decision_summary(decision: Decision) -> str:
    """One line: promoted or kept, and the first failing gate (or that all passed)."""
    failed = [r for r in decision.reasons if r.startswith("FAIL")]
    if decision.promoted:
        before = f"v{decision.champion_before}" if decision.champion_before else "none"
        return f"v{decision.version} promoted to @{CHAMPION} (was {before}): every gate passed"
    holder = f"@{CHAMPION} stays v{decision.champion_after}" if decision.champion_after else f"no @{CHAMPION} yet"
    return f"v{decision.version} not promoted, {holder}: " + (failed[0] if failed else decision.reason)


def decision_markdown(decision: Decision) -> str:
    """The promotion decision as a small markdown report: one row per gate."""
    lines = ["## Promotion decision", "", decision_summary(decision), "", "| gate | result |", "|---|---|"]
    for reason in decision.reasons:
        verdict, _, text = reason.partition(" ")
        lines.append(f"| {text.replace('|', '/')} | {verdict if verdict in ('PASS', 'FAIL') else reason} |")
    return "\n".join(lines) + "\n"


def rollback(tracking: TrackingParams) -> tuple[str, str]:
    """Move ``@champion`` back to the previous champion; returns (from version, to version)."""
    client = _client(tracking)
    name = tracking.registered_model
    history = _history(client, name)
    current = champion(tracking)
    while history and current is not None and history[-1] == current[0]:
        history = history[:-1]  # the current champion's own entries (one per promotion)
    if current is None or not history:
        raise RegistryError(f"{name}: no previous champion to roll back to (history: {_history(client, name) or 'empty'})")
    previous = history[-1]
    # the trimmed history first, then the alias: if the alias write fails, a second rollback goes to the same
    # version (alias first, a failed history write would make it go forward again to the version rolled back from)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, current[0], DECISION_TAG, f"rolled back: champion returned to v{previous}")
    log.info("%s: @%s rolled back from v%s to v%s", name, CHAMPION, current[0], previous)
    return current[0], previous


def list_versions(tracking: TrackingParams) -> list[dict[str, Any]]:
    """Every version with its aliases, gate value and promotion decision (newest first)."""
    client = _client(tracking)
    name = tracking.registered_model
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
        aliases = client.get_registered_model(name).aliases if versions else {}  # {alias: version}
    except MlflowException:  # nothing registered yet under this name
        return []
    rows = []
    for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
        held = sorted(a for a, v in aliases.items() if str(v) == str(mv.version))
        rows.append({"version": str(mv.version), "aliases": held, "method": mv.tags.get("sad.method"),
                     "gate_metric": mv.tags.get("sad.gate_metric"), "gate_value": mv.tags.get("sad.gate_value"),
                     "decision": mv.tags.get(DECISION_TAG, "")})
    return rows
