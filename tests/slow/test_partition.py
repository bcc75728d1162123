"""
A network partition, for real (issue 13, section 4): two replicas (``--replicas``)
on one Redis and one MariaDB of the test's own (:class:`tests.netns.PartitionRig`,
shared by this module); replica A runs in this process, in the host's network
namespace, replica B is a ``twistd eventsource`` process in a namespace of its
own that reaches MariaDB and Redis each through a veth link.  Under a load of
version 2 appends (event ids made before the first attempt, expected versions,
the client's retries) and stream reads, one of B's links is cut for
:data:`PARTITION` seconds (its host end set down: a silent partition), then
healed:

- cut from MariaDB: B notices within about 2 s and claims nothing until its
  database answers again; what it took before fails (``unavailable``, or no
  answer) and the client sends it again, to be served by A;
- cut from Redis: B hears nothing, its PING goes unanswered, it drops its
  connections and reconnects until the heal; A serves;
- cut from MariaDB while B's transaction holds the append lock: MariaDB kills
  B's idle session after ``idle_transaction_timeout``, and A's appends go on.

Every acknowledged event is stored once, at the version it was acknowledged
with; the streams' versions have no gap; every read that was answered was
right; and after the heal B serves again, which the test sees in B's own
counts (``eventsource_requests_total{kind="persist",result="ok"}`` on B's
``/metrics``, reached over a third link that is never cut, polled about every
0.1 s).  Each test also checks what its measure changed, each of which fails
without it: the rate of acknowledgements late in the cut against the rate
before it (a ratio of two rates of the same run), B's log and its
``eventsource_redis_connected``, and how long A's appends waited after a cut
inside a transaction.  The figures (heal to B serving again, requests retried
and failed while cut) are printed and docs/OPERATIONS.md quotes them.
"""
import os
import re
import sys
import time
import urllib.request
import uuid
from collections import Counter

import pymysql
from twisted.enterprise import adbapi
from twisted.internet import defer, reactor, threads
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from eventsource.client import (
    NO_STREAM,
    NewEvent,
    NoServerError,
    RedisConnectionError,
    ReplyTimeout,
    RetryPolicy,
    StreamTimeout,
    Unavailable,
    connect,
)
from eventsource.config import Config
from eventsource.service import make_server
from tests.clusters import LoggedProcess, kill_group, shared, spawn
from tests.netns import PartitionRig
from tests.support import free_port, sleep, unique, wait_until

#: seconds each MariaDB read or write of both replicas may take (the default
#: 60 s would keep B's requests that were in flight at the cut for a minute)
MYSQL_TIMEOUT = 3.0

#: seconds a client's attempt waits for an answer
CLIENT_TIMEOUT = 2.0

#: the client's retries of an append whose outcome is unknown
RETRY = RetryPolicy(retries=20, initial_delay=0.05, max_delay=0.5)

#: seconds each partition lasts
PARTITION = 6.0

#: what a read may meet while a replica is cut off (it is then read again)
READ_FAILURES = (ReplyTimeout, Unavailable, NoServerError, StreamTimeout, RedisConnectionError)

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROBLEM = PartitionRig.missing()


def rig():
    return shared(__name__, PartitionRig)


def report(text):
    """A figure for the person running the slow tests (and for the docs)."""
    print("\n" + text, file=sys.stderr)


def _get(url, timeout=2.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return None, str(error)


_SAMPLE = re.compile(r'^(eventsource_[a-z_]+)(?:\{([^}]*)\})? ([0-9.e+-]+)$')


def parse_metrics(text):
    """``{(name, frozenset(labels)): value}`` of a Prometheus text page."""
    values = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            values[match.group(1), labels] = float(match.group(3))
    return values


class ReplicaB(LoggedProcess):
    """``twistd eventsource --replicas`` in the rig's namespace; its ``/metrics`` over ``control``."""

    tail_lines = 60

    def __init__(self, rig, table, prefix, logfile):
        self.rig = rig
        self.table = table
        self.prefix = prefix
        self.logfile = logfile
        self.http_port = free_port()
        self.process = None

    @property
    def url(self):
        return f"http://{self.rig.control_ip}:{self.http_port}"

    def start(self):
        redis_host, redis_port = self.rig.redis_address
        mysql_host, mysql_port = self.rig.mysql_address
        # (env -i: no REDIS_*, MYSQL_*, EVENTSOURCE_* of the test's environment)
        command = ["env", "-i", f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}",
                   f"PYTHONPATH={HERE}", sys.executable, "-c",
                   "from twisted.scripts.twistd import run; run()",
                   "-n", "--pidfile=", "eventsource", "--replicas", "--writer-lease", "0",
                   "--table", self.table, "--channel-prefix", self.prefix,
                   "--redis-host", redis_host, "--redis-port", str(redis_port),
                   "--mysql-host", mysql_host, "--mysql-port", str(mysql_port),
                   "--mysql-user", "root", "--mysql-timeout", str(MYSQL_TIMEOUT),
                   "--http-port", str(self.http_port),
                   "--http-interface", self.rig.control_ip]
        self.process = spawn(self.rig.in_namespace(command), self.logfile, cwd=HERE)
        return self

    def ready(self):
        if self.process.poll() is not None:
            raise AssertionError(f"replica B exited ({self.process.returncode}):\n"
                                 f"{self.log_tail()}")
        status, _ = _get(self.url + "/health/ready", timeout=1)
        return status == 200

    def metrics(self):
        """B's counts now (blocking: call it from a thread)."""
        status, text = _get(self.url + "/metrics")
        if status != 200:
            raise AssertionError(f"replica B's /metrics answered {status}: {text[:300]}")
        return parse_metrics(text)


    def stop(self):
        kill_group(self.process)


