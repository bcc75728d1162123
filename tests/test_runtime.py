"""
Runtime bounds (issue 9, points 4 and 6), each caused for real against
MariaDB and Redis: the statement time limit of every read, no re-run of a
statement that was sent, nothing of the server's left running in MariaDB
after a stop, a shutdown bounded whatever is queued, an explicit session
``sql_mode``, and a Redis ``NOPERM`` on a reply channel taken as a warning.

Measured times are logged (``measured: ...`` lines in ``_trial_temp/test.log``).
"""

import json
import threading
import time

import pymysql
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from eventsource import store as store_module
from eventsource import wire
from eventsource.config import Config
from eventsource.service import EventSourceService
from eventsource.store import (CUT_GRACE, KILL_GRACE, SQL_MODE, StatementTimeLimit, Store,
                               _check_server, _not_sent, _read_page)
from eventsource.testing import MemoryBus, MemoryStore
from tests.redis_server import PrivateRedisTestCase, RedisServer
from tests.support import MYSQL, IntegrationTestCase, LogCapture, sleep, sql, unique, wait_until
from tests.test_faults import TCPProxy, lost_connection_errors

log = Logger()


def event(pid, **data):
    return {"pid": pid, "domain": "runtime", "name": "ran", "data": data}


class SlowPlan:
    """A hand-built keyset plan whose page is ``SELECT SLEEP(seconds)``, marked to be found."""

    keyset = True
    keyset_start = 0
    keyset_index = None

    def __init__(self, seconds):
        self.seconds = seconds
        self.marker = unique("slow")
        self.runs = 0

    def row_encoder(self, names, checked_json=False):
        return wire.row_encoder(names)

    def page_sql(self, position, high_water, size):
        self.runs += 1
        return (f"SELECT /* {self.marker} */ SLEEP(%s) AS `slept`, 1 AS `__keyset`",
                (self.seconds,))

    def running(self):
        """How many of its statements MariaDB is running now."""
        return sql("SELECT COUNT(*) FROM information_schema.PROCESSLIST"
                   " WHERE INFO LIKE %s AND ID <> CONNECTION_ID()",
                   (f"%{self.marker}%",))[0][0]


def server_connections(server):
    """MariaDB's ids of the server's pooled connections."""
    return [c.thread_id() for c in list(server.store._pool.connections.values())]


def still_there(ids):
    if not ids:
        return []
    marks = ", ".join(str(int(i)) for i in ids)
    return sql(f"SELECT ID, COMMAND, INFO FROM information_schema.PROCESSLIST WHERE ID IN ({marks})")


class TableLock:
    """``LOCK TABLES ... WRITE`` from a connection of the test: every read and write of the
    table waits (a stalled database, as far as the server can tell)."""

    def __init__(self, testcase, table):
        self.connection = pymysql.connect(autocommit=True, **MYSQL)
        self._mutex = threading.Lock()
        with self.connection.cursor() as cursor:
            cursor.execute(f"LOCK TABLES {table} WRITE")
        testcase.addCleanup(self.release)

    def release(self):
        with self._mutex:
            connection, self.connection = self.connection, None
        if connection is not None:
            with connection.cursor() as cursor:
                cursor.execute("UNLOCK TABLES")
            connection.close()

    def release_later(self, testcase, seconds):
        """
        A safety net, in a thread: if the server blocked the reactor (the code
        before this change joined pool threads stuck behind the lock), the lock
        still goes, so the test fails on its measured time instead of hanging.
        """
        timer = threading.Timer(seconds, self.release)
        timer.start()
        testcase.addCleanup(timer.cancel)


# -- the statement time limit -----------------------------------------------------


