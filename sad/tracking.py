"""MLflow tracking: one run per stage execution, params and metrics logged, git/DVC provenance tagged."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sad.config import TrackingParams

log = logging.getLogger(__name__)

# A key is a secret when a part of it names one (`auth.api_token`, `db_password`, `aws_secret_access_key`,
# `secrets.db`), not when a setting's name merely contains `token` (`distill.methods.token_kd.loss`,
# `context.max_new_tokens`, `tokenizer.vocab_size`): `token` counts only at the end of the last part.
SECRET_WORD = re.compile(r"password|passwd|passphrase|secret|credential|private[_-]?key|access[_-]?key|api[_-]?key",
                         re.IGNORECASE)
SECRET_END = re.compile(r"token$", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """Whether a (dotted) parameter name names a secret."""
    return bool(SECRET_WORD.search(key) or SECRET_END.search(key.split(".")[-1]))


def tracking_uri(tracking: TrackingParams) -> str:
    """``SAD_MLFLOW_URI`` (or ``MLFLOW_TRACKING_URI``) overrides the params' URI."""
    return os.environ.get("SAD_MLFLOW_URI") or os.environ.get("MLFLOW_TRACKING_URI") or tracking.uri


def configure(tracking: TrackingParams) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    uri = tracking_uri(tracking)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        mlflow.set_experiment(experiment_id=experiment.experiment_id)
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        artifact_location = Path(tracking.artifacts).resolve().as_uri()
    try:
        experiment_id = mlflow.create_experiment(tracking.experiment, artifact_location=artifact_location)
    except Exception:  # created concurrently by another stage
        experiment_id = mlflow.get_experiment_by_name(tracking.experiment).experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """Drop values whose key looks like a secret, and secrets embedded in URIs."""
    out = {}
    for k, v in params.items():
        if is_secret_key(k):
            out[k] = "***"
        elif isinstance(v, str) and "://" in v and "@" in v.split("://", 1)[1].split("/", 1)[0]:
            scheme, rest = v.split("://", 1)
            out[k] = f"{scheme}://***@{rest.split('@', 1)[1]}"
        else:
            out[k] = v
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except Exception:
        return "unknown"


# The retrain (or hand-run stage) a run belongs to: set by whoever guards the runs (flows.server), inherited
# by the stages it starts, tagged on each run, so that a clean-up marks only its own runs KILLED.
SESSION_ENV = "SAD_RUN_SESSION"
SESSION_TAG = "sad.session"


@contextlib.contextmanager
def stage_run(tracking: TrackingParams, stage: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run for one stage execution, tagged with the stage, git commit, profile and session."""
    import mlflow

    configure(tracking)
    session = {SESSION_TAG: os.environ[SESSION_ENV]} if os.environ.get(SESSION_ENV) else {}
    all_tags = {"sad.stage": stage, "git.commit": git_commit(), **session, **(tags or {})}
    started = time.perf_counter()
    with mlflow.start_run(run_name=stage, tags=all_tags) as run:
        if params:
            flat = redact(flatten(params))
            mlflow.log_params({k: str(v)[:6000] for k, v in flat.items()})
        yield run
        mlflow.log_metrics({"stage/seconds": time.perf_counter() - started, "stage/peak_rss_mb": peak_rss_mb()})


def peak_rss_mb() -> float:
    """Peak resident memory of this process and its finished children, in MiB (Linux ru_maxrss is KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def log_metrics(metrics: Mapping[str, Any], step: int | None = None, prefix: str = "") -> None:
    import mlflow

    clean = {f"{prefix}{k}": float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if clean:
        mlflow.log_metrics(clean, step=step)
