"""``sad``: run the pipeline, one stage, or the expert from the command line.

    sad pipeline                  # retrain: dvc repro, register, gate, promote (the main job)
    sad pipeline --set distill.train.lr=0.001   # the same as a DVC experiment (dvc exp run -S)
    sad registry list | promote 3 | rollback
    sad schedule --cron "0 3 * * 0"              # serve the retrain deployment on a Prefect server
    sad profile tiny              # rewrite params.yaml with profiles/tiny.yaml merged in
    sad stage teacher             # run one stage's Prefect flow by hand
    sad stage distill --method sad
    sad stage evaluate --agent teacher
    sad expert --env alfworld --split test --n 20 --json
    sad expert --env webshop --generate --n 200 --json   # a fresh generated task set
    sad bench envs --json                                # env reset time and steps/s
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from enum import Enum
from pathlib import Path

import typer

# Settings every process of the pipeline needs, before Prefect/MLflow/HF are imported.
os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "sad")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # two run links per stage: the logs name the run
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# A fresh PREFECT_HOME migrates its database on the first start: 20 s (the default) is too short on a busy 2-core box.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

app = typer.Typer(
    help="Structured Agent Distillation pipeline: distil a ReAct teacher agent into a small student. "
         "Run it from the project root (the folder with params.yaml and dvc.yaml).",
    epilog="Typical use: sad pipeline (the whole pipeline: dvc repro, register, gate, promote); "
           "sad profile tiny && sad pipeline (a fast end-to-end check; git checkout params.yaml restores the default); "
           "sad pipeline distill@sad (one stage and what it needs); sad registry list; "
           "sad --debug <command> ... (tracebacks and Prefect's/MLflow's own logs).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("sad")


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="show tracebacks and Prefect's/MLflow's own logs "
                                                                 "(also: SAD_DEBUG=1; stages under DVC inherit it)")) -> None:
    if debug:
        os.environ["SAD_DEBUG"] = "1"


def _marker_set_names() -> type[Enum]:
    """The built-in marker sets of :mod:`sad.markers` as a choice (the module is light: regexes only)."""
    from sad.markers import MARKER_SETS

    return Enum("MarkerSetName", {name: name for name in MARKER_SETS}, type=str)


MarkerSetName = _marker_set_names()


class Stage(str, Enum):
    tasks = "tasks"
    demos = "demos"
    pretrained = "pretrained"
    tokenizer = "tokenizer"
    teacher = "teacher"
    rollout = "rollout"
    segment = "segment"
    teacher_logits = "teacher_logits"
    student_init = "student_init"
    distill = "distill"
    evaluate = "evaluate"
    scale = "scale"
    select = "select"
    report = "report"


def _debug() -> bool:
    """``--debug`` or ``SAD_DEBUG=1``: tracebacks and the libraries' own console logs."""
    return os.environ.get("SAD_DEBUG", "").lower() not in ("", "0", "false", "no")


_FAILURE_COPIES = ("Finished in state Failed", "Task run failed with exception", "Encountered exception")


