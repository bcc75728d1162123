"""The benchmark's targets, the summary of its repetitions and the table it prints."""

import os
import platform
import statistics
from typing import Any

from benchmarks.common import Sizes

#: (what, ratio or figure key, comparison, threshold: a number or a name of the server's pool)
TARGETS: tuple[tuple[str, str, str, float | str], ...] = (
    ("per-row fetch, 1 stream >= 0.9 x ping-pong 1 pair",
     "fetch_1_stream_vs_pingpong_1_pair", ">=", 0.9),
    ("per-row fetch, 100 streams >= 0.5 x ping-pong 100 pairs",
     "fetch_100_streams_vs_pingpong_100_pairs", ">=", 0.5),
    ("windowed fetch (100), 1 stream >= 10 x per-row fetch, 1 stream",
     "fetch_window_100_vs_fetch_1_stream", ">=", 10.0),
    ("persist, 50 in flight >= 1.0 x raw INSERT, 8 connections",
     "persist_50_vs_insert_8_connections", ">=", 1.0),
    ("v2 persist, 50 in flight, expected versions >= 0.9 x without",
     "persist_v2_expected_50_vs_persist_v2_50", ">=", 0.9),
    ("idle streams: no thread per stream", "idle_threads_added", "<=", "pool_size"),
    ("idle streams: no connection per stream", "idle_server_connections", "<=", "pool_size+2"),
    ("idle streams: <= 30 KB RSS each", "idle_rss_kb_per_stream", "<=", 30.0),
    ("subscription catch-up >= 1.0 x windowed fetch (100), version 2 rows",
     "subscribe_catch_up_vs_fetch_v2_window_100", ">=", 1.0),
    ("live p99 <= 100 ms, 1,000 subscriptions, ~1,000 events/s", "live_1000_p99_ms", "<=",
     100.0),
)


#: each ratio: (key, figure, the figure it is divided by)
RATIOS = (
    ("fetch_1_stream_vs_pingpong_1_pair", "fetch_1_stream_rows_per_s", "pingpong_1_pair_rt_per_s"),
    ("fetch_100_streams_vs_pingpong_100_pairs", "fetch_100_streams_rows_per_s",
     "pingpong_100_pairs_rt_per_s"),
    ("fetch_window_100_vs_fetch_1_stream", "fetch_window_100_rows_per_s",
     "fetch_1_stream_rows_per_s"),
    ("fetch_window_100_vs_select", "fetch_window_100_rows_per_s", "select_rows_per_s"),
    ("persist_50_vs_insert_8_connections", "persist_50_per_s", "insert_8_connections_per_s"),
    ("persist_1_vs_insert_1_connection", "persist_1_per_s", "insert_1_connection_per_s"),
    ("persist_1_vs_its_floor", "persist_1_per_s", "persist_1_floor_per_s"),
    ("persist_v2_expected_50_vs_persist_v2_50", "persist_v2_expected_50_per_s",
     "persist_v2_50_per_s"),
    ("persist_v2_50_vs_persist_50", "persist_v2_50_per_s", "persist_50_per_s"),
    ("subscribe_catch_up_vs_fetch_window_100", "subscribe_catch_up_rows_per_s",
     "fetch_window_100_rows_per_s"),
    ("subscribe_catch_up_vs_fetch_v2_window_100", "subscribe_catch_up_rows_per_s",
     "fetch_v2_window_100_rows_per_s"),
)


def ratios(f: dict[str, float]) -> dict[str, float]:
    """The ratios of :data:`RATIOS`, within one repetition."""
    if "persist_1_floor_per_s" not in f:
        f["persist_1_floor_per_s"] = persist_1_floor(f)
    return {key: f[figure] / f[floor] for key, figure, floor in RATIOS}


