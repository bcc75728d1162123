"""
Replica mode on the real Redis and MariaDB (docs/OPERATIONS.md "Replicas"):
several servers with the same table and the same channel prefix, run with
``replicas=True``, serve each request once.  Servers of this process
(``start_server``) and, for ``kill -9``, a real ``twistd eventsource``
process.

Each test fails without replica mode: with ``replicas=False`` every server
answers every request, so persists are written (and answered) two or three
times and streams get every row twice.
"""

import json
import os
import signal
import subprocess
import sys
import uuid

from twisted.internet import defer

from tests.redis_server import RedisServer
from tests.support import (MYSQL, REDIS_HOST, REDIS_PORT, IntegrationTestCase, LogCapture,
                           WireClient, sleep, sql, unique, wait_until)
from tests.test_security import CLIENT_ACL, SERVER_ACL, SecuredRedisTestCase
from tests.test_subscribe import Follower

#: how the tests' servers run (a test flips it to see the tests fail)
REPLICAS = True


def persist_v2(channel, pid, event_id):
    return {"v": 2, "channel": channel, "query": {"$insert": {"$documents": [
        {"pid": pid, "domain": "d", "name": "n", "data": {"pid": pid}, "eventId": event_id}]}}}


class ReplicaTestCase(IntegrationTestCase):
    # (every replica writes: the claims are these tests' subject; the writer
    # lease's tests ask for it)
    server_config = {"replicas": REPLICAS, "writer_lease": 0.0}

    @defer.inlineCallbacks
    def start_replicas(self, count):
        """``count`` more servers of this process on the same table and channels."""
        servers = [self.server]
        for _ in range(count):
            server = yield self.start_server(**self.server_config)
            servers.append(server)
        self.server = servers[0]
        self.servers = servers
        return servers

    @defer.inlineCallbacks
    def clients(self, count):
        clients = [self.client]
        for _ in range(count - 1):
            client = yield WireClient(self.prefix).connect()
            self.addCleanup(client.disconnect)
            clients.append(client)
        return clients

    def results(self, client, channel):
        """The decoded messages on ``channel`` that are not acknowledgements."""
        return [json.loads(b) for b in client.messages.get(channel, []) if b != '"accepted"']


