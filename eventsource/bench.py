"""
The benchmark: the server over the wire, against floors measured in the same run.

``python3 -m eventsource.bench`` (``make bench``) starts a server as a process
of its own (``twistd eventsource``, from this checkout) on a database of its
own, drives it with an independent client (plain txredisapi with hiredis, as
the server uses), and in the same run measures what the figures must be
compared with:

floors
    Redis pub/sub ping-pong round trips/s (1 pair of channels, and 100 pairs
    at once), raw single-row ``INSERT``/s with PyMySQL in autocommit (1
    connection, and 8 connections in 8 threads), raw ``SELECT`` rows/s.
server
    persist/s and latency (p50/p99) with 1 and 50 requests in flight; fetch
    rows/s with per-row acceptance on 1 stream and on 100 streams at once;
    windowed fetch rows/s (window 100); time to first row; RSS, threads and
    connections with 1,000 streams open and idle; server CPU per row.

The ping-pong floor has the shape of a fetch: an echo process (like the
server, one subscriber and one publisher connection) answers each small
message of the client on ``ping:i`` with a row-sized message on ``pong:i``;
the client side is the same code as the fetch client.  "100 pairs" are 100
channel pairs over those same connections, as 100 streams are.

Every scenario runs in every repetition (each on a fresh server) and ratios
are taken within a repetition, so a noisy machine moves floors and figures
together; the table shows medians.  ``--quick`` is the small run of CI: it
proves the benchmark runs, not how fast.  ``--profile`` afterwards runs the
1-stream and the 100-stream fetch and persist with 50 in flight once more,
against a server under cProfile and against one sampled by py-spy (when
installed), and prints their hot spots.
"""

import argparse
import ctypes
import json
import os
import platform
import pstats
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from functools import partial

import pymysql
import txredisapi
from twisted.internet import defer, reactor, task, threads
from twisted.internet.endpoints import HostnameEndpoint
from twisted.python.failure import Failure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: the rows every fetch scenario selects from: ``pid`` is ``p0``..``p99``
PIDS = 100

#: what the client publishes to accept one row, and the echo's row stand-in
ROW_LIKE_BODY = (
    '{"id":123456,"timestamp":"2024-05-01T12:34:56.789Z","pid":"p42","domain":"bench",'
    '"name":"filled","data":"{\\"i\\": 123456, \\"user\\": \\"u-123456\\", \\"amount\\": 12.5}"}'
)

TARGETS = (
    # (name, ratio or figure key, comparison, threshold)
    ("per-row fetch, 1 stream >= 0.9 x ping-pong 1 pair",
     "fetch_1_stream_vs_pingpong_1_pair", ">=", 0.9),
    ("per-row fetch, 100 streams >= 0.5 x ping-pong 100 pairs",
     "fetch_100_streams_vs_pingpong_100_pairs", ">=", 0.5),
    ("windowed fetch (100), 1 stream >= 10 x per-row fetch, 1 stream",
     "fetch_window_100_vs_fetch_1_stream", ">=", 10.0),
    ("persist, 50 in flight >= 1.0 x raw INSERT, 8 connections",
     "persist_50_vs_insert_8_connections", ">=", 1.0),
    ("idle streams: no thread per stream", "idle_threads_added", "<=", "pool_size"),
    ("idle streams: no connection per stream", "idle_server_connections", "<=", "pool_size+2"),
    ("idle streams: <= 30 KB RSS each", "idle_rss_kb_per_stream", "<=", 30.0),
)


class BenchError(Exception):
    """The benchmark could not measure what it set out to."""


# -- sizes and settings ------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
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

    @classmethod
    def from_options(cls, options):
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
        )


def _mysql_settings():
    return dict(
        host=os.environ.get("MYSQL_HOST") or "127.0.0.1",
        port=int(os.environ.get("MYSQL_PORT") or 3306),
        user=os.environ.get("MYSQL_USER") or "root",
        password=os.environ.get("MYSQL_PASS") or "",
        charset="utf8mb4",
    )


def _connect_mysql(settings, **extra):
    return pymysql.connect(autocommit=True, **settings, **extra)


# -- processes ----------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
try:  # looked up here: the child, between fork and exec, only calls it
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent():
    """In a child: receive SIGTERM when the benchmark dies, whatever kills it."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _child_env():
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = REPO + (os.pathsep + path if path else "")
    return env


class Child:
    """A process of the benchmark's own, output to a log file, ended by its pid."""

    def __init__(self, name, argv, log_path):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.process = None

    def start(self):
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
    def pid(self):
        return self.process.pid

    def log_tail(self, lines=30):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    @defer.inlineCallbacks
    def wait_for(self, check, what, timeout=60.0):
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
            yield task.deferLater(reactor, 0.05, lambda: None)

    def log_has(self, text):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return text in f.read()
        except OSError:
            return False

    @defer.inlineCallbacks
    def stop(self, timeout=30.0, how=signal.SIGTERM):
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(how)
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        if process.poll() is None:
            process.kill()
            process.wait()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- /proc --------------------------------------------------------------------

_CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid):
    """User plus system CPU time of every thread of ``pid``, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICK


def proc_status(pid):
    """``VmRSS`` (kB) and ``Threads`` from ``/proc/<pid>/status``."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                values[key] = int(value.split()[0])
    return values["VmRSS"], values["Threads"]


def proc_tcp_connections(pid, remote_port):
    """Local ports of the established TCP connections of ``pid`` to ``remote_port``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
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


# -- the Redis client -----------------------------------------------------------


class _Subscriber(txredisapi.SubscriberProtocol):
    def connectionMade(self):
        d = super().connectionMade()
        self.factory.made.append(self)
        return d

    def messageReceived(self, pattern, channel, message):
        handler = self.factory.handlers.get(channel)
        if handler is not None:
            handler(message)


class _Publisher(txredisapi.RedisProtocol):
    def connectionMade(self):
        d = super().connectionMade()
        self.factory.made.append(self)
        return d


def _ignore(failure):
    return None


class RedisClient:
    """
    One subscriber and one publisher connection, numbers never converted.

    ``handlers`` maps a subscribed channel to ``handler(body)``; publishing
    goes straight to the protocol (no ``ConnectionHandler`` in between) and
    is not waited for, so publishes pipeline.
    """

    def __init__(self):
        self.handlers = {}

    @defer.inlineCallbacks
    def connect(self, host, port):
        self._factories = []
        protocols = []
        for protocol, factory in ((_Subscriber, txredisapi.SubscriberFactory()),
                                  (_Publisher, txredisapi.RedisFactory(None, None, 1))):
            factory.protocol = protocol
            factory.convertNumbers = False
            factory.continueTrying = False
            factory.handlers = self.handlers
            factory.made = []
            factory.startConnecting(HostnameEndpoint(reactor, host, port, timeout=5))
            yield factory.deferred
            self._factories.append(factory)
            protocols.append(factory.made[-1])
        self.subscriber, self.publisher = protocols
        return self

    def disconnect(self):
        return defer.gatherResults([f.disconnect() for f in self._factories], consumeErrors=True)

    def listen(self, channel, handler):
        self.handlers[channel] = handler
        return self.subscriber.subscribe(channel)

    def listen_all(self, handlers):
        return defer.gatherResults([self.listen(c, h) for c, h in handlers.items()],
                                   consumeErrors=True)

    def unlisten_all(self, channels):
        for channel in channels:
            self.handlers.pop(channel, None)
        return defer.gatherResults([self.subscriber.unsubscribe(c) for c in channels],
                                   consumeErrors=True)

    def publish(self, channel, body):
        d = self.publisher.execute_command("PUBLISH", channel, body)
        d.addErrback(_ignore)
        return d

    def command(self, *args):
        return self.publisher.execute_command(*args)


# -- the echo process (the far end of the ping-pong floor) -----------------------


def echo_main(host, port, prefix, pairs):
    """Answer every message on ``<prefix>:ping:<i>`` with a row-sized one on ``<prefix>:pong:<i>``."""

    @defer.inlineCallbacks
    def start():
        client = yield RedisClient().connect(host, port)
        publish = client.publisher.execute_command

        def answer(out):
            def on_ping(body):
                publish("PUBLISH", out, ROW_LIKE_BODY).addErrback(_ignore)
            return on_ping

        yield client.listen_all({f"{prefix}:ping:{i}": answer(f"{prefix}:pong:{i}")
                                 for i in range(pairs)})
        print("echo ready", flush=True)

    def failed(failure):
        print(f"echo failed: {failure.getErrorMessage()}", flush=True)
        reactor.stop()

    parent = os.getppid()
    task.LoopingCall(lambda: os.getppid() != parent and reactor.stop()).start(1.0, now=False)
    reactor.callWhenRunning(lambda: start().addErrback(failed))
    reactor.run()


# -- floors ------------------------------------------------------------------------


def _percentile(values, fraction):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


@defer.inlineCallbacks
def pingpong(client, prefix, pairs, duration):
    """Round trips/s of ``pairs`` concurrent ping-pong lanes for ``duration`` seconds."""
    done = defer.Deferred()
    state = {"count": 0, "active": pairs, "end": None}
    deadline = [0.0]
    ack = '{"channel":"ack"}'
    publish = client.publish
    clock = time.perf_counter

    def lane(i):
        ping = f"{prefix}:ping:{i}"

        def on_pong(body):
            state["count"] += 1
            if clock() < deadline[0]:
                publish(ping, ack)
            else:
                state["active"] -= 1
                if state["active"] == 0 and not done.called:
                    done.callback(clock())
        return ping, on_pong

    lanes = [lane(i) for i in range(pairs)]
    for i, (_, on_pong) in enumerate(lanes):
        client.handlers[f"{prefix}:pong:{i}"] = on_pong
    start = clock()
    deadline[0] = start + duration
    for ping, _ in lanes:
        publish(ping, ack)
    done.addTimeout(duration + 30, reactor)
    end = yield done
    return state["count"] / (end - start)


def _insert_worker(settings, table, clock, counts, index, errors):
    connection = None
    try:
        connection = _connect_mysql(settings)
    except Exception as error:  # reported by the caller
        errors.append(error)
    try:
        clock["ready"].wait()  # connected (PyMySQL takes ~20 ms): now the clock runs
        if connection is None:
            return
        with connection.cursor() as cursor:
            sql = (f"INSERT INTO {table} (`pid`, `domain`, `name`, `data`)"
                   " VALUES (%s, %s, %s, %s)")
            deadline = clock["deadline"]
            n = 0
            while time.perf_counter() < deadline:
                cursor.execute(sql, (f"floor{index}", "bench", "floor", '{"n": %d}' % n))
                n += 1
            counts[index] = n
            clock["ends"][index] = time.perf_counter()
    except Exception as error:
        errors.append(error)
    finally:
        if connection is not None:
            connection.close()


def raw_inserts(settings, table, connections, duration):
    """Single-row autocommit INSERTs/s over ``connections`` connections, one thread each."""
    counts = [0] * connections
    errors = []
    clock = {"ends": [0.0] * connections}

    def started():
        clock["start"] = time.perf_counter()
        clock["deadline"] = clock["start"] + duration

    clock["ready"] = threading.Barrier(connections, action=started)
    workers = [threading.Thread(target=_insert_worker,
                                args=(settings, table, clock, counts, i, errors))
               for i in range(connections)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise BenchError(f"raw INSERT failed: {errors[0]}")
    return sum(counts) / (max(clock["ends"]) - clock["start"])


def raw_select(settings, table, rows):
    """Rows/s of one PyMySQL SELECT of ``rows`` rows of the events table, all fetched."""
    connection = _connect_mysql(settings)
    try:
        with connection.cursor() as cursor:
            start = time.perf_counter()
            cursor.execute(f"SELECT `id`, `timestamp`, `pid`, `domain`, `name`, `data` FROM {table}"
                           " ORDER BY `id` LIMIT %s", (rows,))
            fetched = len(cursor.fetchall())
            elapsed = time.perf_counter() - start
    finally:
        connection.close()
    if fetched != rows:
        raise BenchError(f"raw SELECT fetched {fetched} rows, not {rows}")
    return fetched / elapsed


# -- server scenarios ------------------------------------------------------------------


class Run:
    """What one benchmark run shares: names, the client, the server process."""

    def __init__(self, options, sizes):
        self.options = options
        self.sizes = sizes
        self.tag = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.database = options.database or f"eventsource_bench_{self.tag}"
        self.table = f"`{self.database}`.`event`"
        self.floor_table = f"`{self.database}`.`floor_event`"
        self.mysql = _mysql_settings()
        self.redis_host = os.environ.get("REDIS_HOST") or "127.0.0.1"
        self.redis_port = int(os.environ.get("REDIS_PORT") or 6379)
        self.prefix = f"bench_{self.tag}"
        # The server's request channels get a prefix of their own: other
        # servers on the same Redis neither answer nor see our requests.
        self.channel_prefix = f"{self.prefix}:"
        self.request_channels = {kind: self.channel_prefix + kind
                                 for kind in ("persist", "fetch", "fetch-next")}
        self._channels = 0
        self.client = None
        self.server = None
        self._servers_started = 0
        self.workdir = tempfile.mkdtemp(prefix="eventsource-bench-")

    def channel(self, kind):
        self._channels += 1
        return f"{self.prefix}:{kind}:{self._channels}"

    def server_args(self):
        args = ["--table", f"{self.database}.event",
                "--channel-prefix", self.channel_prefix,
                # idle streams wait longer than the default 5 s for their client
                "--row-timeout", "300",
                "--redis-host", self.redis_host, "--redis-port", str(self.redis_port),
                "--mysql-host", self.mysql["host"], "--mysql-port", str(self.mysql["port"]),
                "--mysql-user", self.mysql["user"]]
        if self.mysql["password"]:
            args += ["--mysql-password", self.mysql["password"]]
        return args

    def server_config(self):
        from eventsource.tap import Options

        options = Options()
        options.parseOptions(self.server_args())
        return options.config

    @defer.inlineCallbacks
    def start_server(self, profile=None):
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "--logfile", "-"]
        if profile:
            argv += ["--profile", profile, "--profiler", "cprofile", "--savestats"]
        argv += ["eventsource"] + self.server_args()
        name = "profiled-server" if profile else "server"
        self._servers_started += 1
        log_path = os.path.join(self.workdir, f"{name}-{self._servers_started}.log")
        self.server = Child(name, argv, log_path)
        self.server.start()
        yield self.server.wait_for(lambda: self.server.log_has("eventsource serving"),
                                   "\"eventsource serving\" in its log")
        return self.server

    @defer.inlineCallbacks
    def stop_server(self):
        if self.server is not None:
            yield self.server.stop()
            self.server = None

    # -- fetch ------------------------------------------------------------

    @defer.inlineCallbacks
    def fetch(self, selects, window=1, accept_batch=1):
        """
        Open one stream per select at once and read them to the end,
        accepting every row (``window`` 1) or ``accept_batch`` rows at a time.

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
            request = {"channel": lane.channel, "query": {"$select": select}}
            if window != 1:
                request["window"] = window
            requests.append(json.dumps(request))
        server_cpu = proc_cpu_seconds(self.server.pid)
        client_cpu = time.process_time()
        start = clock()
        for request in requests:
            publish(self.request_channels["fetch"], request)
        try:
            ends = yield _gather_with_timeout([lane.done for lane in lanes], 300)
        finally:
            yield client.unlisten_all([lane.channel for lane in lanes])
        elapsed = max(ends) - start
        server_cpu = proc_cpu_seconds(self.server.pid) - server_cpu
        client_cpu = time.process_time() - client_cpu
        rows = sum(lane.rows for lane in lanes)
        return rows, elapsed, server_cpu, client_cpu

    @defer.inlineCallbacks
    def first_row(self, samples):
        """Milliseconds from publishing a fetch to its first row, one fetch at a time."""
        latencies = []
        for k in range(samples):
            channel = self.channel("first")
            got = defer.Deferred()

            def on_message(body, got=got):
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
            got.addTimeout(30, reactor)
            arrived = yield got
            latencies.append((arrived - start) * 1000)
            self.client.publish(channel, '"end"')
            yield self.client.unlisten_all([channel])
        return statistics.median(latencies)

    # -- persist ----------------------------------------------------------

    @defer.inlineCallbacks
    def persist(self, in_flight, duration):
        """persist/s and latencies (ms) with ``in_flight`` requests outstanding for ``duration`` s."""
        clock = time.perf_counter
        state = {"active": in_flight, "errors": [], "latencies": [], "done": defer.Deferred()}
        lanes = [_PersistLane(self.channel("persist"), i, self.client.publish, clock, state,
                              self.request_channels["persist"])
                 for i in range(in_flight)]
        yield self.client.listen_all({lane.channel: lane.on_message for lane in lanes})
        server_cpu = proc_cpu_seconds(self.server.pid)
        client_cpu = time.process_time()
        start = clock()
        deadline = start + duration
        for lane in lanes:
            lane.deadline = deadline
            lane.send()
        state["done"].addTimeout(duration + 60, reactor)
        try:
            end = yield state["done"]
        finally:
            yield self.client.unlisten_all([lane.channel for lane in lanes])
        server_cpu = proc_cpu_seconds(self.server.pid) - server_cpu
        client_cpu = time.process_time() - client_cpu
        if state["errors"]:
            raise BenchError(f"persist: {len(state['errors'])} requests failed: "
                             f"{state['errors'][0]}")
        latencies = state["latencies"]
        return {
            "per_s": len(latencies) / (end - start),
            "p50_ms": _percentile(latencies, 0.5) * 1000,
            "p99_ms": _percentile(latencies, 0.99) * 1000,
            "server_cpu_us": server_cpu / max(1, len(latencies)) * 1e6,
            "client_cpu_us": client_cpu / max(1, len(latencies)) * 1e6,
        }

    # -- idle streams ---------------------------------------------------------

    @defer.inlineCallbacks
    def idle_streams(self, count):
        """Open ``count`` streams, leave them waiting on their first row, measure the server."""
        pid = self.server.pid
        yield task.deferLater(reactor, 0.3, lambda: None)
        rss_before, threads_before = proc_status(pid)
        lanes = {}
        arrived = defer.Deferred()
        pending = [count]

        def lane(channel):
            state = {"first": False}

            def on_message(body):
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
        arrived.addTimeout(120, reactor)
        try:
            yield arrived
            yield task.deferLater(reactor, 0.5, lambda: None)
            rss_open, threads_open = proc_status(pid)
            mysql_ports = proc_tcp_connections(pid, self.mysql["port"])
            redis_ports = proc_tcp_connections(pid, self.redis_port)
            processlist = yield threads.deferToThread(self._processlist_count, mysql_ports)
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

    def _processlist_count(self, local_ports):
        """How many of the server's MySQL connections MariaDB's PROCESSLIST shows."""
        connection = _connect_mysql(self.mysql)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT HOST FROM information_schema.PROCESSLIST")
                hosts = [row[0] or "" for row in cursor.fetchall()]
        finally:
            connection.close()
        wanted = {str(port) for port in local_ports}
        return sum(1 for host in hosts if host.rsplit(":", 1)[-1] in wanted)

    @defer.inlineCallbacks
    def _wait_unsubscribed(self, channel, timeout=30):
        """Wait until only this client listens on ``channel`` (the server let its stream go)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = yield self.client.command("PUBSUB", "NUMSUB", channel)
            if int(reply[1]) <= 1:
                return
            yield task.deferLater(reactor, 0.05, lambda: None)


class _FetchLane:
    __slots__ = ("channel", "expected", "rows", "unaccepted", "done", "on_message")

    def __init__(self, channel, expected, window, accept_batch, publish, clock, next_channel):
        self.channel = channel
        self.expected = expected
        self.rows = 0
        self.unaccepted = 0
        self.done = defer.Deferred()
        ack = json.dumps({"channel": channel})

        def on_message(body):
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
    def __init__(self, channel, index, publish, clock, state, persist_channel):
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

    def send(self):
        self.sent += 1
        self.ok = False
        body = json.dumps({"channel": self.channel, "query": {"$insert": {"$documents": {
            "pid": f"w{self.index}", "domain": "bench", "name": "persisted",
            "data": {"n": self.sent, "user": f"u-{self.index}", "amount": 12.5}}}}})
        self.started = self.clock()
        self.publish(self.persist_channel, body)

    def on_message(self, body):
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


def _gather_with_timeout(deferreds, timeout):
    d = defer.gatherResults(deferreds, consumeErrors=True)
    d.addTimeout(timeout, reactor)

    def unwrap(failure):
        if isinstance(failure.value, defer.FirstError):
            return failure.value.subFailure
        return failure

    d.addErrback(unwrap)
    return d


# -- one repetition ---------------------------------------------------------------


@defer.inlineCallbacks
def repetition(run, log):
    """Every floor and every server scenario once; returns figures and server CPU figures."""
    sizes = run.sizes
    figures = {}

    log("idle streams")
    idle = yield run.idle_streams(sizes.idle_streams)
    figures.update({f"idle_{key}": value for key, value in idle.items()})

    log("ping-pong floor")
    figures["pingpong_1_pair_rt_per_s"] = yield pingpong(
        run.client, run.prefix, 1, sizes.duration)
    figures["pingpong_100_pairs_rt_per_s"] = yield pingpong(
        run.client, run.prefix, sizes.pairs, sizes.duration)

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

    log("time to first row")
    figures["first_row_ms"] = yield run.first_row(sizes.first_row_samples)

    log("raw SELECT floor")
    figures["select_rows_per_s"] = yield threads.deferToThread(
        raw_select, run.mysql, run.table, sizes.rows)

    log("raw INSERT floor")
    figures["insert_1_connection_per_s"] = yield threads.deferToThread(
        raw_inserts, run.mysql, run.floor_table, 1, sizes.duration)
    figures["insert_8_connections_per_s"] = yield threads.deferToThread(
        raw_inserts, run.mysql, run.floor_table, 8, sizes.duration)

    for in_flight in (1, 50):
        log(f"persist, {in_flight} in flight")
        result = yield run.persist(in_flight, sizes.duration)
        for key, value in result.items():
            figures[f"persist_{in_flight}_{key}"] = value

    figures.update(ratios(figures))
    return figures


@defer.inlineCallbacks
def warm_up(run):
    """A fetch on 1 stream and one on 20: the pool has all its connections after it."""
    rows = min(run.sizes.fetch_1_rows, 200)
    yield run.fetch([({"$limit": rows}, rows)])
    rows = min(run.sizes.rows_per_stream, 2)
    yield run.fetch([({"$where": {"pid": f"p{i}"}, "$limit": rows}, rows) for i in range(20)])


def ratios(f):
    return {
        "fetch_1_stream_vs_pingpong_1_pair":
            f["fetch_1_stream_rows_per_s"] / f["pingpong_1_pair_rt_per_s"],
        "fetch_100_streams_vs_pingpong_100_pairs":
            f["fetch_100_streams_rows_per_s"] / f["pingpong_100_pairs_rt_per_s"],
        "fetch_window_100_vs_fetch_1_stream":
            f["fetch_window_100_rows_per_s"] / f["fetch_1_stream_rows_per_s"],
        "fetch_window_100_vs_select":
            f["fetch_window_100_rows_per_s"] / f["select_rows_per_s"],
        "persist_50_vs_insert_8_connections":
            f["persist_50_per_s"] / f["insert_8_connections_per_s"],
        "persist_1_vs_insert_1_connection":
            f["persist_1_per_s"] / f["insert_1_connection_per_s"],
    }


# -- the table ---------------------------------------------------------------------

#: (key, label, unit, format, how several repetitions combine)
ROWS = [
    ("floors", None, None, None, None),
    ("pingpong_1_pair_rt_per_s", "Redis ping-pong, 1 pair", "round trips/s", "{:,.0f}", "median"),
    ("pingpong_100_pairs_rt_per_s", "Redis ping-pong, 100 pairs", "round trips/s", "{:,.0f}",
     "median"),
    ("insert_1_connection_per_s", "raw INSERT, 1 connection", "rows/s", "{:,.0f}", "median"),
    ("insert_8_connections_per_s", "raw INSERT, 8 connections", "rows/s", "{:,.0f}", "median"),
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
    ("first_row_ms", "time to first row", "ms", "{:.2f}", "median"),
    ("idle_rss_kb_per_stream", "idle streams: RSS per stream", "KB", "{:.1f}", "max"),
    ("idle_rss_open_kb", "  server RSS, streams open", "KB", "{:,.0f}", "max"),
    ("idle_threads_open", "  server threads, streams open", "threads", "{:.0f}", "max"),
    ("idle_threads_added", "  threads added", "threads", "{:.0f}", "max"),
    ("idle_mysql_connections", "  server MySQL connections", "connections", "{:.0f}", "max"),
    ("idle_mysql_processlist", "  of them in PROCESSLIST", "connections", "{:.0f}", "max"),
    ("idle_redis_connections", "  server Redis connections", "connections", "{:.0f}", "max"),
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
]


def combine(runs, how):
    return max(runs) if how == "max" else statistics.median(runs)


def summarize(reps, pool_size):
    """Figures and ratios as ``{key: {"value", "runs", "unit"}}``, and the targets."""
    summary = {}
    for key, _, unit, _, how in ROWS:
        if unit is None:
            continue
        runs = [rep[key] for rep in reps]
        summary[key] = {"value": combine(runs, how), "runs": runs, "unit": unit, "combined": how}
    summary["idle_server_connections"] = {
        "value": max(rep["idle_mysql_connections"] + rep["idle_redis_connections"] for rep in reps),
        "runs": [rep["idle_mysql_connections"] + rep["idle_redis_connections"] for rep in reps],
        "unit": "connections", "combined": "max",
    }
    thresholds = {"pool_size": pool_size, "pool_size+2": pool_size + 2}
    targets = []
    for name, key, op, threshold in TARGETS:
        threshold = thresholds.get(threshold, threshold)
        value = summary[key]["value"]
        ok = value >= threshold if op == ">=" else value <= threshold
        targets.append({"target": name, "key": key, "value": value, "op": op,
                        "threshold": threshold, "pass": ok})
    return summary, targets


def format_table(summary, targets, machine, sizes, repeats):
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
        if unit is None:
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


# -- profiling -----------------------------------------------------------------------

#: frames that only pass work along (the reactor loop, logging and context
#: wrappers, thread pool hand-offs): left out of the inclusive lists
PLUMBING = ("twisted/python/", "twisted/_threads/", "threading.py", "twisted/internet/base.py",
            "twisted/internet/epollreactor.py", "twisted/internet/posixbase.py",
            "twisted/internet/endpoints.py", "twisted/internet/tcp.py", "twisted/application/",
            "twisted/scripts/", "<string>")

#: leaf frames (function, file) of a thread that waits rather than works
WAITING = {("doPoll", "twisted/internet/epollreactor.py"), ("wait", "threading.py"),
           ("_wait_for_tstate_lock", "threading.py"), ("get", "queue.py")}


def _is_plumbing(function):
    return any(marker in function for marker in PLUMBING)


def _is_waiting(frame_name):
    name, _, where = frame_name.partition(" (")
    return (name.rsplit(".", 1)[-1], where.rstrip(")")) in WAITING


def profile_summary(path, count=10):
    """The top functions of a cProfile dump, by own time and by cumulative time."""
    stats = pstats.Stats(path)
    rows = []
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


def _short_path(filename):
    match = re.search(r"/lib/python3\.\d+/(?:site-packages/)?(.*)$", filename)
    if match:
        return match.group(1)
    if filename.startswith(REPO + os.sep):
        return os.path.relpath(filename, REPO)
    return filename


def format_profile(name, summary):
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


def pyspy_summary(path, count=12):
    """
    Own and inclusive samples per function of a ``py-spy record --format raw
    --threads`` file, the reactor thread and the other threads apart, waits
    (epoll, idle pool threads) counted apart from work.
    """
    own = {}
    inclusive = {}
    busy = {}
    waiting = {}
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

    def top(table):
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


def _frame_name(frame):
    # "function (path/to/file.py:123)" -> "function (file.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({_short_path(where)})" if where else name


def format_pyspy(name, summary):
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


def _profiled_scenarios(run):
    sizes = run.sizes

    @defer.inlineCallbacks
    def fetch_1():
        rows, seconds, _, _ = yield run.fetch(
            [({"$limit": sizes.fetch_1_rows}, sizes.fetch_1_rows)])
        return f"{rows:,} rows", seconds

    @defer.inlineCallbacks
    def fetch_100():
        rows, seconds, _, _ = yield run.fetch(
            [({"$where": {"pid": f"p{i % PIDS}"}, "$limit": sizes.rows_per_stream},
              sizes.rows_per_stream) for i in range(sizes.streams)])
        return f"{rows:,} rows", seconds

    @defer.inlineCallbacks
    def persist_50():
        result = yield run.persist(50, sizes.duration)
        return f"{result['per_s'] * sizes.duration:,.0f} persists", sizes.duration

    return [
        ("per-row fetch, 1 stream", fetch_1),
        (f"per-row fetch, {sizes.streams} streams", fetch_100),
        ("persist, 50 in flight", persist_50),
    ]


@defer.inlineCallbacks
def run_profiles(run, log):
    """
    The per-row fetch on 1 stream, on 100 streams, and persist with 50 in
    flight, each against a fresh server under cProfile (the reactor thread
    only, slowed by cProfile itself), then, when ``py-spy`` is installed,
    against an unprofiled one that py-spy samples (every thread).
    """
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        log("profile: py-spy is not installed (pip install py-spy): cProfile only")
    results = {"cprofile": {}, "py-spy": {}}
    for index, (name, scenario) in enumerate(_profiled_scenarios(run)):
        log(f"profile: {name}, cProfile")
        path = os.path.join(run.workdir, f"cprofile-{index}.prof")
        yield run.start_server(profile=path)
        try:
            yield warm_up(run)
            what, seconds = yield scenario()
        finally:
            yield run.stop_server()
        if not os.path.exists(path):
            raise BenchError(f"the profiled server wrote no {path}")
        summary = profile_summary(path)
        summary.update(what=what, seconds=seconds, stats_file=path)
        results["cprofile"][name] = summary
        if pyspy is None:
            continue
        log(f"profile: {name}, py-spy")
        path = os.path.join(run.workdir, f"py-spy-{index}.txt")
        yield run.start_server()
        yield warm_up(run)
        # --gil: only the thread holding the GIL, i.e. where the Python time goes
        spy = Child("py-spy", [pyspy, "record", "--pid", str(run.server.pid), "--rate", "400",
                               "--gil", "--format", "raw", "--threads", "--nonblocking",
                               "--output", path],
                    os.path.join(run.workdir, f"py-spy-{index}.log"))
        try:
            spy.start()
            yield spy.wait_for(partial(spy.log_has, "Sampling process"), "sampling", timeout=20)
            what, seconds = yield scenario()
        finally:
            yield spy.stop(how=signal.SIGINT)
            yield run.stop_server()
        if not os.path.exists(path):
            raise BenchError(f"py-spy wrote no {path}:\n{spy.log_tail()}")
        summary = pyspy_summary(path)
        summary.update(what=what, seconds=seconds, samples_file=path)
        results["py-spy"][name] = summary
    return results


# -- main ----------------------------------------------------------------------------


def machine_info(redis_version, mariadb_version):
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


def _prepare_database(run):
    """Fill the events table (the server made it) and make the INSERT floor's table."""
    connection = _connect_mysql(run.mysql)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE TABLE {run.floor_table} LIKE {run.table}")
            sql = (f"INSERT INTO {run.table} (`pid`, `domain`, `name`, `data`)"
                   " VALUES (%s, %s, %s, %s)")
            batch = []
            for i in range(run.sizes.rows):
                batch.append((f"p{i % PIDS}", "bench", "filled",
                              json.dumps({"i": i, "user": f"u-{i}", "amount": 12.5})))
                if len(batch) == 5000:
                    cursor.executemany(sql, batch)
                    batch = []
            if batch:
                cursor.executemany(sql, batch)
            cursor.execute("SELECT VERSION()")
            return cursor.fetchone()[0]
    finally:
        connection.close()


