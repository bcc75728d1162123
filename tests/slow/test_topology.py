"""
The whole topology of issue 13 at once (:class:`tests.clusters.Topology`,
shared by this module): a 3-node Galera cluster, a Redis master with a replica
and three Sentinels, and three ``eventsource serve --replicas`` processes,
server ``i`` on Galera node ``i``, servers and clients all finding Redis
through the Sentinels.

Each test sends 3,000 version 2 appends from several clients (lanes, each
appending to its own stream with expected versions and event ids made before
the first attempt; the replica that claims a request serves it, so every
server writes through its own node) while subscriptions, at least one served
by each server, follow the test's events.  Then:

- every acknowledged event is stored once, at the version and position it was
  acknowledged with, and nothing else is; versions are exact; the three nodes
  hold the same rows;
- every subscription saw exactly the stored log, in position order, each
  event once (the client would drop a repeated or backward position with a
  warning: there is none).

The fault tests ``kill -9`` one server, one Galera node, or the Redis master
once a third of the appends are acknowledged (the server when it holds
appends it claimed: stopped with SIGSTOP first, and killed once appends sent
before that wait for it), bring it back (the server restarted, the node
rejoined, the old master a replica of the new one), and make the same checks
once the load is done, with a subscription served by every server again.
After the load of every test, appends to new streams go on until every server
has served one: each serves again.  The figures (the longest pause in
acknowledgements after the kill, the slowest append, the requests retried)
are printed for docs/OPERATIONS.md; nothing asserts on time.
"""

import signal
import sys
import time
import uuid

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from eventsource.client import (
    NO_STREAM,
    Busy,
    NewEvent,
    NoServerError,
    RedisConnectionError,
    ReplyTimeout,
    RetryPolicy,
    Unavailable,
    connect,
)
from tests.clusters import Topology, shared
from tests.support import LogCapture, sleep, unique, wait_until

#: servers' heartbeat: a subscription on a dead server is noticed in 2 s
HEARTBEAT = 1.0
#: each attempt's wait for an answer, and the client's retries (outlast a failover)
ATTEMPT_TIMEOUT = 3.0
RETRY = RetryPolicy(retries=30, initial_delay=0.05, max_delay=0.5)
APPENDS = 3000
CLIENTS = 4
LANES = 30


def topology():
    # (every server writes, through its own Galera node: commit order across
    # writers and nodes is this test's subject, so no writer lease)
    return shared(__name__, lambda: Topology(server_arguments=[
        "--heartbeat", str(HEARTBEAT), "--writer-lease", "0"]))


def report(text):
    """A figure for the person running the slow tests (and for docs/OPERATIONS.md)."""
    print("\n" + text, file=sys.stderr)


def plain(event_id):
    return event_id.replace("-", "").lower()