class _QuietLibraries(logging.Filter):
    """The console shows the project's logs; Prefect's and MLflow's chatter only from WARNING up, and
    not their copies of a flow's failure (the CLI reports it once). Prefect's API still gets every log
    and records every state. Off with ``--debug``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("prefect", "mlflow")):
            return True
        if record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return record.levelno < logging.ERROR and not record.getMessage().startswith(_FAILURE_COPIES)
        return record.levelno >= logging.WARNING


def _quiet_console() -> None:
    """Put :class:`_QuietLibraries` on the root logger's handlers (again after Prefect configured logging)."""
    if _debug():
        return
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
            handler.addFilter(_QuietLibraries())


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose or _debug() else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("httpx", "httpcore", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _quiet_console()


def _bad_input_types() -> tuple[type[BaseException], ...]:
    """Errors that name a wrong input (:data:`sad.io.BAD_INPUT_ERRORS`): printed alone, exit 2, no traceback."""
    from sad.io import BAD_INPUT_ERRORS

    return BAD_INPUT_ERRORS


def _report_bad_input(exc: BaseException, where: str) -> None:
    """Print a bad input's message in one line plus what to do, and exit 2 (``--debug``: re-raise)."""
    if _debug():
        raise exc
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    typer.echo(f"{where} stopped on bad input: fix what is named above and run it again "
               "(rerun as `sad --debug ...` or with SAD_DEBUG=1 to see the traceback).", err=True)
    _exit_now(2)


def _bug_types() -> tuple[type[BaseException], ...]:
    """Errors of the code itself (:data:`sad.io.BUG_ERRORS`): traceback, exit 3, never retried."""
    from sad.io import BUG_ERRORS

    return BUG_ERRORS


def _report_bug(exc: BaseException, where: str) -> None:
    """Print a bug's traceback and what to do, and exit 3: a rerun (the retrain's retries included) would fail
    the same way, so the orchestrator does not retry it (``--debug``: re-raise)."""
    import traceback

    if _debug():
        raise exc
    traceback.print_exception(exc)
    typer.secho(f"error: {where} stopped on an error in the code ({type(exc).__name__}), not in its input: a rerun "
                "fails the same way. Please report it with the traceback above.", fg=typer.colors.RED, err=True)
    _exit_now(3)


def _exit_now(code: int = 0) -> None:
    """Flush logs (Prefect's API handler included) and exit without the slow interpreter teardown.

    Every output is already written and renamed into place; tearing down torch, transformers,
    MLflow and Prefect module state costs 1-2 s per stage for nothing.
    """
    from flows.preload_client import on_exit

    _stop_temporary_prefect_server()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    on_exit(code)
    os._exit(code)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@contextlib.contextmanager
def _registry_errors(p):
    """A registry command's errors in one line (exit 2): the registry's and the lock's own, and the store's
    (MlflowException, an unreachable server; `sad --debug ...` shows the traceback)."""
    from flows.server import RetrainBusy
    from sad.registry import RegistryError

    try:
        yield
    except (RegistryError, RetrainBusy) as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - the store's own errors
        if _debug():
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _fail(f"the MLflow store at {_store_of(p)} failed: {first} (nothing or only part was changed: run "
              "`sad registry list`, then the command again; `sad --debug ...` shows the traceback)")


def _gate_record(p, version: str) -> str:
    """What the gates decided for ``version`` ('' if never gated or no such version: promote says which)."""
    from sad.registry import gates_verdict

    try:
        return gates_verdict(p.tracking, version.strip().removeprefix("v")) or ""
    except Exception:  # noqa: BLE001 - no such version: promote() names it
        return ""


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def _store_of(p) -> str:
    """The tracking URI this command uses, any credentials in it hidden."""
    from sad.tracking import redact, tracking_uri

    return redact({"uri": tracking_uri(p.tracking)})["uri"]


def _load_params(path: Path):
    """Validated params, or a clear error naming the file and key (exit code 2)."""
    from sad.config import ConfigError, load_params

    try:
        return load_params(path)
    except ConfigError as exc:
        _fail(str(exc))


def dvc_stage_names(dvc_yaml: Path, params_yaml: Path) -> list[str]:
    """The stage names ``dvc repro`` accepts: plain stages, and ``name@item`` for each ``foreach`` over a
    mapping or list of ``params_yaml`` (``${distill.methods}``)."""
    import yaml

    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    params = yaml.safe_load(params_yaml.read_text()) or {}
    names = []
    for name, spec in stages.items():
        over = spec.get("foreach") if isinstance(spec, dict) else None
        if over is None:
            names.append(name)
            continue
        items = over
        if isinstance(over, str) and over.startswith("${") and over.endswith("}"):
            items = params
            for key in over[2:-1].split("."):
                items = items.get(key, {}) if isinstance(items, dict) else {}
        names += [f"{name}@{item}" for item in (items if isinstance(items, (dict, list)) else [])]
    return names


# Params naming a local folder that a stage reads, and the dvc.yaml stage that must list it in its deps:
# dvc.yaml cannot interpolate them (each may be null), so it names the shipped folders.
SOURCE_PARAMS: tuple[tuple[str, str], ...] = (
    ("teacher.source", "pretrained"), ("teacher.init", "teacher"), ("distill.heal.source", "student_init"),
    ("tasks.alfworld.official", "tasks"), ("tasks.hotpotqa.official", "tasks"), ("tasks.webshop.official", "tasks"))


def untracked_sources(params, dvc_yaml: Path) -> list[str]:
    """One line per local folder or file a ``SOURCE_PARAMS`` key names that its stage's deps in ``dvc_yaml`` do
    not cover (the dep itself or a folder above it): DVC would not rerun that stage when it changes."""
    import yaml

    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    lines, dumped = [], params.model_dump()
    for key, stage in SOURCE_PARAMS:
        value = dumped
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, str) or not Path(value).exists():
            continue  # null, 'pypi:<wheel>' or a Hugging Face id: nothing DVC can hash in the repo
        source = Path(os.path.normpath(value))
        deps = [Path(os.path.normpath(d)) for d in stages.get(stage, {}).get("deps", []) if "${" not in d]
        if not any(source == d or d in source.parents for d in deps):
            lines.append(f"{key}: {value} is not a dep of dvc.yaml stage {stage!r}, so DVC will not rerun it when "
                         f"that folder changes; add `- {value}` to its deps")
    return lines


def params_with_overrides(params_yaml: Path, set_params: list[str]):
    """The params a ``sad pipeline --set`` experiment runs with: ``params_yaml`` with the overrides to it applied
    as ``dvc exp run -S`` applies them (DVC's own Hydra override code, on a temporary copy), validated.
    Raises ``ConfigError`` naming the overrides when they make the params invalid."""
    import shutil
    import tempfile

    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides, to_hydra_overrides

    from sad.config import ConfigError, load_params

    overrides = [o for path, group in to_path_overrides(set_params).items()
                 if Path(path).resolve() == params_yaml.resolve() for o in group]
    if not overrides:
        return load_params(params_yaml)
    try:
        sweep = any(o.is_sweep_override() for o in to_hydra_overrides(overrides))
    except Exception:  # noqa: BLE001 - a malformed override: apply_overrides below names it
        sweep = False
    if sweep:
        raise ConfigError(f"--set {' '.join(overrides)}: a sweep (several values, range(), choice()) runs several "
                          "experiments, which `dvc exp run` queues: run `dvc exp run --queue -S ...`, then "
                          "`dvc queue start`; `sad pipeline --set` runs one")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "params.yaml"
        shutil.copyfile(params_yaml, copy)
        try:
            apply_overrides(copy, overrides)
            return load_params(copy)
        except Exception as exc:  # noqa: BLE001 - Hydra, YAML and validation errors: one message naming them
            cause = exc.__cause__ if isinstance(exc, InvalidArgumentError) and exc.__cause__ else exc
            detail = str(cause).strip() or type(cause).__name__
            detail = _unknown_override_key(params_yaml, detail) or detail.replace(str(copy), str(params_yaml))
            raise ConfigError(f"--set {' '.join(overrides)}: {detail}") from None


