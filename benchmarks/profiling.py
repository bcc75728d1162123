"""
``--profile``: the server's hot spots under cProfile and, when installed,
py-spy, and the readers that summarize what they wrote.
"""

import os
import pstats
import re
import shutil
import signal
from collections.abc import Callable, Generator
from functools import partial
from typing import Any

from twisted.internet import defer

from benchmarks.common import PIDS, REPO, BenchError
from benchmarks.processes import Child
from benchmarks.scenarios import Run, warm_up
from benchmarks.subscriptions import Subscriptions

#: one profiled scenario: fires with what it did and how long it took
Scenario = Callable[[], "defer.Deferred[tuple[str, float]]"]

#: frames that only pass work along (the reactor loop, logging and context
#: wrappers, thread pool hand-offs): left out of the inclusive lists
PLUMBING = ("twisted/python/", "twisted/_threads/", "threading.py", "twisted/internet/base.py",
            "twisted/internet/epollreactor.py", "twisted/internet/posixbase.py",
            "twisted/internet/endpoints.py", "twisted/internet/tcp.py", "twisted/application/",
            "twisted/scripts/", "<string>")

#: leaf frames (function, file) of a thread that waits rather than works
WAITING = {("doPoll", "twisted/internet/epollreactor.py"), ("wait", "threading.py"),
           ("_wait_for_tstate_lock", "threading.py"), ("get", "queue.py")}


def _is_plumbing(function: str) -> bool:
    return any(marker in function for marker in PLUMBING)


def _is_waiting(frame_name: str) -> bool:
    name, _, where = frame_name.partition(" (")
    return (name.rsplit(".", 1)[-1], where.rstrip(")")) in WAITING


def profile_summary(path: str, count: int = 10) -> dict[str, Any]:
    """The top functions of a cProfile dump, by own time and by cumulative time."""
    stats: Any = pstats.Stats(path)  # its .stats and .total_tt are not in the stubs
    rows: list[dict[str, Any]] = []
    for (filename, line, name), (_cc, nc, tt, ct, _callers) in stats.stats.items():
        where = f"{name} ({_short_path(filename)}:{line})" if line else name
        rows.append({"function": where, "calls": nc, "own_s": tt, "cumulative_s": ct})
    idle = [r for r in rows if "'poll' of 'select.epoll'" in r["function"]]
    busy = [r for r in rows if r not in idle]
    by_own = sorted(busy, key=lambda r: r["own_s"], reverse=True)[:count]
    by_cumulative = sorted((r for r in busy if not _is_plumbing(r["function"])),
                           key=lambda r: r["cumulative_s"], reverse=True)[:count]
    return {
        "total_s": stats.total_tt,
        "idle_in_epoll_s": sum(r["own_s"] for r in idle),
        "by_own_time": by_own,
        "by_cumulative_time": by_cumulative,
    }


def _short_path(filename: str) -> str:
    match = re.search(r"/lib/python3\.\d+/(?:site-packages/)?(.*)$", filename)
    if match:
        return match.group(1)
    if filename.startswith(REPO + os.sep):
        return os.path.relpath(filename, REPO)
    return filename


def format_profile(name: str, summary: dict[str, Any]) -> str:
    profiled = summary["total_s"] - summary["idle_in_epoll_s"]
    out = [f"CPROFILE {name}: {summary['what']} in {summary['seconds']:.2f} s; reactor thread "
           f"only, {profiled:.2f} s busy + {summary['idle_in_epoll_s']:.2f} s in epoll"]
    for title, key in (("by own time", "by_own_time"),
                       ("by cumulative time (plumbing left out)", "by_cumulative_time")):
        out.append(f"  {'own s':>7} {'cum s':>7} {'calls':>8}  {title}")
        for r in summary[key]:
            out.append(f"  {r['own_s']:7.3f} {r['cumulative_s']:7.3f} {r['calls']:8d}  "
                       f"{r['function']}")
    return "\n".join(out)


