"""
Replica mode (docs/OPERATIONS.md "Replicas"): several servers on the same
channels serve each request once.

Unit tests: two services on one MemoryStore, each with its own MemoryBus,
the buses sharing one dict of claims (one "Redis"), every message delivered
to both, as Redis pub/sub delivers it to every subscriber; a Clock.  The
integration tests, with real Redis and MariaDB, are in
``tests/test_replicas_integration.py``.
"""

import json

import pymysql
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from eventsource.config import Config
from eventsource.service import EventSourceService, claim_key
from eventsource.testing import MemoryBus, MemoryStore


def persist2(channel, *pids):
    documents = [{"pid": pid, "domain": "d", "name": "n", "data": {"pid": pid}} for pid in pids]
    return json.dumps({"v": 2, "channel": channel,
                       "query": {"$insert": {"$documents": documents}}})


def fetch2(channel, window=1):
    return json.dumps({"v": 2, "channel": channel, "query": {"$select": {}}, "window": window})


def subscribe2(channel, window=1):
    return json.dumps({"v": 2, "channel": channel, "query": {"$select": {}}, "from": "start",
                       "window": window})


def accept(channel, count=1):
    return json.dumps({"channel": channel, "accepted": count})


class ReplicaTestCase(SynchronousTestCase):
    """Two replicas, ``a`` and ``b``, sharing a store and the claims."""

    def make(self, count=2, probes=None, **config):
        """``probes``: each replica's database check (:class:`Probe`), when given."""
        config.setdefault("replicas", True)
        # (the claims are these tests' subject: every replica writes, unless a
        # test asks for the writer lease)
        config.setdefault("writer_lease", 0.0)
        self.clock = Clock()
        self.config = Config(**config)
        self.store = MemoryStore(page_size=self.config.page_size)
        self.claims = {}
        self.leases = {}
        self.buses, self.services = [], []
        for index in range(count):
            bus = MemoryBus(claims=self.claims, leases=self.leases, clock=self.clock)
            service = EventSourceService(self.config, self.clock, bus=bus.attach,
                                         store=self.store,
                                         database_probe=probes[index] if probes else None)
            service.startService()
            self.assertTrue(self.successResultOf(service.ready))
            self.buses.append(bus)
            self.services.append(service)
        self.addCleanup(self.stop)

    def stop(self):
        for service in self.services:
            if service.running:
                service.stopService()
        self.clock.advance(0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def deliver(self, kind, body, order=None):
        """``body`` on the request channel of ``kind``, to every replica (in ``order``)."""
        for index in (range(len(self.services)) if order is None else order):
            self.services[index].message_received(kind, body)
        self.clock.advance(0)

    def out(self, channel, replica=None):
        """What was published on ``channel`` (by one replica, or all of them)."""
        buses = self.buses if replica is None else [self.buses[replica]]
        return [message for bus in buses for message in bus.messages(channel)]

    def publishers(self, channel):
        """The replicas that published anything on ``channel``."""
        return [i for i, bus in enumerate(self.buses) if bus.messages(channel)]

    def results(self, replica, kind):
        stats = self.services[replica].stats
        return {result: count for (k, result), count in stats.requests.items()
                if k == kind and count}


class ServedOnceTests(ReplicaTestCase):
    def test_each_persist_is_written_and_answered_once(self):
        """Whichever replica claims a persist first serves it; the other stays silent."""
        self.make(count=3)
        for i in range(30):
            # (the delivery order varies, as it does between real replicas)
            order = [(i + k) % 3 for k in range(3)]
            self.deliver("persist", persist2(f"r{i}", f"p{i}"), order)
        self.assertEqual(len(self.store.events), 30)
        for i in range(30):
            messages = self.out(f"r{i}")
            self.assertEqual(len(messages), 2, messages)
            self.assertEqual(messages[1], "end")
            self.assertEqual(self.publishers(f"r{i}"), [i % 3])
        self.assertEqual(sorted(self.claims.values()),
                         sorted(s.replica_id for s in self.services for _ in range(10)))
        for replica in range(3):
            self.assertEqual(self.results(replica, "persist"), {"ok": 10, "elsewhere": 20})

    def test_without_replica_mode_every_server_serves(self):
        """What replica mode prevents: two servers on one channel write a persist twice."""
        self.make(replicas=False)
        self.deliver("persist", persist2("r", "p"))
        self.assertEqual(len(self.store.events), 2)
        self.assertEqual(self.publishers("r"), [0, 1])
        self.assertEqual(self.claims, {})

    def test_the_claim(self):
        """One SET per replica per request, keyed by the channel and body, with the TTL."""
        self.make(claim_ttl=12.5, channel_prefix="es:")
        body = persist2("r", "p")
        self.deliver("es:persist", body)
        key = claim_key("es:", "es:persist", body)
        self.assertTrue(key.startswith("es:claim:"))
        for bus, service in zip(self.buses, self.services):
            self.assertEqual(bus.claims_asked, [(key, service.replica_id, 12.5)])
        self.assertNotEqual(self.services[0].replica_id, self.services[1].replica_id)
        # another kind, or another body, is another claim
        self.assertNotEqual(claim_key("es:", "es:fetch", body), key)
        self.assertNotEqual(claim_key("es:", "es:persist", body + " "), key)

    def test_an_identical_body_within_the_ttl_is_served_once(self):
        """The documented rule: same channel, same body, same claim (clients use a new reply channel per attempt)."""
        self.make()
        body = persist2("r", "p")
        self.deliver("persist", body)
        self.deliver("persist", body, order=[1, 0])
        self.assertEqual(len(self.store.events), 1)
        self.assertEqual(len(self.out("r")), 2)

    def test_the_first_claim_redis_takes_wins(self):
        """Claims answered late (a slow replica) still lose: the first SET that Redis took wins."""
        self.make()
        for bus in self.buses:
            bus.hold_claims = True
        self.deliver("persist", persist2("r", "p"))
        self.buses[1].release_claims()  # replica b's SET reached Redis first
        self.buses[0].release_claims()
        self.clock.advance(0)
        self.assertEqual(self.publishers("r"), [1])
        self.assertEqual(len(self.store.events), 1)

    def test_a_bad_request_is_refused_once(self):
        """Refusals are answers too: only the claimer sends "error", "end"."""
        self.make()
        self.deliver("persist", json.dumps({"v": 2, "channel": "r", "query": {"$insert": 1}}))
        self.deliver("fetch", json.dumps({"v": 2, "channel": "f", "query": {"$nope": 1}}))
        for channel in ("r", "f"):
            messages = self.out(channel)
            self.assertEqual([m if m == "end" else "error" for m in messages], ["error", "end"])
            self.assertEqual(len(self.publishers(channel)), 1)

    def test_unparseable_request_is_claimed_and_logged_once(self):
        self.make()
        self.deliver("persist", "{not json")
        self.assertEqual(self.results(0, "persist"), {"unanswerable": 1})
        self.assertEqual(self.results(1, "persist"), {"elsewhere": 1})


class StreamTests(ReplicaTestCase):
    def test_a_fetch_is_streamed_by_its_claimer_and_acknowledged_there_only(self):
        """Per-row acceptance on fetch-next: every replica hears it, only the owner acts."""
        self.make()
        for i in range(3):
            self.store.add(pid=f"p{i}")
        self.deliver("fetch", fetch2("f"), order=[1, 0])
        self.assertIn("f", self.services[1].streams)
        self.assertNotIn("f", self.services[0].streams)
        for _ in range(3):
            self.deliver("fetch-next", accept("f"))
        self.assertEqual(self.publishers("f"), [1])
        messages = self.out("f")
        self.assertEqual(len(messages), 4)
        self.assertEqual(messages[-1], "end")
        self.assertEqual(self.results(0, "fetch-next"), {"ignored": 3})
        self.assertEqual(self.results(1, "fetch-next"), {"ok": 3})
        # acknowledgements are never claimed
        self.assertEqual(len(self.buses[0].claims_asked), 1)

    def test_a_subscription_is_served_by_one_replica(self):
        self.make()
        self.store.add(pid="p0")
        self.deliver("subscribe", subscribe2("s"))
        (owner,) = [i for i, service in enumerate(self.services) if "s" in service.subscriptions]
        self.deliver("fetch-next", accept("s"))
        # a persist through either replica reaches the subscription of the owner
        self.deliver("persist", persist2("w", "p1"), order=[1 - owner, owner])
        self.clock.advance(0)
        self.deliver("fetch-next", accept("s", 5))
        self.assertEqual(self.publishers("s"), [owner])
        positions = [m["position"] for m in self.out("s") if isinstance(m, dict) and "position" in m]
        self.assertEqual(positions, [1, 2])
        self.deliver("fetch-next", json.dumps({"channel": "s", "end": True}))
        self.assertEqual(self.services[owner].subscriptions, {})
        self.assertEqual(self.publishers("s"), [owner])

    def test_a_non_owner_never_writes_on_a_stream_it_does_not_hold(self):
        """
        A request naming a reply channel that another replica streams on is
        served by its claimer, which does not know that stream; the replica
        holding the stream stays silent and keeps it (the busy-channel rule
        holds per replica only: docs/OPERATIONS.md "Replicas").
        """
        self.make()
        self.store.add(pid="p0")
        self.store.add(pid="p1")
        self.deliver("fetch", fetch2("x"), order=[0, 1])
        self.assertIn("x", self.services[0].streams)
        before = len(self.out("x", 0))
        self.deliver("fetch", fetch2("x", window=2), order=[1, 0])
        self.assertEqual(len(self.out("x", 0)), before)
        self.assertTrue(self.services[0].streams["x"].is_live)
        self.assertEqual(self.results(0, "fetch"), {"ok": 1, "elsewhere": 1})

    def test_an_end_reaches_the_owner_only(self):
        self.make()
        self.store.add(pid="p0")
        self.store.add(pid="p1")
        self.deliver("fetch", fetch2("f"), order=[0, 1])
        self.deliver("fetch-next", json.dumps({"channel": "f", "end": True}))
        self.assertEqual(self.publishers("f"), [0])
        self.assertEqual(self.services[0].streams, {})
        self.assertEqual(self.results(0, "fetch-next"), {"ok": 1})
        self.assertEqual(self.results(1, "fetch-next"), {"ignored": 1})


class FaultTests(ReplicaTestCase):
    def test_unreachable_redis_means_not_served(self):
        """A claim that fails is a request not served (its client retries), with a warning."""
        self.make()
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        for bus in self.buses:
            bus.claim_error = ConnectionError("Redis is not connected")
        self.deliver("persist", persist2("r", "p"))
        self.assertEqual(self.out("r"), [])
        self.assertEqual(self.store.events, [])
        self.assertEqual(self.results(0, "persist"), {"unclaimed": 1})
        warnings = [e for e in logged if "claiming it in Redis failed" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 2)

    def test_a_stopping_replica_leaves_requests_to_the_others(self):
        """Shutting down, a replica claims nothing: a replica still serving takes the request."""
        self.make()
        self.services[0].stopService()
        self.deliver("persist", persist2("r", "p"), order=[0, 1])
        self.assertEqual(self.publishers("r"), [1])
        self.assertEqual(len(self.store.events), 1)
        self.assertEqual(len(self.buses[0].claims_asked), 0)
        self.assertEqual(self.results(0, "persist"), {"elsewhere": 1})

    def test_a_dying_replica_takes_only_its_own_streams(self):
        """The streams of a replica that stops end; the other's go on."""
        self.make()
        for i in range(4):
            self.store.add(pid=f"p{i}")
        self.deliver("fetch", fetch2("a"), order=[0, 1])
        self.deliver("fetch", fetch2("b"), order=[1, 0])
        self.services[0].stopService()
        self.clock.advance(0)
        self.assertEqual(self.services[0].streams, {})
        for _ in range(4):
            self.deliver("fetch-next", accept("b"))
        self.assertEqual(self.out("b")[-1], "end")
        self.assertEqual(len(self.out("b")), 5)
        self.assertEqual(self.publishers("b"), [1])


class WriterLeaseTests(ReplicaTestCase):
    """
    ``--writer-lease``: one replica at a time (the lease's holder) claims
    the persists; fetches and subscriptions are claimed by any replica; the
    lease passes on when its holder stops, dies or loses its database.
    """

    def setUp(self):
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def persists(self, first, count=6, alive=(0, 1, 2)):
        """``count`` persists, heard by the replicas in ``alive``, each in a rotated order."""
        for i in range(first, first + count):
            order = [alive[(i + k) % len(alive)] for k in range(len(alive))]
            self.deliver("persist", persist2(f"r{i}", f"p{i}"), order)

    def writers(self, first, count=6):
        """The replica that answered each of these persists."""
        return {tuple(self.publishers(f"r{i}")) for i in range(first, first + count)}

    def test_only_the_holder_writes_and_the_others_serve_reads(self):
        self.make(count=3, writer_lease=2.0)
        owner = self.services[0].replica_id
        self.assertEqual(self.leases, {"claim:writer": (owner, 2.0)})
        self.assertTrue(self.services[0].writer_lease.held)
        self.assertTrue(self.services[1].writer_lease.leaves_persists())
        self.persists(0)
        self.assertEqual(self.writers(0), {(0,)})
        self.assertEqual(len(self.store.events), 6)
        self.assertEqual(self.results(0, "persist"), {"ok": 6})
        for replica in (1, 2):
            self.assertEqual(self.results(replica, "persist"), {"elsewhere": 6})
            # (a persist left to the holder costs no claim)
            self.assertEqual([k for k, _, _ in self.buses[replica].claims_asked
                              if k != "claim:writer"], [])
        # reads are not the lease's: whoever claims them first serves them
        for _ in range(3):
            self.store.add(pid="x")
        self.deliver("fetch", fetch2("f"), order=[2, 0, 1])
        self.deliver("subscribe", subscribe2("s"), order=[1, 0, 2])
        self.assertEqual(self.publishers("f"), [2])
        self.assertEqual([i for i, s in enumerate(self.services) if "s" in s.subscriptions], [1])
        # renewed every quarter of its time, it stays with its holder
        self.clock.pump([0.5] * 20)
        self.assertEqual(self.leases["claim:writer"], (owner, 12.0))
        self.persists(6)
        self.assertEqual(self.writers(6), {(0,)})

    def test_a_stopping_holder_hands_it_on_at_once(self):
        self.make(count=2, writer_lease=2.0)
        self.services[0].stopService()
        self.assertEqual(self.leases, {})  # (given up)
        # until replica 1's next attempt (a quarter of the lease's time at
        # most), it still leaves persists to the holder it saw last
        self.persists(0, alive=(0, 1))
        self.assertEqual(self.writers(0), {()})
        self.clock.advance(0.5)
        self.assertTrue(self.services[1].writer_lease.held)
        self.assertIn("holds the writer lease", self.logged[-1]["log_format"])
        self.persists(6, alive=(0, 1))
        self.assertEqual(self.writers(6), {(1,)})

    def test_a_dead_holder_hands_it_on_when_it_expires(self):
        """
        A holder that dies (it can no longer renew) keeps the lease until it
        expires: persists meanwhile go unanswered (their clients retry), then
        a survivor takes the lease and writes.
        """
        self.make(count=3, writer_lease=2.0)
        self.buses[0].lease_error = ConnectionError("Redis is not connected")  # (dead)
        self.clock.advance(0.25)
        self.persists(0, alive=(1, 2))
        self.assertEqual(self.writers(0), {()})  # left to the dead holder
        self.clock.pump([0.25] + [0.5] * 3)  # it expires at 2.0: the attempts then take it
        self.assertTrue(any(s.writer_lease.held for s in self.services[1:]))
        self.persists(6, alive=(1, 2))
        writers = self.writers(6)
        self.assertEqual(len(writers), 1)
        self.assertIn(writers.pop(), {(1,), (2,)})

    def test_a_holder_without_its_database_gives_it_up(self):
        probes = [Probe(), Probe()]
        self.make(count=2, probes=probes, writer_lease=2.0)
        self.assertTrue(self.services[0].writer_lease.held)
        probes[0].mode = "fail"
        self.clock.advance(1)  # the check fails...
        self.clock.advance(0.5)  # ...and the next lease attempt gives the lease up
        self.assertFalse(self.services[0].writer_lease.held)
        # (replica 1's attempt of the same moment finds it free)
        self.assertEqual(self.leases["claim:writer"][0], self.services[1].replica_id)
        self.assertTrue(self.services[1].writer_lease.held)
        self.persists(0, alive=(0, 1))
        self.assertEqual(self.writers(0), {(1,)})
        # back: it does not take the lease from a holder that keeps it
        probes[0].mode = "answer"
        self.clock.pump([0.5] * 6)
        self.assertTrue(self.services[1].writer_lease.held)
        self.assertTrue(self.services[0].writer_lease.leaves_persists())

    def test_without_an_answer_about_the_lease_every_replica_claims(self):
        """Redis refusing the lease's commands: nobody is known to hold it, claims decide."""
        self.make(count=2, writer_lease=2.0)
        for bus in self.buses:
            bus.lease_error = ConnectionError("NOPERM")
        self.clock.advance(0.5)
        self.assertEqual([s.writer_lease.holder for s in self.services], [None, None])
        self.persists(0, alive=(0, 1))
        self.assertEqual(self.writers(0), {(0,), (1,)})
        self.assertEqual(len(self.store.events), 6)
        self.clock.advance(5)  # (one warning per replica, not one per attempt)
        warnings = [e for e in self.logged if "writer lease" in e.get("log_format", "")
                    and e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 2)

    def test_two_holders_for_a_moment_still_write_each_persist_once(self):
        """The lease routes; the claims decide: a stale holder and a new one overlap safely."""
        self.make(count=2, writer_lease=2.0)
        # replica 1 holds the lease, replica 0 still believes it does (its
        # last answer came before its lease expired and replica 1 took it)
        self.leases["claim:writer"] = (self.services[1].replica_id, 100.0)
        self.clock.advance(0.5)
        self.assertTrue(self.services[1].writer_lease.held)
        lease = self.services[0].writer_lease
        lease.holder = lease.owner
        self.assertTrue(lease.held)
        self.persists(0, alive=(0, 1))
        self.assertEqual(len(self.store.events), 6)
        for i in range(6):
            self.assertEqual(len(self.out(f"r{i}")), 2)
        self.assertEqual(self.writers(0), {(0,), (1,)})
        self.clock.advance(0.5)
        self.assertFalse(self.services[0].writer_lease.held)
        self.assertIn("went to", [e for e in self.logged
                                  if e["log_level"].name == "warn"][-1]["log_format"])

    def test_replicas_that_leave_persists_leave_the_persist_channel(self):
        """
        Another replica holds the lease: this one unsubscribes from the
        persist channel (Redis sends it nothing to drop), and subscribes
        again when it takes the lease, or after Redis comes back.
        """
        self.make(count=2, writer_lease=2.0)
        holder, other = self.services
        self.assertFalse(holder.persists_muted)
        self.assertTrue(other.persists_muted)
        self.assertNotIn("persist", self.buses[1].subscribed)
        # Redis lost and back: the new connection listens on every request channel
        other.redis_lost()
        self.assertFalse(other.persists_muted)
        self.clock.advance(0.5)
        self.assertTrue(other.persists_muted)
        # the holder stops: the other takes the lease, and listens again
        holder.stopService()
        self.clock.advance(0.5)
        self.assertTrue(other.writer_lease.held)
        self.assertFalse(other.persists_muted)
        self.assertIn("persist", self.buses[1].subscribed)

    def test_tenant_mode_keeps_its_pattern(self):
        self.make(count=2, writer_lease=2.0, tenants=True, channel_prefix="es:")
        self.assertTrue(self.services[1].writer_lease.leaves_persists())
        self.assertFalse(self.services[1].persists_muted)
        self.assertEqual(self.buses[1].subscribed, set())

    def test_on_by_default_in_replica_mode_and_off_with_0(self):
        self.assertEqual(Config().writer_lease, 2.0)
        self.make(count=2, writer_lease=Config().writer_lease)
        self.assertTrue(self.services[0].writer_lease.held)
        for service in self.services:
            service.stopService()
        self.make(count=2, writer_lease=0)
        self.assertIsNone(self.services[0].writer_lease)
        self.clock.advance(5)
        self.assertEqual(self.leases, {})
        # (and a single server has none)
        single = EventSourceService(Config(), self.clock, bus=MemoryBus().attach,
                                    store=self.store)
        self.assertIsNone(single.writer_lease)

    def test_the_metric_says_who_holds_it(self):
        from eventsource.metrics import ServerCollector
        self.make(count=2, writer_lease=2.0)
        held = [[m.samples[0].value for m in ServerCollector(s).collect()
                 if m.name == "eventsource_writer_lease_held"] for s in self.services]
        self.assertEqual(held, [[1], [0]])


class Probe:
    """A replica's database check: answered, failed (MariaDB refuses), or held (silence)."""

    def __init__(self):
        self.mode = "answer"
        self.held = []
        self.sent = 0

    def __call__(self):
        self.sent += 1
        if self.mode == "answer":
            return defer.succeed(None)
        if self.mode == "fail":
            return defer.fail(pymysql.err.OperationalError(2003, "Can't connect to server"))
        d = defer.Deferred()
        self.held.append(d)
        return d


class DatabaseWatchTests(ReplicaTestCase):
    """
    A replica that does not reach its database claims nothing (a network
    partition between it and MariaDB): the others serve, and it serves
    again once its database answers.
    """

    def setUp(self):
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)
        self.probes = [Probe(), Probe()]
        self.make(probes=self.probes)

    def texts(self, level):
        return [e["log_format"] for e in self.logged if e["log_level"].name == level]

    def persists(self, first, count=5, order=(0, 1)):
        """``count`` persists, replica 0 hearing (and claiming) each first."""
        for i in range(first, first + count):
            self.deliver("persist", persist2(f"r{i}", f"p{i}"), order=list(order))

    def test_silence_past_the_interval_leaves_requests_to_the_others(self):
        self.assertEqual(self.probes[0].sent, 1)  # (at start)
        self.persists(0)
        self.assertEqual(self.results(0, "persist"), {"ok": 5})
        self.probes[0].mode = "hang"  # the partition
        self.clock.advance(1)  # a check sent...
        self.assertTrue(self.services[0].database_watch.reachable)
        self.persists(5)  # (the silence is not known yet: it claims and serves)
        self.assertEqual(self.results(0, "persist"), {"ok": 10})
        self.clock.advance(1)  # ...and unanswered a second later
        self.assertFalse(self.services[0].database_watch.reachable)
        self.assertEqual(len(self.texts("warn")), 1)
        self.assertIn("leaves requests to the other replicas", self.texts("warn")[0])
        claims = len(self.buses[0].claims_asked)
        self.persists(10)
        self.assertEqual(len(self.buses[0].claims_asked), claims)  # (no claim at all)
        self.assertEqual(self.results(0, "persist"), {"ok": 10, "elsewhere": 5})
        self.assertEqual(self.results(1, "persist"), {"ok": 5, "elsewhere": 10})
        for i in range(10, 15):
            self.assertEqual(self.publishers(f"r{i}"), [1])
        self.deliver("fetch", fetch2("f"), order=[0, 1])
        self.deliver("subscribe", subscribe2("s"), order=[0, 1])
        self.assertEqual(self.publishers("f"), [1])
        self.assertEqual([i for i, s in enumerate(self.services) if "s" in s.subscriptions], [1])
        # one check out at a time: no new one while the first is unanswered
        self.clock.advance(5)
        self.assertEqual(self.probes[0].sent, 2)
        # the heal: the stuck check fails at its own timeout, the next one answers
        self.probes[0].mode = "answer"
        self.probes[0].held.pop().errback(pymysql.err.OperationalError(2013, "Lost connection"))
        self.assertFalse(self.services[0].database_watch.reachable)
        self.clock.advance(1)
        self.assertTrue(self.services[0].database_watch.reachable)
        self.assertIn("answers again", self.texts("info")[-1])
        self.persists(15)
        self.assertEqual(self.results(0, "persist"), {"ok": 15, "elsewhere": 5})
        self.assertEqual(len(self.store.events), 20)
        # the other replica kept its checks answered throughout
        self.assertTrue(self.services[1].database_watch.reachable)

    def test_a_failed_check_leaves_requests_at_once(self):
        self.probes[0].mode = "fail"
        self.clock.advance(1)
        self.assertFalse(self.services[0].database_watch.reachable)
        self.assertIn("SELECT 1 failed", self.logged[-1]["why"])
        self.persists(0)
        self.assertEqual(self.results(0, "persist"), {"elsewhere": 5})
        self.clock.advance(1)  # (still failing: one warning only)
        self.assertEqual(len(self.texts("warn")), 1)

    def test_a_late_answer_does_not_count(self):
        """Reachable means answered within the interval: a slow database stays left alone."""
        self.probes[0].mode = "hang"
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertFalse(self.services[0].database_watch.reachable)
        self.probes[0].held.pop().callback(None)  # answered, 1 s late
        self.assertFalse(self.services[0].database_watch.reachable)
        self.probes[0].mode = "answer"
        self.clock.advance(1)
        self.assertTrue(self.services[0].database_watch.reachable)

    def test_stopping_stops_the_checks(self):
        self.services[0].stopService()
        sent = self.probes[0].sent
        self.clock.advance(10)
        self.assertEqual(self.probes[0].sent, sent)

    def test_no_checks_without_replica_mode(self):
        """A single server answers unavailable itself: it has no one to leave requests to."""
        service = EventSourceService(Config(), self.clock, bus=MemoryBus().attach,
                                     store=self.store, database_probe=Probe())
        self.assertIsNone(service.database_watch)


class TenantTests(ReplicaTestCase):
    def test_tenant_requests_are_claimed_under_the_prefix(self):
        self.make(tenants=True, channel_prefix="es:")
        body = persist2("es:t1:r", "p")
        self.deliver("es:t1:persist", body)
        self.assertEqual(self.publishers("es:t1:r"), [0])
        (key,) = self.claims
        self.assertEqual(key, claim_key("es:", "es:t1:persist", body))
        self.assertTrue(key.startswith("es:claim:"))
        # the same body on another tenant's channel is another request
        self.deliver("es:t2:persist", body)
        self.assertEqual(len(self.claims), 2)
