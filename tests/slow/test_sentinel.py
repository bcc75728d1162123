"""
Redis behind Sentinel, for real: a master, a replica and three Sentinels
(:class:`tests.clusters.SentinelSetup`, shared by this module), a server of
this process and an ``eventsource.client`` both given the Sentinels and the
master's name.  The master is killed (``kill -9``) in the middle of a load of
appends with event ids and expected versions; after the promotion both follow
the new master, every acknowledged event is stored once, versions are exact,
and the server serves again soon after the promotion (the figures are logged
and printed: docs/OPERATIONS.md quotes them; no test asserts on time).
"""

import sys
import time
import uuid

import pymysql
from twisted.internet import defer, reactor, threads

from eventsource.client import (
    NO_STREAM,
    NewEvent,
    NoServerError,
    RetryPolicy,
    connect,
)
from eventsource.client import (
    RedisConnectionError as ClientRedisError,
)
from tests.clusters import SentinelSetup, shared
from tests.support import MYSQL, IntegrationTestCase, sleep, sql, unique, wait_until


def sentinels():
    return shared(__name__, SentinelSetup)


#: the client's retries: they must outlast a failover (about 2 s for the
#: Sentinels to agree, then up to --redis-max-delay for the server to be back)
RETRY = RetryPolicy(retries=30, initial_delay=0.05, max_delay=0.5)


class SentinelFailoverTests(IntegrationTestCase):
    timeout = 240

    @defer.inlineCallbacks
    def setUp(self):
        self.cluster = sentinels()  # (blocks a few seconds, the first time)
        self.database = unique("es_test")
        self.table = f"{self.database}.event"
        self.prefix = unique("t") + ":"
        yield self.start_server(redis_sentinels=tuple(self.cluster.sentinel_addresses),
                                redis_master_name=self.cluster.master_name,
                                redis_host="127.0.0.1", redis_port=1)
        self.es = yield self.connect_client()

    @defer.inlineCallbacks
    def connect_client(self):
        client = yield connect(sentinels=[f"{h}:{p}" for h, p in self.cluster.sentinel_addresses],
                               master_name=self.cluster.master_name, reactor=reactor,
                               channel_prefix=self.prefix, timeout=3, retry=RETRY,
                               max_delay=0.5)
        self.addCleanup(client.disconnect)
        return client

    def stored(self):
        return sql(f"SELECT pid, version, LOWER(HEX(event_id)) FROM {self.table} ORDER BY id")

    @defer.inlineCallbacks
    def test_serves_on_the_master_the_sentinels_name(self):
        """The server and the client found the master through the Sentinels, not redis_port."""
        result = yield self.es.append("s-1", [NewEvent("d", "n", {"i": 0})],
                                      expected_version=NO_STREAM)
        self.assertEqual(result.versions, (0,))
        master = self.cluster.master
        clients = master.cli("CLIENT", "LIST")
        # the server's two connections and the client's two
        self.assertGreaterEqual(clients.count("cmd="), 4, clients)
        self.assertEqual(self.stored()[0][:2], ("s-1", 0))

    @defer.inlineCallbacks
    def test_master_killed_mid_load(self):
        """
        Writers append in a loop, each to its own stream with expected
        versions, the event ids made before the first attempt; the master is
        killed with ``kill -9`` while each writer has an append in flight (the
        table held locked meanwhile: written after the kill, answer lost).  Every append is acknowledged in the end
        (those that reached no server at all are sent again, with the same
        ids), each acknowledged event is stored once at the version it was
        acknowledged with, and nothing else is stored.
        """
        writers = 6
        acknowledged = {}   # event id -> (pid, version)
        repeats = [0]       # appends answered as the repeat of a stored one
        resent = [0]        # appends sent again by the test (no server, or retries used up)
        after_kill = []     # (monotonic time, versions) of acks completed after the kill
        stopping = [False]

        @defer.inlineCallbacks
        def writer(n):
            pid = f"w{n}"
            version = -1
            while not stopping[0]:
                event = NewEvent("d", "n", {"w": n, "v": version + 1}, event_id=uuid.uuid4())
                while True:
                    try:
                        result = yield self.es.append(
                            pid, [event], expected_version=NO_STREAM if version < 0 else version)
                        break
                    except (NoServerError, ClientRedisError):
                        # nothing reached a server, or the retries ran out: the
                        # same event (same id) again, as an application would
                        resent[0] += 1
                        yield sleep(0.05)
                version += 1
                self.assertEqual(result.versions, (version,))
                acknowledged[str(event.event_id).replace("-", "")] = (pid, version)
                repeats[0] += result.duplicate
                if self.killed_at is not None:
                    after_kill.append(time.monotonic())

        self.killed_at = None
        loops = [writer(n) for n in range(writers)]
        self.addCleanup(stopping.__setitem__, 0, True)
        for loop in loops:
            loop.addErrback(lambda failure: (stopping.__setitem__(0, True), failure)[1])
        yield sleep(1.5)
        self.assertFalse(stopping[0], "a writer failed before the kill")
        # Hold the table so that every writer has an append in flight, received
        # by the server and waiting for the database, when the master dies;
        # written once the lock goes, its answer is lost with the master.
        locker = pymysql.connect(**MYSQL)
        self.addCleanup(locker.close)
        locker.cursor().execute(f"LOCK TABLES {self.table} WRITE")
        yield sleep(0.3)
        before = len(acknowledged)
        self.assertGreater(before, 0)
        old = self.cluster.kill_master()
        self.killed_at = self.cluster.killed_at
        yield sleep(0.3)
        locker.cursor().execute("UNLOCK TABLES")
        new, promoted_at = yield threads.deferToThread(self.cluster.wait_promotion, old)
        # the server serves again: subscribed on the new master
        bus = self.server.bus
        yield wait_until(lambda: bus.connected, timeout=30, step=0.005,
                         what="the server to serve again")
        serving_at = time.monotonic()
        yield wait_until(lambda: any(t > serving_at for t in after_kill), timeout=30,
                         what="an append acknowledged after the failover")
        first_ack = min(t for t in after_kill if t > promoted_at)
        yield sleep(1.0)
        stopping[0] = True
        yield defer.gatherResults(loops, consumeErrors=True)

        rows = self.stored()
        ids = [row[2] for row in rows]
        self.assertEqual(len(ids), len(set(ids)), "an event id stored twice")
        stored = {row[2]: (row[0], row[1]) for row in rows}
        self.assertEqual(stored, acknowledged)
        for n in range(writers):
            versions = sorted(v for pid, v in stored.values() if pid == f"w{n}")
            self.assertEqual(versions, list(range(len(versions))))
        self.assertIn(f"{new.port}", str(bus._sentinel_endpoint.master))
        # the appends in flight at the kill were stored, and their repeats answered
        # as such: stored once (checked above), acknowledged once
        self.assertGreaterEqual(repeats[0], 1)
        figures = (f"Sentinel failover: promotion {promoted_at - self.killed_at:.2f} s after "
                   f"kill -9; server serving {serving_at - promoted_at:.2f} s after the "
                   f"promotion; first append acknowledged {first_ack - promoted_at:.2f} s after "
                   f"it; {len(acknowledged)} appends ({before} before the kill), "
                   f"{repeats[0]} answered as repeats, {resent[0]} sent again by the test")
        print("\n" + figures, file=sys.stderr)
        self.figures = figures
        # the old master comes back as a replica of the new one (for later tests)
        self.cluster.restart_old_master()
        yield wait_until(lambda: "role:slave" in old.cli("INFO", "replication"), timeout=60,
                         step=0.2, what="the old master to become a replica")