class StatementSqlTests(SynchronousTestCase):
    """What is sent: every SELECT of a read under ``max_statement_time``; MySQL refused."""

    class Recorder:
        def __init__(self, version="10.11.19-MariaDB"):
            self.statements = []
            self.description = [("slept",), ("__keyset",)]
            self.version = version

        def execute(self, statement, params=None):
            self.statements.append(statement)

        def fetchone(self):
            return (self.version,) if self.statements[-1] == "SELECT VERSION()" else (7,)

        def fetchall(self):
            return [(0, 7)]

    def test_every_select_of_a_read_is_limited(self):
        txn = self.Recorder()
        _read_page(txn, SlowPlan(1), "`d`.`t`", None, 0, 10, 2.5)
        self.assertEqual(len(txn.statements), 2)  # the high-water mark, then the page
        for statement in txn.statements:
            self.assertTrue(statement.startswith(
                "SET STATEMENT max_statement_time=2.500000 FOR SELECT "), statement)

    def test_zero_turns_the_limit_off(self):
        txn = self.Recorder()
        _read_page(txn, SlowPlan(1), "`d`.`t`", None, 0, 10, 0)
        for statement in txn.statements:
            self.assertTrue(statement.startswith("SELECT "), statement)

    def test_a_server_that_is_not_mariadb_is_refused_while_the_limit_is_on(self):
        with self.assertRaises(RuntimeError) as caught:
            _check_server(self.Recorder("8.0.36"), 30.0)
        self.assertIn("is not MariaDB", str(caught.exception))
        self.assertIn("--max-statement-time 0", str(caught.exception))
        self.assertEqual(_check_server(self.Recorder("8.0.36"), 0), "8.0.36")
        self.assertEqual(_check_server(self.Recorder(), 30.0), "10.11.19-MariaDB")


class RunAgainTests(SynchronousTestCase):
    """Which failures mean the statement never reached MariaDB (safe to run once more)."""

    def test_only_statements_never_sent_run_again(self):
        never_sent = [pymysql.err.InterfaceError(0, ""),
                      pymysql.err.OperationalError(2006, "MySQL server has gone away (BrokenPipe)")]
        sent = [pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query"),
                pymysql.err.OperationalError(
                    2013, "Lost connection to MySQL server during query (timed out)"),
                pymysql.err.OperationalError(1317, "Query execution was interrupted"),
                pymysql.err.OperationalError(1969, "Query execution was interrupted "
                                                   "(max_statement_time exceeded)"),
                pymysql.err.OperationalError(1927, "Connection was killed"),
                RuntimeError("anything else")]
        self.assertEqual([_not_sent(error) for error in never_sent], [True, True])
        self.assertEqual([_not_sent(error) for error in sent], [False] * len(sent))


class StatementTimeLimitTests(IntegrationTestCase):
    server_config = {"max_statement_time": 0.001}

    @defer.inlineCallbacks
    def test_slow_fetch_is_stopped_answered_error_and_not_run_again(self):
        """
        A real client fetch whose query scans 100,000 rows (a filter no index
        serves, matching nothing) under a 1 ms limit: MariaDB stops it (1969),
        the client gets "error", "end", and the page is read once only.
        """
        self.insert_events(100000, pid="many")
        events = LogCapture(self)
        reads = []

        def counted(*args):
            reads.append(args[4])
            return _read_page(*args)

        self.patch(store_module, "_read_page", counted)
        started = time.monotonic()
        messages = yield self.client.fetch({"$where": {"name": {"$contains": "no such name"}}})
        log.info("measured: a fetch stopped by a 1 ms statement limit answered in {seconds:.3f} s",
                 seconds=time.monotonic() - started)
        self.assertEqual(messages, ["error", "end"])
        self.assertEqual(len(reads), 1)
        self.assertEqual(self.flushLoggedErrors(StatementTimeLimit), [])
        stopped = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(stopped), 1, stopped)
        self.assertIn("ran longer than the statement time limit (0.001 s)", stopped[0])
        self.assertFalse(self.server.streams)
        # the server goes on
        reply = yield self.client.persist(event("after"))
        self.assertEqual(reply[0]["affectedRows"], 1)


