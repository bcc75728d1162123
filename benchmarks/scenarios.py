"""
The server's scenarios: a ``twistd eventsource`` process of its own, driven
over the wire by the benchmark's own client (persist, per-row and windowed
fetch, time to first row, idle streams), and one repetition of everything.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from benchmarks.common import (
    PIDS,
    BenchError,
    Sizes,
    connect_mysql,
    in_thread,
    mysql_settings,
    percentile,
)
from benchmarks.floors import pingpong, raw_inserts, raw_select
from benchmarks.processes import (
    Child,
    free_port,
    proc_cpu_seconds,
    proc_status,
    proc_tcp_connections,
)
from benchmarks.redis_client import Handler, RedisClient
from benchmarks.report import ratios
from benchmarks.subscriptions import Subscriptions, subscription_figures
from eventsource import schema
from eventsource.config import Config
from eventsource.tap import Options

#: how a lane publishes
Publish = Callable[[str, str], object]


class Run:
    """What one benchmark run shares: names, the client, the server process."""

    def __init__(self, reactor: Any, options: argparse.Namespace, sizes: Sizes) -> None:
        self.reactor = reactor
        self.options = options
        self.sizes = sizes
        self.tag = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.database = options.database or f"eventsource_bench_{self.tag}"
        self.table = f"`{self.database}`.`event`"
        self.floor_table = f"`{self.database}`.`floor_event`"
        #: the floor table's append lock (the append transaction floor takes it)
        self.floor_lock = schema.qualified(self.database, schema.append_lock_name("floor_event"))
        self.mysql = mysql_settings()
        self.redis_host = os.environ.get("REDIS_HOST") or "127.0.0.1"
        self.redis_port = int(os.environ.get("REDIS_PORT") or 6379)
        self.prefix = f"bench_{self.tag}"
        # The server's request channels get a prefix of their own: other
        # servers on the same Redis neither answer nor see our requests.
        self.channel_prefix = ""
        self.request_channels: dict[str, str] = {}
        self.set_channel_prefix(f"{self.prefix}:")
        self._channels = 0
        self.client: RedisClient = None  # type: ignore[assignment]  # set once connected
        self.server: Child | None = None
        self._servers_started = 0
        self.repetitions = 0
        self.workdir = tempfile.mkdtemp(prefix="eventsource-bench-")
        #: --metrics (--metrics-ab): the server's HTTP port, given it while
        #: metrics_on and then scraped every scrape_interval seconds
        #: (--metrics-ab scrapes it itself: benchmarks.metrics_ab)
        metrics, ab = getattr(options, "metrics", False), getattr(options, "metrics_ab", False)
        self.http_port = free_port() if metrics or ab else None
        self.metrics_on: bool = bool(metrics)
        self.scrape_interval: float = getattr(options, "scrape_interval", 1.0)
        self._scraper: task.LoopingCall | None = None
        #: scrapes of /metrics that answered, and those that did not
        self.scrapes = {"ok": 0, "failed": 0, "bytes": 0}

    def set_channel_prefix(self, prefix: str) -> None:
        """The ``--channel-prefix`` of the server started next, and the one requests go to."""
        self.channel_prefix = prefix
        self.request_channels = {kind: prefix + kind
                                 for kind in ("persist", "fetch", "fetch-next", "subscribe")}

    def channel(self, kind: str) -> str:
        self._channels += 1
        return f"{self.prefix}:{kind}:{self._channels}"

    @property
    def server_pid(self) -> int:
        assert self.server is not None, "no server running"
        return self.server.pid

    def server_args(self) -> list[str]:
        args = ["--table", f"{self.database}.event",
                "--channel-prefix", self.channel_prefix,
                # idle streams wait longer than the default 5 s for their client
                "--row-timeout", "300",
                "--redis-host", self.redis_host, "--redis-port", str(self.redis_port),
                "--mysql-host", self.mysql["host"], "--mysql-port", str(self.mysql["port"]),
                "--mysql-user", self.mysql["user"]]
        if self.mysql["password"]:
            args += ["--mysql-password", self.mysql["password"]]
        if self.http_port is not None and self.metrics_on:
            args += ["--http-port", str(self.http_port)]
        return args

    def server_config(self) -> Config:
        """The server's configuration, parsed as ``twistd eventsource`` will parse it."""
        options = Options()
        options.parseOptions(self.server_args())  # type: ignore[no-untyped-call]
        return options.config

    @defer.inlineCallbacks
    def start_server(self, profile: str | None = None, scrape: bool = True
                     ) -> Generator["defer.Deferred[Any]", Any, Child]:
        """
        A server (:attr:`server`) with :meth:`server_args`, once it serves;
        with ``metrics_on`` and ``scrape``, scraped every ``scrape_interval``
        seconds until :meth:`stop_server`.
        """
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "--logfile", "-"]
        if profile:
            argv += ["--profile", profile, "--profiler", "cprofile", "--savestats"]
        argv += ["eventsource"] + self.server_args()
        name = "profiled-server" if profile else "server"
        self._servers_started += 1
        log_path = os.path.join(self.workdir, f"{name}-{self._servers_started}.log")
        server = self.server = Child(self.reactor, name, argv, log_path)
        server.start()
        yield server.wait_for(lambda: server.log_has("eventsource serving"),
                              "\"eventsource serving\" in its log")
        if self.http_port is not None and self.metrics_on and scrape:
            # as Prometheus would, throughout, from a thread of ours (the
            # scrape's CPU is the server's; the benchmark's stays its own)
            self._scraper = task.LoopingCall(self.scrape)
            self._scraper.clock = self.reactor
            self._scraper.start(self.scrape_interval)
        return server

    def scrape(self) -> "defer.Deferred[None]":
        """One GET of ``/metrics`` on :attr:`http_port`, counted in :attr:`scrapes`."""
        import urllib.request

        def get() -> int:
            url = f"http://127.0.0.1:{self.http_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                return len(response.read())

        def counted(size: int) -> None:
            self.scrapes["ok"] += 1
            self.scrapes["bytes"] += size

        def failed(_: Failure) -> None:
            self.scrapes["failed"] += 1

        d: "defer.Deferred[int]" = threads.deferToThread(get)
        return d.addCallbacks(counted, failed)

    @defer.inlineCallbacks
    def stop_server(self) -> Generator["defer.Deferred[Any]", Any, None]:
        scraper, self._scraper = self._scraper, None
        if scraper is not None and scraper.running:
            scraper.stop()
        if self.server is not None:
            yield self.server.stop()
            self.server = None

    # -- fetch ------------------------------------------------------------

    @defer.inlineCallbacks
    def fetch(self, selects: list[tuple[dict[str, Any], int]], window: int = 1,
              accept_batch: int = 1, version: int = 1
              ) -> Generator["defer.Deferred[Any]", Any, tuple[int, float, float, float]]:
        """
        Open one stream per select at once and read them to the end,
        accepting every row (``window`` 1) or ``accept_batch`` rows at a time
        (``version`` 2: version 2 fetches, whose rows have every column).

        Returns ``(rows, seconds, server_cpu_seconds, client_cpu_seconds)``.
        """
        client = self.client
        publish = client.publish
        clock = time.perf_counter
        lanes = []
        for _select, expected in selects:
            channel = self.channel("fetch")
            lanes.append(_FetchLane(channel, expected, window, accept_batch, publish, clock,
                                    self.request_channels["fetch-next"]))
        yield client.listen_all({lane.channel: lane.on_message for lane in lanes})
        requests = []
        for lane, (select, _) in zip(lanes, selects):
            request: dict[str, Any] = {"channel": lane.channel, "query": {"$select": select}}
            if version == 2:
                request["v"] = 2
            if window != 1:
                request["window"] = window
            requests.append(json.dumps(request))
        server_cpu = proc_cpu_seconds(self.server_pid)
        client_cpu = time.process_time()
        machine = machine_times()
        start = clock()
        for body in requests:
            publish(self.request_channels["fetch"], body)
        try:
            ends = yield _gather_with_timeout(self.reactor, [lane.done for lane in lanes], 300)
            #: the share of the machine's CPU (1.0: every core) busy while the rows flowed
            self.machine_busy = machine_busy(machine, machine_times())
        finally:
            yield client.unlisten_all([lane.channel for lane in lanes])
        elapsed = max(ends) - start
        server_cpu = proc_cpu_seconds(self.server_pid) - server_cpu
        client_cpu = time.process_time() - client_cpu
        rows = sum(lane.rows for lane in lanes)
        return rows, elapsed, server_cpu, client_cpu

    @defer.inlineCallbacks
    def first_row(self, samples: int) -> Generator["defer.Deferred[Any]", Any, float]:
        """Milliseconds from publishing a fetch to its first row, one fetch at a time."""
        latencies = []
        for k in range(samples):
            channel = self.channel("first")
            got: defer.Deferred[float] = defer.Deferred()

            def on_message(body: str, got: "defer.Deferred[float]" = got) -> None:
                if not got.called:
                    if body.startswith("{"):
                        got.callback(time.perf_counter())
                    else:
                        got.errback(BenchError(f"first row: the server sent {body}"))

            yield self.client.listen(channel, on_message)
            request = json.dumps({"channel": channel,
                                  "query": {"$select": {"$where": {"pid": f"p{k % PIDS}"}}}})
            start = time.perf_counter()
            self.client.publish(self.request_channels["fetch"], request)
            got.addTimeout(30, self.reactor)
            arrived = yield got
            latencies.append((arrived - start) * 1000)
            self.client.publish(channel, '"end"')
            yield self.client.unlisten_all([channel])
        median: float = statistics.median(latencies)
        return median

    # -- persist ----------------------------------------------------------

    @defer.inlineCallbacks
    def persist(self, in_flight: int, duration: float, mode: str = "v1", totals: bool = False
                ) -> Generator["defer.Deferred[Any]", Any, dict[str, float]]:
        """
        persist/s and latencies (ms) with ``in_flight`` requests outstanding
        for ``duration`` s, each lane appending one event at a time to a
        stream of its own.  ``mode``: ``"v1"``, ``"v2"`` (version 2, the
        client's event ids, no expected version) or ``"v2-expected"`` (the
        same, each request expecting the version the lane's last one got).
        With ``totals``, also ``count`` (persists), ``seconds`` and
        ``server_cpu_s``.
        """
        clock = time.perf_counter
        state: dict[str, Any] = {"active": in_flight, "errors": [], "latencies": [],
                                 "done": defer.Deferred()}
        lane_type = _PersistLane if mode == "v1" else _PersistLaneV2
        # (version 2 lanes: streams no earlier scenario appended to)
        streams = self.channel("stream")
        lanes = [lane_type(self.channel("persist"), i, self.client.publish, clock, state,
                           self.request_channels["persist"])
                 for i in range(in_flight)]
        for lane in lanes:
            if isinstance(lane, _PersistLaneV2):
                lane.configure(f"{streams}:{lane.index}", expected=mode == "v2-expected")
        yield self.client.listen_all({lane.channel: lane.on_message for lane in lanes})
        server_cpu = proc_cpu_seconds(self.server_pid)
        client_cpu = time.process_time()
        start = clock()
        deadline = start + duration
        for lane in lanes:
            lane.deadline = deadline
            lane.send()
        state["done"].addTimeout(duration + 60, self.reactor)
        try:
            end = yield state["done"]
        finally:
            yield self.client.unlisten_all([lane.channel for lane in lanes])
        server_cpu = proc_cpu_seconds(self.server_pid) - server_cpu
        client_cpu = time.process_time() - client_cpu
        if state["errors"]:
            raise BenchError(f"persist: {len(state['errors'])} requests failed: "
                             f"{state['errors'][0]}")
        latencies = state["latencies"]
        result = {
            "per_s": len(latencies) / (end - start),
            "p50_ms": percentile(latencies, 0.5) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000,
            "server_cpu_us": server_cpu / max(1, len(latencies)) * 1e6,
            "client_cpu_us": client_cpu / max(1, len(latencies)) * 1e6,
        }
        if totals:
            result.update(count=len(latencies), seconds=end - start, server_cpu_s=server_cpu)
        return result

    # -- idle streams ---------------------------------------------------------

    @defer.inlineCallbacks
    def idle_streams(self, count: int) -> Generator["defer.Deferred[Any]", Any, dict[str, Any]]:
        """Open ``count`` streams, leave them waiting on their first row, measure the server."""
        pid = self.server_pid
        yield task.deferLater(self.reactor, 0.3, lambda: None)
        rss_before, threads_before = proc_status(pid)
        lanes: dict[str, Handler] = {}
        arrived: defer.Deferred[None] = defer.Deferred()
        pending = [count]

        def lane(channel: str) -> Handler:
            state = {"first": False}

            def on_message(body: str) -> None:
                if not state["first"]:
                    state["first"] = True
                    if not body.startswith("{"):
                        if not arrived.called:
                            arrived.errback(BenchError(f"idle stream: the server sent {body}"))
                        return
                    pending[0] -= 1
                    if pending[0] == 0 and not arrived.called:
                        arrived.callback(None)
            return on_message

        for _ in range(count):
            channel = self.channel("idle")
            lanes[channel] = lane(channel)
        yield self.client.listen_all(lanes)
        for i, channel in enumerate(lanes):
            self.client.publish(self.request_channels["fetch"], json.dumps(
                {"channel": channel, "query": {"$select": {"$where": {"pid": f"p{i % PIDS}"}}}}))
        arrived.addTimeout(120, self.reactor)
        try:
            yield arrived
            yield task.deferLater(self.reactor, 0.5, lambda: None)
            rss_open, threads_open = proc_status(pid)
            mysql_ports = proc_tcp_connections(pid, self.mysql["port"])
            redis_ports = proc_tcp_connections(pid, self.redis_port)
            processlist = yield in_thread(self.reactor, self._processlist_count, mysql_ports)
        finally:
            for channel in lanes:
                self.client.publish(channel, '"end"')
            yield self._wait_unsubscribed(list(lanes)[-1])
            yield self.client.unlisten_all(list(lanes))
        return {
            "rss_before_kb": rss_before,
            "rss_open_kb": rss_open,
            "rss_kb_per_stream": (rss_open - rss_before) / count,
            "threads_before": threads_before,
            "threads_open": threads_open,
            "threads_added": threads_open - threads_before,
            "mysql_connections": len(mysql_ports),
            "mysql_processlist": processlist,
            "redis_connections": len(redis_ports),
        }

    def _processlist_count(self, local_ports: list[int]) -> int:
        """How many of the server's MySQL connections MariaDB's PROCESSLIST shows."""
        connection = connect_mysql(self.mysql)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT HOST FROM information_schema.PROCESSLIST")
                hosts = [row[0] or "" for row in cursor.fetchall()]
        finally:
            connection.close()
        wanted = {str(port) for port in local_ports}
        return sum(1 for host in hosts if host.rsplit(":", 1)[-1] in wanted)

    @defer.inlineCallbacks
    def _wait_unsubscribed(self, channel: str, timeout: float = 30
                           ) -> Generator["defer.Deferred[Any]", Any, None]:
        """Wait until only this client listens on ``channel`` (the server let its stream go)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = yield self.client.command("PUBSUB", "NUMSUB", channel)
            if int(reply[1]) <= 1:
                return
            yield task.deferLater(self.reactor, 0.05, lambda: None)


class _FetchLane:
    __slots__ = ("channel", "expected", "rows", "unaccepted", "done", "on_message")

    def __init__(self, channel: str, expected: int, window: int, accept_batch: int,
                 publish: Publish, clock: Callable[[], float], next_channel: str) -> None:
        self.channel = channel
        self.expected = expected
        self.rows = 0
        self.unaccepted = 0
        self.done: defer.Deferred[float] = defer.Deferred()
        ack = json.dumps({"channel": channel})

        def on_message(body: str) -> None:
            if body.startswith("{"):
                self.rows += 1
                if window == 1:
                    publish(next_channel, ack)
                else:
                    self.unaccepted += 1
                    if self.unaccepted >= accept_batch:
                        publish(next_channel, '{"channel":%s,"accepted":%d}'
                                % (json.dumps(channel), self.unaccepted))
                        self.unaccepted = 0
            elif body == '"end"':
                if self.done.called:
                    return
                if self.rows != self.expected:
                    self.done.errback(BenchError(
                        f"{channel}: {self.rows} rows, not {self.expected} (is another "
                        "eventsource server listening on this Redis?)"))
                else:
                    self.done.callback(clock())
            elif not self.done.called:
                self.done.errback(BenchError(f"{channel}: the server sent {body}"))

        self.on_message = on_message


class _PersistLane:
    def __init__(self, channel: str, index: int, publish: Publish, clock: Callable[[], float],
                 state: dict[str, Any], persist_channel: str) -> None:
        self.channel = channel
        self.persist_channel = persist_channel
        self.index = index
        self.publish = publish
        self.clock = clock
        self.state = state
        self.deadline = 0.0
        self.sent = 0
        self.started = 0.0
        self.ok = False

    def send(self) -> None:
        self.sent += 1
        self.ok = False
        body = json.dumps({"channel": self.channel, "query": {"$insert": {"$documents": {
            "pid": f"w{self.index}", "domain": "bench", "name": "persisted",
            "data": {"n": self.sent, "user": f"u-{self.index}", "amount": 12.5}}}}})
        self.started = self.clock()
        self.publish(self.persist_channel, body)

    def on_message(self, body: str) -> None:
        if body.startswith('{"fieldCount"'):
            self.ok = True
            return
        if body != '"end"':
            if body != '"error"':
                self.state["errors"].append(f"the server sent {body[:200]}")
            else:
                self.state["errors"].append("the server answered \"error\"")
            return
        now = self.clock()
        if self.ok:
            self.state["latencies"].append(now - self.started)
        elif not self.state["errors"]:
            self.state["errors"].append("\"end\" without a result")
        if now < self.deadline:
            self.send()
        else:
            self.state["active"] -= 1
            if self.state["active"] == 0 and not self.state["done"].called:
                self.state["done"].callback(now)


class _PersistLaneV2(_PersistLane):
    """
    A version 2 lane: one event a request with an event id of the client's
    (as a version 2 client sends them, to retry safely), on a stream of its
    own; with ``expected``, each request expects the stream's last version
    (``"noStream"`` first).  Every reply is decoded either way.
    """

    pid = ""
    expected = False
    version: int | None = None

    def configure(self, pid: str, expected: bool) -> None:
        self.pid = pid
        self.expected = expected

    def send(self) -> None:
        self.sent += 1
        self.ok = False
        body: dict[str, Any] = {"v": 2, "channel": self.channel, "query": {"$insert": {
            "$documents": [{
                "pid": self.pid, "domain": "bench", "name": "persisted",
                "data": {"n": self.sent, "user": f"u-{self.index}", "amount": 12.5},
                "eventId": str(uuid.uuid4())}]}}}
        if self.expected:
            body["expectedVersion"] = "noStream" if self.version is None else self.version
        encoded = json.dumps(body)
        self.started = self.clock()
        self.publish(self.persist_channel, encoded)

    def on_message(self, body: str) -> None:
        if body.startswith('{"events"'):
            self.version = json.loads(body)["events"][-1]["version"]
            self.ok = True
            return
        if body.startswith('{"error"'):
            self.state["errors"].append(f"the server sent {body[:200]}")
            return
        super().on_message(body)


def _gather_with_timeout(reactor: IReactorTime, deferreds: list["defer.Deferred[Any]"],
                         timeout: float) -> "defer.Deferred[Any]":
    d = defer.gatherResults(deferreds, consumeErrors=True)
    d.addTimeout(timeout, reactor)

    def unwrap(failure: Failure) -> Failure:
        if isinstance(failure.value, defer.FirstError):
            return failure.value.subFailure
        return failure

    d.addErrback(unwrap)
    return d


# -- one repetition ---------------------------------------------------------------


def machine_times() -> tuple[int, int]:
    """The machine's CPU time so far (all cores, in clock ticks): busy, and in all."""
    with open("/proc/stat") as f:
        fields = [int(value) for value in f.readline().split()[1:9]]
    # user nice system idle iowait irq softirq steal (guest time is in user's)
    user, nice, system, _, _, irq, softirq, _ = fields
    return user + nice + system + irq + softirq, sum(fields)


