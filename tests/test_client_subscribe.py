"""
Tests for :meth:`eventsource.client.EventSourceClient.subscribe`: the
:class:`~eventsource.client.Subscription` iterator (history, ``caughtUp``,
live events, acceptance, the end) and how it subscribes again, from the last
position it handed out, after a ``"timeout"``, an ``unavailable`` error, a
server restart, a Redis outage and a silence, so that its consumer sees each
event once, in order.

The first part runs over :class:`eventsource.client.testing.FakeServer` and
:class:`MemoryPubSub` with a :class:`Clock`; the second against servers of
this process on the real Redis and MariaDB, restarting the server, and a
private Redis, in the middle of a burst of appends.
"""

import gc
import json
import os
import random
import signal
import subprocess
import sys

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from eventsource.client import (
    BadRequest,
    EventSourceClient,
    NewEvent,
    NoServerError,
    RecordedEvent,
    RedisConnectionError,
    Refused,
    RetryPolicy,
    ServerTooOld,
    Subscription,
    connect,
)
from eventsource.client import _requests
from eventsource.client._requests import Marker
from eventsource.client.testing import FakeServer, MemoryPubSub
from eventsource.wire import encode_body, encode_error
from tests.redis_server import PrivateRedisTestCase
from tests.support import REDIS_HOST, REDIS_PORT, IntegrationTestCase, sleep, sql, wait_until

#: no jitter: the pauses between attempts are exactly 0.1, 0.2, 0.4, 0.5, 0.5... s
EXACT = RetryPolicy(initial_delay=0.1, max_delay=0.5, jitter=0)


def run(coroutine):
    return Deferred.fromCoroutine(coroutine)


class Consumer:
    """Iterates a subscription in the background, recording every event."""

    def __init__(self, subscription, stop_after=None):
        self.subscription = subscription
        self.events = []
        self.stop_after = stop_after
        self.done = run(self._go())

    async def _go(self):
        async for event in self.subscription:
            self.events.append(event)
            if self.stop_after is not None and len(self.events) >= self.stop_after:
                break
        return len(self.events)

    @property
    def positions(self):
        return [event.position for event in self.events]


class SubscribeTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.pubsub = MemoryPubSub()
        self.server = FakeServer(self.pubsub)
        self.client = EventSourceClient(self.pubsub, self.clock)

    def tearDown(self):
        self.assertEqual(self.client.open_requests, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def add(self, count, pid="p1", name="n"):
        return [self.server.add_event(pid, "d", f"{name}{i}", {"i": i})["position"]
                for i in range(count)]

    def subscribe(self, *args, **kwargs):
        kwargs.setdefault("retry", EXACT)
        kwargs.setdefault("heartbeat", 1.0)
        return self.client.subscribe(*args, **kwargs)

    def subscribe_requests(self):
        return [r for r in self.server.requests if "from" in r]

    def close(self, consumer):
        self.successResultOf(consumer.subscription.aclose())
        self.assertEqual(self.successResultOf(consumer.done), len(consumer.events))


class IteratorTests(SubscribeTestCase):
    def test_history_caught_up_then_live(self):
        """The stored events, the caughtUp moment, then each new one as it is stored."""
        self.add(3)
        self.add(2, pid="other")
        caught_up = []
        subscription = self.subscribe({"pid": "p1"}, on_caught_up=caught_up.append)
        self.assertIsInstance(subscription, Subscription)
        self.assertEqual((subscription.position, subscription.caught_up), (0, False))
        consumer = Consumer(subscription)
        self.assertEqual(consumer.positions, [1, 2, 3])
        self.assertEqual(caught_up, [5])
        self.assertTrue(subscription.caught_up)
        self.assertEqual(subscription.position, 5)
        [request] = self.subscribe_requests()
        self.assertEqual(request, {"v": 2, "channel": subscription.channel, "from": "start",
                                   "window": 100,
                                   "query": {"$select": {"$where": {"pid": "p1"}}}})
        self.add(2, pid="other")
        self.add(2)
        self.assertEqual(consumer.positions, [1, 2, 3, 8, 9])
        self.assertIsInstance(consumer.events[0], RecordedEvent)
        self.assertEqual((consumer.events[-1].name, consumer.events[-1].data), ("n1", {"i": 1}))
        self.assertEqual(subscription.position, 9)
        self.assertEqual((subscription.attempts, subscription.events), (1, 5))
        self.assertEqual(caught_up, [5])
        self.close(consumer)

    def test_every_event_and_a_table(self):
        self.add(2)
        self.add(1, pid="p2")
        consumer = Consumer(self.subscribe(table="shop.event"))
        self.assertEqual(consumer.positions, [1, 2, 3])
        self.assertEqual(self.subscribe_requests()[0]["query"],
                         {"$select": {"$from": "shop.event"}})
        self.close(consumer)

    def test_from_the_end(self):
        """From "end": nothing stored before; the position is the caughtUp marker's."""
        self.add(3)
        subscription = self.subscribe(start="end")
        self.assertIsNone(subscription.position)
        consumer = Consumer(subscription)
        self.assertEqual((consumer.positions, subscription.position), ([], 3))
        self.add(1)
        self.assertEqual(consumer.positions, [4])
        self.close(consumer)

    def test_from_a_position(self):
        self.add(5)
        consumer = Consumer(self.subscribe(start=3))
        self.assertEqual(consumer.positions, [4, 5])
        self.assertEqual(self.subscribe_requests()[0]["from"], 3)
        self.close(consumer)

    def test_until_caught_up(self):
        """The loop ends at the first caughtUp, telling the server end."""
        self.add(4)
        subscription = self.subscribe(until_caught_up=True, window=3)
        consumer = Consumer(subscription)
        self.assertEqual(self.successResultOf(consumer.done), 4)
        self.assertTrue(subscription.closed)
        self.assertIn({"channel": self.subscribe_requests()[0]["channel"], "end": True},
                      self.pubsub.published("fetch-next"))
        self.assertEqual(self.server.subscriptions, {})

    def test_acceptance_in_batches_markers_take_none(self):
        """Events are accepted as a windowed fetch's rows are; markers are not accepted."""
        self.add(10)
        consumer = Consumer(self.subscribe(window=4))
        self.assertEqual(len(consumer.events), 10)
        accepted = [message.get("accepted", 1) for message in self.pubsub.published("fetch-next")]
        self.assertEqual(accepted, [2, 2, 2, 2, 2])
        self.server.heartbeat()
        self.server.heartbeat()
        self.add(1)
        self.clock.advance(0.05)  # (a lone event waits for the idle acceptance)
        accepted = [message.get("accepted", 1) for message in self.pubsub.published("fetch-next")]
        self.assertEqual(accepted, [2, 2, 2, 2, 2, 1])
        self.close(consumer)

    def test_heartbeat_moves_the_position(self):
        """A heartbeat's position is a safe resume point: the position follows it."""
        self.add(2)
        subscription = self.subscribe({"pid": "p1"})
        consumer = Consumer(subscription)
        self.add(3, pid="other")
        self.assertEqual(subscription.position, 2)
        self.server.heartbeat()
        self.assertEqual(subscription.position, 5)
        self.close(consumer)

    def test_marker_is_one_input(self):
        """A marker is the machine's marker_received, handed out in line, not a row."""
        self.assertEqual(_requests.DIRECT[(_requests.RequestState.OPEN, "marker_received")],
                         ("take_marker",))
        subscription = self.subscribe()
        consumer = Consumer(subscription)
        request = subscription._link.request
        taken = []
        self.patch(request, "take_marker", lambda marker: taken.append(marker))
        self.server.heartbeat()
        self.assertEqual(taken, [Marker("heartbeat", 0)])
        self.assertEqual((request.markers, request.rows), (1, 0))
        self.close(consumer)

    def test_closing(self):
        """aclose() tells the server end on fetch-next and leaves the reply channel."""
        self.add(1)
        subscription = self.subscribe()
        consumer = Consumer(subscription)
        channel = subscription.channel
        self.successResultOf(subscription.aclose())
        self.assertEqual(self.pubsub.published("fetch-next")[-1], {"channel": channel,
                                                                    "end": True})
        self.assertNotIn(channel, self.pubsub.subscribed)
        self.assertEqual(self.successResultOf(consumer.done), 1)
        self.assertEqual(self.server.subscriptions, {})
        self.assertIsNone(self.successResultOf(subscription.next_event()))

    def test_break_sends_end(self):
        self.add(5)
        consumer = Consumer(self.subscribe(window=10), stop_after=2)
        self.assertEqual(self.successResultOf(consumer.done), 2)
        consumer.subscription = None
        gc.collect()
        self.assertEqual(self.pubsub.published("fetch-next")[-1].get("end"), True)
        self.assertEqual(self.server.subscriptions, {})

    def test_async_with_and_callback_style(self):
        self.add(2)

        async def go():
            async with self.subscribe() as subscription:
                first = await subscription.next_event()
                second = await subscription.next_event()
            return first.position, second.position, subscription.closed

        self.assertEqual(self.successResultOf(run(go())), (1, 2, True))
        self.assertEqual(self.server.subscriptions, {})

    def test_caught_up_callback_error_ends_it(self):
        def fail(position):
            raise ZeroDivisionError(position)

        consumer = Consumer(self.subscribe(on_caught_up=fail))
        self.failureResultOf(consumer.done, ZeroDivisionError)
        self.assertEqual(self.server.subscriptions, {})

    def test_bad_arguments(self):
        for args, kwargs in [(([1],), {}), (({}, "later"), {}), (({}, -1), {}),
                             (({}, True), {}), ((), {"window": 0}), ((), {"heartbeat": 0}),
                             ((), {"heartbeat": float("inf")})]:
            with self.assertRaises(ValueError):
                self.client.subscribe(*args, **kwargs)
        with self.assertRaises(TypeError):
            self.client.subscribe({"data": object()})
        with self.assertRaises(TypeError):
            self.client.subscribe("channel", "end")

    def test_the_original_subscribe_to_a_channel(self):
        """A str is still the original client's subscribe to a Redis channel."""
        heard = []
        self.assertIsNone(self.successResultOf(self.client.subscribe("news")))
        self.client.on("news", heard.append)
        self.pubsub.deliver("news", encode_body({"hello": 1}))
        self.assertEqual(heard, [{"hello": 1}])


class ResubscribeTests(SubscribeTestCase):
    def test_after_a_timeout(self):
        """The server's "timeout": every event it sent is handed out, then a new
        subscription from the last one, at once (after the first pause)."""
        self.add(6)
        consumer = Consumer(self.subscribe({"pid": "p1"}, window=4), stop_after=3)
        self.successResultOf(consumer.done)
        # the consumer stopped taking events: the server times it out
        subscription = consumer.subscription
        self.server.time_out()
        consumer = Consumer(subscription)
        self.assertEqual(consumer.positions, [4, 5, 6])  # (sent before the timeout)
        self.assertEqual(subscription.attempts, 1)
        self.clock.advance(0.1)
        self.assertEqual([r["from"] for r in self.subscribe_requests()], ["start", 6])
        self.assertEqual(subscription.attempts, 2)
        self.add(1)
        self.assertEqual(consumer.positions, [4, 5, 6, 7])
        self.close(consumer)

    def test_unavailable_then_no_server_until_it_is_back(self):
        """A shutdown: unavailable, end; no server for a while (pauses grow); it is back."""
        self.add(2)
        subscription = self.subscribe()
        consumer = Consumer(subscription)
        handler = self.pubsub.handlers.pop("subscribe")
        self.server.shut_down()
        self.assertEqual(consumer.positions, [1, 2])
        for delay in (0.1, 0.2, 0.4, 0.5, 0.5):
            self.assertEqual(len(self.clock.getDelayedCalls()), 1)
            self.clock.advance(delay)
        self.assertEqual(subscription.attempts, 6)
        self.assertIsInstance(subscription.last_error, NoServerError)
        self.pubsub.handlers["subscribe"] = handler
        self.add(2)
        self.clock.advance(0.5)
        self.assertEqual(consumer.positions, [1, 2, 3, 4])
        self.assertEqual([r["from"] for r in self.subscribe_requests()], ["start", 2])
        # heard again: the next failure pauses 0.1 s again
        self.server.time_out()
        self.assertAlmostEqual(
            self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds(), 0.1)
        self.clock.advance(0.1)
        self.close(consumer)

    def test_busy_is_retried(self):
        subscription = self.subscribe()
        handler = self.pubsub.handlers["subscribe"]

        def busy(channel, body):
            request = _decode(body)
            self.pubsub.deliver(request["channel"], encode_error("busy", "too many"))
            self.pubsub.deliver(request["channel"], encode_body("end"))
            self.pubsub.handlers["subscribe"] = handler

        self.pubsub.handlers["subscribe"] = busy
        consumer = Consumer(subscription)
        self.add(1)
        self.assertEqual(consumer.positions, [])
        self.clock.advance(0.1)
        self.assertEqual(consumer.positions, [1])
        self.close(consumer)

    def test_silence_means_dead(self):
        """Nothing for 2 × heartbeat while waiting: end, and a new subscription."""
        subscription = self.subscribe(heartbeat=1.0)
        consumer = Consumer(subscription)
        first = subscription.channel
        self.clock.advance(1.5)
        self.server.heartbeat()
        self.clock.advance(1.5)
        self.server.heartbeat()
        self.clock.advance(1.5)
        self.assertEqual((subscription.attempts, subscription.channel), (1, first))
        # a server that stopped without a word (killed): its handlers stay, mute
        self.server.subscriptions.clear()
        self.clock.advance(2.0)
        self.assertIsNone(subscription.channel)
        self.assertIn({"channel": first, "end": True}, self.pubsub.published("fetch-next"))
        self.clock.advance(0.1)
        self.assertEqual(subscription.attempts, 2)
        self.add(1)
        self.assertEqual(consumer.positions, [1])
        self.close(consumer)

    def test_redis_connection_lost(self):
        """The subscriber connection drops: a new subscription once Redis is back."""
        self.add(1)
        subscription = self.subscribe()
        consumer = Consumer(subscription)
        self.assertEqual(consumer.positions, [1])
        self.pubsub.hold_subscribes = True
        self.pubsub.subscribed.clear()
        self.client.connection_lost()
        self.assertIsInstance(subscription.last_error, RedisConnectionError)
        self.clock.advance(0.1)
        self.add(1)  # (while Redis is away)
        self.assertEqual(len(self.pubsub.held), 1)
        self.client.connection_made()
        self.pubsub.held.popleft().callback(None)
        self.assertEqual(consumer.positions, [1, 2])
        self.assertEqual(self.subscribe_requests()[-1]["from"], 1)
        self.close(consumer)

    def test_no_duplicates_at_a_resubscription(self):
        """An event at or before the last position handed out is never handed out again."""
        self.add(3)
        subscription = self.subscribe()
        consumer = Consumer(subscription)
        self.server.time_out()
        real = self.server._subscription

        def careless(request):
            request = dict(request, **{"from": 1})  # a server that ignores "from"
            return real(request)

        self.patch(self.server, "_subscription", careless)
        self.clock.advance(0.1)
        self.add(1)
        self.assertEqual(consumer.positions, [1, 2, 3, 4])
        self.close(consumer)


class RaisedTests(SubscribeTestCase):
    def test_no_server_at_first(self):
        del self.pubsub.handlers["subscribe"]
        consumer = Consumer(self.subscribe())
        self.failureResultOf(consumer.done, NoServerError)
        self.assertTrue(consumer.subscription.closed)

    def test_refusals_are_raised(self):
        self.add(1)
        consumer = Consumer(self.subscribe({"nope": 1}))
        self.failureResultOf(consumer.done, Refused)
        handler = self.pubsub.handlers["subscribe"]

        def bad(channel, body):
            request = _decode(body)
            self.pubsub.deliver(request["channel"], encode_error("badRequest", "no"))
            self.pubsub.deliver(request["channel"], encode_body("end"))

        self.pubsub.handlers["subscribe"] = bad
        consumer = Consumer(self.subscribe())
        self.failureResultOf(consumer.done, BadRequest)
        self.pubsub.handlers["subscribe"] = handler

    def test_version_1_server(self):
        pubsub = MemoryPubSub()
        FakeServer(pubsub, version=1)
        client = EventSourceClient(pubsub, self.clock)
        consumer = Consumer(client.subscribe())
        self.failureResultOf(consumer.done, ServerTooOld)

    def test_disconnect_while_subscribed(self):
        consumer = Consumer(self.subscribe())
        self.successResultOf(self.client.disconnect())
        self.failureResultOf(consumer.done, RedisConnectionError)

    def test_disconnect_while_pausing(self):
        subscription = self.subscribe()
        consumer = Consumer(subscription)
        self.server.time_out()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.successResultOf(self.client.disconnect())
        self.failureResultOf(consumer.done, RedisConnectionError)

    def test_close_while_pausing(self):
        subscription = self.subscribe()
        consumer = Consumer(subscription)
        self.server.time_out()
        self.successResultOf(subscription.aclose())
        self.assertEqual(self.successResultOf(consumer.done), 0)
        self.assertEqual(subscription.attempts, 1)

    def test_cancel_while_waiting(self):
        subscription = self.subscribe()
        consumer = Consumer(subscription)
        consumer.done.cancel()
        self.failureResultOf(consumer.done, defer.CancelledError)
        self.successResultOf(subscription.aclose())


class ProjectionExampleTests(SubscribeTestCase):
    """docs/CLIENT.md's projection runs as written, and resumes from its checkpoint."""

    def load(self):
        path = os.path.join(CHECKOUT, "docs", "CLIENT.md")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        section = text[text.index("### A projection"):]
        code = section[section.index("```python\n") + 10:section.index("```\n", 1)]
        namespace = {"__name__": "client_md_projection"}
        exec(compile(code, path, "exec"), namespace)
        return namespace["project_orders"]

    def test_projection(self):
        import sqlite3

        project_orders = self.load()
        db = sqlite3.connect(":memory:")
        self.server.add_event("order-1", "order", "created", {"total": 12})
        self.server.add_event("order-1", "order", "paid", {"amount": 5})
        self.server.add_event("user-1", "user", "created", {"name": "x"})
        self.successResultOf(run(project_orders(self.client, db, until_caught_up=True)))
        self.assertEqual(db.execute("SELECT * FROM orders").fetchall(), [("order-1", 12, 5)])
        self.assertEqual(db.execute("SELECT position FROM checkpoint").fetchall(), [(3,)])

        # following: each batch is committed with its position
        d = run(project_orders(self.client, db))
        self.assertEqual(self.subscribe_requests()[-1]["from"], 3)
        self.server.add_event("order-2", "order", "created", {"total": 1})
        self.server.add_event("order-1", "order", "paid", {"amount": 7})
        self.assertEqual(db.execute("SELECT * FROM orders ORDER BY pid").fetchall(),
                         [("order-1", 12, 12), ("order-2", 1, 0)])
        self.assertEqual(db.execute("SELECT position FROM checkpoint").fetchall(), [(5,)])
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.server.subscriptions, {})


