"""The MLflow model registry: register a student, compare it with the champion, promote by alias.

A registered version carries its gate metric as a tag; ``@challenger`` marks the newest
candidate, and ``@champion`` moves only when the candidate beats the current champion.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sad.config import TrackingParams

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
GATE_TAG = "sad.gate_value"

PIP_REQUIREMENTS = ["torch", "transformers", "tokenizers", "safetensors"]


@dataclass(frozen=True)
class Decision:
    version: str
    promoted: bool
    reason: str
    challenger_value: float
    champion_version: str | None
    champion_value: float | None


def decide(challenger: float, champion: float | None, min_improvement: float) -> tuple[bool, str]:
    """Promote when there is no champion, or the challenger beats it by more than ``min_improvement``."""
    if champion is None:
        return True, "no current champion"
    if challenger > champion + min_improvement:
        return True, f"gate metric {challenger:.4f} beats champion {champion:.4f} by more than {min_improvement}"
    return False, f"gate metric {challenger:.4f} does not beat champion {champion:.4f} by more than {min_improvement}"


def _client(tracking: TrackingParams):
    from mlflow import MlflowClient

    from sad.tracking import configure

    configure(tracking)
    return MlflowClient()


def champion_version(tracking: TrackingParams) -> tuple[str, float] | None:
    """(version, gate value) of the current champion, or None."""
    client = _client(tracking)
    try:
        mv = client.get_model_version_by_alias(tracking.registered_model, CHAMPION)
    except Exception:
        return None
    value = mv.tags.get(GATE_TAG)
    return str(mv.version), float(value) if value is not None else float("-inf")


def log_student(model_dir: Path, card: dict[str, Any], tracking: TrackingParams) -> str:
    """Log the student (transformers flavor, tokenizer included) in the active run and register it.

    Returns the new version number. Must run inside an active MLflow run.
    """
    import mlflow

    from sad.modeling import load_model
    from sad.tokenizer import load_tokenizer

    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="model",
        task="text-generation",
        pip_requirements=PIP_REQUIREMENTS,
        registered_model_name=tracking.registered_model,
        model_config={"max_new_tokens": 64, "do_sample": False},
        metadata={"sad_card": json.dumps(card, sort_keys=True)},
    )
    mlflow.log_dict(card, "model_card.json")
    return str(info.registered_model_version)


def register_and_promote(model_dir: Path, card: dict[str, Any], gate_value: float, tracking: TrackingParams,
                         min_improvement: float) -> Decision:
    """Register a new version, tag it, set ``@challenger``, then move ``@champion`` if it wins."""
    client = _client(tracking)
    version = log_student(model_dir, card, tracking)
    name = tracking.registered_model
    client.set_model_version_tag(name, version, GATE_TAG, str(gate_value))
    for key in ("method", "gate_split", "gate_metric", "data_hash"):
        if key in card:
            client.set_model_version_tag(name, version, f"sad.{key}", str(card[key]))
    client.set_registered_model_alias(name, CHALLENGER, version)
    current = champion_version(tracking)
    promote, reason = decide(gate_value, current[1] if current else None, min_improvement)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "sad.promotion", ("promoted: " if promote else "kept champion: ") + reason)
    decision = Decision(version, promote, reason, gate_value, current[0] if current else None, current[1] if current else None)
    log.info("registry %s v%s: %s", name, version, reason)
    return decision


def decision_dict(decision: Decision) -> dict[str, Any]:
    return asdict(decision)
