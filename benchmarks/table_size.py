"""
``python3 -m benchmarks.table_size``: do the server's figures stay flat as
the log grows? (issue 15, "Flat as the log grows")

One events table is grown from the smallest size to the next (10,000 and
1,000,000 events by default; 10,000,000 only when asked with ``--sizes``),
filled by MariaDB itself (``INSERT ... SELECT`` from a ``seq_`` table, the
rows the main benchmark fills: ``pid`` ``p0``..``p99``, each stream's
versions in order).  At each size, every repetition starts a fresh server
and measures, with the main benchmark's client and scenarios:

- time to first row (a fetch by ``pid``, one at a time, median);
- per-row fetch, 1 stream (the main benchmark's, from the table's start);
- windowed fetch (window 100) of a fixed number of rows from the table's
  start and from that many rows before its end, so that neither figure
  scales with the table;
- a stream read by ``pid`` from a version (version 2, window 100): the
  last rows of a stream (``{"pid": ..., "version": {"$gte": k}}``), for
  several streams one after the other;
- one subscription's catch-up from a fixed number of rows before the end;
- persist with 50 in flight (version 1), last (its rows are deleted
  afterwards, so the table keeps its size);
- the server's RSS after them all.

The smallest table is also kept as it is, in a database of its own: each
repetition at a larger size is a pair, a fresh server on the smallest table
and one on the larger, back to back (which goes first alternates), so a
machine whose speed drifts moves both alike.  Each figure's ratio to the
smallest table's within its pair is the verdict's ground: within 10 % (rates
at least 0.9 of it, time to first row and RSS at most 1.1 of it) passes.
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer, task

from benchmarks.common import PIDS, Sizes, connect_mysql, in_thread, run_benchmark
from benchmarks.main import _drop_database, _start_own_redis
from benchmarks.processes import Child, proc_status
from benchmarks.redis_client import RedisClient
from benchmarks.report import machine_info
from benchmarks.scenarios import Run, warm_up
from benchmarks.subscriptions import Subscriptions
from eventsource.query import TableSchema, compile_select

#: the default sizes, and the largest, only when asked
DEFAULT_SIZES = (10_000, 1_000_000)
LARGEST = 10_000_000

#: rows each windowed fetch and the catch-up read, at most (never more than the smallest table)
READ_ROWS = 20_000
#: rows each stream read reads (the last of a stream), at most, and how many streams are read
STREAM_ROWS = 100
STREAM_READS = 20
#: rows inserted by one statement of the fill
FILL_CHUNK = 100_000

#: the figures: key, label, unit, True when higher is better
FIGURES: tuple[tuple[str, str, str, bool], ...] = (
    ("persist_50_per_s", "persist, 50 in flight (v1)", "/s", True),
    ("first_row_ms", "time to first row (median)", "ms", False),
    ("fetch_1_stream_rows_per_s", "per-row fetch, 1 stream", "rows/s", True),
    ("fetch_window_start_rows_per_s", "windowed fetch (100), table's start", "rows/s", True),
    ("fetch_window_end_rows_per_s", "windowed fetch (100), table's end", "rows/s", True),
    ("stream_read_rows_per_s", "stream read by pid from a version (v2)", "rows/s", True),
    ("catch_up_rows_per_s", "subscription catch-up, near the end", "rows/s", True),
    ("rss_kb", "server RSS after the scenarios", "kB", False),
)

#: how far from the smallest table's figure a figure may be
TOLERANCE = 0.10


# -- the table -----------------------------------------------------------------


def fill(run: Run, start: int, stop: int) -> None:
    """Append the rows ``start`` .. ``stop - 1`` of the fill (as the main benchmark's)."""
    connection = connect_mysql(run.mysql)
    try:
        with connection.cursor() as cursor:
            for low in range(start, stop, FILL_CHUNK):
                high = min(stop, low + FILL_CHUNK) - 1
                cursor.execute(
                    f"INSERT INTO {run.table} (`pid`, `domain`, `name`, `data`, `version`,"
                    f" `event_id`) SELECT CONCAT('p', seq MOD {PIDS}), 'bench', 'filled',"
                    " CONCAT('{\"i\": ', seq, ', \"user\": \"u-', seq, '\", \"amount\": 12.5}'),"
                    f" seq DIV {PIDS}, UNHEX(REPLACE(UUID(), '-', '')) FROM `{run.database}`.seq_{low}_to_{high}")
    finally:
        connection.close()


def _query(run: Run, sql: str, params: Any = None) -> Any:
    connection = connect_mysql(run.mysql)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()
    finally:
        connection.close()


def position_before_last(run: Run, rows: int) -> int:
    """The position after which the table holds exactly its last ``rows`` rows."""
    found = _query(run, f"SELECT `id` FROM {run.table} ORDER BY `id` DESC LIMIT 1 OFFSET {rows}")
    return int(found[0][0]) if found else 0


def delete_persisted(run: Run) -> None:
    """Delete the rows the persist scenario appended (its pids are ``w0``, ``w1``...)."""
    _query(run, f"DELETE FROM {run.table} WHERE `pid` IN ("
                + ", ".join(f"'w{i}'" for i in range(50)) + ")")


def explain(run: Run, select: dict[str, Any], version: int, after: int | None = None,
            page: int = 100, stream_reads: bool = True) -> list[list[str]]:
    """
    EXPLAIN of the first keyset page the server reads for ``select`` (its own
    SQL); ``stream_reads`` False: as a subscription's history is read.
    """
    table = (TableSchema.version2 if version == 2 else TableSchema)(run.database, "event")
    if not stream_reads:
        table = dataclasses.replace(table, stream_reads=False)
    plan = compile_select(select, table)
    high_water = 2 ** 62
    sql, params = plan.page_sql(plan.keyset_start if after is None else after, high_water, page)
    return [[str(value) for value in row] for row in _query(run, "EXPLAIN " + sql, params)]


# -- one size --------------------------------------------------------------------


@defer.inlineCallbacks
def measure(run: Run, size: int, read_rows: int, stream_rows: int,
            log: Callable[[str], None]) -> Generator["defer.Deferred[Any]", Any, dict[str, float]]:
    """Every figure once, on the running server, for a table of ``size`` filled rows."""
    sizes = run.sizes
    figures: dict[str, float] = {}
    window, batch = sizes.window, max(1, sizes.window // 2)

    log("time to first row")
    figures["first_row_ms"] = yield run.first_row(sizes.first_row_samples)

    log("per-row fetch, 1 stream")
    rows, seconds, _, _ = yield run.fetch([({"$limit": sizes.fetch_1_rows}, sizes.fetch_1_rows)])
    figures["fetch_1_stream_rows_per_s"] = rows / seconds

    log(f"windowed fetch (window {window}), {read_rows:,} rows from the start")
    rows, seconds, _, _ = yield run.fetch([({"$limit": read_rows}, read_rows)],
                                          window=window, accept_batch=batch)
    figures["fetch_window_start_rows_per_s"] = rows / seconds

    after = yield in_thread(run.reactor, position_before_last, run, read_rows)
    log(f"windowed fetch (window {window}), the last {read_rows:,} rows")
    rows, seconds, _, _ = yield run.fetch(
        [({"$where": {"id": {"$gt": after}}, "$limit": read_rows}, read_rows)],
        window=window, accept_batch=batch)
    figures["fetch_window_end_rows_per_s"] = rows / seconds

    per_stream = size // PIDS
    log(f"stream reads: the last {stream_rows} events of {STREAM_READS} streams (v2)")
    total_rows, total_seconds = 0, 0.0
    for i in range(STREAM_READS):
        select = {"$where": {"pid": f"p{i % PIDS}", "version": {"$gte": per_stream - stream_rows}}}
        rows, seconds, _, _ = yield run.fetch([(select, stream_rows)], window=window,
                                              accept_batch=batch, version=2)
        total_rows += rows
        total_seconds += seconds
    figures["stream_read_rows_per_s"] = total_rows / total_seconds

    after = yield in_thread(run.reactor, position_before_last, run, read_rows)
    log(f"subscription catch-up from {read_rows:,} rows before the end")
    result = yield Subscriptions(run).catch_up(read_rows, window, after=after)
    figures["catch_up_rows_per_s"] = result["rows_per_s"]

    log("persist, 50 in flight")
    result = yield run.persist(50, sizes.duration)
    figures["persist_50_per_s"] = result["per_s"]
    yield in_thread(run.reactor, delete_persisted, run)

    yield task.deferLater(run.reactor, 0.3, lambda: None)
    figures["rss_kb"], _ = proc_status(run.server_pid)
    return figures


# -- the verdict (pure) --------------------------------------------------------------


def summarize(smallest: int, pairs: dict[int, list[tuple[dict[str, float], dict[str, float]]]]
              ) -> dict[str, Any]:
    """
    ``pairs``: for each larger size, its repetitions, each a pair of the
    smallest table's figures and the larger table's, measured back to back.
    Each figure's median per size (the smallest's over all its pairs), its
    ratio to the smallest table's within each pair (and their median), and
    the verdict of the median ratio.
    """
    result: dict[str, Any] = {}
    for key, _label, _unit, higher in FIGURES:
        row: dict[str, Any] = {"medians": {}, "ratios": {}, "verdicts": {}}
        row["medians"][smallest] = statistics.median(
            small[key] for size in sorted(pairs) for small, _ in pairs[size])
        for size in sorted(pairs):
            row["medians"][size] = statistics.median(large[key] for _, large in pairs[size])
            runs = [large[key] / small[key] for small, large in pairs[size]]
            ratio = statistics.median(runs)
            row["ratios"][size] = {"median": ratio, "runs": runs}
            row["verdicts"][size] = verdict(ratio, higher)
        result[key] = row
    return result


def verdict(ratio: float, higher_is_better: bool) -> str:
    """PASS when ``ratio`` (large table / small table) is within :data:`TOLERANCE`."""
    ok = ratio >= 1 - TOLERANCE if higher_is_better else ratio <= 1 + TOLERANCE
    return "PASS" if ok else "FAIL"


def format_table(summary: dict[str, Any]) -> str:
    """Each figure's medians by size, and each larger size's ratio (repetitions) and verdict."""
    sizes = sorted(next(iter(summary.values()))["medians"]) if summary else []
    header = ["figure"] + [f"{size:,}" for size in sizes] + [
        f"ratio {size:,} (runs)" for size in sizes[1:]] + [
        f"verdict {size:,}" for size in sizes[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for key, label, unit, _ in FIGURES:
        row = summary[key]
        cells = [f"{label} ({unit})"]
        cells += [_number(row["medians"][size]) for size in sizes]
        for size in sizes[1:]:
            ratio = row["ratios"][size]
            runs = ", ".join(f"{r:.2f}" for r in ratio["runs"])
            cells.append(f"{ratio['median']:.2f} ({runs})")
        cells += [row["verdicts"][size] for size in sizes[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


# -- the run -----------------------------------------------------------------------


@defer.inlineCallbacks
def benchmark(reactor: Any, options: argparse.Namespace, log: Callable[[str], None]
              ) -> Generator["defer.Deferred[Any]", Any, dict[str, Any]]:
    table_sizes: list[int] = options.sizes
    smallest = table_sizes[0]
    sizes = Sizes.from_options(argparse.Namespace(quick=options.quick, rows=smallest,
                                                  idle_streams=None, repeat=options.repeat))
    run = Run(reactor, options, sizes)
    read_rows = min(READ_ROWS, smallest)
    stream_rows = max(1, min(STREAM_ROWS, smallest // PIDS))
    # the smallest table stays as it is, in a database of its own: each
    # larger table's repetition is paired with one on it, back to back
    small_db, large_db = run.database + "_small", run.database
    children: list[Child] = []
    pairs: dict[int, list[tuple[dict[str, float], dict[str, float]]]] = {}
    fills: dict[int, float] = {}
    plans: dict[int, dict[str, list[list[str]]]] = {}
    created: list[str] = []
    mariadb_version = "unknown"

    @defer.inlineCallbacks
    def fresh_server(database: str, size: int, log: Callable[[str], None]
                     ) -> Generator["defer.Deferred[Any]", Any, dict[str, float]]:
        use_database(run, database)
        yield run.stop_server()
        yield run.start_server()
        yield warm_up(run)
        figures: dict[str, float] = yield measure(run, size, read_rows, stream_rows, log)
        return figures

    try:
        if options.own_redis:
            children.append((yield _start_own_redis(run)))
            run.redis_host = "127.0.0.1"
        log(f"Redis {run.redis_host}:{run.redis_port}, MariaDB {run.mysql['host']}:"
            f"{run.mysql['port']}, databases {small_db} and {large_db}")
        run.client = yield RedisClient().connect(reactor, run.redis_host, run.redis_port)
        mariadb_version = (yield in_thread(reactor, _query, run, "SELECT VERSION()"))[0][0]
        filled = 0
        for database, stop in ((small_db, smallest), (large_db, smallest)):
            use_database(run, database)
            created.append(database)
            yield run.start_server()  # (it makes the table)
            yield run.stop_server()
            log(f"filling {stop:,} rows in {database}")
            started = time.monotonic()
            yield in_thread(reactor, fill, run, 0, stop)
            fills[smallest] = time.monotonic() - started
        plans[smallest] = yield in_thread(reactor, _plans, run, smallest, read_rows, stream_rows)
        filled = smallest
        for size in table_sizes[1:]:
            use_database(run, large_db)
            log(f"filling {filled:,} -> {size:,} rows")
            started = time.monotonic()
            yield in_thread(reactor, fill, run, filled, size)
            yield in_thread(reactor, _query, run, f"ANALYZE TABLE {run.table}")
            fills[size] = time.monotonic() - started
            log(f"  filled in {fills[size]:.1f} s")
            filled = size
            plans[size] = yield in_thread(reactor, _plans, run, size, read_rows, stream_rows)
            pairs[size] = []
            for index in range(sizes.repeat):
                # (which goes first alternates)
                order = [(small_db, smallest), (large_db, size)]
                if index % 2:
                    order.reverse()
                measured: dict[int, dict[str, float]] = {}
                for database, rows in order:
                    log(f"{size:,} rows, repetition {index + 1} of {sizes.repeat}: "
                        f"a fresh server on the {rows:,}-row table")
                    measured[rows] = yield fresh_server(database, rows,
                                                        lambda what: log(f"  {what}"))
                pairs[size].append((measured[smallest], measured[size]))
        yield run.stop_server()
    finally:
        if run.client is not None:
            yield run.client.disconnect()
        yield run.stop_server()
        for child in reversed(children):
            yield child.stop()
        if not options.keep_database:
            for database in created:
                use_database(run, database)
                yield in_thread(reactor, _drop_database, run)
    return {
        "machine": machine_info("unknown", mariadb_version),
        "databases": [small_db, large_db],
        "sizes": table_sizes,
        "repeat": sizes.repeat,
        "read_rows": read_rows,
        "stream_rows": stream_rows,
        "fill_seconds": fills,
        "plans": plans,
        "summary": summarize(smallest, pairs),
        "repetitions": {size: [{"small": small, "large": large} for small, large in reps]
                        for size, reps in pairs.items()},
    }


def use_database(run: Run, database: str) -> None:
    """Point ``run`` (and the servers it starts next) at ``database``'s events table."""
    run.database = database
    run.table = f"`{database}`.`event`"


def _plans(run: Run, size: int, read_rows: int, stream_rows: int) -> dict[str, list[list[str]]]:
    """EXPLAIN of the first page of the reads whose cost could grow with the table."""
    after = position_before_last(run, read_rows)
    return {
        "first_row": explain(run, {"$where": {"pid": "p1"}}, 1),
        "window_end": explain(run, {"$where": {"id": {"$gt": after}}}, 1, after=after),
        "stream_read": explain(run, {"$where": {"pid": "p1", "version": {
            "$gte": size // PIDS - stream_rows}}}, 2),
        "catch_up": explain(run, {}, 2, after=after, stream_reads=False),
    }


def parse_sizes(text: str) -> list[int]:
    """``"10000,1000000"``: at least two sizes, each at least 100, increasing."""
    values = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    if len(values) < 2:
        raise argparse.ArgumentTypeError("give at least two sizes")
    if min(values) < PIDS or values != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"sizes must increase, each at least {PIDS}")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.table_size",
                                     description=__doc__.strip().splitlines()[0])
    parser.add_argument("--sizes", type=parse_sizes,
                        default=list(DEFAULT_SIZES), metavar="N,N,...",
                        help="table sizes, increasing (default 10000,1000000; add 10000000 "
                             "for the largest)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="pairs (smallest, this size) at each larger size, each on a fresh "
                             "server (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="the scenarios' small sizes (CI: proves it runs, not how fast)")
    parser.add_argument("--own-redis", action="store_true",
                        help="start a private redis-server on a free port")
    parser.add_argument("--database", default=None, help="the benchmark's database")
    parser.add_argument("--keep-database", action="store_true", help="do not drop it at the end")
    parser.add_argument("--json", default="bench-table-size.json", metavar="PATH",
                        help="where the results go (default bench-table-size.json)")
    options = parser.parse_args(argv)
    if options.repeat is None:
        options.repeat = 1
    if options.repeat < 1:
        parser.error("--repeat must be at least 1")
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    ran = run_benchmark(benchmark, options)
    if ran is None:
        return 1
    result, seconds = ran
    result["seconds"] = seconds
    with open(options.json, "w") as f:
        json.dump(result, f, indent=2)
    print(format_table(result["summary"]))
    fills = ", ".join(f"{size:,} in {seconds:.0f} s" for size, seconds in
                      result["fill_seconds"].items())
    print(f"\nfilled {fills}; results written to {options.json} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
