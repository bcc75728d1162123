"""
The Redis connection machine of :mod:`eventsource.bus`, without a Redis:
a memory reactor takes the connection attempts, ``StringTransport`` carries
the bytes, the tests play Redis's replies and advance the clock.
(The same behaviours against a real Redis: ``test_faults``, ``test_security``,
``test_tenants``, ``test_big_rows``.)
"""

import random

from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from eventsource import bus as bus_module
from eventsource.bus import (
    JITTER,
    BusState,
    RedisBus,
    RedisRefused,
    RedisUnavailable,
    ReplyChannelRefused,
    retry_delay,
)
from eventsource.config import Config

CHANNELS = ("persist", "fetch", "fetch-next", "subscribe")
#: what a Redis with roomy limits answers to the publisher's CONFIG GETs
ROOMY_LIMITS = (("client-output-buffer-limit", "normal 0 0 0 pubsub 0 0 0"),
                ("proto-max-bulk-len", "536870912"))


def bulk(text):
    data = text.encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def command(*words):
    """A command as the protocol writes it."""
    return b"*%d\r\n" % len(words) + b"".join(bulk(word) for word in words)


def subscribed(kind, channel, count):
    return b"*3\r\n" + bulk(kind) + bulk(channel) + b":%d\r\n" % count


class Connection:
    """One connection attempt the bus made: the test accepts, refuses, answers or drops it."""

    def __init__(self, reactor, index):
        self.factory = reactor.tcpClients[index][2]
        self.connector = reactor.connectors[index]
        self.protocol = self.transport = None

    def accept(self):
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 6379))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        return self

    def refuse(self):
        self.factory.clientConnectionFailed(self.connector, Failure(ConnectionRefusedError()))

    def sent(self):
        data = self.transport.value()
        self.transport.clear()
        return data

    def reply(self, data):
        self.protocol.dataReceived(data)

    def drop(self, reason=None):
        self.protocol.connectionLost(Failure(reason or ConnectionDone()))


