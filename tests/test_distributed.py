"""Two CPU processes (gloo) take the same steps as one process on the same global batch."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "ddp_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path):
    one = _run([sys.executable, str(WORKER), "--batch-size", "4", "--out", str(tmp_path / "one.safetensors")])
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), str(WORKER), "--batch-size", "2", "--out", str(tmp_path / "two.safetensors")])
    assert "processes=1" in one
    assert "processes=2 backend=gloo" in two
    # same number of steps and tokens seen, same final loss to float precision
    assert re.search(r"steps=(\d+) tokens=(\d+)", one).groups() == re.search(r"steps=(\d+) tokens=(\d+)", two).groups()
    assert int(re.search(r"steps=(\d+)", one).group(1)) > 0
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert a.keys() == b.keys()
    # both trained: the weights moved away from the student's initial ones (same seed as the worker's)
    from tests.ddp_worker import tiny_llama

    initial = tiny_llama(48, 16, seed=1).state_dict()
    assert max((a[key] - initial[key]).abs().max().item() for key in a) > 1e-3
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), f"{key}: max diff {(a[key] - b[key]).abs().max()}"
    loss_one = float(re.search(r"loss=([\d.]+)", one).group(1))
    loss_two = float(re.search(r"loss=([\d.]+)", two).group(1))
    assert abs(loss_one - loss_two) < 1e-4


def _sad_stage(project: Path, *args: str) -> tuple[float, str]:
    """``sad stage ...`` in ``project`` with no Prefect server configured; returns (wall seconds, log)."""
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "SAD_MLFLOW_URI", "MLFLOW_TRACKING_URI")}
    env.update({"PREFECT_HOME": str(project / ".prefect"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    started = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).with_name("sad")), "stage", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return time.perf_counter() - started, done.stdout + done.stderr


def _episodes(project: Path) -> list[dict]:
    from sad.io import read_jsonl

    rows = read_jsonl(project / "data/rollouts/rollouts.jsonl")
    for row in rows:
        for step in row["steps"]:
            step.pop("latency_s")  # wall time differs between runs; everything else must not
    return rows


@pytest.mark.slow
def test_rollouts_on_a_two_worker_dask_cluster_equal_the_single_process_run(rollout_project, tmp_path, monkeypatch):
    """The teacher's rollout stage with ``workers.task_runner: dask`` (a local 2-worker cluster, one shard
    per worker, through Prefect's DaskTaskRunner) writes the same episodes as one process."""
    import json
    import shutil

    import yaml

    single = Path(shutil.copytree(rollout_project, tmp_path / "single"))
    sharded = Path(shutil.copytree(rollout_project, tmp_path / "dask"))
    params = yaml.safe_load((sharded / "params.yaml").read_text())
    params["workers"] = {"task_runner": "dask", "n_workers": 2}
    (sharded / "params.yaml").write_text(yaml.safe_dump(params))

    import time

    from sad.config import load_params
    from sad.stages import run_rollout

    monkeypatch.chdir(single)  # the stage function in this process: the reference episodes
    started = time.perf_counter()
    run_rollout(load_params("params.yaml"), progress=False)
    t_single = time.perf_counter() - started
    t_dask, log = _sad_stage(sharded, "rollout")  # the CLI: Prefect server, Dask cluster, 2 shards
    assert "play-agent-shard" in log
    # the workers report to the server the flow reports to: one server on PREFECT_HOME's database, not two
    assert "Prefect server for the Dask workers" not in log and not (sharded / ".prefect" / "stage-server.log").exists()
    assert _episodes(sharded) == _episodes(single) and len(_episodes(single)) == 12
    metrics = json.loads((sharded / "metrics/rollout.json").read_text())
    assert metrics["episodes"] == 12
    print(f"rollout: in-process stage function {t_single:.1f} s; `sad stage rollout` on 2 Dask workers {t_dask:.1f} s")
