"""Stage ``tokenizer``: the copy-friendly BPE trained on the demos, or the pretrained teacher's own."""

from __future__ import annotations

from typing import Any

from sad.config import Params
from sad.io import atomic_dir, write_json_atomic
from sad.react import episode_text
from sad.stages.layout import demos_file, pretrained_dir, read_episodes, tokenizer_dir


def run_tokenizer(p: Params) -> dict[str, Any]:
    from sad.tokenizer import load_tokenizer, train_bpe

    episodes = read_episodes(demos_file(p))
    if p.teacher.source is not None:  # a pretrained teacher brings its tokenizer; students share it
        tokenizer = load_tokenizer(pretrained_dir(p))
    else:
        tokenizer = train_bpe((episode_text(e) for e in episodes), p.tokenizer.vocab_size, p.tokenizer.min_frequency)
    with atomic_dir(tokenizer_dir(p)) as tmp:
        tokenizer.save_pretrained(str(tmp))
    lengths = [len(tokenizer.encode(episode_text(e))) for e in episodes]
    metrics = {"vocab_size": len(tokenizer), "avg_episode_tokens": sum(lengths) / max(len(lengths), 1),
               "max_episode_tokens": max(lengths, default=0)}
    write_json_atomic(p.path("metrics", "tokenizer.json"), metrics)
    return metrics