def requests(metrics, kind, result):
    return metrics.get(("eventsource_requests_total",
                        frozenset({("kind", kind), ("result", result)})), 0.0)


def summary(metrics):
    """B's counts that tell what it did with requests."""
    return {f"{kind} {result}": int(requests(metrics, kind, result))
            for kind in ("persist", "fetch") for result in
            ("ok", "failed", "elsewhere", "unclaimed") if requests(metrics, kind, result)}


class Load:
    """
    Writers appending to a stream each, with expected versions and event ids
    made before the first attempt (the client repeats an attempt whose outcome
    is unknown; what still fails is sent again by the writer, the same event),
    and readers reading the writers' streams back.  Counts by phase.
    """

    def __init__(self, test, client, writers=4, readers=2):
        self.test = test
        self.client = client
        self.phase = "before"
        self.stopping = False
        self.acknowledged = {}  # event id -> (pid, version)
        self.by_stream = {}  # pid -> [event id of version 0, 1, ...]
        self.acks = Counter()  # phase -> appends acknowledged
        self.duplicates = Counter()  # phase -> acknowledged as the repeat of a stored append
        self.retried = Counter()  # (phase, why) -> attempts the client sent again
        self.resent = Counter()  # (phase, error) -> appends the writer sent again
        self.reads = Counter()  # phase -> reads answered (and checked)
        self.reads_failed = Counter()  # (phase, error) -> reads that failed, read again
        self.ack_times = []
        globalLogPublisher.addObserver(self._observe)
        test.addCleanup(globalLogPublisher.removeObserver, self._observe)
        self.pids = [unique("w") for _ in range(writers)]
        self.loops = [self._writer(pid) for pid in self.pids]
        self.loops += [self._reader(n) for n in range(readers)]
        for loop in self.loops:
            loop.addErrback(self._failed)
        test.addCleanup(self.stop)

    def _failed(self, failure):
        self.stopping = True
        return failure

    def _observe(self, event):
        """The client's log line for each attempt it sends again."""
        if (event.get("log_namespace", "").startswith("eventsource.client")
                and "attempt {attempt}" in (event.get("log_format") or "")):
            why = "no answer" if "no answer" in str(event.get("error")) else "unavailable"
            self.retried[self.phase, why] += 1

    @defer.inlineCallbacks
    def _writer(self, pid):
        version = -1
        stream = self.by_stream.setdefault(pid, [])
        while not self.stopping:
            event = NewEvent("d", "n", {"v": version + 1}, event_id=uuid.uuid4())
            while True:
                try:
                    result = yield self.client.append(
                        pid, [event], expected_version=NO_STREAM if version < 0 else version)
                    break
                except (NoServerError, RedisConnectionError, ReplyTimeout, Unavailable) as error:
                    self.resent[self.phase, type(error).__name__] += 1
                    yield sleep(0.05)
            version += 1
            self.test.assertEqual(result.versions, (version,), pid)
            event_id = str(event.event_id)
            self.acknowledged[event_id] = (pid, version)
            stream.append(event_id)
            self.acks[self.phase] += 1
            self.duplicates[self.phase] += result.duplicate
            self.ack_times.append(time.monotonic())

    @defer.inlineCallbacks
    def _reader(self, number):
        turn = number
        while not self.stopping:
            yield sleep(0.02)
            pid = self.pids[turn % len(self.pids)]
            turn += 1
            known = list(self.by_stream[pid])  # acknowledged before the read was sent
            try:
                events = yield defer.Deferred.fromCoroutine(self._read(pid))
            except READ_FAILURES as error:
                self.reads_failed[self.phase, type(error).__name__] += 1
                continue
            versions = [e.version for e in events]
            self.test.assertEqual(versions, list(range(len(versions))), pid)
            self.test.assertGreaterEqual(len(events), len(known), pid)
            self.test.assertEqual([str(uuid.UUID(e.event_id)) for e in events[:len(known)]],
                                  known, pid)
            self.reads[self.phase] += 1

    async def _read(self, pid):
        return [event async for event in self.client.read_stream(pid, timeout=CLIENT_TIMEOUT)]

    def stop(self):
        self.stopping = True
        return defer.DeferredList(self.loops)

    @defer.inlineCallbacks
    def finish(self):
        """Stop and fail with the first loop's failure, if one failed."""
        self.stopping = True
        yield defer.gatherResults(self.loops, consumeErrors=True)

    def retries_in(self, phase):
        return {why: n for (p, why), n in self.retried.items() if p == phase}

    def failures_in(self, counter, phase):
        return {what: n for (p, what), n in counter.items() if p == phase}