def machine_busy(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of the machine's CPU (all cores: 1.0 is every core busy) used in between."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else 0.0


@defer.inlineCallbacks
def repetition(run: Run, log: Callable[[str], None]
               ) -> Generator["defer.Deferred[Any]", Any, dict[str, float]]:
    """Every floor and every server scenario once; returns figures and server CPU figures."""
    sizes = run.sizes
    figures: dict[str, float] = {}

    log("idle streams")
    idle = yield run.idle_streams(sizes.idle_streams)
    figures.update({f"idle_{key}": value for key, value in idle.items()})

    log("ping-pong floor")
    figures["pingpong_1_pair_rt_per_s"] = yield pingpong(
        run.reactor, run.client, run.prefix, 1, sizes.duration)
    figures["pingpong_100_pairs_rt_per_s"] = yield pingpong(
        run.reactor, run.client, run.prefix, sizes.pairs, sizes.duration)

    log("per-row fetch, 1 stream")
    rows, seconds, cpu, client_cpu = yield run.fetch(
        [({"$limit": sizes.fetch_1_rows}, sizes.fetch_1_rows)])
    figures["fetch_1_stream_rows_per_s"] = rows / seconds
    figures["fetch_1_stream_server_cpu_us_per_row"] = cpu / rows * 1e6
    figures["fetch_1_stream_client_cpu_us_per_row"] = client_cpu / rows * 1e6

    log(f"per-row fetch, {sizes.streams} streams")
    selects = [({"$where": {"pid": f"p{i % PIDS}"}, "$limit": sizes.rows_per_stream},
                sizes.rows_per_stream) for i in range(sizes.streams)]
    rows, seconds, cpu, client_cpu = yield run.fetch(selects)
    figures["fetch_100_streams_rows_per_s"] = rows / seconds
    figures["fetch_100_streams_server_cpu_us_per_row"] = cpu / rows * 1e6
    figures["fetch_100_streams_client_cpu_us_per_row"] = client_cpu / rows * 1e6

    log(f"windowed fetch (window {sizes.window}), 1 stream")
    rows, seconds, cpu, client_cpu = yield run.fetch(
        [({"$limit": sizes.rows}, sizes.rows)], window=sizes.window,
        accept_batch=max(1, sizes.window // 2))
    figures["fetch_window_100_rows_per_s"] = rows / seconds
    figures["fetch_window_100_server_cpu_us_per_row"] = cpu / rows * 1e6
    figures["fetch_window_100_client_cpu_us_per_row"] = client_cpu / rows * 1e6

    # The version 2 windowed fetch and the subscription's catch-up read the
    # same rows with the same window: measured back to back, in turn first
    # (every other repetition the other way round), so they are compared
    # under the same load.
    run.repetitions += 1
    readers = [v2_windowed_fetch, catch_up]
    if run.repetitions % 2 == 0:
        readers.reverse()
    for reader in readers:
        figures.update((yield reader(run, log)))

    log("time to first row")
    figures["first_row_ms"] = yield run.first_row(sizes.first_row_samples)

    log("raw SELECT floor")
    figures["select_rows_per_s"] = yield in_thread(
        run.reactor, raw_select, run.mysql, run.table, sizes.rows)

    log("raw INSERT floor")
    figures["insert_1_connection_per_s"] = yield in_thread(
        run.reactor, raw_inserts, run.mysql, run.floor_table, 1, sizes.duration)
    figures["insert_8_connections_per_s"] = yield in_thread(
        run.reactor, raw_inserts, run.mysql, run.floor_table, 8, sizes.duration)
    log("raw append transaction floor")
    figures["append_txn_1_connection_per_s"] = yield in_thread(
        run.reactor, raw_inserts, run.mysql, run.floor_table, 1, sizes.duration,
        run.floor_lock)

    for in_flight in (1, 50):
        log(f"persist, {in_flight} in flight")
        result = yield run.persist(in_flight, sizes.duration)
        for key, value in result.items():
            figures[f"persist_{in_flight}_{key}"] = value

    v2_modes = [("v2", "persist_v2_50", "no expected version"),
                ("v2-expected", "persist_v2_expected_50", "expected versions")]
    # (compared with each other: every other repetition runs them in the other order)
    if run.repetitions % 2 == 0:
        v2_modes.reverse()
    for mode, name, what in v2_modes:
        log(f"version 2 persist, 50 in flight, a stream each, {what}")
        result = yield run.persist(50, sizes.duration, mode)
        for key, value in result.items():
            figures[f"{name}_{key}"] = value

    figures.update((yield subscription_figures(run, log)))

    figures.update(ratios(figures))
    return figures


@defer.inlineCallbacks
def v2_windowed_fetch(run: Run, log: Callable[[str], None]
                      ) -> Generator["defer.Deferred[Any]", Any, dict[str, float]]:
    """The whole table in one version 2 fetch with a window."""
    sizes = run.sizes
    log(f"windowed fetch (window {sizes.window}), version 2, 1 stream")
    rows, seconds, cpu, _ = yield run.fetch(
        [({"$limit": sizes.rows}, sizes.rows)], window=sizes.window,
        accept_batch=max(1, sizes.window // 2), version=2)
    return {"fetch_v2_window_100_rows_per_s": rows / seconds,
            "fetch_v2_window_100_server_cpu_us_per_row": cpu / rows * 1e6}


@defer.inlineCallbacks
def catch_up(run: Run, log: Callable[[str], None]
             ) -> Generator["defer.Deferred[Any]", Any, dict[str, float]]:
    """The whole table by a subscription from the start, to its ``caughtUp``."""
    sizes = run.sizes
    log("subscription catch-up")
    result = yield Subscriptions(run).catch_up(sizes.rows, sizes.window)
    return {"subscribe_catch_up_rows_per_s": result["rows_per_s"],
            "subscribe_catch_up_server_cpu_us_per_row": result["server_cpu_us_per_row"]}


@defer.inlineCallbacks
def warm_up(run: Run) -> Generator["defer.Deferred[Any]", Any, None]:
    """A fetch on 1 stream and one on 20: the pool has all its connections after it."""
    rows = min(run.sizes.fetch_1_rows, 200)
    yield run.fetch([({"$limit": rows}, rows)])
    rows = min(run.sizes.rows_per_stream, 2)
    yield run.fetch([({"$where": {"pid": f"p{i}"}, "$limit": rows}, rows) for i in range(20)])
