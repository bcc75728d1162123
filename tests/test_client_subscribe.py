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

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from eventsource.client import (
    BadRequest,
    EventSourceClient,
    NoServerError,
    RecordedEvent,
    RedisConnectionError,
    Refused,
    RetryPolicy,
    ServerTooOld,
    Subscription,
)
from eventsource.client import _requests
from eventsource.client._requests import Marker
from eventsource.client.testing import FakeServer, MemoryPubSub
from eventsource.wire import encode_body, encode_error

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


class MarkerTests(SynchronousTestCase):
    def test_markers(self):
        self.assertEqual(Marker.from_message({"caughtUp": 3}), Marker("caughtUp", 3))
        self.assertEqual(Marker.from_message({"heartbeat": 0}), Marker("heartbeat", 0))
        for message in ({"caughtUp": "3"}, {"caughtUp": -1}, {"caughtUp": True},
                        {"heartbeat": 1, "x": 2}, {"position": 1}, "end", None):
            self.assertIsNone(Marker.from_message(message))


def _decode(body):
    import json

    return json.loads(body)
