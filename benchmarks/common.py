"""What every part of the benchmark shares: its sizes, MariaDB settings, errors."""

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pymysql
from twisted.internet import defer, task, threads
from twisted.python.failure import Failure

#: the checkout this benchmark lives in (it runs the server from it)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: the rows every fetch scenario selects from: ``pid`` is ``p0``..``p99``
PIDS = 100

#: what the client publishes to accept one row, and the echo's row stand-in
ROW_LIKE_BODY = (
    '{"id":123456,"timestamp":"2024-05-01T12:34:56.789Z","pid":"p42","domain":"bench",'
    '"name":"filled","data":"{\\"i\\": 123456, \\"user\\": \\"u-123456\\", \\"amount\\": 12.5}"}'
)

class BenchError(Exception):
    """The benchmark could not measure what it set out to."""


# -- sizes and settings ------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How much every scenario does: small with ``--quick``."""

    rows: int  # rows in the events table before the run; the windowed fetch reads them all
    fetch_1_rows: int  # rows of the per-row fetch on 1 stream
    rows_per_stream: int  # rows of each of the 100 streams
    streams: int  # concurrent streams of the per-row fetch
    pairs: int  # concurrent ping-pong pairs
    window: int
    duration: float  # seconds of each time-bound scenario (ping-pong, INSERT, persist)
    first_row_samples: int
    idle_streams: int
    repeat: int
    #: seconds of each live subscription scenario (and of its baseline without subscriptions)
    live_duration: float = 2.0
    #: subscriptions held open and idle (as many as the idle streams)
    idle_subscriptions: int = 1000

    @classmethod
    def from_options(cls, options: argparse.Namespace) -> "Sizes":
        quick = options.quick
        rows = options.rows or (2000 if quick else 100000)
        rows = max(rows, PIDS)
        return cls(
            rows=rows,
            fetch_1_rows=min(rows, 300 if quick else 10000),
            rows_per_stream=max(1, min(rows // PIDS, 10 if quick else 200)),
            streams=100,
            pairs=100,
            window=100,
            duration=0.3 if quick else 2.0,
            first_row_samples=5 if quick else 20,
            idle_streams=options.idle_streams or (200 if quick else 1000),
            repeat=options.repeat or (1 if quick else 5),
            live_duration=0.3 if quick else 2.0,
            idle_subscriptions=options.idle_streams or (200 if quick else 1000),
        )


def mysql_settings() -> dict[str, Any]:
    """PyMySQL connection arguments from ``MYSQL_*`` (as the server reads them)."""
    return dict(
        host=os.environ.get("MYSQL_HOST") or "127.0.0.1",
        port=int(os.environ.get("MYSQL_PORT") or 3306),
        user=os.environ.get("MYSQL_USER") or "root",
        password=os.environ.get("MYSQL_PASS") or "",
        charset="utf8mb4",
    )


def connect_mysql(settings: dict[str, Any], **extra: Any) -> pymysql.Connection:
    """An autocommit PyMySQL connection."""
    return pymysql.connect(autocommit=True, **settings, **extra)


_T = TypeVar("_T")


def in_thread(reactor: Any, function: Callable[..., _T], *args: Any
              ) -> "defer.Deferred[_T]":
    """Run blocking ``function`` in ``reactor``'s thread pool (not the global reactor's)."""
    d: defer.Deferred[_T] = threads.deferToThreadPool(
        reactor, reactor.getThreadPool(), function, *args)
    return d


def percentile(values: list[float], fraction: float) -> float:
    """The value at ``fraction`` (0..1) of the sorted ``values``; NaN if there are none."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def run_benchmark(benchmark: Callable[[Any, argparse.Namespace, Callable[[str], None]],
                                      "defer.Deferred[Any]"],
                  options: argparse.Namespace) -> tuple[Any, float] | None:
    """
    Run ``benchmark(reactor, options, log)`` on a reactor of its own (the
    command's whole run), ``log`` writing each line to standard error with
    the seconds since the start: ``(its result, seconds)``, or None once
    the failure is printed.
    """
    started = time.monotonic()

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    outcome: dict[str, Any] = {}

    @defer.inlineCallbacks
    def go(reactor: Any) -> Any:
        try:
            outcome["result"] = yield benchmark(reactor, options, log)
        except BenchError as error:
            outcome["error"] = str(error)
        except Exception:
            outcome["error"] = Failure().getTraceback()  # type: ignore[no-untyped-call]

    try:
        task.react(go)
    except SystemExit:
        pass
    if "result" not in outcome:
        print(f"benchmark failed: {outcome.get('error', 'the reactor stopped')}", file=sys.stderr)
        return None
    return outcome["result"], time.monotonic() - started