class BusMachineTests(SynchronousTestCase):

    def setUp(self):
        # every delay exactly its mean: the backoff is read off the clock
        self.patch(random, "normalvariate", lambda mean, sigma: mean)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def make(self, **settings):
        self.reactor = MemoryReactorClock()
        self.config = Config(**settings)
        self.messages, self.lost, self.ready = [], [], []
        self.bus = RedisBus(
            self.config, self.reactor, lambda channel, body: self.messages.append((channel, body)),
            on_connection_lost=lambda: self.lost.append(self.reactor.seconds()),
            on_ready=lambda: self.ready.append(self.reactor.seconds()),
            endpoint=TCP4ClientEndpoint(self.reactor, "127.0.0.1", 6379))
        return self.bus

    # -- playing Redis ----------------------------------------------------

    def attempts(self):
        return len(self.reactor.tcpClients)

    def connection(self, index=-1):
        return Connection(self.reactor, index % self.attempts())

    def publisher_handshake(self, connection, auth=None):
        """Answer the publisher's handshake as a Redis with roomy limits does."""
        expected = b""
        if auth is not None:
            expected += command("AUTH", *auth)
            self.assertEqual(connection.sent(), expected)
            connection.reply(b"+OK\r\n")
        self.assertEqual(connection.sent(), command("PING"))
        connection.reply(b"+PONG\r\n")
        for name, value in ROOMY_LIMITS:
            self.assertEqual(connection.sent(), command("CONFIG", "GET", name))
            connection.reply(b"*2\r\n" + bulk(name) + bulk(value))
        self.reactor.advance(0)  # (the machine hears of it on the next turn)

    def subscriber_handshake(self, connection, kind="subscribe", channels=CHANNELS):
        for count, channel in enumerate(channels, 1):
            self.assertEqual(connection.sent(), command(kind.upper(), channel))
            connection.reply(subscribed(kind, channel, count))
        self.reactor.advance(0)

    def serve(self, **settings):
        """A started bus, serving: returns its publisher and subscriber connections."""
        self.make(**settings)
        started = self.bus.start()
        auth = (settings["redis_password"],) if "redis_password" in settings else None
        publisher = self.connection().accept()
        self.publisher_handshake(publisher, auth)
        subscriber = self.connection().accept()
        if auth:
            self.assertEqual(subscriber.sent(), command("AUTH", *auth))
            subscriber.reply(b"+OK\r\n")
        self.subscriber_handshake(subscriber)
        self.assertIsNone(self.successResultOf(started))
        return publisher, subscriber

    def delays(self, exact=False):
        """The pending delays, but the heartbeat's (:meth:`heartbeat`)."""
        delays = [call.getTime() - self.reactor.seconds()
                  for call in self.reactor.getDelayedCalls() if not self.is_heartbeat(call)]
        return delays if exact else [round(delay, 4) for delay in delays]

    def is_heartbeat(self, call):
        return call.func in (self.bus._check_publisher, self.bus._ping_overdue)

    def heartbeat(self):
        """The delay of the heartbeat's next check, or None when none is pending."""
        calls = [call for call in self.reactor.getDelayedCalls() if self.is_heartbeat(call)]
        self.assertLessEqual(len(calls), 1)
        return round(calls[0].getTime() - self.reactor.seconds(), 4) if calls else None

    def texts(self, level=None):
        return [formatEvent(event) for event in self.events
                if level is None or event["log_level"].name == level]

    # -- start ------------------------------------------------------------

    def test_start_serves_once_the_publisher_then_the_subscriber_are_handshaken(self):
        self.make(redis_user="app", redis_password="secret")
        started = self.bus.start()
        self.assertEqual(self.attempts(), 1)
        publisher = self.connection().accept()
        self.publisher_handshake(publisher, auth=("app", "secret"))
        # the subscriber connects only once answers can go out
        self.assertEqual(self.attempts(), 2)
        self.assertEqual(self.bus.state, BusState.STARTING_SUBSCRIBER)
        self.assertNoResult(started)
        subscriber = self.connection().accept()
        self.assertEqual(subscriber.sent(), command("AUTH", "app", "secret"))
        subscriber.reply(b"+OK\r\n")
        self.subscriber_handshake(subscriber)
        self.assertIsNone(self.successResultOf(started))
        self.assertTrue(self.bus.connected)
        self.assertEqual(self.ready, [0])
        self.assertEqual(self.delays(), [])
        self.bus.publish("reply-1", '{"a": 1}')
        self.assertEqual(publisher.sent(), command("PUBLISH", "reply-1", '{"a": 1}'))
        subscriber.reply(b"*3\r\n" + bulk("message") + bulk("fetch") + bulk('{"q": "007"}'))
        self.assertEqual(self.messages, [("fetch", '{"q": "007"}')])

    def test_tenant_mode_psubscribes_the_request_patterns(self):
        self.make(tenants=True, channel_prefix="es:")
        started = self.bus.start()
        self.publisher_handshake(self.connection().accept())
        subscriber = self.connection().accept()
        self.subscriber_handshake(subscriber, "psubscribe",
                                  [f"es:*:{kind}" for kind in CHANNELS])
        self.successResultOf(started)
        subscriber.reply(b"*4\r\n" + bulk("pmessage") + bulk("es:*:fetch") + bulk("es:t1:fetch")
                         + bulk("{}"))
        self.assertEqual(self.messages, [("es:t1:fetch", "{}")])

    def test_unreachable_redis_is_retried_with_a_growing_bounded_backoff(self):
        self.make(redis_max_delay=2.0)
        started = self.bus.start()
        delays = []
        for _ in range(6):
            self.connection().refuse()
            (delay,) = self.delays(exact=True)
            delays.append(round(delay, 4))
            self.reactor.advance(delay)
        self.assertEqual(delays, [0.1, 0.2718, 0.7389, 2.0, 2.0, 2.0])
        self.assertEqual(self.attempts(), 7)
        # never refused: the start waits for Redis
        self.assertNoResult(started)
        self.publisher_handshake(self.connection().accept())
        self.subscriber_handshake(self.connection().accept())
        self.successResultOf(started)

    def test_refused_password_fails_the_start_with_a_sentence(self):
        self.make(redis_user="app", redis_password="wrong")
        started = self.bus.start()
        publisher = self.connection().accept()
        self.assertEqual(publisher.sent(), command("AUTH", "app", "wrong"))
        publisher.reply(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
        error = self.failureResultOf(started, RedisRefused).value
        self.assertEqual(str(error), "Redis 127.0.0.1:6379 refused the publisher connection "
                         "(user app): WRONGPASS invalid username-password pair or user is "
                         "disabled.")
        self.assertNotIn("wrong", str(error))
        self.assertEqual(self.bus.state, BusState.IDLE)
        # no retry; the refused connection is closed, and its loss troubles nothing
        self.assertEqual(self.delays(), [])
        self.assertTrue(publisher.transport.disconnecting)
        publisher.drop()
        self.assertEqual(self.attempts(), 1)

    def test_missing_subscribe_permission_fails_the_start(self):
        self.make()
        started = self.bus.start()
        publisher = self.connection().accept()
        self.publisher_handshake(publisher)
        subscriber = self.connection().accept()
        self.assertEqual(subscriber.sent(), command("SUBSCRIBE", "persist"))
        subscriber.reply(b"-NOPERM User app has no permissions to access the 'persist' "
                         b"channel\r\n")
        # the start fails once both connections are closed, and nothing retries
        self.assertTrue(publisher.transport.disconnecting)
        self.assertTrue(subscriber.transport.disconnecting)
        subscriber.drop()
        publisher.drop()
        error = self.failureResultOf(started, RedisRefused).value
        self.assertIn("refused the subscriber connection (user default): NOPERM", str(error))
        self.assertEqual(self.delays(), [])
        self.assertEqual(self.bus.state, BusState.IDLE)

    def test_tls_verification_failure_fails_the_start(self):
        self.make()
        started = self.bus.start()
        publisher = self.connection().accept()
        publisher.drop(SSL.Error([("SSL routines", "", "certificate verify failed")]))
        error = self.failureResultOf(started, RedisRefused).value
        self.assertIn("refused the publisher connection: TLS handshake failed: ", str(error))
        self.assertIn("certificate verify failed", str(error))
        self.assertEqual(self.delays(), [])

    def test_connection_closed_during_the_handshake_is_retried_not_refused(self):
        self.make()
        started = self.bus.start()
        self.connection().accept().drop()
        self.assertNoResult(started)
        self.assertEqual(self.delays(), [0.1])
        self.assertTrue(any("closed the publisher connection during the handshake" in text
                            for text in self.texts("warn")))
        self.reactor.advance(0.1)
        self.publisher_handshake(self.connection().accept())
        self.subscriber_handshake(self.connection().accept())
        self.successResultOf(started)

    # -- after serving ----------------------------------------------------

    def test_lost_publisher_drops_the_subscriber_until_the_publisher_is_back(self):
        publisher, subscriber = self.serve()
        self.reactor.advance(10)
        publisher.drop()
        self.assertFalse(self.bus.connected)
        self.assertEqual(self.lost, [10])
        self.assertTrue(subscriber.transport.disconnecting)
        subscriber.drop()
        # publish fails at once, nothing queued; subscribe fails
        self.bus.publish("reply-1", "{}")
        self.failureResultOf(self.bus.subscribe("reply-1"), RedisUnavailable)
        self.assertEqual(self.delays(), [0.1])
        self.reactor.advance(0.1)
        self.assertEqual(self.attempts(), 3)
        again = self.connection().accept()
        self.publisher_handshake(again)
        # re-subscribed on a new subscriber connection, at once
        self.subscriber_handshake(self.connection().accept())
        self.assertTrue(self.bus.connected)
        self.assertEqual(self.ready, [0, 10.1])
        self.assertEqual(self.lost, [10])
        self.assertTrue(any("is back: subscribed again to persist,fetch,fetch-next,subscribe after "
                            "0.10 s" in text for text in self.texts("info")))

    def test_lost_subscriber_alone_ends_streams_and_resubscribes(self):
        publisher, subscriber = self.serve()
        subscriber.drop()
        self.assertEqual(self.lost, [0])
        self.assertFalse(self.bus.connected)
        # the publisher is still there: the streams' ends reach their clients
        self.bus.publish("reply-1", '"end"')
        self.assertEqual(publisher.sent(), command("PUBLISH", "reply-1", '"end"'))
        self.assertEqual(self.delays(), [0.1])
        self.reactor.advance(0.1)
        self.subscriber_handshake(self.connection().accept())
        self.assertTrue(self.bus.connected)
        self.assertEqual(self.attempts(), 3)

    def test_refusal_after_serving_is_logged_and_retried_with_backoff(self):
        publisher, subscriber = self.serve(redis_password="secret")
        publisher.drop()
        subscriber.drop()
        delays = []
        for _ in range(3):
            (delay,) = self.delays(exact=True)
            delays.append(round(delay, 4))
            self.reactor.advance(delay)
            refused = self.connection().accept()
            refused.sent()
            refused.reply(b"-LOADING Redis is loading the dataset in memory\r\n")
            self.assertTrue(refused.transport.disconnecting)
            refused.drop()
        # each refusal is a failed attempt: the wait grows as for an unreachable Redis
        self.assertEqual(delays, [0.1, 0.2718, 0.7389])
        self.assertEqual(self.delays(), [2.0])
        errors = self.texts("error")
        self.assertEqual(len(errors), 3)
        self.assertEqual(errors[0], "Redis 127.0.0.1:6379 refused the publisher connection "
                         "(user default): LOADING Redis is loading the dataset in memory; "
                         "retrying")
        self.reactor.advance(2.0)
        self.publisher_handshake(self.connection().accept(), auth=("secret",))
        subscriber = self.connection().accept()
        self.assertEqual(subscriber.sent(), command("AUTH", "secret"))
        subscriber.reply(b"+OK\r\n")
        self.subscriber_handshake(subscriber)
        self.assertTrue(self.bus.connected)
        # back to a quick first retry
        subscriber.drop()
        self.assertEqual(self.delays(), [0.1])

    def test_reply_channel_refused_is_warned_once(self):
        _, subscriber = self.serve()
        for _ in range(2):
            d = self.bus.subscribe("secret-reply")
            self.assertEqual(subscriber.sent(), command("SUBSCRIBE", "secret-reply"))
            subscriber.reply(b"-NOPERM User app has no permissions to access the "
                             b"'secret-reply' channel\r\n")
            self.failureResultOf(d, ReplyChannelRefused)
        warnings = [text for text in self.texts("warn") if "secret-reply" in text]
        self.assertEqual(len(warnings), 1)
        self.assertTrue(self.bus.connected)

    # -- stop -------------------------------------------------------------

    def test_stop_while_waiting_to_reconnect(self):
        publisher, subscriber = self.serve()
        publisher.drop()
        subscriber.drop()
        self.assertEqual(self.delays(), [0.1])
        self.successResultOf(self.bus.stop())
        self.assertEqual(self.bus.state, BusState.IDLE)
        self.assertEqual(self.delays(), [])
        self.reactor.advance(10)
        self.assertEqual(self.attempts(), 2)

    def test_stop_while_connecting(self):
        self.make()
        started = self.bus.start()
        publisher = self.connection().accept()
        self.assertEqual(publisher.sent(), command("PING"))
        stopped = self.bus.stop()
        self.assertTrue(publisher.transport.disconnecting)
        self.successResultOf(stopped)
        publisher.drop()
        self.assertEqual(self.bus.state, BusState.IDLE)
        self.assertEqual(self.delays(), [])
        self.assertNoResult(started)

    def test_stop_as_soon_as_started(self):
        """Whoever waited for the start stops the bus at once: both connections close."""
        self.make()
        started = self.bus.start()
        stopped = []
        started.addCallback(lambda _: stopped.append(self.bus.stop()))
        publisher = self.connection().accept()
        self.publisher_handshake(publisher)
        subscriber = self.connection().accept()
        self.subscriber_handshake(subscriber)
        self.assertTrue(publisher.transport.disconnecting)
        self.assertTrue(subscriber.transport.disconnecting)
        subscriber.drop()
        publisher.drop()
        self.successResultOf(stopped[0])
        self.assertEqual(self.bus.state, BusState.IDLE)
        self.assertEqual(self.delays(), [])

    def test_publisher_lost_before_the_machine_heard_it_was_ready(self):
        self.make()
        started = self.bus.start()
        publisher = self.connection().accept()
        self.assertEqual(publisher.sent(), command("PING"))
        publisher.reply(b"+PONG\r\n")
        for name, value in ROOMY_LIMITS:
            publisher.sent()
            publisher.reply(b"*2\r\n" + bulk(name) + bulk(value))
        publisher.drop()
        self.reactor.advance(0)
        self.assertEqual(self.bus.state, BusState.STARTING)
        self.assertEqual(self.attempts(), 1)
        self.assertEqual(self.delays(), [0.1])
        self.reactor.advance(0.1)
        self.publisher_handshake(self.connection().accept())
        self.subscriber_handshake(self.connection().accept())
        self.successResultOf(started)

    def test_stop_during_the_limits_check(self):
        self.make()
        started = self.bus.start()
        publisher = self.connection().accept()
        self.assertEqual(publisher.sent(), command("PING"))
        publisher.reply(b"+PONG\r\n")
        self.assertEqual(publisher.sent(), command("CONFIG", "GET", "client-output-buffer-limit"))
        self.successResultOf(self.bus.stop())
        self.assertTrue(publisher.transport.disconnecting)
        publisher.drop()
        self.reactor.advance(10)
        self.assertEqual(self.bus.state, BusState.IDLE)
        self.assertEqual((self.attempts(), self.delays()), (1, []))
        self.assertNoResult(started)
        self.assertEqual([text for text in self.texts() if "could not check" in text], [])

    def test_stop_while_serving_closes_both_connections(self):
        publisher, subscriber = self.serve()
        stopped = self.bus.stop()
        self.assertTrue(publisher.transport.disconnecting)
        self.assertTrue(subscriber.transport.disconnecting)
        self.assertFalse(self.bus.connected)
        self.assertNoResult(stopped)
        subscriber.drop()
        publisher.drop()
        self.successResultOf(stopped)
        self.assertEqual(self.bus.state, BusState.IDLE)
        self.assertEqual(self.delays(), [])
        # a stop is not a lost connection: open streams were ended by the service already
        self.assertEqual(self.lost, [])

    def test_claims_pipeline_with_the_publishes(self):
        """SET NX PX on the publisher connection; each reply goes to its own command."""
        publisher, _ = self.serve()
        self.bus.publish("reply-1", "{}")
        won = self.bus.claim("claim:abc", "host:1:r", 2.5)
        counted = self.bus.publish_counted("reply-2", "{}")
        lost = self.bus.claim("claim:def", "host:1:r", 60)
        refused = self.bus.claim("claim:ghi", "host:1:r", 60)
        self.assertEqual(publisher.sent(), b"".join([
            command("PUBLISH", "reply-1", "{}"),
            command("SET", "claim:abc", "host:1:r", "NX", "PX", "2500"),
            command("PUBLISH", "reply-2", "{}"),
            command("SET", "claim:def", "host:1:r", "NX", "PX", "60000"),
            command("SET", "claim:ghi", "host:1:r", "NX", "PX", "60000")]))
        publisher.reply(b":1\r\n+OK\r\n:3\r\n$-1\r\n-NOPERM no permissions\r\n")
        self.assertIs(self.successResultOf(won), True)
        self.assertEqual(self.successResultOf(counted), 3)
        self.assertIs(self.successResultOf(lost), False)
        self.assertIn("NOPERM", str(self.failureResultOf(refused).value))

    def test_claims_fail_when_the_publisher_is_lost_or_away(self):
        publisher, subscriber = self.serve()
        pending = self.bus.claim("claim:abc", "host:1:r", 60)
        self.bus.publish("reply-1", "{}")
        publisher.drop()
        self.failureResultOf(pending, RedisUnavailable)
        self.failureResultOf(self.bus.claim("claim:def", "host:1:r", 60), RedisUnavailable)

    # -- the heartbeat ------------------------------------------------------

    def test_a_ping_unanswered_for_redis_timeout_drops_both_connections(self):
        """A silent partition: nothing is lost, nothing answers; the bus reconnects."""
        publisher, subscriber = self.serve()
        self.assertEqual(self.heartbeat(), 1.0)  # (redis_timeout 3 s, a third of it)
        self.reactor.advance(1)
        self.assertEqual(publisher.sent(), command("PING"))
        publisher.reply(b"+PONG\r\n")
        self.reactor.advance(1)
        self.assertEqual(publisher.sent(), command("PING"))  # unanswered from now on
        for _ in range(2):
            self.reactor.advance(1)
            self.assertFalse(publisher.transport.disconnecting)
            self.assertEqual(publisher.sent(), b"")  # (one PING at a time)
        self.reactor.advance(1)
        self.assertTrue(publisher.transport.disconnecting)
        self.assertTrue(any("did not answer a PING within 3.0 s" in text
                            for text in self.texts("warn")), self.texts())
        publisher.drop()
        self.assertEqual(self.lost, [5])
        self.assertFalse(self.bus.connected)
        self.assertTrue(subscriber.transport.disconnecting)
        self.assertIsNone(self.heartbeat())
        subscriber.drop()
        self.reactor.advance(0.1)
        self.publisher_handshake(self.connection().accept())
        self.subscriber_handshake(self.connection().accept())
        self.assertTrue(self.bus.connected)
        self.assertEqual(self.heartbeat(), 1.0)

    def test_answered_pings_keep_the_connection_and_pipeline_with_the_rest(self):
        publisher, _ = self.serve(redis_timeout=0.3)
        self.assertEqual(self.heartbeat(), 0.1)
        for _ in range(20):
            self.bus.publish("reply-1", "{}")
            self.reactor.advance(0.1)
            claim = self.bus.claim("claim:abc", "host:1:r", 60)
            self.assertEqual(publisher.sent(), command("PUBLISH", "reply-1", "{}") +
                             command("PING") + command("SET", "claim:abc", "host:1:r", "NX",
                                                        "PX", "60000"))
            publisher.reply(b":1\r\n+PONG\r\n+OK\r\n")
            self.assertIs(self.successResultOf(claim), True)
        self.assertFalse(publisher.transport.disconnecting)
        self.assertEqual(self.lost, [])

    def test_an_answer_waiting_when_the_ping_is_overdue_keeps_the_connection(self):
        """A reactor too busy to read: the answer read on the next turn still counts."""
        publisher, _ = self.serve()
        self.reactor.advance(1)
        self.assertEqual(publisher.sent(), command("PING"))
        self.reactor.advance(1)
        self.reactor.advance(1)
        # the third check, by hand (the clock would run the confirmation it
        # schedules for the next turn at once, before the answer is read)
        self.bus._heartbeat.cancel()
        self.bus._check_publisher()
        self.assertFalse(publisher.transport.disconnecting)
        publisher.reply(b"+PONG\r\n")  # (read before the next turn)
        self.reactor.advance(0)
        self.assertFalse(publisher.transport.disconnecting)
        self.assertEqual(self.heartbeat(), 1.0)
        self.reactor.advance(1)
        self.assertEqual(publisher.sent(), command("PING"))

    def test_no_heartbeat_while_away_or_stopped(self):
        publisher, subscriber = self.serve()
        publisher.drop()
        self.assertIsNone(self.heartbeat())
        subscriber.drop()
        self.reactor.advance(0.1)
        again = self.connection().accept()
        self.publisher_handshake(again)
        self.assertEqual(self.heartbeat(), 1.0)  # (the publisher is ready again)
        self.bus.stop()
        self.assertIsNone(self.heartbeat())
        self.reactor.advance(10)
        self.assertEqual(again.sent(), b"")

    def test_publish_and_subscribe_before_start(self):
        self.make()
        self.bus.publish("reply-1", "{}")
        self.failureResultOf(self.bus.subscribe("reply-1"), RedisUnavailable)
        self.successResultOf(self.bus.unsubscribe("reply-1"))
        self.successResultOf(self.bus.stop())


class RetryDelayTests(SynchronousTestCase):
    """The retry policy itself, with its real jitter: short at first, bounded."""

    def setUp(self):
        # (a seeded generator: the jitter is unbounded, and one draw in some
        # thousands past five sigmas would fail these bounds at random)
        self.patch(bus_module, "random", random.Random(10))

    def test_first_retry_is_quick_and_all_are_bounded(self):
        first = [retry_delay(1, 2.0) for _ in range(200)]
        self.assertLess(max(first), 0.1 * (1 + 5 * JITTER))
        self.assertLess(abs(sorted(first)[100] - 0.1), 0.02)
        later = [retry_delay(attempt, 2.0) for attempt in range(2, 60) for _ in range(20)]
        self.assertLess(max(later), 2.0 * (1 + 5 * JITTER))
        self.assertGreaterEqual(min(later), 0)
        self.assertLess(abs(sorted(retry_delay(30, 2.0) for _ in range(201))[100] - 2.0), 0.1)

    def test_max_delay_below_the_initial_delay(self):
        self.assertLess(max(retry_delay(a, 0.05) for a in range(1, 10) for _ in range(50)),
                        0.05 * (1 + 5 * JITTER))

    def test_bus_uses_it_with_the_configured_max_delay(self):
        bus = RedisBus(Config(redis_max_delay=0.5), MemoryReactorClock(), lambda c, b: None)
        self.patch(bus_module.random, "normalvariate", lambda mean, sigma: mean)
        self.assertEqual(bus._retry_delay(50), 0.5)
        self.assertEqual(bus._retry_delay(1), 0.1)