class MarkerTests(SynchronousTestCase):
    def test_markers(self):
        self.assertEqual(Marker.from_message({"caughtUp": 3}), Marker("caughtUp", 3))
        self.assertEqual(Marker.from_message({"heartbeat": 0}), Marker("heartbeat", 0))
        for message in ({"caughtUp": "3"}, {"caughtUp": -1}, {"caughtUp": True},
                        {"heartbeat": 1, "x": 2}, {"position": 1}, "end", None):
            self.assertIsNone(Marker.from_message(message))


def _decode(body):
    return json.loads(body)


# -- for real ----------------------------------------------------------------------

#: writers retry for as long as a restart or an outage takes
WRITER_RETRY = RetryPolicy(retries=200, initial_delay=0.05, max_delay=0.3)
#: the subscriptions' pauses between attempts
FAST = RetryPolicy(initial_delay=0.05, max_delay=0.3)
#: the servers' --heartbeat in these tests (and the subscriptions' heartbeat)
HEARTBEAT = 0.5
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RealSubscriptionCase:
    """Clients of this process on the server's Redis; writers; the table's positions."""

    timeout = 180
    redis_port = REDIS_PORT

    async def es_client(self):
        from twisted.internet import reactor

        client = await connect(REDIS_HOST, self.redis_port, reactor=reactor, max_delay=0.2,
                               channel_prefix=self.prefix, retry=WRITER_RETRY)
        self.addCleanup(client.disconnect)
        return client

    def follow(self, client, **kwargs):
        kwargs.setdefault("heartbeat", HEARTBEAT)
        kwargs.setdefault("retry", FAST)
        consumer = Consumer(client.subscribe(**kwargs))
        self.addCleanup(lambda: consumer.subscription.aclose().addCallback(
            lambda _: consumer.done))
        return consumer

    def positions(self):
        return [row[0] for row in sql(f"SELECT id FROM `{self.database}`.`event` ORDER BY id")]

    async def append(self, client, pid, count):
        """One append of ``count`` events to ``pid``; a first attempt that finds no
        server (restarting, or Redis just back) waits and tries again."""
        events = [NewEvent("d", f"n{k}", {"k": k}) for k in range(count)]
        while True:
            try:
                return await client.append(pid, events)
            except NoServerError:
                await sleep(0.05)

    def burst(self, clients, appends, per_append, tag="p"):
        """Every client starts ``appends`` appends at once."""
        return defer.gatherResults([
            Deferred.fromCoroutine(self.append(client, f"{tag}{c}-{a % 7}", per_append))
            for c, client in enumerate(clients) for a in range(appends)])

    async def rounds(self, clients, count, per_append, tag="r", pause=0):
        """``count`` rounds: every client appends once, together, then (after
        ``pause`` seconds) the next round."""
        for r in range(count):
            await defer.gatherResults([
                Deferred.fromCoroutine(self.append(client, f"{tag}{c}-{r % 5}", per_append))
                for c, client in enumerate(clients)])
            if pause:
                await sleep(pause)

    async def wait_for(self, consumer, count, what="events"):
        await wait_until(lambda: len(consumer.events) >= count or consumer.done.called,
                         timeout=60, what=f"{count} {what}")
        if consumer.done.called:
            consumer.done.addErrback(lambda f: self.fail(f"the subscription ended: {f}"))

    def assertTheLog(self, consumer, expected):
        positions = consumer.positions
        self.assertEqual(len(positions), len(set(positions)), "an event twice")
        self.assertEqual(positions, sorted(positions), "events out of order")
        self.assertEqual(positions, expected)