def _unknown_override_key(params_yaml: Path, hydra_error: str) -> str | None:
    """For Hydra's "Could not override 'KEY'" on a KEY that is no setting at all: that, with close setting names
    (Hydra's advice, +KEY, is right only for a setting params.yaml leaves out, such as a method's default)."""
    import difflib
    import re

    from sad.config import load_params
    from sad.tracking import flatten

    found = re.search(r"Could not override '([^']+)'", hydra_error)
    if not found:
        return None
    key = found.group(1)
    if is_setting(key):
        return None
    names = list(flatten(load_params(params_yaml).model_dump()))
    close = difflib.get_close_matches(key, names, n=3)
    return f"no setting {key!r} in {params_yaml}" + (f"; did you mean {', '.join(close)}?" if close else "")


def is_setting(key: str) -> bool:
    """Whether dotted ``key`` names a setting of the params schema, including those of sections params.yaml
    leaves null (``teacher.lora.r``) and of any named entry of a mapping (``distill.methods.<name>.onpolicy.rounds``)."""
    import types
    import typing

    from pydantic import BaseModel

    from sad.config import Params

    def walk(node, parts: list[str]) -> bool:
        if not parts:
            return True
        if typing.get_origin(node) in (typing.Union, types.UnionType):  # Optional[...] and other unions: any
            return any(walk(a, parts) for a in typing.get_args(node) if a is not type(None))
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(parts[0]) or next(
                (f for f in node.model_fields.values() if f.alias == parts[0]), None)
            return field is not None and walk(field.annotation, parts[1:])
        if typing.get_origin(node) is dict:
            return walk(typing.get_args(node)[1], parts[1:])  # any entry name
        return False  # a value has no settings under it

    return walk(Params, key.split("."))


def _check_pipeline_args(target: str | None, set_params: list[str]) -> None:
    """Fail at once, before any server starts, on a target that is no stage or a --set without '='."""
    for item in set_params:
        if "=" not in item and not item.split(":")[-1].startswith("~"):
            _fail(f"--set {item!r}: expected KEY=VALUE (or ~KEY to delete one), e.g. distill.train.lr=0.001")
    if target is None or set_params or ":" in target or "/" in target or not Path("dvc.yaml").is_file():
        return  # a dvc.yaml path, a path:stage target, or stages an experiment's --set may add: DVC checks it
    names = dvc_stage_names(Path("dvc.yaml"), Path("params.yaml"))
    if target not in names and target not in {n.split("@")[0] for n in names}:
        import difflib

        close = difflib.get_close_matches(target, names, n=3)
        _fail(f"no dvc.yaml stage {target!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
              + f" (stages: {', '.join(names)})")


@contextlib.contextmanager
def _api_for_workers(p, name: Stage, flow_api_url: str | None = None):
    """Dask workers report their task runs to the flow's Prefect API: without a configured server each
    worker would start its own temporary one. They get the server this stage's flow reports to
    (``flow_api_url``: the temporary server a hand-run stage started), else one local server for the stage
    (127.0.0.1)."""
    if p.workers.task_runner != "dask" or name not in (Stage.demos, Stage.rollout, Stage.evaluate) \
            or os.environ.get("PREFECT_API_URL"):
        yield
        return
    if flow_api_url:  # one server, one writer of PREFECT_HOME's database
        os.environ["PREFECT_API_URL"] = flow_api_url
        try:
            yield
        finally:
            os.environ.pop("PREFECT_API_URL", None)
        return
    from flows.server import start_server, stop_server

    proc, url = start_server(Path(os.environ["PREFECT_HOME"]) / "stage-server.log")
    os.environ["PREFECT_API_URL"] = url
    log.info("Prefect server for the Dask workers: %s", url)
    try:
        yield
    finally:
        _drain_prefect()  # flush logs and events while the server is still up
        os.environ.pop("PREFECT_API_URL", None)
        stop_server(proc)


@contextlib.contextmanager
def _guard_hand_run(p):
    """A ``sad stage`` run by hand (or by ``dvc repro`` alone, no ``PREFECT_API_URL``) starts Prefect's
    temporary server: started here first, it is registered with a reaper process, which stops it and marks
    the stage's MLflow runs KILLED should this process be SIGKILLed (SIGTERM unwinds normally). Yields that
    server's API URL (None under `sad pipeline`), which Dask workers then report to."""
    if os.environ.get("PREFECT_API_URL"):  # under `sad pipeline`: its reaper guards the run
        yield None
        return
    from prefect.server.api.server import SubprocessASGIServer

    from flows.server import Reaper, _reapers, is_local_store, new_run_session
    from sad.tracking import SESSION_ENV, tracking_uri

    interrupted = False
    reaper = Reaper(Path(os.environ["PREFECT_HOME"]) / "reaper.log")
    _reapers.append(reaper)
    try:
        uri = tracking_uri(p.tracking)
        os.environ.setdefault(SESSION_ENV, new_run_session())  # this stage's runs: the reaper marks only these
        if not os.environ.get("SAD_MLFLOW_URI") and is_local_store(uri):
            reaper.watch_store(uri, int(time.time() * 1000), os.environ[SESSION_ENV])
        server = SubprocessASGIServer()  # the instance Prefect's client would start itself
        server.start()
        if server.server_process is not None:
            reaper.watch_pid(server.server_process.pid)
        yield server.api_url
    except BaseException:
        interrupted = True
        raise
    finally:
        _stop_temporary_prefect_server()
        _reapers.remove(reaper)
        reaper.close(interrupted)


