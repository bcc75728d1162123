"""
Shared helpers of the tests, each written once: names no other test uses
(:func:`unique`), :func:`sleep`, :func:`free_port`, :func:`sql`, a server
running in this process against the real Redis and MariaDB with a database of
its own per test (:class:`IntegrationTestCase`), and an independent Redis
client (plain txredisapi, not ``eventsource.client``) that speaks the wire
protocol by hand.  The private ``redis-server`` and its test case are in
:mod:`tests.redis_server`.
"""

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pymysql
import txredisapi
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from eventsource.config import Config
from eventsource.ids import uuid7
from eventsource.service import make_server

REDIS_HOST = os.environ.get("REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("REDIS_PORT", "6379"))
MYSQL = dict(
    host=os.environ.get("MYSQL_HOST", "127.0.0.1"),
    port=int(os.environ.get("MYSQL_PORT", "3306")),
    user=os.environ.get("MYSQL_USER", "root"),
    password=os.environ.get("MYSQL_PASS", ""),
    charset="utf8mb4",
)

_counter = itertools.count()

#: how long any single wait of a test may take before it fails
WAIT = 20


#: the checkout's folder
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_kb():
    """This process's resident memory now (not its lifetime peak, which earlier tests set)."""
    import resource

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() // 1024


def run_json_command(module, *args, cache):
    """
    ``python -m <module> <args> --json PATH`` from the checkout, once for
    every test that asks (``cache``, a dict of the test module's):
    ``(process, its JSON results or None)``.
    """
    if not cache:
        folder = tempfile.mkdtemp(prefix="test-bench-")
        try:
            path = os.path.join(folder, "results.json")
            argv = [sys.executable, "-m", module, *args, "--json", path]
            process = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                                     timeout=200)
            results = None
            if process.returncode == 0 and os.path.exists(path):
                with open(path) as f:
                    results = json.load(f)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        cache.update(process=process, results=results)
    return cache["process"], cache["results"]


class CommandRunTestCase(TestCase):
    """
    Tests of one run of a command that writes JSON results (see
    :func:`run_json_command`): ``run_once`` gives ``(process, results)``;
    a run that failed fails each test with the end of its output.
    """

    timeout = 240

    def run_once(self):
        raise NotImplementedError

    def setUp(self):
        self.process, self.results = self.run_once()
        if self.results is None:
            self.fail(f"the command failed ({self.process.returncode}):\n"
                      f"{self.process.stdout[-3000:]}\n{self.process.stderr[-3000:]}")


def unique(prefix):
    """A name no other test, run or process uses at the same time."""
    return f"{prefix}_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"


def sleep(seconds):
    """A Deferred that fires after ``seconds`` on the reactor (the one trial runs)."""
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_until(check, timeout=WAIT, step=0.01, what="a condition"):
    """Poll ``check()`` every ``step`` seconds until it is true; returns the seconds waited."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        yield sleep(step)
    return time.monotonic() - started


class LogCapture(list):
    """
    Every log event from now until the test ends: the events themselves, in
    order; :meth:`texts` and :meth:`details` are the same events as text.
    """

    def __init__(self, testcase):
        super().__init__()
        globalLogPublisher.addObserver(self.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.append)

    def texts(self):
        """Each event's message."""
        return [formatEvent(event) for event in self]

    def details(self):
        """Each event's message, any traceback and every field: where a secret could hide."""
        texts = []
        for event in self:
            parts = [formatEvent(event)]
            failure = event.get("log_failure")
            if isinstance(failure, Failure):
                parts.append(failure.getTraceback())
            parts += [f"{key}={value!r}" for key, value in event.items()]
            texts.append("\n".join(parts))
        return texts


#: the stream columns of row ``seq`` of an ``INSERT ... SELECT`` from a
#: SEQUENCE table, all rows of one new pid: ``version, event_id``
SEQ_STREAM_COLUMNS = "seq - 1, UNHEX(REPLACE(UUID(), '-', ''))"


def numbered(rows, pid_index=0, versions=None):
    """
    ``rows`` each followed by the stream columns a direct INSERT must write
    (``version, event_id``), numbered per pid from ``versions`` (pid -> last
    version; new pids start at 0), as the server's writer numbers them.
    """
    versions = {} if versions is None else versions
    result = []
    for row in rows:
        pid = row[pid_index]
        versions[pid] = versions.get(pid, -1) + 1
        result.append(tuple(row) + (versions[pid], uuid7()))
    return result


def last_versions(cursor, table_sql):
    """pid -> last version of a table (for :func:`numbered`)."""
    cursor.execute(f"SELECT pid, MAX(version) FROM {table_sql} GROUP BY pid")
    return dict(cursor.fetchall())


def free_port():
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sql(statement, params=None, database=None):
    """Run one statement on a fresh connection; returns all rows."""
    connection = pymysql.connect(database=database, autocommit=True, **MYSQL)
    return sql_on(connection, statement, params, "SET time_zone = '+00:00'")


def sql_on(connection, statement, params=None, *before):
    """Run ``before`` and one statement on ``connection``, then close it; all its rows."""
    try:
        with connection.cursor() as cursor:
            for setting in before:
                cursor.execute(setting)
            cursor.execute(statement, params)
            return cursor.fetchall()
    finally:
        connection.close()


class _Subscriber(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern, channel, message):
        self.factory.client._received(channel, message)


class WireClient:
    """
    An independent protocol client: records every message per channel.

    ``prefix`` is the server's ``channel_prefix``: tests give every server a
    prefix of its own, so servers of other test runs on the same Redis never
    answer their requests.
    """

    def __init__(self, prefix=""):
        self.prefix = prefix
        self.messages = {}
        self._waiters = []

    @defer.inlineCallbacks
    def connect(self, host=REDIS_HOST, port=REDIS_PORT):
        self._sub_factory = txredisapi.SubscriberFactory()
        self._sub_factory.protocol = _Subscriber
        self._sub_factory.convertNumbers = False
        self._sub_factory.client = self
        self._sub_factory.startConnecting(HostnameEndpoint(reactor, host, port))
        self.subscriber = yield self._sub_factory.deferred
        self._pub_factory = txredisapi.RedisFactory(None, None, 1, convertNumbers=False)
        self._pub_factory.startConnecting(HostnameEndpoint(reactor, host, port))
        self.publisher = yield self._pub_factory.deferred
        return self

    def disconnect(self):
        return defer.gatherResults([self._sub_factory.disconnect(), self._pub_factory.disconnect()])

    def subscribe(self, channel):
        self.messages.setdefault(channel, [])
        return self.subscriber.subscribe(channel)

    def publish(self, channel, message):
        """Publish ``message``: a str is sent as it is, anything else JSON-encoded."""
        body = message if isinstance(message, str) else json.dumps(message)
        return self.publisher.publish(channel, body)

    def request(self, kind, message):
        """Publish on the request channel ``kind`` (``persist``, ``fetch``, ``fetch-next``)."""
        return self.publish(self.prefix + kind, message)

    def _received(self, channel, body):
        self.messages.setdefault(channel, []).append(body)
        for waiter in list(self._waiters):
            waiter()

    def decoded(self, channel):
        return [json.loads(body) for body in self.messages.get(channel, [])]

    def wait_for(self, check, timeout=WAIT):
        """Fire when ``check()`` is true (tested after every message)."""
        d = defer.Deferred()

        def waiter():
            if not d.called and check():
                self._waiters.remove(waiter)
                d.callback(None)

        self._waiters.append(waiter)
        waiter()
        d.addTimeout(timeout, reactor, onTimeoutCancel=lambda *a: self._timeout(waiter, check))
        return d

    def _timeout(self, waiter, check):
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        raise AssertionError(f"timed out waiting; messages so far: {self.messages!r:.2000}")

    def wait_count(self, channel, count, timeout=WAIT):
        return self.wait_for(lambda: len(self.messages.get(channel, [])) >= count, timeout)

    def wait_end(self, channel, timeout=WAIT):
        """Fire when the server's last word ("end" or "timeout") arrived on ``channel``."""
        return self.wait_for(
            lambda: bool(self.messages.get(channel)) and self.messages[channel][-1] in ('"end"', '"timeout"'),
            timeout,
        )

    @defer.inlineCallbacks
    def persist(self, documents, channel=None, table=None):
        """Send a persist request; returns the decoded reply messages."""
        channel = channel or unique("reply")
        yield self.subscribe(channel)
        insert = {"$documents": documents}
        if table:
            insert["$table"] = table
        yield self.request("persist", {"channel": channel, "query": {"$insert": insert}})
        yield self.wait_end(channel)
        return self.decoded(channel)

    @defer.inlineCallbacks
    def fetch(self, select, channel=None, accept="fetch-next", window=None):
        """
        Fetch with per-row acceptance (``"fetch-next"``, ``"accepted"`` or
        ``"mixed"``); returns every decoded message, the last being the
        server's final word.
        """
        channel = channel or unique("reply")
        yield self.subscribe(channel)
        request = {"channel": channel, "query": {"$select": select}}
        if window is not None:
            request["window"] = window
        yield self.request("fetch", request)
        messages = yield self.drain(channel, accept)
        return messages

    @defer.inlineCallbacks
    def drain(self, channel, accept="fetch-next"):
        """Accept every row on ``channel`` (those already here too) until the server's last word."""
        seen = [0]
        modes = itertools.cycle(["fetch-next", "accepted"]) if accept == "mixed" else itertools.repeat(accept)

        def on_message():
            bodies = self.messages[channel]
            while seen[0] < len(bodies):
                body = bodies[seen[0]]
                seen[0] += 1
                if body.startswith("{"):
                    if next(modes) == "fetch-next":
                        d = self.request("fetch-next", {"channel": channel})
                    else:
                        d = self.publish(channel, '"accepted"')
                    d.addErrback(lambda failure: None)  # the test fails on what it sees, not here
            return False

        self._waiters.append(on_message)
        on_message()
        try:
            yield self.wait_end(channel)
        finally:
            self._waiters.remove(on_message)
        return [json.loads(body) for body in self.messages[channel] if body != '"accepted"']


class IntegrationTestCase(TestCase):
    """A server of this process on the real Redis and MariaDB, with its own database."""

    timeout = 120
    server_config = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.database = unique("es_test")
        self.table = f"{self.database}.event"
        self.prefix = unique("t") + ":"
        yield self.start_server(**self.server_config)
        self.client = yield WireClient(self.prefix).connect()
        self.addCleanup(self.client.disconnect)

    @defer.inlineCallbacks
    def start_server(self, **overrides):
        settings = dict(table=self.table, redis_host=REDIS_HOST, redis_port=REDIS_PORT,
                        mysql_host=MYSQL["host"], mysql_port=MYSQL["port"],
                        mysql_user=MYSQL["user"], mysql_password=MYSQL["password"],
                        channel_prefix=self.prefix)
        settings.update(overrides)
        self.server = make_server(Config(**settings), stop_reactor_on_failure=False)
        self.server.startService()
        self.addCleanup(self._stop_server, self.server)
        self.addCleanup(sql, f"DROP DATABASE IF EXISTS `{self.database}`")
        yield self.server.ready
        return self.server

    def _stop_server(self, server):
        if server.running:
            return server.stopService()

    def rows(self, columns="pid, domain, name, data", where=""):
        return sql(f"SELECT {columns} FROM `{self.database}`.`event` {where} ORDER BY id")

    def insert_events(self, count, pid="p", domain="d", name="n"):
        """Fast set-up: ``count`` events straight into the table."""
        values = [(f"{pid}{i}" if pid.endswith("_") else pid, domain, name, json.dumps({"i": i}))
                  for i in range(count)]
        connection = pymysql.connect(autocommit=False, **MYSQL)
        try:
            with connection.cursor() as cursor:
                values = numbered(values, versions=last_versions(
                    cursor, f"`{self.database}`.`event`"))
                for start in range(0, count, 5000):
                    cursor.executemany(
                        f"INSERT INTO `{self.database}`.`event` (pid, domain, name, data,"
                        " version, event_id) VALUES (%s, %s, %s, %s, %s, %s)",
                        values[start:start + 5000])
            connection.commit()
        finally:
            connection.close()
