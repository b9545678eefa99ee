"""Shared fixtures: a few real ALFWorld games, expert demos on them, a tokenizer, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

# One bf16 decision per test worker, inherited by every subprocess it starts: a stage killed and resumed must train
# in the precision of the run it resumes, and a timing taken on an oversubscribed CPU can land either side of
# sad.modeling.BF16_MIN_SPEEDUP (tests/test_training.py checks the measured decision itself)
if "SAD_CPU_BF16" not in os.environ:
    from sad.modeling import cpu_bf16_is_fast

    os.environ["SAD_CPU_BF16"] = "1" if cpu_bf16_is_fast() else "0"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on the 2-core box
    os.environ["OMP_NUM_THREADS"] = "1"  # one core each (and for the processes they start), not two apiece
    # a Prefect home per worker: two temporary servers must not share one SQLite database
    _home = os.environ.get("PREFECT_HOME") or str(Path.home() / ".prefect")
    os.environ["PREFECT_HOME"] = f"{_home}-{os.environ['PYTEST_XDIST_WORKER']}"


def pytest_collection_modifyitems(config, items):
    """Slowest files first, so that with two workers (``--dist loadfile``, collection order) the
    end-to-end file starts at once on one worker and no long file is left for the end: the e2e file,
    then files by their number of tests marked slow, then the rest (file order otherwise kept)."""
    def file_of(item) -> str:
        return item.nodeid.split("::", 1)[0]

    slow: dict[str, int] = {}
    for item in items:
        name = file_of(item)
        if item.get_closest_marker("e2e"):
            slow[name] = 1000
        elif item.get_closest_marker("slow"):
            slow[name] = slow.get(name, 0) + 1
    order = {name: i for i, name in enumerate(dict.fromkeys(file_of(item) for item in items))}
    items.sort(key=lambda item: (-slow.get(file_of(item), 0), order[file_of(item)]))


@pytest.fixture(autouse=True)
def _tracking_uri_stays_in_its_test():
    """``mlflow.set_tracking_uri`` also sets MLFLOW_TRACKING_URI in os.environ (mlflow 3), and
    ``sad.tracking.tracking_uri`` prefers the environment: one test's store must not become the next test's
    (or that of the processes it starts)."""
    keys = ("MLFLOW_TRACKING_URI", "SAD_MLFLOW_URI")
    before = {key: os.environ.get(key) for key in keys}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """One cache of converted models (``SAD_CACHE_DIR``: SmolLM2's GGUF dequantised once) for the whole
    run, shared by both xdist workers and the processes tests start; fresh in every run, so the first
    test that loads the wheel's model converts it for real."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "sad-cache"
    os.environ.setdefault("SAD_CACHE_DIR", str(root))
    return Path(os.environ["SAD_CACHE_DIR"])


@pytest.fixture(scope="session")
def small_params():
    from sad.config import parse_params

    return parse_params({"tasks": {"train": 12, "dev": 3, "test": 6}})


@pytest.fixture(scope="session")
def task_root(tmp_path_factory, small_params) -> Path:
    from sad.environments import write_tasks

    root = tmp_path_factory.mktemp("tasks")
    write_tasks(small_params, root)
    return root


@pytest.fixture(scope="session")
def demos(task_root):
    from sad.environments import load_tasks
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


@pytest.fixture(scope="session")
def rollout_project(tmp_path_factory, tokenizer, tiny_model_factory):
    """A project folder with tasks, a tokenizer and a (random) teacher: enough to run rollout and segment."""
    from sad.config import parse_params
    from sad.modeling import save_model
    from sad.stages import run_tasks

    root = tmp_path_factory.mktemp("project")
    raw = {"tasks": {"envs": ["alfworld", "hotpotqa"], "train": 6, "dev": 1, "test": 1,
                     "alfworld": {"max_steps": 6}, "hotpotqa": {"max_steps": 4}},
           "context": {"max_tokens": 512, "max_new_tokens": 24}, "rollout": {"batch_size": 4}}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    p = parse_params(raw)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        run_tasks(p)
        save_model(tiny_model_factory(hidden=32, seed=4), tokenizer, Path("models/teacher"))
        tokenizer.save_pretrained("models/tokenizer")
    finally:
        os.chdir(cwd)
    return root


def distill_raw(layers, heal_epochs: float) -> dict:
    """Parameters of a tiny project whose students are distilled with SFT (``distill_project``)."""
    return {"tasks": {"envs": ["alfworld", "hotpotqa"], "train": 6, "dev": 1, "test": 1},
            "context": {"max_tokens": 512, "max_new_tokens": 24},
            "distill": {"student_layers": layers, "heal": {"epochs": heal_epochs, "lr": 0.01, "source": None},
                        "train": {"epochs": 1, "batch_size": 4, "checkpoint_every": 2, "dev_fraction": 0.0},
                        "curriculum": {"gamma": 0}, "scaling": {"method": "sft"}, "methods": {"sft": {"loss": "sft"}}}}


@pytest.fixture
def distill_project(rollout_project, tmp_path, demos, tiny_model_factory, tokenizer):
    """A project with a 2-layer teacher, the expert's demos as the train/dev demos and as the teacher's rollouts
    (segmented): everything student_init and an SFT distill need."""
    import shutil

    from sad.config import parse_params
    from sad.io import write_jsonl_atomic
    from sad.modeling import save_model
    from sad.stages import run_segment

    root = Path(shutil.copytree(rollout_project, tmp_path / "project"))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        save_model(tiny_model_factory(hidden=32, layers=2, seed=7), tokenizer, Path("models/teacher"))
        write_jsonl_atomic(Path("data/demos/demos.jsonl"), (e.to_dict() for e in demos[:6]))
        write_jsonl_atomic(Path("data/demos/dev.jsonl"), (e.to_dict() for e in demos[6:8]))
        write_jsonl_atomic(Path("data/rollouts/rollouts.jsonl"), (e.to_dict() for e in demos[:6]))
        run_segment(parse_params(distill_raw(None, 0)))
        yield root
    finally:
        os.chdir(cwd)