class ReadTimeoutTests(IntegrationTestCase):
    """``--mysql-timeout`` passes while a read runs: it is not run again, and MariaDB stops it."""

    server_config = {"mysql_timeout": 1.0, "max_statement_time": 0}

    @defer.inlineCallbacks
    def test_timed_out_read_is_not_run_again_and_is_killed(self):
        plan = SlowPlan(20)
        started = time.monotonic()
        with self.assertRaises(pymysql.err.OperationalError) as caught:
            yield self.server.store.read_page(plan, 0, 0, 10)
        took = time.monotonic() - started
        self.assertIn("timed out", str(caught.exception))
        self.assertEqual(plan.runs, 1, "the timed-out statement was sent again")
        self.assertLess(took, 5)
        # The server gave up on it; MariaDB would run it 20 s: it is killed.
        waited = yield wait_until(lambda: plan.running() == 0, timeout=5,
                                  what="the timed-out statement to be killed")
        log.info("measured: a read given up on at --mysql-timeout stopped in MariaDB "
                 "{seconds:.3f} s later", seconds=waited)
        self.assertEqual(plan.runs, 1)
        lost_connection_errors(self)


class IdleTransactionTests(IntegrationTestCase):
    """
    A server that goes silent inside a transaction (a network partition:
    nothing tells MariaDB its client is gone) would hold the append lock, and
    every writer of the table, for as long as TCP kept the dead connection.
    MariaDB kills a session of ours that sits idle in a transaction for
    ``idle_transaction_timeout`` (``--mysql-timeout``, at most 10 s).
    """

    server_config = {"mysql_timeout": 2.0}

    def test_the_timeout_follows_mysql_timeout_up_to_ten_seconds(self):
        self.assertEqual([store_module.idle_transaction_timeout(t) for t in (0.5, 2.0, 2.1, 60)],
                         [1, 2, 3, 10])
        kwargs = Store(Config(mysql_timeout=60), None)._connect_kwargs()
        self.assertIn("/*M!100300 , idle_transaction_timeout = 10 */", kwargs["init_command"])

    @defer.inlineCallbacks
    def test_a_session_silent_inside_a_transaction_gives_the_append_lock_up(self):
        store = self.server.store
        held = threading.Event()
        gone = {}

        def silent_holder(txn):
            txn.execute("SELECT @@SESSION.idle_transaction_timeout")
            timeout = txn.fetchone()[0]
            txn.execute(f"SELECT id FROM {store.append_lock} WHERE id = 1 FOR UPDATE")
            txn.fetchall()
            held.set()
            time.sleep(4)  # (the server's side of a partition: not a word to MariaDB)
            try:
                txn.execute("SELECT 1")
            except pymysql.err.MySQLError as error:
                gone["error"] = error
            return timeout

        holding = store._run(silent_holder)
        yield wait_until(held.is_set, what="the lock to be taken")
        started = time.monotonic()
        connection = pymysql.connect(autocommit=False, **MYSQL)
        self.addCleanup(connection.close)
        with connection.cursor() as cursor:
            cursor.execute("SET SESSION innodb_lock_wait_timeout = 8")
            cursor.execute(f"SELECT id FROM {store.append_lock} WHERE id = 1 FOR UPDATE")
        waited = time.monotonic() - started
        connection.rollback()
        try:
            timeout = yield holding
        except pymysql.err.MySQLError:
            timeout = None  # (adbapi's rollback or commit on the killed session)
        log.info("measured: the append lock held by a silent session was free after "
                 "{seconds:.2f} s", seconds=waited)
        self.assertLess(waited, 3.5)
        self.assertIn(timeout, (2, None))
        lost_connection_errors(self)
        # and the server's pool goes on: the killed connection is made again
        self.assertEqual((yield self.client.persist(event("after")))[-1], "end")