def persist_1_floor(f: dict[str, float]) -> float:
    """
    The most persists a second one client could get with 1 in flight if the
    server took no time at all: each is a Redis round trip (a ping-pong of
    one pair: client to server and back, through Redis) plus the database's
    append transaction (the append lock, the row, the commit), one after the
    other.
    """
    return 1 / (1 / f["pingpong_1_pair_rt_per_s"] + 1 / f["append_txn_1_connection_per_s"])


#: (key, label, unit, format, how several repetitions combine)
ROWS: list[tuple[str, str | None, str | None, str | None, str | None]] = [
    ("floors", None, None, None, None),
    ("pingpong_1_pair_rt_per_s", "Redis ping-pong, 1 pair", "round trips/s", "{:,.0f}", "median"),
    ("pingpong_100_pairs_rt_per_s", "Redis ping-pong, 100 pairs", "round trips/s", "{:,.0f}",
     "median"),
    ("insert_1_connection_per_s", "raw INSERT, 1 connection", "rows/s", "{:,.0f}", "median"),
    ("insert_8_connections_per_s", "raw INSERT, 8 connections", "rows/s", "{:,.0f}", "median"),
    ("append_txn_1_connection_per_s", "raw append transaction (lock, INSERT, COMMIT), 1 conn",
     "txn/s", "{:,.0f}", "median"),
    ("persist_1_floor_per_s", "persist 1 in flight floor (ping-pong + append transaction)",
     "persists/s", "{:,.0f}", "median"),
    ("select_rows_per_s", "raw SELECT", "rows/s", "{:,.0f}", "median"),
    ("server", None, None, None, None),
    ("persist_1_per_s", "persist, 1 in flight", "persists/s", "{:,.0f}", "median"),
    ("persist_1_p50_ms", "  latency p50", "ms", "{:.2f}", "median"),
    ("persist_1_p99_ms", "  latency p99", "ms", "{:.2f}", "median"),
    ("persist_1_server_cpu_us", "  server CPU per persist", "us", "{:.0f}", "median"),
    ("persist_50_per_s", "persist, 50 in flight", "persists/s", "{:,.0f}", "median"),
    ("persist_50_p50_ms", "  latency p50", "ms", "{:.2f}", "median"),
    ("persist_50_p99_ms", "  latency p99", "ms", "{:.2f}", "median"),
    ("persist_50_server_cpu_us", "  server CPU per persist", "us", "{:.0f}", "median"),
    ("persist_50_client_cpu_us", "  client CPU per persist", "us", "{:.0f}", "median"),
    ("persist_v2_50_per_s", "v2 persist, 50 in flight, a stream each", "persists/s", "{:,.0f}",
     "median"),
    ("persist_v2_50_p50_ms", "  latency p50", "ms", "{:.2f}", "median"),
    ("persist_v2_50_p99_ms", "  latency p99", "ms", "{:.2f}", "median"),
    ("persist_v2_50_server_cpu_us", "  server CPU per persist", "us", "{:.0f}", "median"),
    ("persist_v2_expected_50_per_s", "  the same, each with an expected version", "persists/s",
     "{:,.0f}", "median"),
    ("persist_v2_expected_50_p50_ms", "  latency p50", "ms", "{:.2f}", "median"),
    ("persist_v2_expected_50_p99_ms", "  latency p99", "ms", "{:.2f}", "median"),
    ("persist_v2_expected_50_server_cpu_us", "  server CPU per persist", "us", "{:.0f}",
     "median"),
    ("fetch_1_stream_rows_per_s", "fetch, per-row acceptance, 1 stream", "rows/s", "{:,.0f}",
     "median"),
    ("fetch_1_stream_server_cpu_us_per_row", "  server CPU per row", "us", "{:.1f}", "median"),
    ("fetch_1_stream_client_cpu_us_per_row", "  client CPU per row", "us", "{:.1f}", "median"),
    ("fetch_100_streams_rows_per_s", "fetch, per-row acceptance, 100 streams", "rows/s",
     "{:,.0f}", "median"),
    ("fetch_100_streams_server_cpu_us_per_row", "  server CPU per row", "us", "{:.1f}", "median"),
    ("fetch_100_streams_client_cpu_us_per_row", "  client CPU per row", "us", "{:.1f}", "median"),
    ("fetch_window_100_rows_per_s", "fetch, window 100, 1 stream", "rows/s", "{:,.0f}", "median"),
    ("fetch_window_100_server_cpu_us_per_row", "  server CPU per row", "us", "{:.1f}", "median"),
    ("fetch_window_100_client_cpu_us_per_row", "  client CPU per row", "us", "{:.1f}", "median"),
    ("fetch_v2_window_100_rows_per_s", "fetch, window 100, 1 stream, version 2", "rows/s",
     "{:,.0f}", "median"),
    ("fetch_v2_window_100_server_cpu_us_per_row", "  server CPU per row", "us", "{:.1f}",
     "median"),
    ("first_row_ms", "time to first row", "ms", "{:.2f}", "median"),
    ("idle_rss_kb_per_stream", "idle streams: RSS per stream", "KB", "{:.1f}", "max"),
    ("idle_rss_open_kb", "  server RSS, streams open", "KB", "{:,.0f}", "max"),
    ("idle_threads_open", "  server threads, streams open", "threads", "{:.0f}", "max"),
    ("idle_threads_added", "  threads added", "threads", "{:.0f}", "max"),
    ("idle_mysql_connections", "  server MySQL connections", "connections", "{:.0f}", "max"),
    ("idle_mysql_processlist", "  of them in PROCESSLIST", "connections", "{:.0f}", "max"),
    ("idle_redis_connections", "  server Redis connections", "connections", "{:.0f}", "max"),
    ("subscriptions", None, None, None, None),
    ("subscribe_catch_up_rows_per_s", "catch-up from the start (window 100)", "rows/s",
     "{:,.0f}", "median"),
    ("subscribe_catch_up_server_cpu_us_per_row", "  server CPU per row", "us", "{:.1f}",
     "median"),
    ("live_1_append_per_s", "append load (single-event persists)", "events/s", "{:,.0f}",
     "median"),
    ("live_1_p50_ms", "live, 1 subscription: latency p50", "ms", "{:.1f}", "median"),
    ("live_1_p99_ms", "  latency p99", "ms", "{:.1f}", "median"),
    ("live_1_server_cpu_us_per_event", "  server CPU per delivered event", "us", "{:.0f}",
     "median"),
    ("live_100_p50_ms", "live, 100 subscriptions: latency p50", "ms", "{:.1f}", "median"),
    ("live_100_p99_ms", "  latency p99", "ms", "{:.1f}", "median"),
    ("live_100_server_cpu_us_per_event", "  server CPU per delivered event", "us", "{:.0f}",
     "median"),
    ("live_1000_p50_ms", "live, 1,000 subscriptions: latency p50", "ms", "{:.1f}", "median"),
    ("live_1000_p99_ms", "  latency p99", "ms", "{:.1f}", "median"),
    ("live_1000_server_cpu_us_per_event", "  server CPU per delivered event", "us", "{:.0f}",
     "median"),
    ("idle_subscription_rss_kb", "idle subscriptions: RSS per subscription", "KB", "{:.1f}",
     "max"),
    ("ratios", None, None, None, None),
    ("fetch_1_stream_vs_pingpong_1_pair", "fetch 1 stream / ping-pong 1 pair", "x", "{:.2f}",
     "median"),
    ("fetch_100_streams_vs_pingpong_100_pairs", "fetch 100 streams / ping-pong 100 pairs", "x",
     "{:.2f}", "median"),
    ("fetch_window_100_vs_fetch_1_stream", "windowed fetch / per-row fetch, 1 stream", "x",
     "{:.1f}", "median"),
    ("fetch_window_100_vs_select", "windowed fetch / raw SELECT", "x", "{:.2f}", "median"),
    ("persist_50_vs_insert_8_connections", "persist 50 in flight / raw INSERT 8 conns", "x",
     "{:.2f}", "median"),
    ("persist_1_vs_insert_1_connection", "persist 1 in flight / raw INSERT 1 conn", "x",
     "{:.2f}", "median"),
    ("persist_1_vs_its_floor", "persist 1 in flight / its floor", "x", "{:.2f}", "median"),
    ("persist_v2_expected_50_vs_persist_v2_50", "v2 persist 50: expected versions / without",
     "x", "{:.2f}", "median"),
    ("persist_v2_50_vs_persist_50", "v2 persist 50 / version 1 persist 50", "x", "{:.2f}",
     "median"),
    ("subscribe_catch_up_vs_fetch_window_100", "subscription catch-up / windowed fetch", "x",
     "{:.2f}", "median"),
    ("subscribe_catch_up_vs_fetch_v2_window_100",
     "subscription catch-up / windowed fetch, v2", "x", "{:.2f}", "median"),
]


