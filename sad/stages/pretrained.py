"""Stage ``pretrained``: ``teacher.source`` as a safetensors folder (or a card: trained from scratch)."""

from __future__ import annotations

import json
import logging
from typing import Any

from sad.config import Params
from sad.io import atomic_dir, write_json_atomic
from sad.stages.layout import pretrained_dir

log = logging.getLogger(__name__)


def run_pretrained(p: Params) -> dict[str, Any]:
    """Convert ``teacher.source`` (GGUF in a wheel, a folder, a downloaded Hub id) to a safetensors
    folder; with no source, record that the teacher is trained from scratch."""
    import time

    from sad.pretrained import convert_to_safetensors, model_source

    if p.teacher.source is None:
        with atomic_dir(pretrained_dir(p)) as tmp:
            (tmp / "card.json").write_text(json.dumps({"source": None, "note": "embedded teacher, trained from scratch"}) + "\n")
        metrics: dict[str, Any] = {"pretrained": 0}
    else:
        started = time.perf_counter()
        card = convert_to_safetensors(model_source(p.teacher.source), pretrained_dir(p))
        metrics = {"pretrained": 1, "parameters": card["parameters"], "layers": card["layers"],
                   "vocab_size": card["vocab_size"], "seconds": time.perf_counter() - started}
        log.info("pretrained teacher %s: %d layers, %d parameters", p.teacher.source, card["layers"], card["parameters"])
    write_json_atomic(p.path("metrics", "pretrained.json"), metrics)
    return metrics
