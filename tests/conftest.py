"""Shared fixtures: a few real ALFWorld games, expert demos on them, a tokenizer, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def small_params():
    from sad.config import parse_params

    return parse_params({"tasks": {"train": 12, "dev": 3, "test": 6}})


@pytest.fixture(scope="session")
def task_root(tmp_path_factory, small_params) -> Path:
    from sad.benchmarks import write_tasks

    root = tmp_path_factory.mktemp("tasks")
    write_tasks(small_params, root)
    return root


@pytest.fixture(scope="session")
def demos(task_root):
    from sad.benchmarks import load_tasks
    from sad.rollout import play_expert

    return play_expert(load_tasks(task_root, "alfworld", "train"), task_root)


@pytest.fixture(scope="session")
def tokenizer(demos):
    from sad.react import episode_text
    from sad.tokenizer import train_bpe

    return train_bpe([episode_text(e) for e in demos], vocab_size=400, min_frequency=2)


@pytest.fixture(scope="session")
def tiny_model_factory(tokenizer):
    from sad.config import ArchParams
    from sad.modeling import build_llama

    def make(hidden: int = 32, layers: int = 1, seed: int = 0):
        arch = ArchParams(hidden_size=hidden, num_layers=layers, num_heads=2, intermediate_size=2 * hidden)
        return build_llama(arch, tokenizer, max_positions=512, seed=seed)

    return make