def _exit_on_sigterm(signum: int, _frame) -> None:
    """A stopped stage unwinds: its MLflow run ends FAILED and its Prefect flow run is marked, not left running.
    A second SIGTERM (its process group signalled again) does not interrupt that unwinding."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


@app.command()
def stage(
    name: Stage = typer.Argument(..., metavar="NAME", help="the stage to run: " + ", ".join(s.value for s in Stage)),
    method: str | None = typer.Option(None, help="required for distill: the method, a key of distill.methods "
                                                 "(default: sad, token_kd, sft)"),
    agent: str | None = typer.Option(None, help="required for evaluate: 'teacher' or a method name"),
    size: str | None = typer.Option(None, help="required for scale: a key of distill.scaling.sizes"),
    params: Path = typer.Option(Path("params.yaml"), help="parameter file"),
) -> None:
    """Run one stage as a Prefect flow (what each dvc.yaml stage calls).

    Runs only this stage, on what its inputs hold now; upstream stages and dvc.lock are not touched.

    To build a stage with everything it needs: `sad pipeline <dvc stage>`, e.g. `sad pipeline distill@sad`.

    The teacher's evaluation is `evaluate_teacher` there, `sad stage evaluate --agent teacher` here."""
    _setup_logging()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    p = _load_params(params)
    path = str(params)
    if name is Stage.distill and not method:
        _fail("the distill stage needs --method (one of: " + ", ".join(p.distill.methods) + ")")
    if name is Stage.evaluate and not agent:
        _fail("the evaluate stage needs --agent ('teacher' or a method)")
    if name is Stage.scale and not size:
        _fail("the scale stage needs --size (one of: " + ", ".join(p.distill.scaling.sizes) + ")")
    # a typo fails here, in a second, not after Prefect has started a server and a flow run
    if name is Stage.distill and method not in p.distill.methods:
        _fail(f"unknown method {method!r}; {params} distill.methods has: {', '.join(p.distill.methods)}")
    if name is Stage.evaluate and agent != "teacher" and agent not in p.distill.methods:
        _fail(f"unknown agent {agent!r}; use 'teacher' or one of {params} distill.methods: {', '.join(p.distill.methods)}")
    if name is Stage.scale and size not in p.distill.scaling.sizes:
        _fail(f"unknown size {size!r}; {params} distill.scaling.sizes has: {', '.join(p.distill.scaling.sizes)}")
    from flows import stages as f

    runners = {
        Stage.tasks: lambda: f.tasks_flow(path),
        Stage.demos: lambda: f.demos_flow_for(p)(path),
        Stage.pretrained: lambda: f.pretrained_flow(path),
        Stage.tokenizer: lambda: f.tokenizer_flow(path),
        Stage.teacher: lambda: f.teacher_flow(path),
        Stage.rollout: lambda: f.on_workers_flow(f.rollout_flow, p)(path),
        Stage.segment: lambda: f.segment_flow(path),
        Stage.teacher_logits: lambda: f.teacher_logits_flow(path),
        Stage.student_init: lambda: f.student_init_flow(path),
        Stage.distill: lambda: f.distill_flow(method, path),
        Stage.evaluate: lambda: f.on_workers_flow(f.evaluate_flow, p)(agent, path),
        Stage.scale: lambda: f.scale_flow(size, path),
        Stage.select: lambda: f.select_flow(path),
        Stage.report: lambda: f.report_flow(path),
    }
    _quiet_console()
    started = time.perf_counter()
    try:
        with _guard_hand_run(p) as flow_api_url, _api_for_workers(p, name, flow_api_url):
            runners[name]()
    except _bad_input_types() as exc:
        _report_bad_input(exc, f"stage {name.value}")
    except _bug_types() as exc:
        _report_bug(exc, f"stage {name.value}")
    log.info("stage %s finished in %.1fs", name.value, time.perf_counter() - started)
    _exit_now(0)


@app.command()
def pipeline(
    force: bool = typer.Option(False, "--force", help="rerun every stage (dvc repro --force)"),
    target: str | None = typer.Argument(None, help="reproduce up to this dvc.yaml stage and register nothing"),
    set_params: list[str] = typer.Option([], "--set", "-S", help="KEY=VALUE: run as a DVC experiment (dvc exp run -S), repeatable"),
    preload: bool = typer.Option(True, "--preload/--no-preload",
                                 help="fork each stage from one process that imported torch/transformers/Prefect/MLflow once"),
) -> None:
    """Retrain: reproduce the pipeline with DVC, register the best student in MLflow, promote it if the gates pass.

    Starts local Prefect and MLflow servers (127.0.0.1) for the run and stops them afterwards.
    The decision is printed and written to reports/registry.json.
    """
    from flows.server import (  # no Prefect import before the services
        RetrainBusy,
        RetrainStopped,
        pipeline_services,
        single_flight,
        stop_on_signals,
    )
    from sad.tracking import tracking_uri

    _setup_logging()
    p = _load_params(Path("params.yaml"))
    _check_pipeline_args(target, set_params)
    if set_params:  # the experiment's params, validated before any server starts
        from sad.config import ConfigError

        try:
            p = params_with_overrides(Path("params.yaml"), set_params)
        except ConfigError as exc:
            _fail(str(exc))
    if Path("dvc.yaml").is_file():
        for line in untracked_sources(p, Path("dvc.yaml")):
            log.warning(line)
    home = Path(os.environ["PREFECT_HOME"])
    started = time.perf_counter()
    code = 0
    stop_on_signals()
    try:  # the lock first: a refused retrain starts no server
        with single_flight(Path.cwd(), p.retrain.lock_timeout_s), \
                pipeline_services(home, tracking_uri(p.tracking), Path(p.tracking.artifacts), preload) as services:
            os.environ.update(services)  # before Prefect reads its settings: the flow reports to this server
            code = _retrain(set_params, force, target, preload)
    except RetrainBusy as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        code = 2
    except RetrainStopped as exc:
        typer.secho(f"error: the retrain was {exc}; its stage, DVC, the preload runner and the servers are stopped. "
                    "Run `sad pipeline` again to resume (finished stages come from DVC's cache).", fg=typer.colors.RED, err=True)
        code = 128 + exc.signum
    log.info("pipeline finished in %.1fs with exit code %d", time.perf_counter() - started, code)
    _exit_now(code)


