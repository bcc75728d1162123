"""
``--metrics-ab``: what serving and scraping the metrics costs, in pairs.

Each round measures the throughput scenarios twice back to back, on a fresh
server without ``--http-port`` and on one with it scraped every
``--scrape-interval`` seconds (which goes first alternates from round to
round), and takes each figure's ratio with / without *within the round*.
A machine whose speed drifts over minutes (other work on its two cores)
moves both halves of a round alike, so the rounds' ratios scatter far less
than figures compared across whole repetitions; the median ratio and its
spread are reported.

The counting behind the metrics (a few integer additions and a ``bisect``
per request) is always on: it is part of both halves, and its own cost is
measured in the reactor thread (docs/OPERATIONS.md, "What the metrics cost").
"""

import statistics
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer

from benchmarks.common import PIDS
from benchmarks.scenarios import Run, warm_up

#: the throughput figures a round compares (higher is better), and the
#: server's CPU per unit of work (lower is better)
THROUGHPUT = ("fetch_1_stream_rows_per_s", "fetch_100_streams_rows_per_s",
              "fetch_window_100_rows_per_s", "persist_1_per_s", "persist_50_per_s")
CPU = ("fetch_1_stream_server_cpu_us_per_row", "fetch_100_streams_server_cpu_us_per_row",
       "fetch_window_100_server_cpu_us_per_row", "persist_50_server_cpu_us")


@defer.inlineCallbacks
def half(run: Run, metrics_on: bool, log: Callable[[str], None]
         ) -> Generator["defer.Deferred[Any]", Any, dict[str, float]]:
    """The scenarios of one half of a round, on a fresh server."""
    sizes = run.sizes
    run.metrics_on = metrics_on
    yield run.stop_server()
    yield run.start_server()
    yield warm_up(run)
    yield run.persist(1, 0.2)
    log(f"  metrics {'on' if metrics_on else 'off'}")
    figures: dict[str, float] = {}
    rows, seconds, cpu, _ = yield run.fetch([({"$limit": sizes.fetch_1_rows}, sizes.fetch_1_rows)])
    figures["fetch_1_stream_rows_per_s"] = rows / seconds
    figures["fetch_1_stream_server_cpu_us_per_row"] = cpu / rows * 1e6
    selects = [({"$where": {"pid": f"p{i % PIDS}"}, "$limit": sizes.rows_per_stream},
                sizes.rows_per_stream) for i in range(sizes.streams)]
    rows, seconds, cpu, _ = yield run.fetch(selects)
    figures["fetch_100_streams_rows_per_s"] = rows / seconds
    figures["fetch_100_streams_server_cpu_us_per_row"] = cpu / rows * 1e6
    rows, seconds, cpu, _ = yield run.fetch(
        [({"$limit": sizes.rows}, sizes.rows)], window=sizes.window,
        accept_batch=max(1, sizes.window // 2))
    figures["fetch_window_100_rows_per_s"] = rows / seconds
    figures["fetch_window_100_server_cpu_us_per_row"] = cpu / rows * 1e6
    for in_flight in (1, 50):
        result = yield run.persist(in_flight, sizes.duration)
        figures[f"persist_{in_flight}_per_s"] = result["per_s"]
        if in_flight == 50:
            figures["persist_50_server_cpu_us"] = result["server_cpu_us"]
    return figures


@defer.inlineCallbacks
def rounds(run: Run, count: int, log: Callable[[str], None]
           ) -> Generator["defer.Deferred[Any]", Any, list[dict[str, dict[str, float]]]]:
    """``count`` rounds: each ``{"off": figures, "on": figures}``."""
    results = []
    for index in range(count):
        log(f"metrics A/B round {index + 1} of {count}")
        order = [False, True] if index % 2 == 0 else [True, False]
        pair: dict[str, dict[str, float]] = {}
        for metrics_on in order:
            pair["on" if metrics_on else "off"] = yield half(run, metrics_on, log)
        results.append(pair)
    yield run.stop_server()
    return results


def summarize(pairs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Each figure's ratio with / without, round by round: the median and the runs."""
    summary: dict[str, dict[str, Any]] = {}
    for key in THROUGHPUT + CPU:
        runs = [pair["on"][key] / pair["off"][key] for pair in pairs
                if pair["off"].get(key) and key in pair["on"]]
        if runs:
            summary[key] = {"ratio": statistics.median(runs), "runs": runs,
                            "without": statistics.median(p["off"][key] for p in pairs),
                            "with": statistics.median(p["on"][key] for p in pairs)}
    return summary


def format_summary(summary: dict[str, dict[str, Any]]) -> list[str]:
    """One line a figure: the median ratio and every round's."""
    lines = []
    for key, figure in summary.items():
        runs = ", ".join(f"{r:.3f}" for r in figure["runs"])
        kind = "throughput" if key in THROUGHPUT else "server CPU"
        lines.append(f"  {key} ({kind}): with / without {figure['ratio']:.3f} (rounds: {runs})")
    return lines