class ProbeTests(IntegrationTestCase):
    """Replica mode's check that MariaDB answers: a connection of its own, short timeouts."""

    @defer.inlineCallbacks
    def test_the_probe_answers_and_makes_its_connection_again_after_a_kill(self):
        store = self.server.store
        yield store.probe()
        connection_id = store._probe_connection.thread_id()
        self.assertNotIn(connection_id, [c.thread_id() for c in store._pool.connections.values()])
        sql(f"KILL {int(connection_id)}")
        yield sleep(0.1)
        yield store.probe()
        self.assertNotEqual(store._probe_connection.thread_id(), connection_id)

    @defer.inlineCallbacks
    def test_a_silent_database_fails_the_probe_within_its_timeout(self):
        """A port that accepts and says nothing (a MariaDB that hangs, a half-open path)."""
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory, Protocol

        silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        store = Store(Config(mysql_host="127.0.0.1", mysql_port=silent.getHost().port), reactor)
        started = time.monotonic()
        with self.assertRaises(pymysql.err.OperationalError):
            yield store.probe()
        took = time.monotonic() - started
        self.assertGreater(took, store_module.PROBE_TIMEOUT - 0.5)
        self.assertLess(took, store_module.PROBE_TIMEOUT + 1.5)
        self.assertIsNone(store._probe_connection)


# -- nothing left running, shutdown bounded ------------------------------------------


class StopOrderTests(SynchronousTestCase):
    """With in-memory doubles and a Clock: what a stop does first."""

    def test_streams_end_and_reads_drop_before_the_persist_wait(self):
        clock, bus, store = Clock(), MemoryBus(), MemoryStore(hold=True)
        service = EventSourceService(Config(shutdown_timeout=3), clock, bus=bus.attach,
                                     store=store)
        service.startService()
        self.successResultOf(service.ready)
        service.message_received("fetch", json.dumps({"channel": "f", "query": {"$select": {}}}))
        service.message_received("persist", json.dumps({"channel": "p", "query": {
            "$insert": {"$documents": event("held")}}}))
        d = service.stopService()
        # at once: the stream is over and its read dropped, so the pool is
        # the persists' for the wait
        self.assertEqual(bus.messages("f"), ["error", "end"])
        self.assertTrue(store.reads_dropped)
        self.assertNoResult(d)
        store.release()
        self.assertEqual(bus.messages("p")[-1], "end")
        self.successResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])


class StopKillsStatementsTests(IntegrationTestCase):
    server_config = {"pool_size": 2, "shutdown_timeout": 1.0, "max_statement_time": 0,
                     "mysql_timeout": 10.0}

    @defer.inlineCallbacks
    def test_no_statement_of_the_server_remains_after_stop(self):
        """
        A read running for a minute and a persist waiting behind a table lock
        when the server stops: both are killed, the stop takes the shutdown
        timeout plus the kill, and none of the server's connections is left
        in ``information_schema.PROCESSLIST``.
        """
        reply = yield self.client.persist(event("before"))
        self.assertEqual(reply[0]["affectedRows"], 1)
        plan = SlowPlan(60)
        read = self.server.store.read_page(plan, 0, 0, 10)
        read.addErrback(lambda failure: None)  # killed: checked in PROCESSLIST below
        yield wait_until(lambda: plan.running() == 1, what="the slow read to run")
        lock = TableLock(self, f"`{self.database}`.`event`")
        lock.release_later(self, 40)
        yield self.client.subscribe("blocked")
        yield self.client.request("persist", {"channel": "blocked", "query": {
            "$insert": {"$documents": event("blocked")}}})
        # (the writer's first statement reads the stream's last version)
        writing = f"SELECT `pid`, MAX(`version`) FROM `{self.database}`.`event`%"
        yield wait_until(lambda: sql("SELECT COUNT(*) FROM information_schema.PROCESSLIST"
                                     " WHERE INFO LIKE %s", (writing,))[0][0] == 1,
                         what="the persist to wait for the lock")
        ids = server_connections(self.server)
        self.assertEqual(len(ids), 2)

        started = time.monotonic()
        yield self.server.stopService()
        took = time.monotonic() - started
        log.info("measured: stop with a running read and a blocked persist took {seconds:.3f} s",
                 seconds=took)
        self.assertLess(took, 1.0 + KILL_GRACE + 2)
        yield wait_until(lambda: not still_there(ids), timeout=3,
                         what="the server's connections to leave MariaDB")
        self.assertEqual(plan.running(), 0)
        self.assertEqual(plan.runs, 1)
        lock.release()
        self.assertEqual([pid for pid, in sql(f"SELECT pid FROM `{self.database}`.event")],
                         ["before"])
        self.flushLoggedErrors(pymysql.err.OperationalError)