class RealServerTests(RealSubscriptionCase, IntegrationTestCase):
    server_config = {"heartbeat": HEARTBEAT}

    def test_concurrent_burst_seen_exactly_once(self):
        """
        A subscription tailing the log while 3 clients persist 3,000 events
        (100 rounds of 10 each, the three at once), and one started at a
        random moment of the burst (the seam between history and live events
        in its middle), see each event once, in position order.
        """
        async def go():
            reader = await self.es_client()
            writers = [await self.es_client() for _ in range(3)]
            tailing = self.follow(reader)
            await wait_until(lambda: tailing.subscription.caught_up, what="caughtUp")
            burst = Deferred.fromCoroutine(self.rounds(writers, 100, 10))
            await self.wait_for(tailing, random.randrange(100, 1500))
            seam = self.follow(reader)
            await burst
            expected = self.positions()
            self.assertEqual(len(expected), 3000)
            await self.wait_for(tailing, 3000)
            await self.wait_for(seam, 3000)
            await sleep(0.2)
            self.assertTheLog(tailing, expected)
            self.assertTheLog(seam, expected)
            self.assertEqual(tailing.subscription.attempts, 1)

        return Deferred.fromCoroutine(go())

    def test_server_restart_in_the_middle(self):
        """The server stops (unavailable, end) and a new one starts on the same
        table while writers go on: the iterator's output is still the log."""
        async def go():
            reader = await self.es_client()
            writers = [await self.es_client() for _ in range(3)]
            consumer = self.follow(reader)
            writing = Deferred.fromCoroutine(self.rounds(writers, 100, 10))
            await self.wait_for(consumer, 600)
            await self.server.stopService()
            await sleep(0.3)
            await self.start_server(**self.server_config)
            await writing
            expected = self.positions()
            self.assertEqual(len(expected), 3000)
            await self.wait_for(consumer, 3000)
            await sleep(0.2)
            self.assertTheLog(consumer, expected)
            self.assertGreater(consumer.subscription.attempts, 1)

        return Deferred.fromCoroutine(go())

    def test_command_line_stopped_and_restarted(self):
        """
        ``eventsource subscribe --checkpoint FILE`` stopped by SIGTERM, started
        again and stopped by SIGINT while events are appended, then started
        once more with --until-caught-up: the three outputs are the log, each
        event once.
        """
        async def go():
            writers = [await self.es_client() for _ in range(2)]
            await self.burst(writers, appends=25, per_append=10, tag="before")
            writing = Deferred.fromCoroutine(self.rounds(writers, 100, 10, pause=0.05))
            folder = os.path.abspath(self.mktemp())
            os.makedirs(folder)
            checkpoint = os.path.join(folder, "position")
            outputs = []
            for sig, after in ((signal.SIGTERM, 400), (signal.SIGINT, 300)):
                process, output = self.command(checkpoint)
                outputs.append(output)

                def printed(process=process, output=output, after=after):
                    return len(lines(output)) >= after or process.poll() is not None

                await wait_until(printed, timeout=60, what=f"{after} lines")
                self.assertIsNone(process.poll(), self.stderr_of(process))
                process.send_signal(sig)
                await wait_until(lambda p=process: p.poll() is not None,
                                 what="the command to stop")
                self.assertEqual(process.returncode, 130, self.stderr_of(process))
                self.assertIn("interrupted", self.stderr_of(process))
                with open(checkpoint) as f:
                    self.assertEqual(int(f.read()), json.loads(lines(output)[-1])["position"])
            self.assertFalse(writing.called, "the appends ended before the second stop")
            await writing
            process, output = self.command(checkpoint, "--until-caught-up")
            outputs.append(output)
            await wait_until(lambda: process.poll() is not None, timeout=60,
                             what="--until-caught-up to end")
            self.assertEqual((process.returncode, self.stderr_of(process)), (0, ""))
            printed = [json.loads(line)["position"] for output in outputs
                       for line in lines(output)]
            expected = self.positions()
            self.assertEqual(len(expected), 2500)
            self.assertEqual(printed, expected)

        return Deferred.fromCoroutine(go())

    def command(self, checkpoint, *more):
        output = os.path.abspath(self.mktemp())
        errors = output + ".err"
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(("REDIS_", "EVENTSOURCE_"))}
        env["PYTHONPATH"] = CHECKOUT
        with open(output, "w") as out, open(errors, "w") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "eventsource", "subscribe", "--checkpoint", checkpoint,
                 "--redis-host", REDIS_HOST, "--redis-port", str(REDIS_PORT),
                 "--channel-prefix", self.prefix, "--heartbeat", str(HEARTBEAT), *more],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=CHECKOUT)
        process.errors = errors

        def stop():
            if process.poll() is None:
                process.kill()
                process.wait()

        self.addCleanup(stop)
        return process, output

    def stderr_of(self, process):
        with open(process.errors) as f:
            return f.read()