def combine(runs: list[float], how: str) -> float:
    return max(runs) if how == "max" else statistics.median(runs)


def summarize(reps: list[dict[str, float]], pool_size: int
              ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Figures and ratios as ``{key: {"value", "runs", "unit"}}``, and the targets."""
    summary: dict[str, dict[str, Any]] = {}
    for key, _, unit, _, how in ROWS:
        if unit is None:
            continue
        runs = [rep[key] for rep in reps]
        summary[key] = {"value": combine(runs, how or "median"), "runs": runs, "unit": unit, "combined": how}
    summary["idle_server_connections"] = {
        "value": max(rep["idle_mysql_connections"] + rep["idle_redis_connections"] for rep in reps),
        "runs": [rep["idle_mysql_connections"] + rep["idle_redis_connections"] for rep in reps],
        "unit": "connections", "combined": "max",
    }
    thresholds = {"pool_size": pool_size, "pool_size+2": pool_size + 2}
    targets: list[dict[str, Any]] = []
    for name, key, op, threshold in TARGETS:
        limit = thresholds.get(threshold, threshold) if isinstance(threshold, str) else threshold
        value = summary[key]["value"]
        ok = value >= limit if op == ">=" else value <= limit
        targets.append({"target": name, "key": key, "value": value, "op": op,
                        "threshold": limit, "pass": ok})
    return summary, targets


def format_table(summary: dict[str, dict[str, Any]], targets: list[dict[str, Any]],
                 machine: dict[str, Any], sizes: Sizes, repeats: int) -> str:
    """The table ``make bench`` prints: every figure, its runs, and the targets."""
    out = []
    out.append(f"eventsource benchmark: {machine['arch']}, {machine['cpu']}, "
               f"{machine['cores']} cores; Python {machine['python']}, Redis {machine['redis']}, "
               f"MariaDB {machine['mariadb']}")
    out.append(f"{repeats} repetition(s); medians (RSS, threads, connections: worst); "
               f"table {sizes.rows:,} rows, per-row fetch {sizes.fetch_1_rows:,} rows, "
               f"{sizes.streams} streams x {sizes.rows_per_stream} rows, "
               f"{sizes.idle_streams} idle streams, {sizes.duration:g} s timed scenarios")
    width = 44
    for key, label, unit, fmt, _how in ROWS:
        if unit is None or fmt is None:
            out.append("")
            out.append(f"{key.upper():<{width}} {'value':>14}  {'unit':<14} runs")
            continue
        item = summary[key]
        runs = ", ".join(fmt.format(v) for v in item["runs"]) if len(item["runs"]) > 1 else ""
        out.append(f"{label:<{width}} {fmt.format(item['value']):>14}  {unit:<14} {runs}")
    out.append("")
    out.append("TARGETS")
    for t in targets:
        value = t["value"]
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        out.append(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']:<66} "
                   f"{shown} {t['op']} {t['threshold']:g}")
    return "\n".join(out)


def machine_info(redis_version: str, mariadb_version: str) -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "arch": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "redis": redis_version,
        "mariadb": mariadb_version,
        "uname": " ".join(platform.uname()),
    }