class BoundedShutdownTests(IntegrationTestCase):
    server_config = {"pool_size": 2, "shutdown_timeout": 2.0}

    @defer.inlineCallbacks
    def test_thousands_of_queued_reads_do_not_hold_shutdown(self):
        """
        3,000 streams whose first page reads wait for a pool of 2 connections
        stuck behind a table lock, and 10 persists in flight: the stop takes at
        most the shutdown timeout plus the kill grace; every acknowledged
        persist is stored, nothing else.
        """
        acknowledged = yield defer.gatherResults(
            [self.client.persist(event(f"ok{i}")) for i in range(20)])
        for reply in acknowledged:
            self.assertEqual(reply[0]["affectedRows"], 1)
        lock = TableLock(self, f"`{self.database}`.`event`")
        lock.release_later(self, 30)
        for i in range(10):
            self.client.request("persist", {"channel": f"{self.prefix}late:{i}", "query": {
                "$insert": {"$documents": event(f"late{i}")}}})
        count = 3000
        for i in range(count):
            self.client.request("fetch", {"channel": f"{self.prefix}s:{i}",
                                          "query": {"$select": {"$where": {"pid": "ok1"}}}})
        yield wait_until(lambda: len(self.server.streams) == count and len(self.server._persists) == 10,
                         timeout=60, what="every stream to be open")
        # every stream still waits for its first page: the reads are queued
        self.assertEqual(sum(s.rows_sent for s in self.server.streams.values()), 0)
        queued = len(getattr(self.server.store, "_reads", ()))
        ids = server_connections(self.server)

        started = time.monotonic()
        yield self.server.stopService()
        took = time.monotonic() - started
        log.info("measured: stop with {queued} page reads queued on a pool of 2 behind a lock, "
                 "10 persists blocked: {seconds:.3f} s", queued=queued, seconds=took)
        self.assertLess(took, 2.0 + KILL_GRACE + 2)
        self.assertFalse(self.server.streams)
        yield wait_until(lambda: not still_there(ids), timeout=3,
                         what="the server's connections to leave MariaDB")
        lock.release()
        stored = sorted(pid for pid, in sql(f"SELECT pid FROM `{self.database}`.event"))
        self.assertEqual(stored, sorted(f"ok{i}" for i in range(20)))
        self.flushLoggedErrors(pymysql.err.OperationalError)


