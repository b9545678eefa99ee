"""Stage ``tokenizer``: the copy-friendly BPE trained on the demos, or the pretrained teacher's own
(cut to the domain's tokens when ``tokenizer.domain_vocab`` is on)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from sad.config import Params
from sad.io import atomic_dir, write_json_atomic
from sad.react import episode_text
from sad.stages.layout import demos_file, pretrained_dir, read_episodes, tasks_root, tokenizer_dir

log = logging.getLogger(__name__)


def domain_texts(p: Params, episodes) -> Iterator[str]:
    """The text a domain vocabulary covers: the train split's expert demos (dev stays unseen, so step
    accuracy measures what the cut costs) and what each environment shows whatever the task (WebShop's
    catalogue), each of its words also alone (a word after ``[`` or a newline has no leading space)."""
    from sad.environments import get_benchmark

    yield from (episode_text(e) for e in episodes)
    for env in p.tasks.envs:
        world = get_benchmark(env).world_texts
        for text in (world(tasks_root(p) / env) if world else ()):
            yield text
            yield "\n".join(text.split())


def trained_token_ids(p: Params, source_vocab_size: int) -> list[int] | None:
    """The source ids a shipped teacher was trained with: the ``trained_vocab.json`` the pretrained stage carried
    over from ``teacher.source``, joined with the one in ``teacher.init`` (an adapter trained further: its first
    training's tokens stay too); None when neither folder has one (a teacher shipped before the file existed)."""
    from pathlib import Path

    from sad.tokenizer import TRAINED_VOCAB_FILE, read_domain_vocab

    folders = [pretrained_dir(p)] + ([Path(p.teacher.init)] if p.teacher.init is not None else [])
    found: set[int] | None = None
    for folder in folders:
        ids = read_domain_vocab(folder, TRAINED_VOCAB_FILE)
        if ids is None:
            continue
        if max(ids) >= source_vocab_size:
            raise ValueError(f"{folder / TRAINED_VOCAB_FILE} keeps token id {max(ids)}, but the source's tokenizer "
                             f"has {source_vocab_size} tokens: ship the teacher again from the same source")
        found = (found or set()) | set(ids)
    return None if found is None else sorted(found)


def run_tokenizer(p: Params) -> dict[str, Any]:
    from sad.tokenizer import (
        DOMAIN_VOCAB_FILE,
        domain_token_ids,
        load_tokenizer,
        restrict_tokenizer,
        train_bpe,
    )

    episodes = read_episodes(demos_file(p))
    metrics: dict[str, Any] = {}
    keep_ids: list[int] | None = None
    if p.teacher.source is not None:  # a pretrained teacher brings its tokenizer; students share it
        tokenizer = load_tokenizer(pretrained_dir(p))
        if p.tokenizer.domain_vocab:
            keep_ids = domain_token_ids(tokenizer, domain_texts(p, episodes))
            metrics["source_vocab_size"] = len(tokenizer)
            trained = trained_token_ids(p, len(tokenizer))
            if trained is not None:  # a shipped teacher: every token it was trained with stays, so a word the
                # demos here lack (an object, a name) is not cut into pieces it never saw
                metrics["teacher_trained_tokens_added"] = len(set(trained) - set(keep_ids))
                keep_ids = sorted(set(keep_ids) | set(trained))
            tokenizer = restrict_tokenizer(tokenizer, keep_ids)
            log.info("domain vocabulary: %d of the source's %d tokens (those of the train demos and the envs' "
                     "task-independent text, every byte and special token, and their merge parents%s)",
                     len(keep_ids), metrics["source_vocab_size"],
                     f"; {metrics['teacher_trained_tokens_added']} more that the shipped teacher was trained with"
                     if trained is not None else "")
    else:
        tokenizer = train_bpe((episode_text(e) for e in episodes), p.tokenizer.vocab_size, p.tokenizer.min_frequency)
    with atomic_dir(tokenizer_dir(p)) as tmp:
        tokenizer.save_pretrained(str(tmp))
        if keep_ids is not None:
            (tmp / DOMAIN_VOCAB_FILE).write_text(json.dumps({"source_vocab_size": metrics["source_vocab_size"],
                                                             "source_ids": keep_ids}) + "\n")
    lengths = [len(tokenizer.encode(episode_text(e), add_special_tokens=False)) for e in episodes]
    metrics.update({"vocab_size": len(tokenizer), "avg_episode_tokens": sum(lengths) / max(len(lengths), 1),
                    "max_episode_tokens": max(lengths, default=0)})
    write_json_atomic(p.path("metrics", "tokenizer.json"), metrics)
    return metrics