class PartitionTests(TestCase):
    timeout = 120

    if PROBLEM:
        skip = f"cannot make a network partition here: {PROBLEM}"

    @defer.inlineCallbacks
    def setUp(self):
        started = time.monotonic()
        self.rig = rig()  # (blocks the first time: mariadb-install-db, about 4 s)
        if time.monotonic() - started > 1:
            report(f"partition rig ready in {self.rig.start_seconds:.1f} s "
                   f"(namespace {self.rig.namespace.name})")
        self.rig.namespace.heal_all()
        self.addCleanup(self.rig.namespace.heal_all)
        self.database = unique("es_part")
        self.table = f"{self.database}.event"
        self.prefix = unique("p") + ":"
        self.addCleanup(self.rig.mariadb.sql, f"DROP DATABASE IF EXISTS `{self.database}`")
        redis_host, redis_port = self.rig.redis_address
        mysql_host, mysql_port = self.rig.mysql_address
        self.a = make_server(Config(
            table=self.table, redis_host=redis_host, redis_port=redis_port,
            mysql_host=mysql_host, mysql_port=mysql_port, mysql_user="root",
            mysql_timeout=MYSQL_TIMEOUT, replicas=True, writer_lease=0.0,
            channel_prefix=self.prefix),
            stop_reactor_on_failure=False)
        self.a.startService()
        self.addCleanup(lambda: self.a.stopService() if self.a.running else None)
        yield self.a.ready
        self.b = ReplicaB(self.rig, self.table, self.prefix, self.mktemp() + ".log").start()
        self.addCleanup(self.b.stop)
        yield wait_until(self.b.ready, timeout=60, step=0.2, what="replica B to be ready")
        self.client = yield connect(redis_host, redis_port, reactor=reactor,
                                    channel_prefix=self.prefix, timeout=CLIENT_TIMEOUT,
                                    retry=RETRY)
        self.addCleanup(self.client.disconnect)
        #: appends of the test's own (besides the load's), checked with them
        self.extra_appends = []
        self.extra_figures = {}

    def b_metrics(self):
        return threads.deferToThread(self.b.metrics)

    @defer.inlineCallbacks
    def b_persists(self):
        metrics = yield self.b_metrics()
        return requests(metrics, "persist", "ok")

    @defer.inlineCallbacks
    def partition(self, tag, cut=None):
        """
        Load; cut B's ``tag`` link (with ``cut(load, link)`` when given, which
        fires with the moment of the cut) for :data:`PARTITION` seconds; heal;
        wait until B serves a persist again; stop the load and check the
        table.  Returns the figures; keeps B's counts in :attr:`during` (at
        the end of the cut) and :attr:`after`.
        """
        load = self.load = Load(self, self.client)
        # (cleanups run last first: the links heal before the loads are awaited)
        self.addCleanup(self.rig.namespace.heal_all)
        started = time.monotonic()
        yield sleep(2.0)
        self.assertFalse(load.stopping, "a loop failed before the partition")
        served_before = yield self.b_persists()
        self.assertGreater(served_before, 0, "replica B served nothing before the partition")
        self.before_cut = before = yield self.b_metrics()
        link = self.rig.links[tag]
        rate_before = load.acks["before"] / (time.monotonic() - started)
        load.phase = "cut"
        if cut is None:
            cut_at = link.cut()
        else:
            cut_at = yield cut(load, link)
        yield sleep(max(0.0, PARTITION - (time.monotonic() - cut_at)))
        self.during = during = yield self.b_metrics()
        load.phase = "healed"
        healed_at = link.heal()
        late = cut_at + PARTITION / 2  # (B has noticed the partition by then)
        rate_late = sum(1 for t in load.ack_times if late <= t < healed_at) / (healed_at - late)
        at_heal = requests(during, "persist", "ok")

        # B serves again: its count of persists written grows
        state = {}

        @defer.inlineCallbacks
        def poll():
            while "served" not in state:
                count = yield self.b_persists()
                if count > at_heal:
                    state["served"] = time.monotonic()
                    return
                if "ready" not in state:
                    ready = yield threads.deferToThread(self.b.ready)
                    if ready:
                        state["ready"] = time.monotonic()
                yield sleep(0.05)

        polling = poll()
        yield wait_until(lambda: "served" in state or load.stopping, timeout=60, step=0.05,
                         what="replica B to serve a persist after the heal")
        self.assertFalse(load.stopping, "a loop failed")
        yield polling
        yield sleep(1.5)
        self.after = after = yield self.b_metrics()
        yield load.finish()
        yield defer.gatherResults(self.extra_appends)
        self.check_table(load)
        figures = {
            "link": tag,
            "partition_s": round(healed_at - cut_at, 2),
            "heal_to_b_serving_s": round(state["served"] - healed_at, 2),
            "heal_to_b_ready_s": round(state.get("ready", state["served"]) - healed_at, 2),
            "acks_per_s_before": round(rate_before),
            "acks_per_s_late_in_the_cut": round(rate_late),
            "acks": dict(load.acks),
            "duplicates": dict(load.duplicates),
            "client_retries_while_cut": load.retries_in("cut"),
            "client_retries_after_heal": load.retries_in("healed"),
            "resent_by_writers_while_cut": load.failures_in(load.resent, "cut"),
            "reads": dict(load.reads),
            "reads_failed_while_cut": load.failures_in(load.reads_failed, "cut"),
            "reads_failed_after_heal": load.failures_in(load.reads_failed, "healed"),
            "b_before": summary(before),
            "b_while_cut": _delta(summary(during), summary(before)),
            "b_after_heal": _delta(summary(after), summary(during)),
        }
        self.b_log = open(self.b.logfile, errors="replace").read()
        figures.update(self.extra_figures)
        report(f"partition of B from {tag}: {figures}")
        self.assertGreater(load.acks["cut"], 0, "nothing acknowledged while B was cut off")
        self.rates = (rate_before, rate_late)
        return figures

    def assert_served_while_cut(self):
        """
        In the second half of the cut the service acknowledged appends at a
        fifth of its rate before the cut at least (a ratio of two rates of
        the same run: about one half here; without the database check it was
        under a fiftieth, every writer waiting on a replica that could not
        write).
        """
        before, late = self.rates
        self.assertGreater(late, before / 5, self.figures)

    def check_table(self, load):
        """Every acknowledged event stored once, at its version; nothing else stored."""
        rows = self.rig.mariadb.sql(
            f"SELECT LOWER(HEX(event_id)), pid, version FROM {self.table} ORDER BY id")
        ids = [row[0] for row in rows]
        self.assertEqual(len(ids), len(set(ids)), "an event id stored twice")
        stored = {str(uuid.UUID(row[0])): (row[1], row[2]) for row in rows}
        self.assertEqual(stored, load.acknowledged)
        for pid in load.pids:
            versions = sorted(v for p, v in stored.values() if p == pid)
            self.assertEqual(versions, list(range(len(versions))), pid)

    def b_count(self, metrics, name):
        return metrics.get((name, frozenset()), 0.0)

    @defer.inlineCallbacks
    def test_1_cut_from_mariadb(self):
        """
        B loses MariaDB, not Redis: it notices within about 2 s and claims
        nothing until MariaDB answers again, so A serves the requests (and
        the repeats of those B had taken, which failed or went unanswered).
        """
        self.figures = yield self.partition("mysql")
        self.assertIn("the database is unreachable", self.b_log)
        self.assertIn("the database answers again after", self.b_log)
        self.assert_served_while_cut()

    @defer.inlineCallbacks
    def test_2_cut_from_redis(self):
        """
        B loses Redis, not MariaDB: its PING goes unanswered, it drops both
        connections and reconnects until the heal; A serves meanwhile.
        """
        self.figures = yield self.partition("redis")
        self.assert_served_while_cut()
        self.assertIn("did not answer a PING within", self.b_log)
        self.assertEqual(self.b_count(self.during, "eventsource_redis_connected"), 0)
        self.assertEqual(self.b_count(self.after, "eventsource_redis_connected"), 1)
        self.assertGreaterEqual(self.b_count(self.after, "eventsource_redis_reconnects_total"), 1)

    @defer.inlineCallbacks
    def test_3_cut_from_mariadb_inside_a_transaction(self):
        """
        The cut comes while B's transaction holds the append lock (its INSERT
        waits for a row the test holds; the test lets it go just after the
        cut, so MariaDB runs the INSERT and its answer is lost): MariaDB
        kills B's session once it has been idle in its transaction for
        ``idle_transaction_timeout`` (here 3 s), and A's appends go on.
        Without it every writer of the table waited for the heal.
        """
        self.figures = yield self.partition("mysql", cut=self.cut_inside_a_transaction)
        self.assertLess(self.figures["writers_waited_after_the_cut_s"], PARTITION - 1)
        # A's statements that waited for the lock past --mysql-timeout gave
        # their connections up; adbapi logs the rollbacks that failed on them
        self.flushLoggedErrors(pymysql.err.OperationalError, pymysql.err.InterfaceError,
                               adbapi.ConnectionLost)

    @defer.inlineCallbacks
    def cut_inside_a_transaction(self, load, link):
        mariadb = self.rig.mariadb
        b_host = self.rig.links["mysql"].ns_ip
        for attempt in range(10):
            holder = pymysql.connect(host=mariadb.host, port=mariadb.port, user="root",
                                     password="", autocommit=False, connect_timeout=5)
            self.addCleanup(holder.close)
            pid = unique("blocked")
            with holder.cursor() as cursor:
                # the stream's version 0, not committed: an append to the
                # stream waits for it, holding the append lock
                cursor.execute(f"INSERT INTO {self.table} (pid, domain, name, data, version, "
                               "event_id) VALUES (%s, 'd', 'n', '{}', 0, %s)",
                               (pid, uuid.uuid4().bytes))
            event = NewEvent("d", "n", {"blocked": attempt}, event_id=uuid.uuid4())
            appended = self.client.append(pid, [event])
            appended.addCallback(self._extra_acknowledged, event, pid)
            self.extra_appends.append(appended)
            waiting = yield threads.deferToThread(
                wait_for_host, mariadb, holder.thread_id(), timeout=CLIENT_TIMEOUT)
            if waiting == b_host:
                cut_at = link.cut()
                yield sleep(0.3)
                holder.rollback()  # (B's INSERT runs now; its answer is lost)
                released = time.monotonic()
                yield wait_until(lambda released=released: any(t > released
                                                               for t in load.ack_times),
                                 timeout=PARTITION, step=0.02,
                                 what="an append acknowledged after the cut")
                waited = min(t for t in load.ack_times if t > released) - released
                self.extra_figures.update(attempts_to_catch_b=attempt + 1,
                                          writers_waited_after_the_cut_s=round(waited, 2))
                return cut_at
            holder.rollback()  # (A's, or none: A writes it; another try)
            yield appended
        self.fail("replica B never took the blocked append")

    def _extra_acknowledged(self, result, event, pid):
        self.assertEqual(len(result.events), 1)
        self.load.acknowledged[str(event.event_id)] = (pid, result.versions[0])
        return result


def wait_for_host(mariadb, holder_thread, timeout):
    """
    The address of the client whose transaction waits for a lock of the
    transaction of connection ``holder_thread`` (a replica's append), once
    one does; None after ``timeout``.  Blocking.  (The holder is found by
    its connection in the same snapshot of INNODB_TRX as the waiter: looked
    up alone beforehand, a new transaction may not show there yet.)
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = mariadb.sql(
            "SELECT p.HOST FROM information_schema.INNODB_LOCK_WAITS w "
            "JOIN information_schema.INNODB_TRX t ON t.trx_id = w.requesting_trx_id "
            "JOIN information_schema.INNODB_TRX b ON b.trx_id = w.blocking_trx_id "
            "JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id "
            "WHERE b.trx_mysql_thread_id = %s", (holder_thread,))
        if rows:
            return rows[0][0].rsplit(":", 1)[0]
        time.sleep(0.05)
    return None


def _delta(now, then):
    return {key: now.get(key, 0) - then.get(key, 0)
            for key in set(now) | set(then) if now.get(key, 0) != then.get(key, 0)}