class StalledDatabaseTests(IntegrationTestCase):
    """
    The server reaches MariaDB through a proxy this test freezes: the pool's
    connections get no answer at all (a partition), while new connections
    (the one sending ``KILL QUERY``) still get through.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.proxy = TCPProxy(self, MYSQL["host"], MYSQL["port"])
        self.proxy.up()
        self.server_config = {"mysql_port": self.proxy.port, "pool_size": 2,
                              "max_statement_time": 0, "mysql_timeout": 10.0}
        yield super().setUp()

    def freeze(self):
        for proxied in list(self.proxy.factory.live):
            proxied.transport.pauseProducing()
            if proxied.peer is not None:
                proxied.peer.transport.pauseProducing()

    @defer.inlineCallbacks
    def test_stop_cuts_connections_that_never_answer(self):
        events = LogCapture(self)
        plan = SlowPlan(60)
        read = self.server.store.read_page(plan, 0, 0, 10)
        read.addErrback(lambda failure: None)
        yield wait_until(lambda: plan.running() == 1, what="the slow read to run")
        self.freeze()
        started = time.monotonic()
        yield self.server.stopService()
        took = time.monotonic() - started
        log.info("measured: stop with the database not answering took {seconds:.3f} s",
                 seconds=took)
        self.assertLess(took, KILL_GRACE + CUT_GRACE + 2)
        self.assertTrue(any("did not answer" in formatEvent(e) for e in events))
        # the KILL QUERY went through on a connection of its own
        yield wait_until(lambda: plan.running() == 0, timeout=3, what="the read to be killed")
        self.assertEqual(plan.runs, 1)
        lost_connection_errors(self)


# -- sql_mode ------------------------------------------------------------------------


HOSTILE_SQL_MODE = "NO_BACKSLASH_ESCAPES,ANSI_QUOTES,PIPES_AS_CONCAT"


class SqlModeTests(IntegrationTestCase):
    """
    Every pooled connection starts in a hostile ``sql_mode``, as it would on a
    MariaDB whose global default is that: PyMySQL's ``sql_mode`` argument sets
    it right after the handshake and before our ``init_command`` runs (the
    shared test server's global cannot be changed).
    """

    @defer.inlineCallbacks
    def setUp(self):
        original = Store._connect_kwargs

        def hostile(store):
            return dict(original(store), sql_mode=HOSTILE_SQL_MODE)

        self.patch(Store, "_connect_kwargs", hostile)
        yield super().setUp()

    @defer.inlineCallbacks
    def test_like_operators_work_whatever_the_default_mode(self):
        names = ["50%off", "500", "a_b", "axb", "back\\slash", "it's"]
        reply = yield self.client.persist([
            {"pid": "m", "domain": "mode", "name": name, "data": {"n": name}} for name in names])
        self.assertEqual(reply[0]["affectedRows"], len(names))

        def txn_mode(txn):
            txn.execute("SELECT @@session.sql_mode")
            return txn.fetchone()[0]

        for condition, expected in [({"$startsWith": "50%"}, ["50%off"]),
                                    ({"$endsWith": "_b"}, ["a_b"]),
                                    ({"$contains": "\\"}, ["back\\slash"]),
                                    ({"$contains": "'"}, ["it's"])]:
            messages = yield self.client.fetch({"$where": {"pid": "m", "name": condition}})
            self.assertNotIn("error", messages, condition)
            self.assertEqual(messages[-1], "end", condition)
            self.assertEqual([m["name"] for m in messages[:-1]], expected, condition)
            self.assertEqual([json.loads(m["data"])["n"] for m in messages[:-1]], expected)
        mode = yield self.server.store._run(txn_mode)
        self.assertEqual(mode, SQL_MODE)


# -- NOPERM ---------------------------------------------------------------------------


SERVER_ACL = ("user eventsource on >server-pass resetkeys resetchannels "
              "&persist &fetch &fetch-next &subscribe &ok:* -@all +subscribe +unsubscribe +publish +ping")


class NoPermTests(PrivateRedisTestCase):
    """The server's Redis user may use reply channels ``ok:*`` only; a client names others."""

    def make_redis(self):
        return RedisServer(self, acl=["user default on nopass ~* &* +@all", SERVER_ACL])

    def server_settings(self):
        return dict(redis_user="eventsource", redis_password="server-pass")

    @defer.inlineCallbacks
    def test_refused_reply_channel_is_one_warning_and_the_server_goes_on(self):
        events = LogCapture(self)
        yield self.client.request("persist", {"channel": "denied:p", "query": {
            "$insert": {"$documents": event("denied")}}})
        yield self.client.request("fetch", {"channel": "denied:f", "query": {"$select": {}}})
        reply = yield self.client.persist(event("allowed"), channel="ok:1")
        self.assertEqual(reply[0]["affectedRows"], 1)
        messages = yield self.client.fetch({"$where": {"pid": "allowed"}}, channel="ok:2")
        self.assertEqual(messages[-1], "end")
        yield sleep(0.1)
        loud = [formatEvent(e) for e in events if e["log_level"] > LogLevel.warn]
        self.assertEqual(loud, [])
        warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        for channel in ("denied:p", "denied:f"):
            about = [text for text in warnings if channel in text]
            self.assertEqual(len(about), 1, warnings)
            self.assertIn("NOPERM", about[0])
        self.assertFalse(any(e.get("log_failure") for e in events))
        self.assertFalse(self.server.streams)
        self.assertEqual(len(self.rows(where="WHERE pid = 'denied'")), 1)