def pyspy_summary(path: str, count: int = 12) -> dict[str, Any]:
    """
    Own and inclusive samples per function of a ``py-spy record --format raw
    --threads`` file, the reactor thread and the other threads apart, waits
    (epoll, idle pool threads) counted apart from work.
    """
    own: dict[tuple[str, str], int] = {}
    inclusive: dict[tuple[str, str], int] = {}
    busy: dict[str, int] = {}
    waiting: dict[str, int] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            samples = int(count_text)
            thread, *frames = stack.split(";")
            group = "reactor" if thread.endswith("MainThread") else "other threads"
            names = [_frame_name(frame) for frame in frames] or ["(no Python frame)"]
            if _is_waiting(names[-1]):
                waiting[group] = waiting.get(group, 0) + samples
                continue
            busy[group] = busy.get(group, 0) + samples
            key = (group, names[-1])
            own[key] = own.get(key, 0) + samples
            for name in set(names):
                if not _is_plumbing(name):
                    key = (group, name)
                    inclusive[key] = inclusive.get(key, 0) + samples
    total = sum(busy.values())

    def top(table: dict[tuple[str, str], int]) -> list[dict[str, Any]]:
        rows = sorted(table.items(), key=lambda item: item[1], reverse=True)
        return [{"thread": group, "function": name, "samples": n,
                 "share": n / total if total else 0.0} for (group, name), n in rows[:count]]

    return {
        "samples": total,
        "threads": busy,
        "waiting": waiting,
        "by_own_samples": top(own),
        "by_inclusive_samples": top(inclusive),
    }


