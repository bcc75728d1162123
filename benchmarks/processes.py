"""The benchmark's child processes (server, echo, private Redis, py-spy) and ``/proc`` readers."""

import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from benchmarks.common import REPO, BenchError

_PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None
try:  # looked up here: the child, between fork and exec, only calls it
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent() -> None:
    """In a child: receive SIGTERM when the benchmark dies, whatever kills it."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = REPO + (os.pathsep + path if path else "")
    return env


class Child:
    """A process of the benchmark's own, output to a log file, ended by its pid."""

    def __init__(self, reactor: IReactorTime, name: str, argv: list[str], log_path: str) -> None:
        self.reactor = reactor
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=_child_env(), cwd=os.path.dirname(self.log_path),
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    @defer.inlineCallbacks
    def wait_for(self, check: Callable[[], Any], what: str, timeout: float = 60.0
                 ) -> Generator["defer.Deferred[Any]", Any, None]:
        """Fire once ``check()`` (or the Deferred it returns) is true; fail if the child exits."""
        assert self.process is not None, "not started"
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise BenchError(f"{self.name} exited ({self.process.returncode}) before {what}:\n"
                                 + self.log_tail())
            ok = yield defer.maybeDeferred(check)
            if ok:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no {what} after {timeout:.0f} s:\n" + self.log_tail())
            yield task.deferLater(self.reactor, 0.05, lambda: None)

    def log_has(self, text: str) -> bool:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return text in f.read()
        except OSError:
            return False

    @defer.inlineCallbacks
    def stop(self, timeout: float = 30.0, how: int = signal.SIGTERM
             ) -> Generator["defer.Deferred[Any]", Any, None]:
        """Signal the child, wait for it to exit, kill it after ``timeout`` seconds."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(how)
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            yield task.deferLater(self.reactor, 0.05, lambda: None)
        if process.poll() is None:
            process.kill()
            process.wait()


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of every thread of ``pid``, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICK


def proc_status(pid: int) -> tuple[int, int]:
    """``VmRSS`` (kB) and ``Threads`` from ``/proc/<pid>/status``."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                values[key] = int(value.split()[0])
    return values["VmRSS"], values["Threads"]


def proc_tcp_connections(pid: int, remote_port: int) -> list[int]:
    """Local ports of the established TCP connections of ``pid`` to ``remote_port``."""
    inodes: set[str] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports: list[int] = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, remote, state, inode = parts[1], parts[2], parts[3], parts[9]
                    if (inode in inodes and state == "01"
                            and int(remote.rsplit(":", 1)[1], 16) == remote_port):
                        ports.append(int(local.rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports
