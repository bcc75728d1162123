"""
Faults the server must survive, each caused for real: a private Redis that
is stopped and started again, pooled MariaDB connections killed with
``KILL``, MariaDB going away at the network level (through a TCP proxy this
test runs and stops), and shutdown in the middle of a burst of persists,
in-process and as a real ``twistd`` process receiving SIGTERM.

The recovery times measured here are logged (``measured: ...`` lines in
``_trial_temp/test.log``); docs/OPERATIONS.md quotes them.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pymysql
from twisted.enterprise import adbapi
from twisted.internet import defer, reactor, task
from twisted.logger import Logger
from twisted.protocols import portforward

from eventsource.stream import MACHINE
from eventsource.store import FIRST_PAGE
from tests.redis_server import PrivateRedisTestCase, RedisServer
from tests.support import (
    MYSQL,
    IntegrationTestCase,
    free_port,
    sleep,
    sql,
    unique,
    wait_until,
)

log = Logger()

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def event(pid, **data):
    return {"pid": pid, "domain": "fault", "name": "happened", "data": data}


@defer.inlineCallbacks
def quiet(client, seconds):
    """Wait until ``client`` has received nothing for ``seconds``."""
    while True:
        before = sum(len(bodies) for bodies in client.messages.values())
        yield sleep(seconds)
        if sum(len(bodies) for bodies in client.messages.values()) == before:
            return


def lost_connection_errors(testcase):
    """Forget the errors adbapi logs on purpose for a dead connection ("Rollback failed")."""
    return testcase.flushLoggedErrors(pymysql.err.OperationalError, pymysql.err.InterfaceError,
                                      adbapi.ConnectionLost)


# -- a TCP proxy we can take down and bring back -----------------------------


class _CommitEatingClient(portforward.ProxyClient):
    """The MariaDB side of a proxied connection; may swallow the answer to a COMMIT."""

    swallow = False

    def dataReceived(self, data):
        if self.swallow:
            # MariaDB has committed; the client never hears it: its
            # connection dies while it waits for the answer.
            self.peer.transport.abortConnection()
            self.transport.loseConnection()
            return
        super().dataReceived(data)


class _CommitEatingClientFactory(portforward.ProxyClientFactory):
    protocol = _CommitEatingClient


class _ProxyServer(portforward.ProxyServer):
    clientProtocolFactory = _CommitEatingClientFactory

    def dataReceived(self, data):
        # a COM_QUERY packet (command byte 3) holding COMMIT
        factory = self.factory
        if factory.eat_commits and b"\x03COMMIT" in data and self.peer is not None:
            if factory.pass_commits:
                factory.pass_commits -= 1
            else:
                factory.eat_commits -= 1
                self.peer.swallow = True
        super().dataReceived(data)

    def connectionMade(self):
        self.factory.live.add(self)
        super().connectionMade()

    def connectionLost(self, reason):
        self.factory.live.discard(self)
        super().connectionLost(reason)


class _ProxyFactory(portforward.ProxyFactory):
    protocol = _ProxyServer

    def __init__(self, host, port):
        super().__init__(host, port)
        self.live = set()
        #: how many more COMMITs to let through to MariaDB but answer with a
        #: dead connection, after letting ``pass_commits`` through
        self.eat_commits = 0
        self.pass_commits = 0


class TCPProxy:
    """
    A ``portforward`` proxy on a fixed free loopback port.  :meth:`down`
    stops listening and aborts every proxied connection (as a crashed or
    unplugged server would); :meth:`up` listens again on the same port.
    """

    def __init__(self, testcase, host, port):
        self.factory = _ProxyFactory(host, port)
        self.port = free_port()
        self._listening = None
        testcase.addCleanup(self.down)

    def up(self):
        self._listening = reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")

    def down(self):
        listening, self._listening = self._listening, None
        for server in list(self.factory.live):
            server.transport.abortConnection()
            if server.peer is not None:
                server.peer.transport.abortConnection()
        if listening is not None:
            return listening.stopListening()
        return defer.succeed(None)


# -- Redis goes away and comes back -------------------------------------------


class RedisFaultTestCase(PrivateRedisTestCase):
    """A server on a private redis-server, which the test stops and starts again."""

    @defer.inlineCallbacks
    def first_served(self, client):
        """
        Publish a persist as soon as Redis is back, again every 10 ms until a
        server hears it (``PUBLISH`` counts the receivers), then wait for
        its answer.  Returns the answer.
        """
        channel = unique("back")
        yield client.subscribe(channel)
        request = json.dumps({"channel": channel, "query": {"$insert": {"$documents": event(channel)}}})
        while True:
            receivers = yield client.publisher.publish("persist", request)
            if receivers:
                break
            yield sleep(0.01)
        yield client.wait_end(channel)
        return client.decoded(channel)


class RedisRestartTests(RedisFaultTestCase):
    """A private redis-server, stopped and started again under a running server."""

    @defer.inlineCallbacks
    def test_streams_end_and_server_serves_again_after_each_outage(self):
        """
        Three outages of different lengths.  Every time: the open stream ends
        (its timer cancelled, its model out of the shared machine), and the
        first request once Redis is back is answered, within the bounded
        backoff.  The time from Redis back to the first answered request is
        logged.
        """
        self.insert_events(5, pid="open")
        self.assertEqual(MACHINE.models, [])  # (driven by the shared machine, never registered)
        recoveries = []
        for outage in (0.3, 1.5, 4.0):
            # a stream left waiting for the client's acceptance of row 1
            channel = unique("open")
            yield self.client.subscribe(channel)
            yield self.client.request("fetch", {"channel": channel,
                                                "query": {"$select": {"$where": {"pid": "open"}}}})
            yield self.client.wait_count(channel, 1)
            (stream,) = self.server.streams.values()
            self.assertTrue(stream._timer.active())
            self.assertEqual(list(self.server.streams.values()), [stream])

            yield self.redis.stop()
            yield wait_until(lambda: not self.server.streams, what="the open stream to end")
            self.assertEqual(stream.state.value, "errored")
            self.assertIsNone(stream._timer)
            self.assertEqual(self.server.streams, {})
            self.assertEqual(MACHINE.models, [])
            self.assertFalse(self.server.bus.connected)

            yield sleep(outage)
            yield self.redis.start()
            back = self.redis.ready_at
            # The old client's connections are gone too; a fresh one, like a
            # client process that reconnects.
            self.client = yield self.connect_client()
            answer = yield self.first_served(self.client)
            served = time.monotonic() - back
            self.assertEqual(answer[-1], "end")
            self.assertEqual(answer[0]["affectedRows"], 1)
            recoveries.append(served)
            log.info("measured: Redis down {outage} s; back to first request served in "
                     "{served:.3f} s", outage=outage, served=served)
            # bounded: at most the largest backoff step (with its jitter), plus work
            self.assertLess(served, self.server.config.redis_max_delay * 1.2 + 1.0)
        # the table holds exactly the three persists
        self.assertEqual(len(self.rows(where="WHERE pid LIKE 'back%'")), 3)
        log.info("measured: Redis recovery times {times}",
                 times=", ".join(f"{t:.3f}" for t in recoveries))

    @defer.inlineCallbacks
    def test_redis_killed_outright(self):
        """SIGKILL (no goodbye from Redis): same recovery."""
        yield self.redis.stop(signal.SIGKILL)
        yield wait_until(lambda: not self.server.bus.connected, what="the server to notice")
        yield self.redis.start()
        back = self.redis.ready_at
        client = yield self.connect_client()
        answer = yield self.first_served(client)
        self.assertEqual(answer[-1], "end")
        log.info("measured: Redis SIGKILLed; back to first request served in {served:.3f} s",
                 served=time.monotonic() - back)
        messages = yield client.fetch({"$where": {"pid": {"$startsWith": "back"}}})
        self.assertEqual(len(messages), 2)

    @defer.inlineCallbacks
    def test_requests_while_redis_is_down_do_not_break_the_server(self):
        """A persist in flight when Redis goes: stored, its answer lost; the server carries on."""
        self.server.bus.publish = _slow(self.server.bus.publish)
        channel = unique("lost")
        yield self.client.subscribe(channel)
        yield self.client.request("persist", {"channel": channel,
                                              "query": {"$insert": {"$documents": event("lost")}}})
        yield self.redis.stop()
        yield wait_until(lambda: not self.server._persists, what="the persist to finish")
        self.assertEqual(len(self.rows(where="WHERE pid = 'lost'")), 1)
        yield self.redis.start()
        client = yield self.connect_client()
        answer = yield self.first_served(client)
        self.assertEqual(answer[-1], "end")


class RedisDropsConnectionsTests(RedisFaultTestCase):
    """Redis stays up but closes one of the server's connections."""

    def make_redis(self):
        # a small pub/sub output buffer, so that a flood overflows it for real
        return RedisServer(self, extra=["client-output-buffer-limit pubsub 1mb 512kb 1"])

    @defer.inlineCallbacks
    def open_stream(self, client):
        channel = unique("open")
        yield client.subscribe(channel)
        yield client.publish("fetch", {"channel": channel,
                                       "query": {"$select": {"$where": {"pid": "open"}}}})
        yield client.wait_count(channel, 1)
        return channel

    def kill_connection(self, role):
        """``CLIENT KILL`` one of the server's two connections, by its address."""
        address = getattr(self.server.bus, f"_{role}").transport.getHost()
        self.assertEqual(self.redis.cli("CLIENT", "KILL", f"{address.host}:{address.port}"),
                         "OK")

    @defer.inlineCallbacks
    def test_subscriber_killed(self):
        """CLIENT KILL of the subscriber: its streams end with "error", "end"; back at once."""
        self.insert_events(3, pid="open")
        channel = yield self.open_stream(self.client)
        killed = time.monotonic()
        self.kill_connection("subscriber")
        # (the publisher is still there: the client hears the end of its stream)
        yield self.client.wait_end(channel)
        self.assertEqual(self.client.decoded(channel)[-2:], ["error", "end"])
        client = yield self.connect_client()
        answer = yield self.first_served(client)
        self.assertEqual(answer[-1], "end")
        log.info("measured: subscriber killed; first request served after {seconds:.3f} s",
                 seconds=time.monotonic() - killed)

    @defer.inlineCallbacks
    def test_publisher_killed(self):
        """
        CLIENT KILL of the publisher: the server stops taking requests (it drops
        its subscriber too) until it can answer again, then serves.
        """
        killed = time.monotonic()
        self.kill_connection("publisher")
        yield wait_until(lambda: not self.server.bus.connected, what="the server to notice")
        client = yield self.connect_client()
        answer = yield self.first_served(client)
        self.assertEqual(answer[-1], "end")
        log.info("measured: publisher killed; first request served after {seconds:.3f} s",
                 seconds=time.monotonic() - killed)

    @defer.inlineCallbacks
    def test_flood_overflows_the_subscriber_buffer(self):
        """
        Requests faster than the server reads them, past Redis's output buffer
        limit for pub/sub: Redis drops the server's subscriber.  The server
        re-subscribes, ends the streams open then, and serves again.
        """
        self.insert_events(3, pid="open")
        channel = yield self.open_stream(self.client)
        flood = json.dumps({"query": "x" * (5 * 1024 * 1024)})  # too large: only logged
        for _ in range(8):
            self.client.publisher.publish("persist", flood)
        yield self.client.wait_end(channel)
        self.assertEqual(self.client.decoded(channel)[-2:], ["error", "end"])
        self.assertIn("scheduled to be closed ASAP for overcoming of output buffer limits",
                      self.redis.log_text())
        client = yield self.connect_client()
        answer = yield self.first_served(client)
        self.assertEqual(answer[-1], "end")


def _slow(publish):
    """Delay every publish by 0.2 s, so a reply is still on its way when Redis stops."""

    def delayed(channel, body):
        return task.deferLater(reactor, 0.2, publish, channel, body)

    return delayed


# -- MySQL connections killed ---------------------------------------------------


class KilledConnectionTests(IntegrationTestCase):
    """``KILL`` every pooled connection of the server, then use it."""

    server_config = {"pool_size": 4}

    def pool_connection_ids(self):
        pool = self.server.store._pool
        return [connection.thread_id() for connection in list(pool.connections.values())]

    def kill_pool(self):
        ids = self.pool_connection_ids()
        for connection_id in ids:
            try:
                sql(f"KILL {int(connection_id)}")
            except pymysql.err.OperationalError:
                pass  # already gone
        return ids

    @defer.inlineCallbacks
    def warm_up(self, count=12):
        """Persist in parallel until every pool thread holds a connection."""
        replies = yield defer.gatherResults(
            [self.client.persist(event(f"warm{i}")) for i in range(count)])
        for reply in replies:
            self.assertEqual(reply[-1], "end")
            self.assertIn("affectedRows", reply[0])

    @defer.inlineCallbacks
    def test_persist_and_fetch_after_kill(self):
        yield self.warm_up()
        killed = self.kill_pool()
        self.assertGreaterEqual(len(killed), 2)
        yield sleep(0.1)
        reply = yield self.client.persist(event("after-kill"))
        self.assertEqual(reply[0]["affectedRows"], 1)
        killed = self.kill_pool()
        yield sleep(0.1)
        messages = yield self.client.fetch({"$where": {"pid": "after-kill"}})
        self.assertEqual([m["pid"] for m in messages[:-1]], ["after-kill"])
        self.assertEqual(messages[-1], "end")
        self.assertEqual(len(self.rows(where="WHERE pid = 'after-kill'")), 1)
        lost_connection_errors(self)

    @defer.inlineCallbacks
    def test_burst_after_killing_every_connection(self):
        """Every request of a burst right after the kill succeeds, each persist stored once."""
        yield self.warm_up()
        self.kill_pool()
        yield sleep(0.1)
        replies = yield defer.gatherResults(
            [self.client.persist(event(f"burst{i}")) for i in range(20)]
            + [self.client.fetch({"$where": {"pid": "warm1"}}) for _ in range(5)])
        for reply in replies:
            self.assertEqual(reply[-1], "end")
            self.assertNotIn("error", reply)
        self.assertEqual(len(self.rows(where="WHERE pid LIKE 'burst%'")), 20)
        self.assertEqual(len(sql(f"SELECT DISTINCT pid FROM `{self.database}`.event"
                                 " WHERE pid LIKE 'burst%'")), 20)
        lost_connection_errors(self)

    @defer.inlineCallbacks
    def test_stream_survives_kill_between_pages(self):
        """A stream reads page by page; connections killed between pages don't end it."""
        self.insert_events(100, pid="paged")
        yield self.server.stopService()
        yield self.start_server(page_size=10, pool_size=4)
        killed_at = []

        def kill_now_and_then():
            rows = sum(1 for channel, bodies in self.client.messages.items()
                       if channel.startswith("paged") for b in bodies if b.startswith("{"))
            if rows % 10 == 5 and rows not in killed_at:
                killed_at.append(rows)
                self.kill_pool()
            return False

        self.client._waiters.append(kill_now_and_then)
        messages = yield self.client.fetch({"$where": {"pid": "paged"}}, channel=unique("paged"))
        self.client._waiters.remove(kill_now_and_then)
        self.assertEqual(len(killed_at), 10)
        self.assertEqual(len(messages), 101)
        self.assertEqual(messages[-1], "end")
        self.assertEqual([json.loads(m["data"])["i"] for m in messages[:-1]], list(range(100)))
        lost_connection_errors(self)


# -- MariaDB goes away and comes back (network level) --------------------------


class MariaDBOutageTests(IntegrationTestCase):
    """The server talks to MariaDB through a proxy this test takes down and brings back."""

    @defer.inlineCallbacks
    def setUp(self):
        self.proxy = TCPProxy(self, MYSQL["host"], MYSQL["port"])
        self.proxy.up()
        self.server_config = {"mysql_port": self.proxy.port, "pool_size": 4}
        yield super().setUp()

    @defer.inlineCallbacks
    def test_requests_during_outage_fail_then_first_after_recovery_succeeds(self):
        # more rows than a stream's first page, so the open stream needs MariaDB again
        self.insert_events(FIRST_PAGE + 14, pid="before")
        reply = yield self.client.persist(event("before-outage"))
        self.assertEqual(reply[0]["affectedRows"], 1)

        # a stream open when MariaDB goes away
        stream_channel = unique("open")
        yield self.client.subscribe(stream_channel)
        yield self.client.request("fetch", {"channel": stream_channel,
                                            "query": {"$select": {"$where": {"pid": "before"}}}})
        yield self.client.wait_count(stream_channel, 1)

        yield self.proxy.down()
        during = []
        for i in range(5):
            reply = yield self.client.persist(event(f"during{i}"))
            during.append(reply)
        fetched = yield self.client.fetch({"$where": {"pid": "before-outage"}})
        self.assertEqual(during, [["error", "end"]] * 5)
        self.assertEqual(fetched, ["error", "end"])
        # the open stream: its next page fails, so it ends with "error", "end"
        messages = yield self.client.drain(stream_channel)
        self.assertEqual(messages[-2:], ["error", "end"])
        self.assertFalse(self.server.streams)

        self.proxy.up()
        started = time.monotonic()
        reply = yield self.client.persist(event("after"))
        log.info("measured: MariaDB back; first persist answered in {seconds:.3f} s",
                 seconds=time.monotonic() - started)
        self.assertEqual(reply[0]["affectedRows"], 1)
        replies = yield defer.gatherResults(
            [self.client.persist(event(f"after{i}")) for i in range(10)]
            + [self.client.fetch({"$where": {"pid": "before-outage"}})])
        for reply in replies:
            self.assertNotIn("error", reply)
        self.assertEqual(len(self.rows(where="WHERE pid LIKE 'during%'")), 0)
        self.assertEqual(len(self.rows(where="WHERE pid LIKE 'after%'")), 11)
        lost_connection_errors(self)

    @defer.inlineCallbacks
    def test_flapping(self):
        """Down and up five times; after each return the very first request succeeds."""
        for cycle in range(5):
            yield self.proxy.down()
            reply = yield self.client.persist(event(f"down{cycle}"))
            self.assertEqual(reply, ["error", "end"])
            self.proxy.up()
            reply = yield self.client.persist(event(f"up{cycle}"))
            self.assertEqual(reply[0]["affectedRows"], 1, f"cycle {cycle}")
        self.assertEqual(len(self.rows(where="WHERE pid LIKE 'up%'")), 5)
        self.assertEqual(len(self.rows(where="WHERE pid LIKE 'down%'")), 0)
        lost_connection_errors(self)


class CommitLostTests(IntegrationTestCase):
    """
    The connection dies after MariaDB committed but before the server heard
    the answer: the outcome is unknown to the server.  Whatever it answers,
    a persist answered with success must be in the table exactly once.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.proxy = TCPProxy(self, MYSQL["host"], MYSQL["port"])
        self.proxy.up()
        self.server_config = {"mysql_port": self.proxy.port, "pool_size": 4}
        yield super().setUp()

    @defer.inlineCallbacks
    def test_lost_commit_answer_never_duplicates(self):
        reply = yield self.client.persist(event("warm"))
        self.assertEqual(reply[0]["affectedRows"], 1)
        for round_ in range(3):
            # the first persist of the burst is written alone; the second
            # COMMIT is that of a batch of the others
            self.proxy.factory.eat_commits = 1
            self.proxy.factory.pass_commits = 1
            # a burst, so that persists are written in batches of several
            replies = yield defer.gatherResults(
                [self.client.persist(event(f"r{round_}-{i}")) for i in range(30)])
            acknowledged = {f"r{round_}-{i}" for i, reply in enumerate(replies)
                            if isinstance(reply[0], dict)}
            refused = {f"r{round_}-{i}" for i, reply in enumerate(replies)
                       if reply == ["error", "end"]}
            self.assertEqual(len(acknowledged) + len(refused), 30)
            self.assertEqual(self.proxy.factory.eat_commits, 0)
            stored = [pid for (pid,) in sql(f"SELECT pid FROM `{self.database}`.event"
                                            " WHERE pid LIKE %s", (f"r{round_}-%",))]
            self.assertEqual(len(stored), len(set(stored)), f"round {round_}: stored twice")
            self.assertTrue(acknowledged <= set(stored), "an acknowledged persist is missing")
            log.info("measured: COMMIT answer lost: {ok} acknowledged, {refused} answered "
                     "error ({stored} of those stored: outcome unknown to the server)",
                     ok=len(acknowledged), refused=len(refused),
                     stored=len(set(stored) & refused))
        lost_connection_errors(self)


# -- shutdown ------------------------------------------------------------------


class ShutdownTests(IntegrationTestCase):
    @defer.inlineCallbacks
    def test_stop_in_the_middle_of_a_burst(self):
        """
        500 persists pipelined; the server is stopped after the first answers.
        Every persist answered with success is in the table exactly once; every
        other one is not there at all; the open stream ended with "error",
        "end"; the connections are closed; it took a few seconds at most.
        """
        self.insert_events(3, pid="open")
        stream_channel = unique("open")
        yield self.client.subscribe(stream_channel)
        yield self.client.request("fetch", {"channel": stream_channel,
                                            "query": {"$select": {"$where": {"pid": "open"}}}})
        yield self.client.wait_count(stream_channel, 1)

        count = 500
        channels = [f"{self.prefix}burst:{i}" for i in range(count)]
        yield self.client.subscriber.psubscribe(f"{self.prefix}burst:*")

        def send(i):
            self.client.publish(self.prefix + "persist", {
                "channel": channels[i], "query": {"$insert": {"$documents": event(f"b{i}")}}})

        # 25 persists every 5 ms; the server is stopped after the first 150
        stop = defer.Deferred()
        sent = 0
        while sent < count:
            for i in range(sent, sent + 25):
                send(i)
            sent += 25
            if sent == 150:
                stop = self.server.stopService()
                started = time.monotonic()
            yield sleep(0.005)
        yield stop
        stopped_in = time.monotonic() - started
        log.info("measured: stopService in the middle of a burst took {seconds:.3f} s",
                 seconds=stopped_in)
        self.assertLess(stopped_in, 5)
        yield quiet(self.client, 0.5)

        answered_ok, refused, silent = set(), set(), set()
        for i, channel in enumerate(channels):
            reply = self.client.decoded(channel)
            if reply and isinstance(reply[0], dict):
                self.assertEqual(reply, [reply[0], "end"])
                answered_ok.add(f"b{i}")
            elif reply:
                self.assertEqual(reply, ["error", "end"])
                refused.add(f"b{i}")
            else:
                silent.add(f"b{i}")
        stored = [pid for (pid,) in sql(f"SELECT pid FROM `{self.database}`.event"
                                        " WHERE pid LIKE 'b%'")]
        self.assertEqual(len(stored), len(set(stored)), "a persist was stored twice")
        self.assertTrue(answered_ok <= set(stored), "an acknowledged persist is missing")
        self.assertFalse(set(stored) & refused, "a refused persist was stored")
        log.info("measured: shutdown burst: {ok} acknowledged and stored once, {refused} "
                 "refused, {silent} unanswered (sent after the server left), {stored} rows",
                 ok=len(answered_ok), refused=len(refused), silent=len(silent),
                 stored=len(stored))
        self.assertTrue(answered_ok)
        # persists never answered were never received: nothing of them is stored
        self.assertEqual(set(stored), answered_ok)
        self.assertEqual(self.client.decoded(stream_channel)[-2:], ["error", "end"])
        self.assertFalse(self.server.streams)
        self.assertIsNone(self.server.store._pool)
        self.assertFalse(self.server.bus.connected)


class TwistdSigtermTests(PrivateRedisTestCase):
    """The real command: ``twistd -n --pidfile= eventsource``, stopped with SIGTERM."""

    start_at_setup = False

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.addCleanup(sql, f"DROP DATABASE IF EXISTS `{self.database}`")
        self.client = yield self.connect_client()

    def spawn(self):
        self.output = os.path.join(self.redis.folder, "twistd.out")
        env = dict(os.environ, PYTHONPATH=HERE)
        for name in list(env):
            if name.startswith(("REDIS_", "MYSQL_", "EVENTSOURCE_")):
                del env[name]
        # (``python -m twisted.scripts.twistd`` does nothing: that module has
        # no ``__main__`` block; this is what the ``twistd`` script runs.)
        command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                   "-n", "--pidfile=",
                   "eventsource", "--table", self.table,
                   "--redis-port", str(self.redis.port),
                   "--mysql-host", MYSQL["host"], "--mysql-port", str(MYSQL["port"]),
                   "--mysql-user", MYSQL["user"]]
        with open(self.output, "w") as out:
            process = subprocess.Popen(command, cwd=HERE, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def kill():
            if process.poll() is None:
                process.kill()
                process.wait()

        self.addCleanup(kill)
        return process

    def log_text(self):
        with open(self.output, errors="replace") as f:
            return f.read()

    @defer.inlineCallbacks
    def test_sigterm_exits_cleanly_within_seconds(self):
        process = self.spawn()
        yield wait_until(lambda: "eventsource serving" in self.log_text() or
                         process.poll() is not None, timeout=30, what="twistd to serve")
        self.assertIsNone(process.poll(), self.log_text())
        reply = yield self.client.persist(event("twistd"))
        self.assertEqual(reply[0]["affectedRows"], 1)
        # an open stream, and persists in flight, when the signal arrives
        stream_channel = unique("open")
        yield self.client.subscribe(stream_channel)
        yield self.client.request("fetch", {"channel": stream_channel,
                                            "query": {"$select": {"$where": {"pid": "twistd"}}}})
        yield self.client.wait_count(stream_channel, 1)
        yield self.client.subscriber.psubscribe("sig:*")
        for i in range(50):
            self.client.request("persist", {"channel": f"sig:{i}", "query": {
                "$insert": {"$documents": event(f"sig{i}")}}})
        yield self.client.wait_for(lambda: self.client.messages.get("sig:0"))
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        yield wait_until(lambda: process.poll() is not None, timeout=10,
                         what="twistd to exit after SIGTERM")
        took = time.monotonic() - started
        log.info("measured: twistd exited {seconds:.3f} s after SIGTERM, code {code}",
                 seconds=took, code=process.returncode)
        self.assertEqual(process.returncode, 0, self.log_text())
        self.assertLess(took, 5)
        yield sleep(0.2)
        self.assertEqual(self.client.decoded(stream_channel)[-2:], ["error", "end"])
        acknowledged = {f"sig{i}" for i in range(50)
                        if (self.client.decoded(f"sig:{i}") or [None])[0] not in (None, "error")}
        stored = {pid for (pid,) in sql(f"SELECT pid FROM `{self.database}`.event"
                                        " WHERE pid LIKE 'sig%'")}
        self.assertEqual(stored, acknowledged)
        self.assertIn("Main loop terminated", self.log_text())
        self.assertNotIn("Traceback", self.log_text())

