"""``python3 -m benchmarks``: the command, and one whole run of the benchmark."""

import argparse
import json
import os
import shutil
import socket
import sys
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer

from benchmarks.common import PIDS, BenchError, Sizes, connect_mysql, in_thread, run_benchmark
from benchmarks import metrics_ab
from benchmarks.floors import pingpong
from benchmarks.processes import Child, free_port
from benchmarks.profiling import format_profile, format_pyspy, run_profiles
from benchmarks.redis_client import RedisClient, ignore
from benchmarks.report import format_table, machine_info, summarize
from benchmarks.scenarios import Run, repetition, warm_up
from eventsource import schema
from eventsource.ids import uuid7


def _prepare_database(run: Run) -> str:
    """Fill the events table (the server made it) and make the INSERT floor's table."""
    connection = connect_mysql(run.mysql)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE TABLE {run.floor_table} LIKE {run.table}")
            for statement in schema.append_lock_statements(run.database, "floor_event"):
                cursor.execute(statement)
            sql = (f"INSERT INTO {run.table} (`pid`, `domain`, `name`, `data`, `version`,"
                   " `event_id`) VALUES (%s, %s, %s, %s, %s, %s)")
            batch: list[tuple[str, str, str, str, int, bytes]] = []
            for i in range(run.sizes.rows):
                batch.append((f"p{i % PIDS}", "bench", "filled",
                              json.dumps({"i": i, "user": f"u-{i}", "amount": 12.5}),
                              i // PIDS, uuid7()))
                if len(batch) == 5000:
                    cursor.executemany(sql, batch)
                    batch = []
            if batch:
                cursor.executemany(sql, batch)
            cursor.execute("SELECT VERSION()")
            row = cursor.fetchone()
            version: str = row[0] if row else "unknown"
            return version
    finally:
        connection.close()


def _drop_database(run: Run) -> None:
    connection = connect_mysql(run.mysql)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{run.database}`")
    finally:
        connection.close()


@defer.inlineCallbacks
def _start_own_redis(run: Run) -> Generator["defer.Deferred[Any]", Any, Child]:
    port = free_port()
    redis = Child(run.reactor, "redis-server",
                  [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1",
                   "--port", str(port), "--save", "", "--appendonly", "no"],
                  os.path.join(run.workdir, "redis.log"))
    redis.start()
    run.redis_port = port

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    yield redis.wait_for(answers, "answer to PING", timeout=20)
    return redis


@defer.inlineCallbacks
def benchmark(reactor: Any, options: argparse.Namespace, log: Callable[[str], None]
              ) -> Generator["defer.Deferred[Any]", Any, tuple[dict[str, Any], str]]:
    """Every repetition, then the profiles if asked: the results and the table."""
    sizes = Sizes.from_options(options)
    run = Run(reactor, options, sizes)
    children: list[Child] = []
    created_database = False
    try:
        if options.own_redis:
            redis = yield _start_own_redis(run)
            children.append(redis)
            run.redis_host = "127.0.0.1"
        log(f"Redis {run.redis_host}:{run.redis_port}, MariaDB {run.mysql['host']}:"
            f"{run.mysql['port']}, database {run.database}, work files in {run.workdir}")
        run.client = yield RedisClient().connect(reactor, run.redis_host, run.redis_port)
        config = run.server_config()
        if config.request_channels != run.request_channels:
            raise BenchError(f"the server would listen on {config.request_channels}, "
                             f"not on {run.request_channels}")
        numsub = yield run.client.command("PUBSUB", "NUMSUB", *run.request_channels.values())
        listening = max(int(n) for n in numsub[1::2])
        if listening:
            raise BenchError(
                f"{listening} other client(s) already listen on {run.channel_prefix}persist, "
                "fetch or fetch-next: they would answer the benchmark's requests too.")
        info = yield run.client.command("INFO", "server")
        redis_version = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                              if line.startswith("redis_version:")), "unknown")
        pool_size = config.pool_size

        log("starting the server")
        created_database = True
        yield run.start_server()
        log(f"filling {sizes.rows:,} rows")
        mariadb_version = yield in_thread(reactor, _prepare_database, run)

        log("starting the echo process")
        echo = Child(reactor, "echo",
                     [sys.executable, "-m", "benchmarks.echo", run.prefix, str(sizes.pairs),
                      f"{run.redis_host}:{run.redis_port}"],
                     os.path.join(run.workdir, "echo.log"))
        echo.start()
        children.append(echo)
        yield echo.wait_for(lambda: echo.log_has("echo ready"), "\"echo ready\"")
        yield run.client.listen_all({f"{run.prefix}:pong:{i}": ignore
                                     for i in range(sizes.pairs)})

        yield pingpong(reactor, run.client, run.prefix, 1, 0.2)  # warms the echo up

        reps = []
        ab = None
        if options.metrics_ab:
            # (two servers at once, in interleaved slices, instead of the
            # repetitions: benchmarks.metrics_ab)
            ab = yield metrics_ab.measure(
                run, options.slices or (4 if options.quick else 60),
                options.slice_seconds or (0.2 if options.quick else 0.5), log)
        for index in range(0 if options.profile_only or options.metrics_ab else sizes.repeat):
            log(f"repetition {index + 1} of {sizes.repeat}: a fresh server, warmed up"
                + (f", metrics {'on' if run.metrics_on else 'off'}" if run.http_port else ""))
            # Every repetition starts from a fresh server, so that the RSS of
            # its idle streams is not hidden by memory the last one freed.
            yield run.stop_server()
            yield run.start_server()
            yield warm_up(run)
            yield run.persist(1, 0.2)
            figures = yield repetition(run, lambda what: log(f"  {what}"))
            figures["metrics_on"] = 1.0 if run.metrics_on else 0.0
            reps.append(figures)

        yield run.stop_server()
        if run.http_port is not None:
            log(f"scraped /metrics {run.scrapes['ok']} times, every {run.scrape_interval:g} s "
                f"({run.scrapes['failed']} failed)")
            if ab is not None:
                for line in metrics_ab.format_summary(ab["summary"]):
                    log(line)
        profiles = None
        if options.profile or options.profile_only:
            try:
                profiles = yield run_profiles(run, log)
            except BenchError as error:
                log(f"profiling failed: {error}")
                profiles = {"error": str(error)}
    finally:
        if run.client is not None:
            yield run.client.disconnect()
        yield run.stop_server()
        for child in reversed(children):
            yield child.stop()
        if created_database and not options.keep_database:
            yield in_thread(reactor, _drop_database, run)
        if not os.listdir(run.workdir):
            os.rmdir(run.workdir)

    machine = machine_info(redis_version, mariadb_version)
    summary, targets = summarize(reps, pool_size) if reps else ({}, [])
    result = {
        "machine": machine,
        "sizes": sizes.__dict__,
        "repeat": sizes.repeat,
        "quick": options.quick,
        "database": run.database,
        "server": {"argv": "twistd -n eventsource " + " ".join(run.server_args()),
                   "pool_size": pool_size},
        "metrics": ({"scrape_interval": run.scrape_interval, **run.scrapes, "ab": ab}
                    if run.http_port is not None else None),
        "figures": summary,
        "targets": targets,
        "repetitions": reps,
        "profiles": profiles,
        "work_dir": run.workdir if profiles else None,
    }
    if not profiles:  # on failure it stays, with the logs of the server and the echo
        shutil.rmtree(run.workdir, ignore_errors=True)
    table = format_table(summary, targets, machine, sizes, sizes.repeat) if reps else ""
    return result, table


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks",
        description="Benchmark the eventsource server against floors measured in the same run.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, 1 repetition (CI: proves it runs, not how fast)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="repetitions of every scenario (default 5; 1 with --quick)")
    parser.add_argument("--rows", type=int, default=None,
                        help="rows in the events table (default 100000; 2000 with --quick)")
    parser.add_argument("--idle-streams", type=int, default=None,
                        help="streams held open and idle (default 1000; 200 with --quick)")
    parser.add_argument("--json", default="bench-results.json", metavar="PATH",
                        help="where to write the results (default bench-results.json)")
    parser.add_argument("--profile", action="store_true",
                        help="then profile the 1- and 100-stream fetch with cProfile")
    parser.add_argument("--profile-only", action="store_true",
                        help="only the profiles, none of the measurements")
    parser.add_argument("--own-redis", action="store_true",
                        help="start a private redis-server on a free port instead of using "
                             "REDIS_HOST/REDIS_PORT (127.0.0.1:6379)")
    parser.add_argument("--database", default=None,
                        help="the benchmark's database (default eventsource_bench_<pid>_<random>;"
                             " dropped at the end)")
    parser.add_argument("--keep-database", action="store_true", help="do not drop it at the end")
    parser.add_argument("--metrics", action="store_true",
                        help="serve the server's metrics (--http-port) and scrape /metrics "
                             "throughout, to measure what they cost")
    parser.add_argument("--metrics-ab", action="store_true",
                        help="instead of the repetitions: two servers at once on the same "
                             "table, one without and one with --metrics (scraped only during "
                             "its own slices), and --slices short slices of each throughput "
                             "scenario on each, alternating off, on, on, off, ...: each "
                             "figure's ratio on / off of the totals, with its spread")
    parser.add_argument("--slices", type=int, default=None, metavar="N",
                        help="with --metrics-ab: slices of each scenario on each server "
                             "(default 60; 4 with --quick)")
    parser.add_argument("--slice-seconds", type=float, default=None, metavar="SECONDS",
                        help="with --metrics-ab: about how long a slice runs (default 0.5; "
                             "0.2 with --quick)")
    parser.add_argument("--scrape-interval", type=float, default=1.0, metavar="SECONDS",
                        help="with --metrics or --metrics-ab: seconds between scrapes "
                             "(default 1)")
    options = parser.parse_args(argv)
    if options.scrape_interval <= 0:
        parser.error("--scrape-interval must be greater than 0")
    if options.slice_seconds is not None and options.slice_seconds <= 0:
        parser.error("--slice-seconds must be greater than 0")
    for name in ("repeat", "rows", "idle_streams", "slices"):
        value = getattr(options, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return options


def main(argv: list[str] | None = None) -> int:
    """``python3 -m benchmarks``: run, print the table, write the JSON; 1 if it failed."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    ran = run_benchmark(benchmark, options)
    if ran is None:
        return 1
    (result, table), seconds = ran
    result["seconds"] = seconds
    with open(options.json, "w") as f:
        json.dump(result, f, indent=2)
    if table:
        print(table)
    profiles = result["profiles"] or {}
    for name, summary in profiles.get("cprofile", {}).items():
        print()
        print(format_profile(name, summary))
    for name, summary in profiles.get("py-spy", {}).items():
        print()
        print(format_pyspy(name, summary))
    if profiles.get("error"):
        print(f"\nprofiling failed: {profiles['error']}")
    elif profiles:
        print(f"\nprofiles (cProfile stats, py-spy samples) kept in {result['work_dir']}")
    print()
    print(f"results written to {options.json} ({result['seconds']:.0f} s)")
    return 0