def _retrain(set_params: list[str], force: bool, target: str | None, preload: bool) -> int:
    """The retrain flow inside the pipeline's services; prints the decision, returns the exit code."""
    from flows.retrain import StageFailed, retrain_flow
    from sad.io import failure_exit_code

    code = 0
    try:
        result = retrain_flow(set_params=set_params, force=force, target=target, preload=preload, lock=False)
    except Exception as exc:  # a failed stage or bad input said why above: one line; anything else: its traceback
        expected = isinstance(exc, (StageFailed, *_bad_input_types())) and not _debug()
        log.error("retrain failed: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                  exc_info=None if expected else exc)
        stage_exit = getattr(exc, "stage_exit", None)
        code = stage_exit if stage_exit in (2, 3) else failure_exit_code(exc)
    else:
        if "version" in result:
            typer.echo(f"registry: v{result['version']} "
                       f"{'promoted to @champion' if result['promoted'] else 'not promoted'}: {result['reason']}")
    _drain_prefect()  # while the server is still up: queued logs and events would block the exit
    return code


def _stop_temporary_prefect_server() -> None:
    """Stop the temporary Prefect server a flow started when no PREFECT_API_URL was set (``sad stage`` by
    hand, ``dvc repro`` outside ``sad pipeline``). Prefect stops it at interpreter exit, which os._exit
    skips: without this each such command would leave a server process behind."""
    server_module = sys.modules.get("prefect.server.api.server")
    instances = getattr(getattr(server_module, "SubprocessASGIServer", None), "_instances", None)
    if not instances:
        return
    _drain_prefect()
    for server in list(instances.values()):
        with contextlib.suppress(Exception):
            server.stop()


def _drain_prefect(timeout_s: float = 20.0) -> None:
    """Send Prefect's queued logs and events now (at interpreter exit they would wait on a stopped server)."""
    from prefect._internal.concurrency.services import _QueueServiceBase

    with contextlib.suppress(Exception):
        _QueueServiceBase.drain_all(timeout=timeout_s, at_exit=False)


registry_app = typer.Typer(help="The MLflow model registry: list versions, promote one by hand, roll back.",
                           no_args_is_help=True)
app.add_typer(registry_app, name="registry")


@registry_app.command("list")
def registry_list(params: Path = typer.Option(Path("params.yaml"), help="parameter file (tracking URI, model name)"),
                  as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Every registered version, newest first, with aliases, method, gate value and the promotion decision."""
    from sad.registry import list_versions

    _setup_logging()
    p = _load_params(params)
    rows = list_versions(p.tracking)
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo(f"no versions of {p.tracking.registered_model} in {_store_of(p)} (`sad pipeline` registers one)")
    for r in rows:
        aliases = ",".join("@" + a for a in r["aliases"]) or "-"
        verdict, _, gates = (r["decision"] or "not gated").partition(": ")
        value = f"{float(r['gate_value']):.4g}" if _is_number(r["gate_value"]) else r["gate_value"]
        typer.echo(f"v{r['version']:<4} {aliases:<24} {r['method'] or '-':<10} {r['gate_metric']}={value}  {verdict}")
        for gate in gates.split("; ") if gates else []:
            typer.echo(f"      {gate}")


@registry_app.command("promote")
def registry_promote(version: str = typer.Argument(..., help="the version to make @champion"),
                     reason: str = typer.Option("promoted by hand", help="recorded on the version"),
                     params: Path = typer.Option(Path("params.yaml"), help="parameter file")) -> None:
    """Make VERSION the champion by hand (no gates), under the retrain lock."""
    from flows.server import single_flight
    from sad.registry import promote

    _setup_logging()
    p = _load_params(params)
    with _registry_errors(p), single_flight(Path.cwd(), p.retrain.lock_timeout_s):
        gates = _gate_record(p, version)
        if "FAIL floor" in gates:
            typer.secho(f"warning: v{version.strip().removeprefix('v')} failed a floor gate ({gates}); promoting it "
                        "by hand, as asked", fg=typer.colors.YELLOW, err=True)
        promote(p.tracking, version, reason)
    typer.echo(f"{p.tracking.registered_model} v{version.strip().removeprefix('v')} is now @champion")


@registry_app.command("rollback")
def registry_rollback(params: Path = typer.Option(Path("params.yaml"), help="parameter file")) -> None:
    """Move @champion back to the previous champion."""
    from flows.server import single_flight
    from sad.registry import rollback

    _setup_logging()
    p = _load_params(params)
    with _registry_errors(p), single_flight(Path.cwd(), p.retrain.lock_timeout_s):
        before, after = rollback(p.tracking)
    typer.echo(f"{p.tracking.registered_model}: @champion rolled back from v{before} to v{after}")


@app.command()
def schedule(
    cron: str | None = typer.Option(None, help="cron expression (default: retrain.cron in params.yaml)"),
    name: str = typer.Option("scheduled", help="deployment name (the flow is 'retrain')"),
    params: Path = typer.Option(Path("params.yaml"), help="parameter file: the project's params.yaml, which the "
                                "stages read too (another file would gate and register under other settings than "
                                "the students were trained with)"),
) -> None:
    """Serve the retrain flow as a cron-scheduled deployment on the Prefect server at PREFECT_API_URL.

    Start the server first:  prefect server start --host 127.0.0.1 --port 4200
    and point at it:          export PREFECT_API_URL=http://127.0.0.1:4200/api
    Runs until interrupted (Ctrl-C); at most one retrain runs at a time.
    """
    _setup_logging()
    if params.resolve() != (Path.cwd() / "params.yaml").resolve():
        _fail(f"--params {params}: a scheduled retrain runs dvc repro, whose stages read ./params.yaml; its gates and "
              "registration must read the same file. Change params.yaml (e.g. `sad profile NAME`), or serve the "
              "schedule from the project folder that holds the other file as its params.yaml")
    p = _load_params(params)
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        _fail("PREFECT_API_URL is not set: start a server with `prefect server start --host 127.0.0.1 --port 4200` "
              "and `export PREFECT_API_URL=http://127.0.0.1:4200/api` (a schedule needs a real server)")
    from prefect import serve
    from prefect.client.schemas.schedules import CronSchedule

    from flows.retrain import retrain_flow

    cron = cron or p.retrain.cron
    try:
        CronSchedule(cron=cron)
    except ValueError as exc:
        _fail(f"--cron {cron!r}: not a valid cron expression ({str(exc).splitlines()[-1].strip()})")
    deployment = retrain_flow.to_deployment(
        name=name, cron=cron, concurrency_limit=1,
        parameters={"project_dir": str(Path.cwd()), "params_path": str(params)},
        description=f"Retrain the SAD student in {Path.cwd()} on '{cron}', then gate and promote.",
    )
    log.info("serving retrain/%s on %s (cron %r, project %s)", name, api, cron, Path.cwd())
    serve(deployment)


@app.command("dvc-deps")
def dvc_deps(
    check: bool = typer.Option(False, "--check", help="only check: exit 1 when dvc.yaml's code deps are not the computed ones"),
    dvc_yaml: Path = typer.Option(Path("dvc.yaml"), help="the stage graph to update"),
) -> None:
    """Write each stage's code deps (the sad/ modules it imports, transitively) into dvc.yaml.

    Run it after changing what a stage imports; `dvc status` then reruns exactly the stages whose code changed.
    """
    from sad.io import write_text_atomic
    from sad.stagegraph import with_code_deps

    if not dvc_yaml.is_file():
        _fail(f"{dvc_yaml}: no such file (run from the project root or pass --dvc-yaml PATH)")
    before = dvc_yaml.read_text()
    try:
        after = with_code_deps(before)
    except ValueError as exc:
        _fail(str(exc))
    if after == before:
        typer.echo(f"{dvc_yaml}: code deps are up to date")
        return
    if check:
        typer.secho(f"{dvc_yaml}: code deps differ from what the stages import; run `sad dvc-deps` to update them",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
    write_text_atomic(dvc_yaml, after)
    typer.echo(f"{dvc_yaml}: code deps updated")


@app.command()
def profile(
    name: str = typer.Argument(..., help="profile name: profiles/<name>.yaml"),
    params: Path = typer.Option(Path("params.yaml"), help="parameter file to rewrite"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the merged params instead of writing them"),
) -> None:
    """Apply profiles/NAME.yaml to params.yaml (in place; preview: --dry-run; undo: git checkout params.yaml).

    Mappings merge key by key, except those under the profile's `replace:` (e.g. distill.methods: the set).

    Profiles: tiny (the whole pipeline in minutes, a plumbing check); full (issue #18's comparison, ~5 h on 2 cores).

    Others: takeover, heal, teacher, teacher2, smollm2, paper; each file's header says what it is and what it costs."""
    import io

    from ruamel.yaml import YAML

    from sad.config import ConfigError, apply_profile, delete_path, parse_params, profile_replaced_paths, read_yaml
    from sad.io import write_text_atomic

    source = f"profiles/{name}.yaml"
    if not Path(source).is_file():
        known = sorted(f.stem for f in Path("profiles").glob("*.yaml"))
        _fail(f"no profile {name!r} ({source} not found); profiles: {', '.join(known) or 'none in ./profiles'}")
    try:
        override = read_yaml(Path(source))
        base = read_yaml(params)
        replaced = profile_replaced_paths(base, override, source)
        merged = apply_profile(base, override, source)
        before = str((base.get("project") or {}).get("profile", "default"))
        # a profile applied over another one: both show in reports (results.md says which params ran)
        stacked = name if before in ("default", name) else f"{before}+{name}"
        merged.setdefault("project", {})["profile"] = stacked
        parse_params(merged, f"{params} + {source}")
    except ConfigError as exc:
        _fail(str(exc))
    override = {k: v for k, v in override.items() if k != "replace"}
    # Round-trip YAML: the comments in params.yaml survive the rewrite.
    yaml = YAML()
    doc = yaml.load(params.read_text())

    def merge_into(node, patch) -> None:
        for key, value in patch.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                merge_into(node[key], value)
            else:
                node[key] = value

    for keys in replaced:  # the profile's mapping replaces these whole (their comments go with them)
        delete_path(doc, keys)
    merge_into(doc, {**override, "project": {**override.get("project", {}), "profile": stacked}})
    buffer = io.StringIO()
    yaml.dump(doc, buffer)
    text = buffer.getvalue()
    if dry_run:
        typer.echo(text)
        return
    write_text_atomic(params, text)
    on_top = f" on top of profile '{before}' (project.profile: {stacked})" if stacked != name else ""
    typer.echo(f"{params}: applied profile '{name}'{on_top} (restore with: git checkout {params})")


class EnvName(str, Enum):
    alfworld = "alfworld"
    hotpotqa = "hotpotqa"
    webshop = "webshop"


class SplitName(str, Enum):
    train = "train"
    dev = "dev"
    test = "test"


def _task_set(env: str, split: str, n: int | None, tasks_root: Path, generate: bool, workdir: Path):
    """Tasks from the tasks stage's folder, or a fresh generated set (seeded by params.yaml)."""
    from sad.config import ConfigError, load_params, parse_params
    from sad.environments import generate_fresh, load_tasks

    if generate:
        try:
            params = load_params("params.yaml") if Path("params.yaml").is_file() else parse_params({}, "defaults")
        except ConfigError as exc:
            _fail(str(exc))
        return generate_fresh(params, env, split, n or 200, workdir), workdir
    try:
        return load_tasks(tasks_root, env, split)[: n or None], tasks_root
    except FileNotFoundError as exc:
        _fail(f"{exc}; or pass --generate to play a fresh generated task set")


@app.command()
def expert(
    env: EnvName = typer.Option(EnvName.alfworld, help="environment"),
    split: SplitName = typer.Option(SplitName.test, help="split"),
    n: int | None = typer.Option(None, "--n", "-n", min=1, help="play the first N tasks of the split (default: all; 200 with --generate)"),
    tasks_root: Path = typer.Option(Path("data/tasks"), help="tasks folder written by the tasks stage"),
    generate: bool = typer.Option(False, "--generate", help="generate N fresh tasks (seeded by params.yaml) in a temp folder"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Play the environment's expert on a split and report its success rate."""
    import tempfile

    from sad.metrics import success_by
    from sad.rollout import play_expert

    _setup_logging()
    with tempfile.TemporaryDirectory(prefix="sad-expert-") as tmp:
        tasks, root = _task_set(env.value, split.value, n, tasks_root, generate, Path(tmp))
        started = time.perf_counter()
        episodes = play_expert(tasks, root, progress=not as_json)
        seconds = time.perf_counter() - started
    if not episodes:
        _fail(f"no {env.value} {split.value} tasks to play in {root}")
    count = len(episodes)
    result = {
        "env": env.value, "split": split.value, "episodes": len(episodes), "generated": generate,
        "success_rate": sum(e.success for e in episodes) / count,
        "avg_reward": sum(e.reward for e in episodes) / count,
        "avg_steps": sum(e.n_steps for e in episodes) / count,
        "max_steps": max((e.n_steps for e in episodes), default=0),
        "success_by_task_type": success_by(episodes), "seconds": round(seconds, 2),
    }
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


@app.command("ship-teacher")
def ship_teacher(
    params: Path = typer.Option(Path("params.yaml"), help="parameter file of the run that trained the teacher"),
    to: Path = typer.Option(Path("assets/teacher"), help="folder of the shipped teacher (teacher.source of the default)"),
) -> None:
    """Copy the trained and evaluated teacher (models/teacher) to the shipped folder with its model card."""
    from sad.shipping import ship_teacher as ship
    from sad.stages import eval_metrics_file, teacher_dir, tokenizer_dir
    from sad.tokenizer import DOMAIN_VOCAB_FILE

    _setup_logging()
    p = _load_params(params)
    try:
        card = ship(teacher_dir(p), eval_metrics_file(p, "teacher"), p.model_dump(by_alias=True), to,
                    domain_vocab=tokenizer_dir(p) / DOMAIN_VOCAB_FILE)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"shipped the teacher to {to} ({card['parameters']:,} parameters, weights {card['weights_sha256']}); "
               f"set teacher.source: {to} and teacher.finetune: false to use it")


@app.command("ship-heal")
def ship_heal(
    params: Path = typer.Option(Path("params.yaml"), help="parameter file of the run that healed the student (a LoRA heal)"),
    to: Path = typer.Option(Path("assets/student_heal"), help="folder of the shipped heal adapter (distill.heal.source of the default)"),
) -> None:
    """Copy the heal adapter of models/student_init (a LoRA heal, profiles/heal.yaml) to the shipped folder with its card."""
    from sad.shipping import ship_heal as ship
    from sad.stages import student_init_dir

    _setup_logging()
    p = _load_params(params)
    try:
        card = ship(student_init_dir(p), p.model_dump(by_alias=True), to)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"shipped the heal adapter to {to} ({card['adapter_parameters']:,} parameters over the teacher's layers "
               f"{card['layers_from_teacher']}, weights {card['weights_sha256']}); set distill.student_layers: "
               f"{card['layers_from_teacher']}, distill.heal.source: {to} and distill.heal.epochs: 0 to use it")


@app.command("segment-text")
def segment_text(
    path: Path = typer.Argument(..., help="a text file holding one ReAct transcript"),
    markers: MarkerSetName = typer.Option("react", help="marker set: react (Thought:/Action:/Observation:) | "
                                                                     "hotpotqa (Thought N:) | alfworld (> think:)"),
    as_json: bool = typer.Option(False, "--json", help="print the pieces as JSON"),
) -> None:
    """Cut a transcript into prompt / REASON / ACT / observation pieces by the marker rules (a dry run of segmentation).

    Example: sad segment-text transcript.txt --markers hotpotqa"""
    from sad.markers import SegmentationError, split_transcript

    if not path.is_file():
        _fail(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        _fail(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})")
    try:
        pieces = split_transcript(text, markers.value, episode_id=str(path))
    except SegmentationError as exc:
        _fail(str(exc))
    rows = [{"kind": p.kind, "step": p.step, "start": p.start, "end": p.end, "text": text[p.start:p.end]} for p in pieces]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for r in rows:
        typer.echo(f"{r['kind']:>11} step {r['step']:>2}  {r['text'].rstrip()[:100]}")


bench_app = typer.Typer(help="Benchmarks that print JSON (machines are noisy: compare ratios from one run). "
                        "`sad bench` alone runs the WHOLE suite (about 15 min on 2 cores; --quick for a smoke run), "
                        "each performance target met or not; the options below apply to the suite only.")
app.add_typer(bench_app, name="bench")


@bench_app.callback(invoke_without_command=True)
def bench_suite(
    ctx: typer.Context,
    quick: bool = typer.Option(False, "--quick", help="smaller samples, training configurations in one process (a smoke run, for tests)"),
    params: Path = typer.Option(Path("params.yaml"), help="parameter file (sizes; the project's models if present)"),
    output: Path | None = typer.Option(None, "--output", "-o", help="also write the JSON to this file"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (else indented)"),
) -> None:
    """The whole suite: rollout, training/MFU, teacher cache, student vs teacher, pipeline overheads."""
    if ctx.invoked_subcommand is not None:
        return
    from flows.bench import run_suite
    from sad.io import write_text_atomic

    _setup_logging()
    p = _load_params(params)
    result = run_suite(p, Path.cwd(), quick=quick, log=lambda msg: log.info(msg))
    text = json.dumps(result) if as_json else json.dumps(result, indent=2)
    if output:
        write_text_atomic(output, json.dumps(result, indent=2) + "\n")
    typer.echo(text)


@bench_app.command("envs")
def bench_envs(
    env: list[EnvName] = typer.Option(list(EnvName), help="environments to time (repeatable)"),
    n: int = typer.Option(50, help="generated test tasks per environment"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Reset time and env steps/s per environment (engine only, replaying expert actions)."""
    import platform
    import tempfile

    from sad.bench.env import benchmark_env

    _setup_logging()
    out: dict[str, object] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                              "tasks_per_env": n, "envs": {}}
    for name in env:
        with tempfile.TemporaryDirectory(prefix="sad-bench-") as tmp:
            tasks, root = _task_set(name.value, "test", n, Path(tmp), True, Path(tmp))
            out["envs"][name.value] = benchmark_env(tasks, root)  # type: ignore[index]
    typer.echo(json.dumps(out) if as_json else json.dumps(out, indent=2))


@bench_app.command("train")
def bench_train(
    steps: int = typer.Option(12, help="optimizer steps timed per configuration"),
    batch_size: int = typer.Option(4, help="windows per step"),
    max_tokens: int | None = typer.Option(None, help="window length cap (default: context.max_tokens)"),
    params: Path = typer.Option(Path("params.yaml"), help="parameter file (model sizes, vocabulary, top-k)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Training tokens/s for sad, token_kd and sft; top-k cache size and time against online teacher logits."""
    import platform

    from sad.bench.training import benchmark_training

    _setup_logging()
    p = _load_params(params)
    result = benchmark_training(p, steps=steps, batch_size=batch_size, max_tokens=max_tokens,
                                progress=lambda name: log.info("benchmark: %s", name))
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


@bench_app.command("precision")
def bench_precision(
    model: Path = typer.Option(Path("models/pretrained"), help="model folder whose config (not weights) is timed; "
                                                                  "absent: the from-scratch student of params.yaml"),
    layers: int | None = typer.Option(8, help="keep this many layers of that config (the default student keeps 8)"),
    batch_size: int = typer.Option(4, help="windows per step"),
    seq_len: int = typer.Option(512, help="tokens per window"),
    steps: int = typer.Option(4, help="timed steps per precision"),
    params: Path = typer.Option(Path("params.yaml"), help="parameter file"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Training step time in fp32 against CPU bf16 autocast (same model, same batch, alternating)."""
    import platform

    from transformers import AutoConfig, LlamaConfig

    from sad.bench.training import benchmark_precision

    _setup_logging()
    p = _load_params(params)
    if (model / "config.json").is_file():
        config = AutoConfig.from_pretrained(model)
        if layers:
            config.num_hidden_layers = min(layers, config.num_hidden_layers)
    else:
        arch = p.distill.student
        config = LlamaConfig(vocab_size=p.tokenizer.vocab_size, hidden_size=arch.hidden_size, num_hidden_layers=arch.num_layers,
                             num_attention_heads=arch.num_heads, intermediate_size=arch.intermediate_size)
    result = benchmark_precision(config, batch_size, seq_len, steps)
    result["model"] = str(model) if (model / "config.json").is_file() else "distill.student (from scratch)"
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


@bench_app.command("eval")
def bench_eval(
    per_env: int = typer.Option(8, help="generated test tasks per environment"),
    batch_size: int = typer.Option(16, help="episodes in flight in the batched run"),
    max_steps: int = typer.Option(5, help="step cap per episode (keeps the one-at-a-time run short)"),
    model: Path = typer.Option(Path("models/teacher"), help="model folder (an untrained one of the teacher's size if absent)"),
    params: Path = typer.Option(Path("params.yaml"), help="parameter file"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Evaluation episodes/s: batched on the KV cache against one episode at a time (same tasks, same model)."""
    import platform

    from sad.bench.evaluation import benchmark_evaluation

    _setup_logging()
    p = _load_params(params)
    result = benchmark_evaluation(p, model, per_env, batch_size, max_steps)
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


def main() -> None:
    from flows.preload_client import delegate

    code = delegate(sys.argv[1:])  # under `sad pipeline`: run in a child of the preload server
    if code is not None:
        sys.exit(code)
    app()


if __name__ == "__main__":
    main()