class ServedOnceTests(ReplicaTestCase):
    @defer.inlineCallbacks
    def test_a_thousand_persists_are_each_written_and_answered_once(self):
        """1,000 persists from 4 connections to 3 replicas: one answer and one row each."""
        yield self.start_replicas(2)
        clients = yield self.clients(4)
        sent = {}  # reply channel -> (client, event id); half of them version 1 persists

        @defer.inlineCallbacks
        def lane(client, lane_number):
            for i in range(250):
                channel = unique(self.prefix + "r")
                event_id = str(uuid.uuid4())
                sent[channel] = (client, event_id)
                yield client.subscribe(channel)
                body = persist_v2(channel, f"p{lane_number}-{i}", event_id)
                if lane_number % 2:  # (version 1: no event id to make a second write a no-op)
                    del body["v"], body["query"]["$insert"]["$documents"][0]["eventId"]
                yield client.request("persist", body)
                if i % 25 == 24:  # (25 in flight per lane at most)
                    yield client.wait_end(channel)

        yield defer.gatherResults([lane(c, n) for n, c in enumerate(clients)])
        for channel, (client, _) in sent.items():
            yield client.wait_end(channel)
        yield sleep(0.5)  # (time for a second answer, were there one)
        for channel, (client, event_id) in sent.items():
            messages = self.results(client, channel)
            self.assertEqual(len(messages), 2, messages)
            self.assertEqual(messages[1], "end")
            if "events" in messages[0]:
                self.assertEqual(messages[0]["events"][0]["eventId"], event_id)
            else:
                self.assertEqual(messages[0]["affectedRows"], 1)
        rows = self.rows("pid")
        self.assertEqual(len(rows), 1000)
        self.assertEqual(len(set(rows)), 1000)
        served = [s.stats.requests["persist", "ok"] for s in self.servers]
        self.assertEqual(sum(served), 1000)
        elsewhere = [s.stats.requests["persist", "elsewhere"] for s in self.servers]
        self.assertEqual(sum(elsewhere), 2000)
        self.served = served  # (for a curious reader of the test)

    @defer.inlineCallbacks
    def test_fetches_are_streamed_once_with_per_row_acceptance(self):
        """Twenty per-row fetches (fetch-next acceptance) over 2 replicas: every row once."""
        yield self.start_replicas(1)
        self.insert_events(40, pid="f_")
        fetched = yield defer.gatherResults([
            self.client.fetch({"$where": {}}, channel=unique(self.prefix + "f"))
            for _ in range(20)])
        for messages in fetched:
            self.assertEqual(len(messages), 41)
            self.assertEqual(messages[-1], "end")
            self.assertEqual([m["pid"] for m in messages[:-1]], [f"f_{i}" for i in range(40)])
        self.assertEqual(sum(s.stats.requests["fetch", "ok"] for s in self.servers), 20)
        self.assertEqual(sum(s.stats.requests["fetch", "elsewhere"] for s in self.servers), 20)
        self.assertEqual(sum(s.stats.requests["fetch-next", "ok"] for s in self.servers), 800)
        self.assertEqual(sum(s.stats.requests["fetch-next", "ignored"] for s in self.servers), 800)

    @defer.inlineCallbacks
    def test_subscriptions_are_served_once(self):
        """Subscriptions (window 1, fetch-next acceptance) over 2 replicas, writes through both."""
        yield self.start_replicas(1)
        self.insert_events(20, pid="h_")
        followers = []
        for _ in range(6):
            follower = yield Follower(self.client).start(window=1)
            followers.append(follower)
        for follower in followers:
            yield follower.wait(lambda f=follower: f.caught_up is not None, "caughtUp")
        writer = yield WireClient(self.prefix).connect()
        self.addCleanup(writer.disconnect)
        channels = []
        for i in range(20):
            channel = unique(self.prefix + "w")
            channels.append(channel)
            yield writer.subscribe(channel)
            yield writer.request("persist", persist_v2(channel, f"live{i}", str(uuid.uuid4())))
        for channel in channels:
            yield writer.wait_end(channel)
        for follower in followers:
            yield follower.wait_rows(40)
        yield sleep(0.5)
        expected = [row[0] for row in self.rows("id")]
        for follower in followers:
            self.assertEqual(follower.positions, expected)
            self.assertEqual(len(follower.markers), 1)  # caughtUp, once
        self.assertEqual(sum(s.stats.requests["subscribe", "ok"] for s in self.servers), 6)
        self.assertEqual(sum(len(s.subscriptions) for s in self.servers), 6)
        for follower in followers:
            yield self.client.request("fetch-next", {"channel": follower.channel, "end": True})
        yield wait_until(lambda: not any(s.subscriptions for s in self.servers),
                         what="the subscriptions to end")