def lines(path):
    """The whole lines of a file written so far."""
    with open(path) as f:
        text = f.read()
    return text.splitlines()[:text.count("\n")]


class RedisRestartTests(RealSubscriptionCase, PrivateRedisTestCase):
    server_config = {"heartbeat": HEARTBEAT, "redis_max_delay": 0.2}

    def setUp(self):
        d = super().setUp()
        return d.addCallback(lambda _: setattr(self, "redis_port", self.redis.port))

    def test_redis_restart_in_the_middle(self):
        """Redis stops and starts again while writers go on (the server, the writers
        and the subscription all on it): the iterator's output is still the log."""
        async def go():
            reader = await self.es_client()
            writers = [await self.es_client() for _ in range(3)]
            consumer = self.follow(reader)
            writing = Deferred.fromCoroutine(self.rounds(writers, 100, 10))
            await self.wait_for(consumer, 600)
            await self.redis.stop()
            await sleep(0.3)
            await self.redis.start()
            await writing
            expected = self.positions()
            self.assertEqual(len(expected), 3000)
            await self.wait_for(consumer, 3000)
            await sleep(0.2)
            self.assertTheLog(consumer, expected)
            self.assertGreater(consumer.subscription.attempts, 1)
            self.assertIsInstance(consumer.subscription.last_error, (RedisConnectionError,
                                                                     NoServerError))

        return Deferred.fromCoroutine(go())