def _frame_name(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({_short_path(where)})" if where else name


def format_pyspy(name: str, summary: dict[str, Any]) -> str:
    busy = ", ".join(f"{group} {n}" for group, n in summary["threads"].items())
    waiting = ", ".join(f"{group} {n}" for group, n in summary["waiting"].items()) or "none"
    out = [f"PY-SPY {name}: {summary['what']} in {summary['seconds']:.2f} s; unprofiled server, "
           f"the thread holding the GIL sampled: {summary['samples']} samples ({busy}); "
           f"waiting: {waiting}"]
    for title, key in (("by own samples", "by_own_samples"),
                       ("by inclusive samples (plumbing left out)", "by_inclusive_samples")):
        out.append(f"  {'share':>6}  {'thread':<13}  {title}")
        for r in summary[key]:
            out.append(f"  {r['share']:6.1%}  {r['thread']:<13}  {r['function']}")
    return "\n".join(out)


def _profiled_scenarios(run: Run) -> list[tuple[str, Scenario]]:
    sizes = run.sizes

    @defer.inlineCallbacks
    def fetch_1() -> Generator["defer.Deferred[Any]", Any, tuple[str, float]]:
        rows, seconds, _, _ = yield run.fetch(
            [({"$limit": sizes.fetch_1_rows}, sizes.fetch_1_rows)])
        return f"{rows:,} rows", seconds

    @defer.inlineCallbacks
    def fetch_100() -> Generator["defer.Deferred[Any]", Any, tuple[str, float]]:
        rows, seconds, _, _ = yield run.fetch(
            [({"$where": {"pid": f"p{i % PIDS}"}, "$limit": sizes.rows_per_stream},
              sizes.rows_per_stream) for i in range(sizes.streams)])
        return f"{rows:,} rows", seconds

    @defer.inlineCallbacks
    def persist_1() -> Generator["defer.Deferred[Any]", Any, tuple[str, float]]:
        result = yield run.persist(1, sizes.duration)
        return f"{result['per_s'] * sizes.duration:,.0f} persists", sizes.duration

    @defer.inlineCallbacks
    def persist_50() -> Generator["defer.Deferred[Any]", Any, tuple[str, float]]:
        result = yield run.persist(50, sizes.duration)
        return f"{result['per_s'] * sizes.duration:,.0f} persists", sizes.duration

    @defer.inlineCallbacks
    def persist_v2_50() -> Generator["defer.Deferred[Any]", Any, tuple[str, float]]:
        result = yield run.persist(50, sizes.duration, "v2")
        return f"{result['per_s'] * sizes.duration:,.0f} persists", sizes.duration

    @defer.inlineCallbacks
    def windowed_v2() -> Generator["defer.Deferred[Any]", Any, tuple[str, float]]:
        rows, seconds, _, _ = yield run.fetch(
            [({"$limit": sizes.rows}, sizes.rows)], window=sizes.window,
            accept_batch=max(1, sizes.window // 2), version=2)
        return f"{rows:,} rows", seconds

    @defer.inlineCallbacks
    def catch_up() -> Generator["defer.Deferred[Any]", Any, tuple[str, float]]:
        result = yield Subscriptions(run).catch_up(sizes.rows, sizes.window)
        return f"{sizes.rows:,} rows", sizes.rows / result["rows_per_s"]

    return [
        ("per-row fetch, 1 stream", fetch_1),
        (f"per-row fetch, {sizes.streams} streams", fetch_100),
        ("persist, 1 in flight", persist_1),
        ("persist, 50 in flight", persist_50),
        ("version 2 persist, 50 in flight", persist_v2_50),
        (f"windowed fetch (window {sizes.window}), version 2", windowed_v2),
        ("subscription catch-up, the same rows", catch_up),
    ]


def _summary(summarize: Callable[[str], dict[str, Any]], path: str, missing: str,
             **extra: Any) -> dict[str, Any]:
    """What ``summarize`` reads from ``path``, with ``extra``; ``missing`` if it is not there."""
    if not os.path.exists(path):
        raise BenchError(missing)
    summary = summarize(path)
    summary.update(extra)
    return summary


@defer.inlineCallbacks
def run_profiles(run: Run, log: Callable[[str], None]
                 ) -> Generator["defer.Deferred[Any]", Any, dict[str, Any]]:
    """
    The per-row fetch on 1 stream, on 100 streams, and persist with 50 in
    flight, each against a fresh server under cProfile (the reactor thread
    only, slowed by cProfile itself), then, when ``py-spy`` is installed,
    against an unprofiled one that py-spy samples (every thread).
    """
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        log("profile: py-spy is not installed (pip install py-spy): cProfile only")
    results: dict[str, dict[str, Any]] = {"cprofile": {}, "py-spy": {}}
    for index, (name, scenario) in enumerate(_profiled_scenarios(run)):
        log(f"profile: {name}, cProfile")
        path = os.path.join(run.workdir, f"cprofile-{index}.prof")
        yield run.start_server(profile=path)
        try:
            yield warm_up(run)
            what, seconds = yield scenario()
        finally:
            yield run.stop_server()
        results["cprofile"][name] = _summary(
            profile_summary, path, f"the profiled server wrote no {path}",
            what=what, seconds=seconds, stats_file=path)
        if pyspy is None:
            continue
        log(f"profile: {name}, py-spy")
        path = os.path.join(run.workdir, f"py-spy-{index}.txt")
        yield run.start_server()
        yield warm_up(run)
        # --gil: only the thread holding the GIL, i.e. where the Python time goes
        spy = Child(run.reactor, "py-spy",
                    [pyspy, "record", "--pid", str(run.server_pid), "--rate", "400", "--gil",
                     "--format", "raw", "--threads", "--nonblocking", "--output", path],
                    os.path.join(run.workdir, f"py-spy-{index}.log"))
        try:
            spy.start()
            yield spy.wait_for(partial(spy.log_has, "Sampling process"), "sampling", timeout=20)
            what, seconds = yield scenario()
        finally:
            yield spy.stop(how=signal.SIGINT)
            yield run.stop_server()
        results["py-spy"][name] = _summary(
            pyspy_summary, path, f"py-spy wrote no {path}:\n{spy.log_tail()}",
            what=what, seconds=seconds, samples_file=path)
    return results