def _drop_database(run):
    connection = _connect_mysql(run.mysql)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{run.database}`")
    finally:
        connection.close()


@defer.inlineCallbacks
def _start_own_redis(run):
    port = _free_port()
    redis = Child("redis-server", [shutil.which("redis-server") or "redis-server",
                                   "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                   "--appendonly", "no"],
                  os.path.join(run.workdir, "redis.log"))
    redis.start()
    run.redis_port = port

    def answers():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    yield redis.wait_for(answers, "answer to PING", timeout=20)
    return redis


@defer.inlineCallbacks
def benchmark(options, log):
    sizes = Sizes.from_options(options)
    run = Run(options, sizes)
    children = []
    created_database = False
    try:
        if options.own_redis:
            redis = yield _start_own_redis(run)
            children.append(redis)
            run.redis_host = "127.0.0.1"
        log(f"Redis {run.redis_host}:{run.redis_port}, MariaDB {run.mysql['host']}:"
            f"{run.mysql['port']}, database {run.database}, work files in {run.workdir}")
        run.client = yield RedisClient().connect(run.redis_host, run.redis_port)
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
        mariadb_version = yield threads.deferToThread(_prepare_database, run)

        log("starting the echo process")
        echo = Child("echo", [sys.executable, "-m", "eventsource.bench",
                              "--echo", run.prefix, str(sizes.pairs),
                              "--echo-redis", f"{run.redis_host}:{run.redis_port}"],
                     os.path.join(run.workdir, "echo.log"))
        echo.start()
        children.append(echo)
        yield echo.wait_for(lambda: echo.log_has("echo ready"), "\"echo ready\"")
        yield run.client.listen_all({f"{run.prefix}:pong:{i}": _ignore
                                     for i in range(sizes.pairs)})

        yield pingpong(run.client, run.prefix, 1, 0.2)  # warms the echo up

        reps = []
        for index in range(0 if options.profile_only else sizes.repeat):
            log(f"repetition {index + 1} of {sizes.repeat}: a fresh server, warmed up")
            # Every repetition starts from a fresh server, so that the RSS of
            # its idle streams is not hidden by memory the last one freed.
            yield run.stop_server()
            yield run.start_server()
            yield warm_up(run)
            yield run.persist(1, 0.2)
            figures = yield repetition(run, lambda what: log(f"  {what}"))
            reps.append(figures)

        yield run.stop_server()
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
            yield threads.deferToThread(_drop_database, run)
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


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python3 -m eventsource.bench",
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
    parser.add_argument("--echo", nargs=2, metavar=("PREFIX", "PAIRS"), help=argparse.SUPPRESS)
    parser.add_argument("--echo-redis", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    for name in ("repeat", "rows", "idle_streams"):
        value = getattr(options, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return options


def main(argv=None):
    options = parse_args(sys.argv[1:] if argv is None else argv)
    if options.echo:
        host, _, port = (options.echo_redis or "127.0.0.1:6379").rpartition(":")
        echo_main(host, int(port), options.echo[0], int(options.echo[1]))
        return 0

    started = time.monotonic()

    def log(text):
        print(f"[{time.monotonic() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    outcome = {}

    @defer.inlineCallbacks
    def go(_reactor):
        try:
            outcome["result"] = yield benchmark(options, log)
        except BenchError as error:
            outcome["error"] = str(error)
        except Exception:
            outcome["error"] = Failure().getTraceback()

    try:
        task.react(go)
    except SystemExit:
        pass
    if "result" not in outcome:
        print(f"benchmark failed: {outcome.get('error', 'the reactor stopped')}", file=sys.stderr)
        return 1
    result, table = outcome["result"]
    result["seconds"] = time.monotonic() - started
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


if __name__ == "__main__":
    sys.exit(main())
