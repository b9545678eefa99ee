"""Security: no unpickling, no remote code, servers on 127.0.0.1 only, no secret in logs or MLflow."""

from __future__ import annotations

import ast
import json
import logging
import os

import pytest

from .conftest import REPO

SOURCES = sorted(p for d in ("sad", "flows", "tasks") for p in (REPO / d).rglob("*.py"))


def _calls(name: str):
    """(file, line, call node) of every call to ``…name(…)`` in the project's code."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                fn = node.func
                called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
                if called == name:
                    yield path.relative_to(REPO), node.lineno, node


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def test_torch_load_is_always_weights_only():
    calls = list(_calls("load"))
    torch_loads = [(f, n, c) for f, n, c in calls if isinstance(c.func, ast.Attribute)
                   and getattr(c.func.value, "id", None) == "torch"]
    assert torch_loads, "expected the checkpoint loader"
    for file, line, call in torch_loads:
        value = _keyword(call, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, f"{file}:{line}: torch.load without weights_only=True"


def test_no_pickle_eval_or_shell_in_the_code():
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                assert not {"pickle", "dill", "joblib", "cloudpickle"} & {n.split(".")[0] for n in names}, \
                    f"{path}:{node.lineno}: imports a pickle library"
            if isinstance(node, ast.Call):
                fn = getattr(node.func, "id", None)
                assert fn not in ("eval", "exec"), f"{path}:{node.lineno}: {fn}()"
                shell = _keyword(node, "shell")
                assert not (isinstance(shell, ast.Constant) and shell.value is True), f"{path}:{node.lineno}: shell=True"


def test_remote_code_is_never_trusted_by_default():
    for file, line, call in _calls("from_pretrained"):
        value = _keyword(call, "trust_remote_code")
        assert not (isinstance(value, ast.Constant) and value.value is True), f"{file}:{line}: trust_remote_code=True"


def test_a_model_folder_with_custom_code_is_refused_and_its_code_never_runs(tmp_path, tiny_model_factory, tokenizer):
    """A folder whose config asks for its own modelling code (``auto_map``) does not load, and the code
    (which would write a marker file on import) is never executed."""
    from sad.modeling import load_model, save_model

    folder = tmp_path / "model"
    save_model(tiny_model_factory(), tokenizer, folder)
    marker = tmp_path / "pwned"
    (folder / "evil_model.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                          "from transformers import LlamaForCausalLM as EvilForCausalLM\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil_model.EvilForCausalLM"}
    config["model_type"] = "evil"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=str(folder)):
        load_model(folder)
    assert not marker.exists()


def _listening(pids: set[int]) -> list[tuple[str, int]]:
    import psutil

    found = []
    for pid in pids:
        try:
            for conn in psutil.Process(pid).net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((conn.laddr.ip, conn.laddr.port))
        except psutil.NoSuchProcess:
            continue
    return found


SECRET = "hunter2-s3cr3t"


def test_no_secret_reaches_mlflow_params_or_logs(tmp_path, monkeypatch, caplog):
    from mlflow import MlflowClient

    from sad.config import TrackingParams, parse_params
    from sad.tracking import flatten, redact, stage_run

    for var in ("SAD_MLFLOW_URI", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    tracking = TrackingParams(uri=f"sqlite:///{tmp_path}/mlflow.db", artifacts=str(tmp_path / "art"), experiment="sec")
    p = parse_params({"tracking": {"uri": f"https://alice:{SECRET}@mlflow.example.com"},
                      "retrain": {"dvc_remote": f"s3://AKIA:{SECRET}@bucket/dvc"}})
    params = {**p.model_dump(by_alias=True), "auth": {"api_token": SECRET, "password": SECRET}}
    caplog.set_level(logging.DEBUG)
    with stage_run(tracking, "secrets", params) as run:
        logging.getLogger("sad").info("params: %s", redact(flatten(params)))
    logged = MlflowClient(tracking.uri).get_run(run.info.run_id).data.params
    assert logged["auth.api_token"] == "***" and logged["auth.password"] == "***"
    assert logged["tracking.uri"] == "https://***@mlflow.example.com"
    assert logged["retrain.dvc_remote"] == "s3://***@bucket/dvc"
    assert not [k for k, v in logged.items() if SECRET in v]
    from sad.tracking import is_secret_key

    secret = ["auth.api_token", "hf_token", "db_password", "aws_secret_access_key", "SECRET_KEY", "private_key",
              "passphrase", "api_keys", "secrets.db", "aws.credentials", "api-key"]
    plain = ["distill.methods.token_kd.loss", "context.max_new_tokens", "tokenizer.vocab_size", "x.tokens", "keyboard"]
    assert [k for k in secret if not is_secret_key(k)] == [] and [k for k in plain if is_secret_key(k)] == []
    # settings whose names merely contain a marker are logged as they are (the baseline's objective, the context)
    assert logged["distill.methods.token_kd.loss"] == "token_kd" and logged["context.max_new_tokens"] == str(p.context.max_new_tokens)
    assert logged["tokenizer.vocab_size"] == str(p.tokenizer.vocab_size) and "***" not in {v for k, v in logged.items() if "auth" not in k}
    assert SECRET not in caplog.text
    assert os.environ.get("MLFLOW_TRACKING_URI", "").find(SECRET) < 0


@pytest.mark.slow
def test_the_local_dask_cluster_listens_on_localhost_only():
    """``workers.task_runner: dask`` starts a local cluster with the runner's own settings: scheduler,
    workers (and the dashboard) bind 127.0.0.1."""
    import psutil
    from distributed import LocalCluster

    from flows.stages import dask_runner
    from sad.config import parse_params

    runner = dask_runner(parse_params({"workers": {"task_runner": "dask", "n_workers": 2}}))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with LocalCluster(**runner.cluster_kwargs) as cluster:
        assert len(cluster.workers) == 2
        pids = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)} - before
        listening = _listening(pids)
    assert len(listening) >= 3 and all(ip == "127.0.0.1" for ip, _ in listening), listening