class Load:
    """
    ``APPENDS`` appends over ``LANES`` lanes spread over the clients: lane
    ``n`` appends ``APPENDS / LANES`` events to stream ``<domain>-n``, one at a
    time, each with an id made before its first attempt and the expected
    version it must land on.  An append that fails after the client's own
    retries (no server, Redis lost, no answer) is sent again by the lane, the
    same event: counted in :attr:`resent`.
    """

    def __init__(self, clients, domain):
        self.clients = clients
        self.domain = domain
        self.acknowledged = {}  # event id -> (pid, version, position)
        self.ack_times = []
        self.latencies = []  # (first sent, acknowledged)
        self.pending = {}  # lane -> when its append of the moment was first sent
        self.extra = 0  # appends to new streams after the load
        self.loaded = None  # acknowledgements when the load was done
        self.resent = 0
        self.duplicates = 0
        self.stopping = False  # (a failed test stops the lanes)

    def run(self):
        per_lane = APPENDS // LANES
        lanes = [self.lane(n, per_lane) for n in range(LANES)]
        return defer.gatherResults(lanes, consumeErrors=True).addCallback(self._loaded)

    def _loaded(self, result):
        self.loaded = len(self.ack_times)  # (the figures are the load's, not what follows)
        return result

    @defer.inlineCallbacks
    def lane(self, n, count):
        client = self.clients[n % len(self.clients)]
        pid = f"{self.domain}-{n}"
        for version in range(count):
            if self.stopping:
                return
            event = NewEvent(self.domain, "n", {"lane": n, "v": version}, event_id=uuid.uuid4())
            sent = self.pending[n] = time.monotonic()
            while True:
                try:
                    result = yield client.append(
                        pid, [event], expected_version=NO_STREAM if version == 0 else version - 1)
                    break
                except (NoServerError, RedisConnectionError, ReplyTimeout, Unavailable, Busy):
                    if self.stopping:
                        return
                    self.resent += 1
                    yield sleep(0.05)
            acked = time.monotonic()
            del self.pending[n]
            appended = result.events[0]
            if (appended.pid, appended.version) != (pid, version):
                raise AssertionError(f"{pid} version {version} acknowledged as {appended}")
            self.acknowledged[plain(appended.event_id)] = (pid, version, appended.position)
            self.duplicates += result.duplicate
            self.ack_times.append(acked)
            self.latencies.append((sent, acked))

    @defer.inlineCallbacks
    def one_each(self, streams):
        """One append to each of ``streams`` new streams, at once (after the load)."""
        start = self.extra
        self.extra += streams
        yield defer.gatherResults([self.lane(LANES + start + k, 1) for k in range(streams)],
                                  consumeErrors=True)

    @property
    def expected(self):
        """How many appends were sent in all."""
        return APPENDS // LANES * LANES + self.extra

    def unanswered(self, before):
        """Appends first sent before ``before`` and not acknowledged yet."""
        return sum(sent < before for sent in self.pending.values())

    def figures(self, since):
        """
        The longest pause in acknowledgements of the load from ``since`` on,
        and its slowest append acknowledged after ``since``.
        """
        times = [since] + sorted(t for t in self.ack_times[:self.loaded] if t > since)
        pause = max((b - a for a, b in zip(times, times[1:])), default=0.0)
        slowest = max((acked - sent for sent, acked in self.latencies[:self.loaded]
                       if acked > since), default=0.0)
        return pause, slowest


class Watcher:
    """A subscription of the client's (``client.subscribe``) to the test's domain."""

    def __init__(self, client, domain):
        self.events = []  # (position, event id)
        self.server = None  # the server that took it first
        self.caught_up = []
        self.subscription = client.subscribe({"domain": domain}, start="start",
                                             heartbeat=HEARTBEAT,
                                             on_caught_up=self.caught_up.append)
        self.done = defer.Deferred.fromCoroutine(self.follow())

    async def follow(self):
        async for event in self.subscription:
            self.events.append((event.position, plain(event.event_id)))

    def close(self):
        return self.subscription.aclose()