class TwistdReplicaTestCase(ReplicaTestCase):
    """A replica of this process, and one in a real ``twistd eventsource`` process."""

    timeout = 180

    @defer.inlineCallbacks
    def start_twistd(self, *arguments):
        output = self.mktemp()
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(("REDIS_", "MYSQL_", "EVENTSOURCE_"))}
        env["PYTHONPATH"] = here
        command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                   "-n", "--pidfile=", "eventsource", "--table", self.table,
                   "--channel-prefix", self.prefix,
                   "--redis-host", REDIS_HOST, "--redis-port", str(REDIS_PORT),
                   "--mysql-host", MYSQL["host"], "--mysql-port", str(MYSQL["port"]),
                   "--mysql-user", MYSQL["user"], "--row-timeout", "120"] + (
                       ["--replicas"] if REPLICAS else []) + list(arguments)
        with open(output, "w") as out:
            process = subprocess.Popen(command, cwd=here, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def stop():
            if process.poll() is None:
                process.kill()
                process.wait()

        self.addCleanup(stop)

        def serving():
            with open(output, errors="replace") as f:
                return "eventsource serving" in f.read() or process.poll() is not None

        yield wait_until(serving, timeout=60, what="twistd to serve")
        self.assertIsNone(process.poll(), open(output).read()[-2000:])
        return process


    @defer.inlineCallbacks
    def append_until_answered(self, client, pid, event_id, answers=None):
        """
        One version 2 append, sent again (a new reply channel, the same event
        id) until answered within 2 s; its answer.  ``answers`` gets every
        reply channel used.
        """
        for _attempt in range(10):
            channel = unique(self.prefix + "r")
            yield client.subscribe(channel)
            yield client.request("persist", persist_v2(channel, pid, event_id))
            try:
                yield client.wait_end(channel, timeout=2)
            except AssertionError:
                continue  # (its replica died: try again, the same event id)
            finally:
                if answers is not None:
                    answers[channel] = client
            return self.results(client, channel)[0]
        raise AssertionError(f"{event_id} never acknowledged")


class KilledReplicaTests(TwistdReplicaTestCase):
    """A real ``twistd eventsource --replicas`` process, killed with SIGKILL mid-load."""

    # (the survivor's streams wait, unaccepted, through the whole load)
    server_config = {"replicas": REPLICAS, "writer_lease": 0.0, "row_timeout": 120.0}

    @defer.inlineCallbacks
    def test_kill_9_loses_only_its_own_streams_and_nothing_acknowledged(self):
        process = yield self.start_twistd("--writer-lease", "0")
        self.insert_events(30, pid="k_")
        # streams on both replicas, each accepted up to its tenth row only
        streams = [unique(self.prefix + "s") for _ in range(12)]
        for channel in streams:
            yield self.client.subscribe(channel)
            yield self.client.request("fetch", {"channel": channel, "query": {"$select": {}}})
        for accepted in range(9):
            for channel in streams:
                yield self.client.wait_count(channel, 1 + accepted)
                yield self.client.request("fetch-next", {"channel": channel})
        for channel in streams:
            yield self.client.wait_count(channel, 10)
        mine = [c for c in streams if c in self.server.streams]
        theirs = [c for c in streams if c not in self.server.streams]
        # persists with retries: a new reply channel per attempt, the same event id
        clients = yield self.clients(3)
        acknowledged = {}  # event id -> the reply
        answers = {}  # reply channel -> messages
        killed = []

        @defer.inlineCallbacks
        def append(client, pid, event_id):
            acknowledged[event_id] = yield self.append_until_answered(
                client, pid, event_id, answers)
            if len(acknowledged) == 100 and not killed:
                process.send_signal(signal.SIGKILL)
                killed.append(True)

        @defer.inlineCallbacks
        def lane(client, number):
            for i in range(100):
                yield append(client, f"l{number}-{i}", str(uuid.uuid4()))

        yield defer.gatherResults([lane(c, n) for n, c in enumerate(clients * 2)])
        self.assertTrue(killed)
        self.assertEqual(process.wait(), -signal.SIGKILL)
        yield sleep(0.5)
        self.assertEqual(len(acknowledged), 600)
        for reply in acknowledged.values():
            self.assertIn("events", reply, reply)
        for channel, client in answers.items():  # never two answers on one channel
            self.assertLessEqual(len(self.results(client, channel)), 2)
        stored = [row[0] for row in sql(
            f"SELECT event_id FROM `{self.database}`.`event` WHERE pid LIKE 'l%%'")]
        self.assertEqual(len(stored), 600)
        self.assertEqual({str(uuid.UUID(bytes=bytes(e))) for e in stored}, set(acknowledged))
        # the survivor's streams go on to their end; the dead replica's say nothing more
        for channel in mine:
            messages = yield self.client.drain(channel)
            self.assertEqual(len(messages), 31)
            self.assertEqual(messages[-1], "end")
        for channel in theirs:
            yield self.client.request("fetch-next", {"channel": channel})
        yield sleep(0.5)
        for channel in theirs:
            self.assertEqual(len(self.results(self.client, channel)), 10)
        self.assertTrue(mine and theirs, (mine, theirs))
        self.attempts = len(answers)  # (600, plus the retries of the dead replica's requests)


class KilledLeaseHolderTests(TwistdReplicaTestCase):
    """
    ``--writer-lease``: the replica that writes every persist (a real
    ``twistd`` process) killed with SIGKILL mid-load: persists go unanswered
    until its lease expires, then the other replica takes it and writes;
    every append acknowledged once, stored once.
    """

    server_config = {"replicas": True, "writer_lease": 1.0}

    @defer.inlineCallbacks
    def test_kill_9_of_the_holder_hands_the_writes_on(self):
        lease = self.server.writer_lease
        process = yield self.start_twistd("--writer-lease", "1")
        yield lease.stop()  # (this one gives the lease up, and the process takes it)
        key = f"{self.prefix}claim:writer"
        yield wait_until(lambda: sql_redis(key, "GET") not in ("", self.server.replica_id),
                         what="the process to take the lease")
        lease.start()
        yield wait_until(lease.leaves_persists, what="the process holding the lease")
        clients = yield self.clients(3)
        acknowledged = {}
        killed = []

        @defer.inlineCallbacks
        def append(client, pid, event_id):
            acknowledged[event_id] = yield self.append_until_answered(client, pid, event_id)
            if len(acknowledged) == 100 and not killed:
                self.assertTrue(lease.leaves_persists())  # (the process writes)
                self.assertEqual(self.server.stats.requests["persist", "ok"], 0)
                process.send_signal(signal.SIGKILL)
                killed.append(self.server.seconds())

        @defer.inlineCallbacks
        def lane(client, number):
            for i in range(50):
                yield append(client, f"h{number}-{i}", str(uuid.uuid4()))

        yield defer.gatherResults([lane(c, n) for n, c in enumerate(clients * 2)])
        self.assertTrue(killed)
        self.assertEqual(process.wait(), -signal.SIGKILL)
        self.assertTrue(lease.held)
        self.assertGreater(self.server.stats.requests["persist", "ok"], 0)
        self.assertEqual(len(acknowledged), 300)
        for reply in acknowledged.values():
            self.assertIn("events", reply, reply)
        stored = [row[0] for row in sql(
            f"SELECT event_id FROM `{self.database}`.`event` WHERE pid LIKE 'h%%'")]
        self.assertEqual(len(stored), 300)
        self.assertEqual({str(uuid.UUID(bytes=bytes(e))) for e in stored}, set(acknowledged))


class WriterLeaseTests(ReplicaTestCase):
    """``--writer-lease`` on the real Redis and MariaDB: one replica writes at a time."""

    server_config = {"replicas": True, "writer_lease": 1.0}

    def holder(self):
        held = [s for s in self.servers if s.writer_lease.held]
        return held[0] if len(held) == 1 else None

    @defer.inlineCallbacks
    def persists(self, clients, count):
        """``count`` version 2 persists spread over ``clients``, 20 in flight each; answers."""
        answers = {}

        @defer.inlineCallbacks
        def lane(client, number):
            for i in range(count // len(clients)):
                channel = unique(self.prefix + "w")
                yield client.subscribe(channel)
                yield client.request("persist", persist_v2(channel, f"w{number}-{i}",
                                                           str(uuid.uuid4())))
                answers[channel] = client
                if i % 20 == 19:
                    yield client.wait_end(channel)

        yield defer.gatherResults([lane(c, n) for n, c in enumerate(clients)])
        for channel, client in answers.items():
            yield client.wait_end(channel)
        return answers

    @defer.inlineCallbacks
    def test_the_holder_writes_every_persist_once(self):
        yield self.start_replicas(1)
        yield wait_until(lambda: self.holder() is not None, what="a lease holder")
        holder = self.holder()
        other = [s for s in self.servers if s is not holder][0]
        yield wait_until(other.writer_lease.leaves_persists, what="the other replica's view")
        key = f"{self.prefix}claim:writer"
        self.assertEqual(sql_redis(key, "GET"), holder.replica_id)
        self.assertTrue(0 < int(sql_redis(key, "PTTL")) <= 1000)
        clients = yield self.clients(2)
        answers = yield self.persists(clients, 400)
        yield sleep(0.3)  # (time for a second answer, were there one)
        for channel, client in answers.items():
            messages = self.results(client, channel)
            self.assertEqual(len(messages), 2, messages)
            self.assertIn("events", messages[0])
        self.assertEqual(len(self.rows("pid")), 400)
        self.assertEqual(holder.stats.requests["persist", "ok"], 400)
        self.assertEqual(other.stats.requests["persist", "ok"], 0)
        # (the other left the persist channel: Redis sent it none of them)
        self.assertEqual(other.stats.requests["persist", "elsewhere"], 0)
        self.assertEqual(sql_redis(f"{self.prefix}persist", "PUBSUB NUMSUB").split(), [
            f"{self.prefix}persist", "1"])

    @defer.inlineCallbacks
    def test_the_lease_passes_on_when_its_holder_stops(self):
        yield self.start_replicas(1)
        yield wait_until(lambda: self.holder() is not None, what="a lease holder")
        first = self.holder()
        other = [s for s in self.servers if s is not first][0]
        yield first.stopService()
        started = self.server.seconds()
        yield wait_until(lambda: other.writer_lease.held, what="the other replica's lease")
        self.assertLess(self.server.seconds() - started, 1.0)  # (its next attempt: 0.25 s)
        answers = yield self.persists([self.client], 40)
        self.assertEqual(len(answers), 40)
        self.assertEqual(other.stats.requests["persist", "ok"], 40)
        self.assertEqual(len(self.rows("pid")), 40)

    @defer.inlineCallbacks
    def test_lease_commands_on_redis(self):
        """The bus's lease: take, see another's, renew, give up, expire."""
        yield self.start_replicas(1)
        a, b = (s.bus for s in self.servers)
        key = unique(f"{self.prefix}claim:lease-test")
        self.addCleanup(sql_redis, key, "DEL")
        self.assertEqual((yield a.lease(key, "a", 0.6)), "a")
        self.assertEqual((yield b.lease(key, "b", 0.6)), "a")
        yield sleep(0.4)
        self.assertEqual((yield a.lease(key, "a", 0.6)), "a")  # (renewed...)
        yield sleep(0.4)
        self.assertEqual((yield b.lease(key, "b", 0.6)), "a")  # (...so still a's at 0.8 s)
        yield b.release_lease(key, "b")  # (not b's: nothing happens)
        self.assertEqual((yield b.lease(key, "b", 0.6)), "a")
        yield a.release_lease(key, "a")
        yield sleep(0.05)
        self.assertEqual((yield b.lease(key, "b", 0.3)), "b")
        yield sleep(0.5)  # (b does not renew: it expires)
        self.assertEqual((yield a.lease(key, "a", 0.6)), "a")


def sql_redis(key, command):
    """One command on ``key`` through redis-cli (outside the servers under test)."""
    out = subprocess.run(["redis-cli", "-h", REDIS_HOST, "-p", str(REDIS_PORT)]
                         + command.split() + [key],
                         capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.strip()


class ReplicaACLTests(SecuredRedisTestCase):
    """
    The ACL line docs/OPERATIONS.md "Replicas" gives the server's user:
    ``~claim:* +set``, and ``+get +pexpire`` for ``--writer-lease``.
    """

    def make_redis(self):
        return RedisServer(self, acl=[
            "user default off",
            SERVER_ACL.format(password="server-pass") + " ~claim:* +set +get +pexpire",
            SERVER_ACL.format(password="server-pass").replace("eventsource", "noclaims"),
            SERVER_ACL.format(password="server-pass").replace("eventsource", "nolease")
            + " ~claim:* +set",
            CLIENT_ACL.format(user="alice", password="alice-pass"),
        ])

    @defer.inlineCallbacks
    def test_the_writer_lease_with_its_commands(self):
        servers = []
        for _ in range(2):
            servers.append((yield self.start(writer_lease=1.0)))
        yield wait_until(lambda: sum(s.writer_lease.held for s in servers) == 1,
                         what="one lease holder")
        alice = yield self.client(user="alice", password="alice-pass")
        yield self.round_trip(alice, reply_prefix="reply:alice:")
        self.assertEqual([s.stats.requests["persist", "ok"] for s in servers],
                         [int(s.writer_lease.held) for s in servers])

    @defer.inlineCallbacks
    def test_without_the_lease_commands_every_replica_claims(self):
        """A user without ``+get +pexpire``: a warning, and persists are claimed as without the lease."""
        logged = LogCapture(self)
        server = yield self.start(redis_user="nolease", writer_lease=1.0)
        yield wait_until(lambda: any("could not ask Redis for the writer lease" in text
                                     for text in logged.texts()), what="the warning")
        self.assertFalse(server.writer_lease.held)
        alice = yield self.client(user="alice", password="alice-pass")
        yield self.round_trip(alice, reply_prefix="reply:alice:")
        self.assertEqual(len(self.rows()), 1)
        self.assertTrue(any("NOPERM" in text for text in logged.texts()), logged.texts())

    def server_settings(self):
        return dict(redis_user="eventsource", redis_password="server-pass", replicas=True,
                    writer_lease=0.0,
                    channel_prefix="")

    @defer.inlineCallbacks
    def test_a_user_with_the_claim_keys_serves(self):
        yield self.start()
        yield self.start()  # (a second replica, on the same user)
        alice = yield self.client(user="alice", password="alice-pass")
        yield self.round_trip(alice, reply_prefix="reply:alice:")
        self.assertEqual(len(self.rows()), 1)

    @defer.inlineCallbacks
    def test_a_user_without_them_serves_nothing_and_says_why(self):
        logged = LogCapture(self)
        yield self.start(redis_user="noclaims")
        alice = yield self.client(user="alice", password="alice-pass")
        channel = unique("reply:alice:p")
        yield alice.subscribe(channel)
        yield alice.request("persist", {"channel": channel, "query": {"$insert": {
            "$documents": {"pid": "sec", "domain": "d", "name": "n"}}}})
        yield wait_until(lambda: any("claiming it in Redis failed" in text
                                     for text in logged.texts()), what="the warning")
        self.assertEqual(alice.messages.get(channel), [])  # (nothing, not even "error")
        self.assertEqual(len(self.rows()), 0)
        self.assertTrue(any("NOPERM" in text for text in logged.texts()), logged.texts())
