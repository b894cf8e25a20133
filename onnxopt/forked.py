"""Run a function, or the whole CLI, in a forked child process: a crash there (an abort or a segfault inside
ONNX Runtime) or a hang costs that one call, not the caller.

A forked child starts with everything the parent has imported, so a call costs milliseconds, where a fresh
interpreter pays 2-5 s of imports. The price is what fork does not copy: only the calling thread survives, so
the parent must not hold ONNX Runtime sessions or thread pools of its own when it forks (ORT's and
OpenBLAS's pools do not survive fork; their locks may be held by a thread that is not there in the child).
Importing onnxruntime and numpy is fine (they start no work at import); creating sessions is not: every
session goes into a child.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ChildResult", "call_forked", "run_cli", "run_cli_forked", "exit_description", "can_fork"]

def can_fork() -> bool:
    """fork exists here (Linux, macOS), not on Windows."""
    return hasattr(os, "fork")


def exit_description(code: int | None) -> str:
    """``exit code 3`` or ``SIGSEGV`` for a child's exit code as :func:`os.waitstatus_to_exitcode` gives it."""
    if code is None or code >= 0:
        return f"exit code {code}"
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


@dataclass(frozen=True)
class ChildResult:
    """What came back from a forked call: its value, the one-line exception it raised, or how the child died."""

    value: Any = None
    error: str | None = None  # the call raised: "TypeError: ..."
    died: str | None = None  # the child did not come back: "SIGABRT", "exit code 1", "timed out after 5 s"
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.died is None


def _wait(pid: int, deadline: float | None) -> int | None:
    """The child's exit code (negative: killed by that signal), or None when the deadline passed (child killed)."""
    if deadline is None:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None
            if pidfd is not None:
                select.select([pidfd], [], [], remaining)
            else:
                time.sleep(min(remaining, 0.01))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def call_forked(fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> ChildResult:
    """``fn(*args)`` in a forked child; its (picklable) return value comes back through a pipe."""
    start = time.perf_counter()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 0
        try:
            os.close(read_end)
            try:
                payload: tuple[str, Any] = ("ok", fn(*args))
            except BaseException as err:  # noqa: BLE001 - everything the call raises goes back as one line
                payload = ("error", f"{type(err).__name__}: {' '.join(str(err).split())[:300]}")
            try:
                data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as err:  # noqa: BLE001
                data = pickle.dumps(("error", f"the result cannot be sent back: {err}"))
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(data)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = None if timeout is None else time.monotonic() + timeout
    chunks = []
    timed_out = False
    try:
        while True:  # read while the child writes: a large result must not fill the pipe and block it
            if deadline is not None:
                ready, _, _ = select.select([read_end], [], [], max(deadline - time.monotonic(), 0))
                if not ready:
                    timed_out = True
                    break
            chunk = os.read(read_end, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        code = _wait(pid, time.monotonic() if timed_out else deadline)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): the child goes too
        _kill(pid)
        raise
    finally:
        os.close(read_end)
    seconds = time.perf_counter() - start
    if code is None:
        return ChildResult(died=f"timed out after {timeout:.0f} s", seconds=seconds)
    if code != 0 or not chunks:
        return ChildResult(died=exit_description(code), seconds=seconds)
    try:
        status, value = pickle.loads(b"".join(chunks))
    except Exception as err:  # noqa: BLE001 - a child that died half-way through writing
        return ChildResult(died=f"sent back an unreadable result ({type(err).__name__})", seconds=seconds)
    if status != "ok":
        return ChildResult(error=value, seconds=seconds)
    return ChildResult(value=value, seconds=seconds)


def _cli_exit_code(argv: Sequence[str], command: Any) -> int:
    """The exit code ``onnxopt ARGV`` gives, run in this process (what the interpreter would make of it)."""
    try:
        command.main(args=list(argv), prog_name="onnxopt")  # standalone: click turns its own errors into exits
        return 0
    except SystemExit as stop:
        if stop.code is None:
            return 0
        if isinstance(stop.code, int):
            return stop.code
        print(stop.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 - an uncaught exception: the interpreter's traceback and exit code 1
        traceback.print_exc()
        return 1


def run_cli(argv: Sequence[str], stdout: Path, stderr: Path, command: Any) -> int:
    """``onnxopt ARGV`` in this process (``command``: the click group, ``onnxopt.cli.cli``; passed in because this
    module sits below the CLI, which reaches it through validation's probe), its stdout/stderr (file descriptors 1 and 2 too) sent to those files for
    good: for a forked child only. Returns the exit code the console script would give. Python warnings are
    ignored, like ``PYTHONWARNINGS=ignore``."""
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    # the parent's sys.stdout/stderr may be a test runner's capture: write to the files instead
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    signal.signal(signal.SIGINT, signal.default_int_handler)
    warnings.simplefilter("ignore")
    try:
        return _cli_exit_code(argv, command)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass


def run_cli_forked(argv: Sequence[str], stdout: Path, stderr: Path, command: Any,
                   timeout: float | None = None) -> tuple[int | None, float]:
    """``onnxopt ARGV`` in a forked child (:func:`run_cli`): (exit code, seconds).

    The exit code is what the console script would give; negative when a signal killed the child (``-6``:
    an abort), None when it ran out of time and was killed.
    """
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = run_cli(argv, stdout, stderr, command)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code & 0xFF)
    try:
        code = _wait(pid, None if timeout is None else time.monotonic() + timeout)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): the child goes too
        _kill(pid)
        raise
    return code, time.perf_counter() - start
