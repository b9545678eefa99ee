"""Atomic file and folder writes: a killed stage never leaves a half-written artifact."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class MissingEntryError(KeyError):
    """An entry the user's input should hold is not there (a task's question in its file, a product's
    instruction); the message names the file and the entry. A plain ``KeyError`` is a bug, not bad input."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# Errors that mean the user's input (a file, a record, a parameter) is wrong, not the code: the project's
# own (ConfigError, SchemaViolation, SegmentationError, StaleCacheError, UnsafePathError, ExpertBelowFloor,
# ModelUnavailable, MissingEntryError) subclass these and name what is wrong. The CLI prints them in one line
# (exit 2); the orchestrator never retries them.
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, MissingEntryError, FileNotFoundError)

# Errors of the code itself, not of its input nor of the machine (a plain KeyError or TypeError is a bug): they
# fail the same way on every retry. The CLI shows their traceback and exits 3; the orchestrator never retries them.
# (An ImportError is left out: a package missing from the environment is no bug of the code.)
BUG_ERRORS: tuple[type[BaseException], ...] = (TypeError, KeyError, AttributeError, NameError, IndexError,
                                               AssertionError, NotImplementedError)


def failure_exit_code(exc: BaseException) -> int:
    """A failed command's exit status: 2 for bad input (fix the input), 3 for a bug (report it), 1 otherwise
    (a crash a rerun may pass: a full disk, a dropped connection, memory)."""
    if isinstance(exc, BAD_INPUT_ERRORS):
        return 2
    return 3 if isinstance(exc, BUG_ERRORS) else 1


def _tmp_prefix(path: Path) -> str:
    """Temp siblings are named ``.<name>.tmp-<pid>-<random>``: a writer killed with SIGKILL (no
    cleanup runs) leaves one behind, and the next writer of ``path`` recognises and removes it."""
    return f".{path.name}.tmp-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temps(path: Path) -> list[Path]:
    """Remove temp siblings of ``path`` left by writers that died (SIGKILL, power loss); returns them."""
    removed = []
    if not path.parent.is_dir():
        return removed
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = leftover.name[len(f".{path.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path)
    fd, name = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _keep_mode(tmp: Path, path: Path) -> None:
    """mkstemp files are 0600: give the result the old file's mode, or the umask default."""
    if path.exists():
        os.chmod(tmp, path.stat().st_mode & 0o777)
    else:
        os.chmod(tmp, 0o666 & ~_umask())


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        _keep_mode(tmp, path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    path = Path(path)
    tmp = _tmp_sibling(path)
    n = 0
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        _keep_mode(tmp, path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def read_jsonl_numbered(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-blank line of a JSON-lines file; a bad line raises ValueError
    naming the file and line."""
    path = Path(path)
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file of objects; a bad line raises ValueError naming the file and line."""
    return [row for _, row in read_jsonl_numbered(path)]


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():  # a writer died between its two renames: the old version is whole
        os.replace(old, path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
    _keep_mode(tmp, path) if path.exists() else os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