class TopologyTests(TestCase):
    timeout = 600

    @defer.inlineCallbacks
    def setUp(self):
        started = time.monotonic()
        self.topology = topology()  # (blocks, the first time: 25-30 s here)
        if time.monotonic() - started > 1:
            report(f"Topology: 3 Galera nodes, Redis with 3 Sentinels and 3 servers serving "
                   f"in {self.topology.start_seconds:.1f} s")
        self.servers = self.topology.servers
        self.domain = unique("d")
        self.logs = LogCapture(self)
        self.watchers = []
        self.clients = []
        self.disconnected = []
        for _ in range(CLIENTS + 1):
            client = yield connect(
                sentinels=self.topology.sentinels_option.split(","),
                master_name=self.topology.master_name, reactor=reactor,
                timeout=ATTEMPT_TIMEOUT, retry=RETRY, max_delay=0.5)
            self.addCleanup(self.disconnect, client)
            self.clients.append(client)
        self.subscriber = self.clients.pop()
        self.addCleanup(self.close_watchers)
        self.served_before = yield self.persists_served()

    def disconnect(self, client):
        if client in self.disconnected:
            return None
        self.disconnected.append(client)
        return client.disconnect()

    @defer.inlineCallbacks
    def close_watchers(self):
        for watcher in self.watchers:
            yield watcher.close()
            yield watcher.done

    # -- the servers, through their /metrics -----------------------------------

    def metric(self, server, name, **labels):
        """A server's metric summed over the labels not given (blocking: from a thread)."""
        return sum(value for (sample, sample_labels), value in server.metrics().items()
                   if sample == name
                   and all(dict(sample_labels).get(k) == v for k, v in labels.items()))

    def persists_served(self):
        return threads.deferToThread(lambda: [
            self.metric(s, "eventsource_requests_total", kind="persist", result="ok")
            if s.running else 0 for s in self.servers])

    def subscriptions_served(self):
        return threads.deferToThread(lambda: [
            self.metric(s, "eventsource_open_subscriptions") if s.running else 0
            for s in self.servers])

    @defer.inlineCallbacks
    def subscribe_on_every_server(self):
        """
        New subscriptions until every server serves one (one that lands on a
        server that has one already is closed again); returns how many it kept.
        """
        kept = 0
        for _ in range(40):
            counts = yield self.subscriptions_served()
            if all(counts):
                return kept
            watcher = Watcher(self.subscriber, self.domain)
            self.watchers.append(watcher)
            yield wait_until(lambda w=watcher: w.caught_up, timeout=30, what="caughtUp")
            after = yield self.subscriptions_served()
            grown = [i for i, (a, b) in enumerate(zip(counts, after)) if b > a]
            watcher.server = grown[0] if len(grown) == 1 else None
            if watcher.server is not None and counts[watcher.server]:
                self.watchers.remove(watcher)
                yield watcher.close()
                yield watcher.done
                continue
            kept += 1
        self.fail(f"subscriptions open per server after 40 tries: {counts}")

    # -- the checks ------------------------------------------------------------

    def stored(self, node):
        """The test's rows as ``node`` has them, in position order."""
        connection = node.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SET SESSION wsrep_sync_wait = 1")
                cursor.execute(f"SELECT id, LOWER(HEX(event_id)), pid, version FROM "
                               f"{self.topology.table} WHERE domain = %s ORDER BY id",
                               (self.domain,))
                return list(cursor.fetchall())
        finally:
            connection.close()

    @defer.inlineCallbacks
    def check(self, load):
        """
        Every acknowledged event stored once, exact versions (asserted); what
        the subscriptions saw that is not the stored log (returned).
        """
        yield threads.deferToThread(self.topology.galera.wait_synced, 120)
        nodes = self.topology.galera.nodes
        rows = yield threads.deferToThread(self.stored, nodes[0])
        for node in nodes[1:]:
            other = yield threads.deferToThread(self.stored, node)
            self.assertEqual(other, rows, f"{node.name} differs from {nodes[0].name}")
        ids = [row[1] for row in rows]
        self.assertEqual(len(ids), len(set(ids)), "an event id stored twice")
        self.assertEqual(len(load.acknowledged), load.expected)
        self.assertEqual({row[1]: (row[2], row[3], row[0]) for row in rows}, load.acknowledged)
        streams = {}
        for _, _, pid, version in rows:
            streams.setdefault(pid, []).append(version)
        for pid, versions in streams.items():
            self.assertEqual(sorted(versions), list(range(len(versions))), pid)
        log = [(row[0], row[1]) for row in rows]
        last = log[-1][0]
        # until every subscription has the last event, or none moved for 5 s
        # (one that skipped an event has it; the comparison says what it lacks)
        progress, moved = None, time.monotonic()
        while not all(w.events and w.events[-1][0] >= last for w in self.watchers):
            now = [len(w.events) for w in self.watchers]
            if now != progress:
                progress, moved = now, time.monotonic()
            elif time.monotonic() - moved > 5:
                break
            yield sleep(0.1)
        problems = []
        for n, watcher in enumerate(self.watchers):
            seen = watcher.events
            if seen != log:
                missing = set(log) - set(seen)
                problems.append(
                    f"subscription {n} (first served by server {watcher.server}): "
                    f"{len(seen)} events, {len(missing)} of the {len(log)} stored missing"
                    f"{' (e.g. position %d)' % min(missing)[0] if missing else ''}, "
                    f"{len(seen) - len(set(seen))} repeated, in position order: "
                    f"{seen == sorted(seen)}")
        ignored = [t for t in self.logs.texts() if "ignored event at position" in t]
        if ignored:
            problems.append(f"the client dropped {len(ignored)} events a subscription sent "
                            f"again or behind its position: {ignored[:3]}")
        return problems

    def retries(self):
        """Append attempts the client made again by itself, and resubscriptions, so far."""
        texts = self.logs.texts()
        return (sum("with the same event ids" in t for t in texts),
                sum("subscribing again from position" in t for t in texts))

    @defer.inlineCallbacks
    def load_with(self, fault):
        """
        The load, with ``fault()`` run once a third of it is acknowledged
        (it returns a Deferred: it waits for the recovery); then the checks.
        """
        yield self.subscribe_on_every_server()
        load = Load(self.clients, self.domain)
        started = time.monotonic()
        running = load.run()

        @defer.inlineCallbacks
        def stop():
            load.stopping = True
            if not running.called:  # (the test failed: end the appends waiting)
                for client in self.clients:
                    yield self.disconnect(client)
            yield running.addErrback(lambda _: None)

        self.addCleanup(stop)
        outcome = {}
        if fault is not None:
            yield wait_until(lambda: len(load.acknowledged) >= APPENDS // 3, timeout=120,
                             what="a third of the appends")
            outcome = yield fault(load)
        yield running
        seconds = time.monotonic() - started
        # every server serves again: appends to new streams until each served
        # some, for 60 s at most (a time, not a count of rounds: a restarted
        # Galera node may take seconds to be ready, however fast the rounds go)
        before = yield self.persists_served()
        deadline = time.monotonic() + 60
        while True:
            yield load.one_each(LANES)
            after = yield self.persists_served()
            if all(b > a for a, b in zip(before, after)):
                break
            if time.monotonic() > deadline:
                self.fail(f"not every server serves persists within 60 s after the recovery: "
                          f"{before} -> {after}")
            yield sleep(0.05)
        # a subscription on every server again (a restarted one has none)
        added = yield self.subscribe_on_every_server()
        per_server = yield self.subscriptions_served()
        problems = yield self.check(load)
        served = yield self.persists_served()
        # (a server restarted during the test counts from its restart)
        served = [b - a if b >= a else b for a, b in zip(self.served_before, served)]
        retried, resubscribed = self.retries()
        return dict(outcome, load=load, seconds=seconds, served=served, retried=retried,
                    resubscribed=resubscribed, added=added, problems=problems,
                    per_server=per_server)

    def describe(self, what, figures):
        """Print the figures (the test then asserts what the subscriptions saw)."""
        load = figures["load"]
        problems = figures["problems"]
        seen = ("saw the same events in order, each once" if not problems
                else f"did not all see the stored log ({len(problems)} problems)")
        text = (f"{what}: {APPENDS} appends from {CLIENTS} clients in {figures['seconds']:.1f} s, "
                f"then {load.extra - figures.get('pressed', 0)} more until every server had "
                f"served one (and {figures.get('pressed', 0)} during the fault); persists served "
                f"per server (a restarted one: since its restart) {figures['served']}; "
                f"{len(self.watchers)} subscriptions ({figures['added']} opened after the "
                f"recovery; open per server at the end {figures['per_server']}) {seen}; "
                f"attempts retried by the client {figures['retried']}, appends sent again by "
                f"the test {load.resent}, answered as duplicates {load.duplicates}; "
                f"resubscriptions {figures['resubscribed']}")
        if "held" in figures:
            text += f"; appends it held (sent before it stopped, unanswered 0.5 s later) " \
                    f"{figures['held']}"
        if "killed_at" in figures:
            pause, slowest = load.figures(figures["killed_at"])
            text += (f"; after the kill: longest pause in acknowledgements {pause:.2f} s, "
                     f"slowest append {slowest:.2f} s")
        for key, value in figures.items():
            if key.endswith("_seconds"):
                text += f"; {key[:-8].replace('_', ' ')} {value:.2f} s"
        report(text)
        self.figures = text

    # -- the tests ---------------------------------------------------------------

    @defer.inlineCallbacks
    def test_all_healthy(self):
        figures = yield self.load_with(None)
        self.assertTrue(all(figures["served"]), f"persists served: {figures['served']}")
        self.describe("Topology, nothing killed", figures)
        self.assertEqual(figures["problems"], [])

    @defer.inlineCallbacks
    def test_server_killed(self):
        """
        ``kill -9`` of a server mid-load, holding requests it claimed, then
        started again: their clients' attempts time out and are sent again.
        """
        killed = []

        @defer.inlineCallbacks
        def fault(load):
            # Stopped (SIGSTOP) at a moment of the load, a server is killed
            # only once appends sent before that moment wait for it (it
            # claimed them): it dies holding requests.  If none does, it goes
            # on (SIGCONT) and is tried again a moment later.  Meanwhile
            # appends to new streams keep coming (the load itself may end
            # first on a fast machine: an append takes a few ms), and the
            # server stopped is the one with the most persists in flight (its
            # /metrics): claims are a race, and one server may win nearly all
            # of them for a while.
            pressing = [True]
            extra_before = load.extra

            @defer.inlineCallbacks
            def press():
                while pressing[0]:
                    yield load.one_each(LANES)

            pressure = press()

            def busiest():
                in_flight = [self.metric(s, "eventsource_persists_in_flight")
                             for s in self.servers]
                return self.servers[in_flight.index(max(in_flight))]

            attempts = 0
            for _ in range(60):
                attempts += 1
                server = yield threads.deferToThread(busiest)
                killed_at = time.monotonic()
                server.send(signal.SIGSTOP)
                yield sleep(0.5)
                held = load.unanswered(before=killed_at)
                if held:
                    break
                server.send(signal.SIGCONT)
                yield sleep(0.2)
            pressing[0] = False
            killed.append(server)
            server.kill()
            yield sleep(1.0)
            restarted = time.monotonic()
            server.spawn()
            yield wait_until(server.serving, timeout=60, step=0.05, what="the server to serve")
            yield pressure  # (its last appends, the held ones among them, answered)
            return dict(killed_at=killed_at, held=held, attempts=attempts,
                        pressed=load.extra - extra_before,
                        server_serving_after_its_restart_seconds=time.monotonic() - restarted)

        figures = yield self.load_with(fault)
        number = self.servers.index(killed[0]) + 1
        self.describe(f"Topology, server {number} killed with kill -9 (stopped "
                      f"{figures['attempts']} times until it held appends) and restarted 1 s "
                      "later", figures)
        self.assertGreater(figures["held"], 0)
        self.assertGreaterEqual(figures["retried"] + figures["load"].resent, figures["held"])
        self.assertEqual(figures["problems"], [])

    @defer.inlineCallbacks
    def test_galera_node_killed(self):
        """``kill -9`` of Galera node 3 mid-load (server 3 loses its database), then rejoined."""
        galera = self.topology.galera
        node = galera.nodes[2]

        @defer.inlineCallbacks
        def fault(load):
            killed_at = time.monotonic()
            node.kill()
            yield threads.deferToThread(galera.wait_synced, 60)
            shrunk = time.monotonic() - killed_at
            yield sleep(2.0)
            restarted = time.monotonic()
            node.spawn()
            yield threads.deferToThread(galera.wait_synced, 180)
            return dict(killed_at=killed_at, cluster_of_2_seconds=shrunk,
                        node_synced_after_its_restart_seconds=time.monotonic() - restarted)

        figures = yield self.load_with(fault)
        self.describe("Topology, Galera node 3 killed with kill -9 and restarted", figures)
        self.assertEqual(figures["problems"], [])

    @defer.inlineCallbacks
    def test_redis_master_killed(self):
        """``kill -9`` of the Redis master mid-load; the Sentinels promote the replica."""
        sentinel = self.topology.sentinel

        @defer.inlineCallbacks
        def fault(load):
            old = sentinel.kill_master()
            killed_at = sentinel.killed_at
            new, promoted_at = yield threads.deferToThread(sentinel.wait_promotion, old)
            yield wait_until(lambda: any(t > promoted_at for t in load.ack_times),
                             timeout=60, what="an append acknowledged after it")
            first_ack = min(t for t in load.ack_times if t > promoted_at)
            sentinel.restart_old_master()

            def replica():
                try:
                    return "role:slave" in old.cli("INFO", "replication")
                except RuntimeError:  # (the Sentinels' reconfiguration closes connections)
                    return False

            yield wait_until(replica, timeout=60, step=0.2,
                             what="the old master to become a replica")
            return dict(killed_at=killed_at, promotion_seconds=promoted_at - killed_at,
                        first_append_after_the_promotion_seconds=first_ack - promoted_at)

        figures = yield self.load_with(fault)
        self.describe("Topology, Redis master killed with kill -9", figures)
        self.assertEqual(figures["problems"], [])
