"""
Tests for version 2 of the protocol in :mod:`eventsource.client`: ``append``
(expected versions, event ids, retries, exactly once), ``append_many``,
``read_stream``, the error codes as exceptions and the probe that tells a
version 1 server.

The first part runs over the in-memory doubles of
:mod:`eventsource.client.testing` with a :class:`Clock`; the second
(:class:`IntegrationTests`) against a server of this process on the real
Redis and MariaDB (:class:`tests.support.IntegrationTestCase`).
"""

import json
import uuid

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from eventsource.client import (
    ANY,
    ERROR_CLASSES,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    BadReply,
    BadRequest,
    Busy,
    EventSourceClient,
    IdempotencyConflict,
    InternalError,
    NewEvent,
    NoServerError,
    ReadOnly,
    RecordedEvent,
    RedisConnectionError,
    Refused,
    ReplyTimeout,
    RetryPolicy,
    ServerError,
    ServerTooOld,
    TooLarge,
    Unavailable,
    WrongExpectedVersion,
    connect,
)
from eventsource.client import _requests
from eventsource.client._events import PROBE_QUERY
from eventsource.client.testing import FakeServer, MemoryPubSub
from eventsource.wire import encode_ok_packet
from tests.support import REDIS_HOST, REDIS_PORT, IntegrationTestCase, unique

UUID_V7 = r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
#: no jitter: the retries come exactly at 0.1, 0.3, 0.7, ... s
EXACT = RetryPolicy(retries=3, initial_delay=0.1, max_delay=1.0, jitter=0)


def run(coroutine):
    return Deferred.fromCoroutine(coroutine)


def events(*names, **data):
    return [{"domain": "order", "name": name, "data": data or None} for name in names]


def error(code, message="no", **fields):
    return {"error": dict({"code": code, "message": message}, **fields)}


class V2TestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.pubsub = MemoryPubSub()
        self.server = FakeServer(self.pubsub)
        self.client = EventSourceClient(self.pubsub, self.clock, retry=EXACT)

    def tearDown(self):
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.client.open_requests, 0)

    def persists(self):
        return [r for r in self.server.requests if "$insert" in r["query"]]

    def probes(self):
        return [r for r in self.server.requests if r["query"] == PROBE_QUERY]

    def read(self, stream):
        async def go():
            return [event async for event in stream]

        return self.successResultOf(run(go()))


class AppendTests(V2TestCase):
    def test_request_and_result(self):
        """The body is version 2's persist; every event has a UUIDv7 made before sending."""
        result = self.successResultOf(self.client.append(
            "order-1", events("created", "paid"), expected_version=NO_STREAM))
        [request] = self.persists()
        documents = request["query"]["$insert"]["$documents"]
        self.assertEqual(set(request), {"v", "channel", "query", "expectedVersion"})
        self.assertEqual((request["v"], request["expectedVersion"]), (2, NO_STREAM))
        self.assertEqual([(d["pid"], d["name"]) for d in documents],
                         [("order-1", "created"), ("order-1", "paid")])
        for document in documents:
            self.assertRegex(document["eventId"], UUID_V7)
        self.assertIsInstance(result, AppendResult)
        self.assertFalse(result.duplicate)
        self.assertEqual(result.versions, (0, 1))
        self.assertEqual(result.positions, (1, 2))
        self.assertEqual([e.event_id for e in result.events], [d["eventId"] for d in documents])
        self.assertEqual(result.last_version(), 1)
        self.assertEqual(result.raw["duplicate"], False)

    def test_any_is_not_sent(self):
        self.successResultOf(self.client.append("p", events("a")))
        self.successResultOf(self.client.append("p", events("b"), ANY))
        self.successResultOf(self.client.append("p", events("c"), expected_version=1))
        self.assertEqual([r.get("expectedVersion") for r in self.persists()], [None, None, 1])

    def test_event_ids_given(self):
        """Ids given are kept (written as the protocol writes them); NewEvent works too."""
        given = uuid.uuid4()
        result = self.successResultOf(self.client.append("p", [
            NewEvent("order", "created", {"a": 1}, event_id=given),
            {"domain": "order", "name": "paid", "eventId": "ABCDEF01-2345-4789-8ABC-DEF012345678"},
            {"pid": "p", "domain": "order", "name": "shipped"}]))
        documents = self.persists()[0]["query"]["$insert"]["$documents"]
        self.assertEqual(documents[0], {"pid": "p", "domain": "order", "name": "created",
                                        "data": {"a": 1}, "eventId": str(given)})
        self.assertEqual(documents[1]["eventId"], "abcdef01-2345-4789-8abc-def012345678")
        self.assertRegex(documents[2]["eventId"], UUID_V7)
        self.assertEqual(result.events[0].event_id, str(given))

    def test_string_data_is_that_string(self):
        """In version 2 a string is a string: no JSON text dance as persist does."""
        self.successResultOf(self.client.append("p", [{"domain": "d", "name": "n",
                                                       "data": '{"a": 1}'}]))
        self.assertEqual(self.persists()[0]["query"]["$insert"]["$documents"][0]["data"],
                         '{"a": 1}')
        [event] = self.read(self.client.read_stream("p"))
        self.assertEqual(event.data, '{"a": 1}')

    def test_table(self):
        self.successResultOf(self.client.append("p", events("a"), table="shop.event"))
        self.assertEqual(self.persists()[0]["query"]["$insert"]["$table"], "shop.event")

    def test_expected_versions_hold(self):
        self.successResultOf(self.client.append("p", events("a"), NO_STREAM))
        self.successResultOf(self.client.append("p", events("b"), STREAM_EXISTS))
        result = self.successResultOf(self.client.append("p", events("c", "d"), 1))
        self.assertEqual(result.versions, (2, 3))

    def test_wrong_expected_version(self):
        """A conflict is WrongExpectedVersion with the stream's actual version; never retried."""
        self.successResultOf(self.client.append("p", events("a", "b")))
        failure = self.failureResultOf(self.client.append("p", events("c"), 0),
                                       WrongExpectedVersion)
        e = failure.value
        self.assertEqual((e.pid, e.expected, e.actual, e.code), ("p", 0, 1, "wrongExpectedVersion"))
        self.assertEqual(e.message, 'stream "p" is at version 1, not version 0')
        self.assertEqual(str(e), e.message)
        self.assertEqual(e.channel, self.persists()[-1]["channel"])
        self.assertIsInstance(e, ServerError)
        self.assertEqual(len(self.persists()), 2)
        for expected in (NO_STREAM, 5):
            self.failureResultOf(self.client.append("p", events("c"), expected),
                                 WrongExpectedVersion)
        failure = self.failureResultOf(self.client.append("new", events("c"), STREAM_EXISTS),
                                       WrongExpectedVersion)
        self.assertIsNone(failure.value.actual)
        self.assertEqual(len(self.server.events), 2)

    def test_each_error_code_is_its_exception(self):
        """Every code of the protocol is raised as its class, with code, message, fields."""
        classes = {"badRequest": BadRequest, "refused": Refused, "tooLarge": TooLarge,
                   "readOnly": ReadOnly, "unavailable": Unavailable, "busy": Busy,
                   "internal": InternalError, "idempotencyConflict": IdempotencyConflict,
                   "wrongExpectedVersion": WrongExpectedVersion}
        self.assertEqual({code: cls for code, cls in ERROR_CLASSES.items()}, classes)
        no_retry = RetryPolicy(retries=0)
        for code, cls in sorted(classes.items()):
            self.server.persist_answers.append([error(code, f"it is {code}", eventId="x")])
            failure = self.failureResultOf(
                self.client.append("p", events("a"), retry=no_retry), cls)
            self.assertEqual((failure.value.code, failure.value.message),
                             (code, f"it is {code}"))
            self.assertEqual(failure.value.details["eventId"], "x")
            self.assertIsInstance(failure.value, ServerError)
        # a code this client does not know yet
        self.server.persist_answers.append([error("overQuota", "too much today")])
        failure = self.failureResultOf(self.client.append("p", events("a")), ServerError)
        self.assertIs(type(failure.value), ServerError)
        self.assertEqual((failure.value.code, str(failure.value)), ("overQuota", "too much today"))
        self.assertEqual(len(self.persists()), len(classes) + 1)

    def test_idempotency_conflict_fields(self):
        stored = str(uuid.uuid4())
        self.successResultOf(self.client.append("p", [{"domain": "d", "name": "a",
                                                       "eventId": stored}]))
        failure = self.failureResultOf(self.client.append("q", [
            {"domain": "d", "name": "a", "eventId": stored}]), IdempotencyConflict)
        self.assertEqual(failure.value.event_id, stored)

    def test_version_1_error_word(self):
        """A bare "error" (not the protocol of version 2) is a ServerError without code."""
        self.server.persist_answers.append(["error"])
        failure = self.failureResultOf(self.client.append("p", events("a")), ServerError)
        self.assertIs(type(failure.value), ServerError)
        self.assertIsNone(failure.value.code)

    def test_bad_arguments(self):
        """Mistakes are ValueError (TypeError for data JSON cannot hold), before anything is sent."""
        bad = [
            ("", events("a"), ANY), (7, events("a"), ANY), ("p", [], ANY),
            ("p", {"domain": "d", "name": "n"}, ANY), ("p", "events", ANY),
            ("p", [{"domain": "d"}], ANY), ("p", [{"domain": "", "name": "n"}], ANY),
            ("p", [{"domain": "d", "name": "n", "colour": "red"}], ANY),
            ("p", [{"pid": "q", "domain": "d", "name": "n"}], ANY),
            ("p", [{"domain": "d", "name": "n", "eventId": "not-a-uuid"}], ANY),
            ("p", [{"domain": "d", "name": "n", "eventId": 7}], ANY),
            ("p", [{"domain": "d", "name": "n", "eventId": "abcdef01-2345-4789-8abc-def012345678"},
                   {"domain": "d", "name": "m", "eventId": "ABCDEF01-2345-4789-8ABC-DEF012345678"}],
             ANY),
            ("p", [["d", "n"]], ANY),
            ("p", events("a"), -1), ("p", events("a"), "nostream"), ("p", events("a"), True),
            ("p", events("a"), 1.0), ("p", events("a"), None),
        ]
        for pid, evs, expected in bad:
            with self.assertRaises(ValueError, msg=(pid, evs, expected)):
                self.client.append(pid, evs, expected)
        self.assertRaises(TypeError, self.client.append, "p",
                          [{"domain": "d", "name": "n", "data": object()}])
        self.assertEqual(self.pubsub.calls, [])

    def test_unavailable_retried_with_the_same_body(self):
        """unavailable: the same body again (same event ids) after a back-off; then success."""
        self.server.persist_answers.extend([[error("unavailable", "no database")],
                                            [error("unavailable", "no database")]])
        d = self.client.append("p", events("a", "b"))
        self.assertEqual(len(self.persists()), 1)
        self.clock.advance(0.099)
        self.assertEqual(len(self.persists()), 1)
        self.clock.advance(0.001)
        self.assertEqual(len(self.persists()), 2)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        result = self.successResultOf(d)
        first, second, third = self.persists()
        self.assertNotEqual(first["channel"], second["channel"])
        for other in (second, third):
            self.assertEqual(dict(other, channel=None), dict(first, channel=None))
        self.assertEqual([e.event_id for e in result.events],
                         [d["eventId"] for d in first["query"]["$insert"]["$documents"]])
        self.assertEqual(len(self.server.events), 2)

    def test_lost_reply_retried_and_duplicate_is_success(self):
        """The first attempt is stored but its reply lost: the retry is answered
        duplicate, with the first attempt's positions; stored once."""
        self.successResultOf(self.client.append("other", events("x")))
        self.server.persist_answers.append(FakeServer.LOSE_REPLY)
        d = self.client.append("p", events("a", "b"), NO_STREAM, timeout=2)
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.assertEqual(len(self.server.events), 3)
        self.clock.advance(0.1)  # the reply timeout
        self.clock.advance(0.1)  # the back-off
        result = self.successResultOf(d)
        self.assertTrue(result.duplicate)
        self.assertEqual((result.positions, result.versions), ((2, 3), (0, 1)))
        self.assertEqual(len(self.server.events), 3)
        first, second = self.persists()[1:]
        self.assertEqual(dict(first, channel=None), dict(second, channel=None))

    def test_connection_lost_while_waiting_is_retried(self):
        self.server.persist_answers.append(FakeServer.LOSE_REPLY)
        d = self.client.append("p", events("a"))
        self.client.connection_lost(None)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        result = self.successResultOf(d)
        self.assertTrue(result.duplicate)
        self.assertEqual(len(self.server.events), 1)

    def test_retries_are_bounded_and_back_off(self):
        """retries + 1 attempts at 0, 0.1, 0.3, 0.7 s (delays doubling), then the last error."""
        self.server.persist_answers.extend([[error("unavailable", f"down {i}")] for i in range(9)])
        d = self.client.append("p", events("a"))
        for delay, attempts in [(0.1, 2), (0.2, 3), (0.4, 4)]:
            self.clock.advance(delay - 0.001)
            self.assertEqual(len(self.persists()), attempts - 1)
            self.clock.advance(0.001)
            self.assertEqual(len(self.persists()), attempts)
        failure = self.failureResultOf(d, Unavailable)
        self.assertEqual(failure.value.message, "down 3")
        self.assertEqual(self.server.events, [])

    def test_delays_capped_and_jittered(self):
        policy = RetryPolicy(retries=10, initial_delay=0.5, max_delay=3, multiplier=3, jitter=0.5)
        for retry, nominal in enumerate([0.5, 1.5, 3, 3, 3]):
            for _ in range(20):
                self.assertTrue(nominal / 2 <= policy.delay(retry) <= nominal)
        self.assertEqual(RetryPolicy(jitter=0, max_delay=5).delay(10_000), 5)
        for bad in (dict(retries=-1), dict(retries=1.5), dict(initial_delay=-1),
                    dict(multiplier=0.5), dict(jitter=2)):
            self.assertRaises(ValueError, RetryPolicy, **bad)

    def test_no_retries(self):
        self.server.persist_answers.append(FakeServer.IGNORE)
        d = self.client.append("p", events("a"), retry=RetryPolicy(retries=0), timeout=1)
        self.clock.advance(1)
        self.failureResultOf(d, ReplyTimeout)
        self.assertEqual(len(self.persists()), 1)

    def test_busy_and_conflicts_not_retried(self):
        self.server.persist_answers.append([error("busy", "too many streams")])
        self.failureResultOf(self.client.append("p", events("a")), Busy)
        self.assertEqual(len(self.persists()), 1)

    def test_no_server_at_first_fails_at_once(self):
        del self.pubsub.handlers["persist"]
        self.failureResultOf(self.client.append("p", events("a")), NoServerError)

    def test_no_server_after_an_unknown_outcome_is_retried(self):
        """A server restarting: no answer, then nobody listening, then the retry finds it."""
        self.server.persist_answers.append(FakeServer.LOSE_REPLY)
        handler = self.pubsub.handlers["persist"]
        d = self.client.append("p", events("a"), timeout=1)
        del self.pubsub.handlers["persist"]
        self.clock.advance(1)    # no answer
        self.clock.advance(0.1)  # the retry reaches nobody
        self.assertNoResult(d)
        self.pubsub.handlers["persist"] = handler
        self.clock.advance(0.2)
        self.assertTrue(self.successResultOf(d).duplicate)

    def test_version_1_answer_to_a_version_2_persist(self):
        """An OkPacket means the server ignored "v": 2 (and the expected version):
        ServerTooOld that says so, never retried."""
        self.server.persist_answers.append([json.loads(encode_ok_packet(1, 42))])
        failure = self.failureResultOf(self.client.append("p", events("a"), 3), ServerTooOld)
        self.assertIn("speaks only version 1", str(failure.value))
        self.assertIn("ignored the expected version", str(failure.value))
        self.assertIn("appended the events without those checks", str(failure.value))
        self.assertEqual(len(self.persists()), 1)

    def test_other_object_is_a_bad_reply(self):
        self.server.persist_answers.append([{"events": "many", "duplicate": False}])
        self.failureResultOf(self.client.append("p", events("a")), BadReply)

    def test_cancel_while_backing_off(self):
        self.server.persist_answers.append([error("unavailable")])
        d = self.client.append("p", events("a"))
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.clock.advance(10)
        self.assertEqual(len(self.persists()), 1)

    def test_cancel_while_waiting(self):
        self.server.persist_answers.append(FakeServer.IGNORE)
        d = self.client.append("p", events("a"))
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.pubsub.subscribed, set())

    def test_disconnect_while_backing_off(self):
        self.server.persist_answers.append([error("unavailable")])
        d = self.client.append("p", events("a"))
        self.successResultOf(self.client.disconnect())
        failure = self.failureResultOf(d, RedisConnectionError)
        self.assertIn("disconnected", str(failure.value))

    def test_disconnect_while_waiting_is_not_retried(self):
        self.server.persist_answers.append(FakeServer.IGNORE)
        d = self.client.append("p", events("a"))
        self.successResultOf(self.client.disconnect())
        self.failureResultOf(d, RedisConnectionError)
        self.assertEqual(len(self.persists()), 1)


class AppendManyTests(V2TestCase):
    def test_several_streams_in_one_request(self):
        self.successResultOf(self.client.append("a", events("x")))
        result = self.successResultOf(self.client.append_many(
            {"a": events("y"), "b": events("z", "w")}, {"a": 0, "b": NO_STREAM}))
        request = self.persists()[-1]
        self.assertEqual(request["expectedVersions"], {"a": 0, "b": NO_STREAM})
        self.assertNotIn("expectedVersion", request)
        self.assertEqual([(e.pid, e.version) for e in result.events],
                         [("a", 1), ("b", 0), ("b", 1)])
        self.assertEqual((result.last_version("a"), result.last_version("b")), (1, 1))
        self.assertRaises(KeyError, result.last_version, "c")

    def test_all_or_nothing(self):
        self.successResultOf(self.client.append("b", events("x")))
        failure = self.failureResultOf(self.client.append_many(
            {"a": events("y"), "b": events("z")}, {"a": NO_STREAM, "b": NO_STREAM}),
            WrongExpectedVersion)
        self.assertEqual((failure.value.pid, failure.value.actual), ("b", 0))
        self.assertEqual(len(self.server.events), 1)

    def test_without_expectations(self):
        self.successResultOf(self.client.append_many({"a": events("y")}))
        self.assertNotIn("expectedVersions", self.persists()[0])

    def test_bad_arguments(self):
        for streams, expected in [({}, None), ([("a", events("y"))], None),
                                  ({"a": events("y")}, {"b": 0}),
                                  ({"a": events("y")}, {"a": "never"}), ({"a": []}, None)]:
            self.assertRaises(ValueError, self.client.append_many, streams, expected)
        self.assertEqual(self.pubsub.calls, [])


class ReadStreamTests(V2TestCase):
    def setUp(self):
        super().setUp()
        self.result = self.successResultOf(self.client.append(
            "p", [{"domain": "order", "name": f"e{i}", "data": {"i": i}} for i in range(5)]))
        self.successResultOf(self.client.append("q", events("other")))
        del self.server.requests[:]

    def test_events_from_a_version(self):
        stream = self.client.read_stream("p", from_version=2)
        got = self.read(stream)
        [request] = self.server.requests
        self.assertEqual(request["query"], {"$select": {"$where": {
            "pid": "p", "version": {"$gte": 2}}}})
        self.assertEqual((request["v"], request["window"]), (2, 100))
        self.assertEqual([e.version for e in got], [2, 3, 4])
        event = got[0]
        self.assertIsInstance(event, RecordedEvent)
        self.assertEqual((event.pid, event.domain, event.name, event.data),
                         ("p", "order", "e2", {"i": 2}))
        self.assertEqual((event.position, event.event_id),
                         (self.result.positions[2], self.result.events[2].event_id))
        self.assertRegex(event.timestamp, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual(event.raw["eventId"], event.event_id)

    def test_from_the_start_one_by_one(self):
        got = self.read(self.client.read_stream("p", window=1, table="db.t"))
        request = self.server.requests[0]
        self.assertNotIn("window", request)
        self.assertEqual(request["query"]["$select"]["$from"], "db.t")
        self.assertEqual(len(got), 5)

    def test_break_ends_the_stream(self):
        async def first():
            async for event in self.client.read_stream("p", window=2):
                return event

        self.assertEqual(self.successResultOf(run(first())).version, 0)
        self.assertEqual(self.server.streams, {})

    def test_callback_style(self):
        stream = self.client.read_stream("p", 4)
        self.assertEqual(self.successResultOf(stream.next_row()).version, 4)
        self.assertIsNone(self.successResultOf(stream.next_row()))

    def test_error_object_raised_after_the_rows(self):
        self.server.fetch_answer = [{"position": 1, "version": 0},
                                    error("busy", "too many open streams")]
        stream = self.client.read_stream("p")
        self.assertEqual(self.successResultOf(stream.next_row()).version, 0)
        failure = self.failureResultOf(stream.next_row(), Busy)
        self.assertEqual(failure.value.message, "too many open streams")

    def test_nothing_sent_before_the_first_event_is_asked_for(self):
        self.client.read_stream("p")
        self.assertEqual(self.server.requests, [])

    def test_bad_arguments(self):
        for args, kwargs in [(("",), {}), (("p", -1), {}), (("p", "0"), {}),
                             (("p",), {"window": 0})]:
            self.assertRaises(ValueError, self.client.read_stream, *args, **kwargs)


class ProbeTests(SynchronousTestCase):
    """Telling a version 1 server: one version 2 fetch per connection, before the first
    version 2 request."""

    def setUp(self):
        self.clock = Clock()
        self.pubsub = MemoryPubSub()
        self.client = EventSourceClient(self.pubsub, self.clock, retry=EXACT,
                                        address="redis.example:6379")

    def serve(self, **kwargs):
        self.server = FakeServer(self.pubsub, **kwargs)
        return self.server

    def test_probe_once_per_connection(self):
        server = self.serve()
        self.successResultOf(self.client.append("p", events("a")))
        self.successResultOf(self.client.append("p", events("b")))
        list(self.successResultOf(run(self._read("p"))))
        probe, *rest = server.requests
        self.assertEqual(set(probe), {"v", "channel", "query"})
        self.assertEqual(probe["v"], 2)
        self.assertEqual(probe["query"], {"$select": {"$columns": ["position"], "$limit": 0}})
        self.assertEqual([r["query"] == PROBE_QUERY for r in rest], [False, False, False])
        self.client.connection_lost(None)
        self.client.connection_made()
        self.successResultOf(self.client.append("p", events("c")))
        self.assertEqual(sum(r["query"] == PROBE_QUERY for r in server.requests), 2)

    async def _read(self, pid):
        return [e async for e in self.client.read_stream(pid)]

    def test_concurrent_requests_share_one_probe(self):
        server = self.serve()
        self.pubsub.hold_subscribes = True
        first = self.client.append("p", events("a"))
        second = self.client.append("q", events("b"))
        self.assertEqual(len(self.pubsub.held), 1)
        self.pubsub.hold_subscribes = False
        self.pubsub.held.popleft().callback(None)
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(sum(r["query"] == PROBE_QUERY for r in server.requests), 1)

    def test_version_1_server_answers_error(self):
        """This project's version 1 server refuses the unknown column: "error"."""
        server = self.serve(version=1)
        failure = self.failureResultOf(self.client.append("p", events("a")), ServerTooOld)
        message = str(failure.value)
        self.assertIn("the eventsource server on Redis redis.example:6379 (requests on "
                      "'persist') speaks only version 1 of the protocol", message)
        self.assertIn('answered the version 2 probe', message)
        self.assertIn('"error"', message)
        # remembered: the next request does not ask again, and nothing is appended
        self.failureResultOf(self.client.read_stream("p").next_row(), ServerTooOld)
        self.assertEqual(len(server.requests), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_version_1_server_answers_a_row_or_an_ok_packet(self):
        for answer in ({"timestamp": "2020-04-06T11:35:18.414Z", "pid": "p"},
                       json.loads(encode_ok_packet(0, 0))):
            pubsub = MemoryPubSub()
            server = FakeServer(pubsub, version=1)
            server.fetch_answer = [answer]
            client = EventSourceClient(pubsub, self.clock)
            failure = self.failureResultOf(client.append("p", events("a")), ServerTooOld)
            self.assertIn("with a row", str(failure.value))
            self.assertEqual(len(server.requests), 1)
            self.assertEqual(client.open_requests, 0)
            self.assertEqual(pubsub.subscribed, set())

    def test_silent_server(self):
        """No answer within the timeout: ServerTooOld, not remembered (asked again)."""
        self.serve()
        self.pubsub.handlers["fetch"] = lambda channel, body: None
        d = self.client.append("p", events("a"), timeout=2)
        self.clock.advance(2)
        failure = self.failureResultOf(d, ServerTooOld)
        self.assertIn("nothing within 2 s", str(failure.value))
        self.assertEqual(self.client.open_requests, 0)
        self.pubsub.handlers["fetch"] = self.server.on_fetch
        self.successResultOf(self.client.append("p", events("a")))
        self.assertEqual(len(self.server.events), 1)

    def test_no_server_is_not_a_verdict(self):
        server = self.serve()
        del self.pubsub.handlers["fetch"]
        self.failureResultOf(self.client.append("p", events("a")), NoServerError)
        self.pubsub.handlers["fetch"] = server.on_fetch
        self.successResultOf(self.client.append("p", events("a")))

    def test_error_object_means_version_2(self):
        """Only a version 2 server sends error objects: a busy answer to the probe counts."""
        server = self.serve()
        server.fetch_answer = [error("busy", "too many open streams")]
        self.successResultOf(self.client.append("p", events("a")))
        self.assertEqual(len(server.events), 1)

    def test_verdict_of_a_lost_connection_not_kept(self):
        """A probe answered after the connection changed is not remembered for the new one."""
        server = self.serve()
        self.pubsub.hold_subscribes = True
        d = self.client.append("p", events("a"))
        self.client.connection_made()  # a new connection while the probe was out
        self.pubsub.hold_subscribes = False
        self.pubsub.held.popleft().callback(None)
        self.successResultOf(d)
        self.successResultOf(self.client.append("p", events("b")))
        self.assertEqual(sum(r["query"] == PROBE_QUERY for r in server.requests), 2)

    def test_disconnect_while_probing(self):
        self.serve()
        self.pubsub.handlers["fetch"] = lambda channel, body: None
        d = self.client.append("p", events("a"))
        self.successResultOf(self.client.disconnect())
        self.failureResultOf(d, RedisConnectionError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_while_probing(self):
        self.serve()
        self.pubsub.handlers["fetch"] = lambda channel, body: None
        d = self.client.append("p", events("a"), timeout=1)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.clock.advance(1)  # the probe itself ends on its own timer

    def test_read_stream_probes_first(self):
        server = self.serve(version=1)
        stream = self.client.read_stream("p")

        async def go():
            return [e async for e in stream]

        self.failureResultOf(run(go()), ServerTooOld)
        self.assertEqual(len(server.requests), 1)


class MachineTests(V2TestCase):
    def test_error_object_is_one_input(self):
        """A version 2 error object on the reply channel is the input error_received."""
        fired = []
        real = _requests._Request._fire

        def recording(request, name, *args):
            fired.append(name)
            return real(request, name, *args)

        self.successResultOf(self.client.require_version_2())
        self.patch(_requests._Request, "_fire", recording)
        self.server.persist_answers.append([error("readOnly")])
        self.failureResultOf(self.client.append("p", events("a")), ReadOnly)
        self.assertEqual([name for name in fired if name.endswith("_received")],
                         ["error_received"])

    def test_version_1_requests_unchanged(self):
        """Only a version 2 request reads an error object as an error: for version 1
        it is a result, as before."""
        self.server.persist_answer = [error("busy")]
        result = self.successResultOf(self.client.persist({"pid": "p"}))
        self.assertEqual(result.raw, error("busy"))


# -- against the real server ------------------------------------------------------


class IntegrationTests(IntegrationTestCase):
    """The client against a version 2 server of this process (real Redis and MariaDB)."""

    async def connect(self, **kwargs):
        from twisted.internet import reactor

        kwargs.setdefault("retry", RetryPolicy(retries=3, initial_delay=0.05, jitter=0))
        client = await connect(REDIS_HOST, REDIS_PORT, channel_prefix=self.prefix,
                               reactor=reactor, **kwargs)
        self.addCleanup(client.disconnect)
        return client

    def test_probe_finds_a_version_2_server(self):
        async def go():
            client = await self.connect()
            await client.require_version_2()
            self.assertTrue(client._speaks_version_2)

        return run(go())

    def test_append_with_expected_versions(self):
        async def go():
            client = await self.connect()
            pid = unique("order")
            result = await client.append(pid, events("created", "paid"), NO_STREAM)
            self.assertEqual((result.versions, result.duplicate), ((0, 1), False))
            self.assertEqual(result.positions[1], result.positions[0] + 1)
            result2 = await client.append(pid, events("shipped"), expected_version=1)
            self.assertEqual(result2.versions, (2,))
            self.assertGreater(result2.positions[0], result.positions[1])
            rows = self.rows("pid, version, name, LOWER(HEX(event_id)), id")
            self.assertEqual([r[:3] for r in rows],
                             [(pid, 0, "created"), (pid, 1, "paid"), (pid, 2, "shipped")])
            self.assertEqual([r[3] for r in rows],
                             [e.event_id.replace("-", "") for e in result.events + result2.events])
            self.assertEqual([r[4] for r in rows], list(result.positions + result2.positions))

        return run(go())

    def test_conflict(self):
        async def go():
            client = await self.connect()
            pid = unique("order")
            await client.append(pid, events("a", "b", "c"))
            with self.assertRaises(WrongExpectedVersion) as caught:
                await client.append(pid, events("d"), expected_version=1)
            e = caught.exception
            self.assertEqual((e.pid, e.expected, e.actual, e.code),
                             (pid, 1, 2, "wrongExpectedVersion"))
            self.assertIn(pid, e.message)
            with self.assertRaises(WrongExpectedVersion) as caught:
                await client.append(pid, events("d"), expected_version=NO_STREAM)
            self.assertEqual(caught.exception.actual, 2)
            with self.assertRaises(WrongExpectedVersion) as caught:
                await client.append(unique("none"), events("d"), STREAM_EXISTS)
            self.assertIsNone(caught.exception.actual)
            self.assertEqual(len(self.rows()), 3)

        return run(go())

    def test_append_many_all_or_nothing(self):
        async def go():
            client = await self.connect()
            a, b = unique("a"), unique("b")
            await client.append(b, events("x"))
            with self.assertRaises(WrongExpectedVersion) as caught:
                await client.append_many({a: events("y"), b: events("z")},
                                         {a: NO_STREAM, b: NO_STREAM})
            self.assertEqual((caught.exception.pid, caught.exception.actual), (b, 0))
            result = await client.append_many({a: events("y"), b: events("z")},
                                              {a: NO_STREAM, b: 0})
            self.assertEqual([(e.pid, e.version) for e in result.events], [(a, 0), (b, 1)])
            self.assertEqual(len(self.rows()), 3)

        return run(go())

    def test_same_ids_again_is_a_duplicate(self):
        """Retrying the same body by hand: duplicate, the first positions, stored once."""
        async def go():
            client = await self.connect()
            pid = unique("order")
            ids = [str(uuid.uuid4()) for _ in range(2)]
            evs = [{"domain": "d", "name": f"n{i}", "eventId": ids[i]} for i in range(2)]
            first = await client.append(pid, evs, NO_STREAM)
            again = await client.append(pid, evs, NO_STREAM)
            self.assertEqual((first.duplicate, again.duplicate), (False, True))
            self.assertEqual(again.events, first.events)
            with self.assertRaises(IdempotencyConflict) as caught:
                await client.append(unique("other"), evs[:1])
            self.assertEqual(caught.exception.event_id, ids[0])
            self.assertEqual(len(self.rows()), 2)

        return run(go())

    def test_lost_reply_is_retried_exactly_once(self):
        """The first reply of the append never reaches the client: it times out,
        retries the same body, and is answered duplicate; one row per event."""
        async def go():
            client = await self.connect(timeout=1.0)
            await client.require_version_2()
            pid = unique("order")
            dropped = []
            deliver = client.message_received

            def lossy(channel, body):
                # every message of the first request's reply channel is lost
                if not dropped and channel in client._requests or dropped \
                        and channel == dropped[0][0]:
                    dropped.append((channel, body))
                    return
                deliver(channel, body)

            client.message_received = lossy
            result = await client.append(pid, events("a", "b"), NO_STREAM)
            self.assertEqual([json.loads(body) for _, body in dropped][1:], ["end"])
            self.assertFalse(json.loads(dropped[0][1])["duplicate"])
            self.assertTrue(result.duplicate)
            self.assertEqual(result.versions, (0, 1))
            self.assertEqual(self.rows("pid, version"), ((pid, 0), (pid, 1)))

        return run(go())

    def test_read_stream_from_a_version(self):
        async def go():
            client = await self.connect()
            pid = unique("order")
            await client.append(unique("other"), events("x"))
            result = await client.append(pid, [{"domain": "order", "name": f"e{i}",
                                                "data": {"i": i, "s": "é"}} for i in range(7)]
                                         + [{"domain": "order", "name": "s", "data": "text"}])
            got = [e async for e in client.read_stream(pid, from_version=3, window=3)]
            self.assertEqual([e.version for e in got], [3, 4, 5, 6, 7])
            self.assertEqual([e.data for e in got][:2], [{"i": 3, "s": "é"}, {"i": 4, "s": "é"}])
            self.assertEqual(got[-1].data, "text")
            self.assertEqual([e.position for e in got], list(result.positions[3:]))
            self.assertEqual([e.event_id for e in got], [e.event_id for e in result.events[3:]])
            self.assertEqual({(e.pid, e.domain) for e in got}, {(pid, "order")})
            self.assertRegex(got[0].timestamp, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
            self.assertEqual([e async for e in client.read_stream(pid, 8)], [])
            self.assertEqual(len([e async for e in client.read_stream(pid, window=1)]), 8)

        return run(go())


    def test_refusals_are_coded_exceptions(self):
        """The real server's error objects arrive as the exceptions of their codes."""
        async def go():
            client = await self.connect()
            with self.assertRaises(Refused) as caught:
                [e async for e in client.read_stream("p", table="mysql.user")]
            self.assertEqual(caught.exception.code, "refused")
            self.assertNotIn("SELECT", caught.exception.message)
            with self.assertRaises(BadRequest):
                await client.append("p", [{"domain": "d", "name": "x" * 256}])
            with self.assertRaises(Refused):
                await client.append("p", events("a"), table="mysql.user")
            self.assertEqual(self.rows(), ())

        return run(go())

    def test_fake_server_answers_as_the_real_one(self):
        """The same appends against FakeServer and the real server: the same
        versions, codes and conflict sentences (the double stays honest)."""
        ids = [str(uuid.UUID(int=n)) for n in range(1, 4)]

        async def script(client):
            outcomes = []
            steps = [
                lambda: client.append("p", events("a"), NO_STREAM),
                lambda: client.append("p", events("b"), 5),
                lambda: client.append("p", events("c"), NO_STREAM),
                lambda: client.append("q", events("x"), STREAM_EXISTS),
                lambda: client.append("p", events("d", "e"), 0),
                lambda: client.append("r", [{"domain": "d", "name": "n", "eventId": i}
                                            for i in ids[:2]]),
                lambda: client.append("r", [{"domain": "d", "name": "n", "eventId": i}
                                            for i in ids[:2]], NO_STREAM),
                lambda: client.append("r", [{"domain": "d", "name": "n", "eventId": i}
                                            for i in ids[1:]]),
                lambda: client.append_many({"p": events("f"), "q": events("g")},
                                           {"q": NO_STREAM, "p": 1}),
                lambda: client.append_many({"p": events("f"), "q": events("g")},
                                           {"q": NO_STREAM, "p": 3}),
            ]
            for step in steps:
                try:
                    result = await step()
                except ServerError as e:
                    outcomes.append((e.code, e.message if isinstance(
                        e, WrongExpectedVersion) else None, e.details.get("actual")))
                else:
                    outcomes.append(([(ev.pid, ev.version) for ev in result.events],
                                     result.duplicate))
            outcomes.append([(e.pid, e.version, e.name) async for e in client.read_stream("p")])
            return outcomes

        async def go():
            pubsub = MemoryPubSub()
            FakeServer(pubsub)
            fake = await script(EventSourceClient(pubsub, Clock()))
            real = await script(await self.connect())
            self.assertEqual(fake, real)
            self.assertEqual(real[1], ("wrongExpectedVersion",
                                       'stream "p" is at version 0, not version 5', 0))

        return run(go())


class VersionOneServerTests(TestCase):
    """A server that answers version 2 fields as version 1 does is told apart."""

    def test_fake_old_server_on_real_redis(self):
        """Over real Redis, a "server" answering the probe with "error" (as this
        project's version 1 server refused the unknown column) is ServerTooOld."""
        async def go():
            from twisted.internet import reactor

            prefix = unique("old") + ":"
            old = await connect(REDIS_HOST, REDIS_PORT, reactor=reactor)
            self.addCleanup(old.disconnect)
            await old.subscribe(prefix + "fetch")

            def answer(message):
                old.publish(message["channel"], "error")
                old.publish(message["channel"], "end")

            old.on(prefix + "fetch", answer)
            client = await connect(REDIS_HOST, REDIS_PORT, channel_prefix=prefix,
                                   reactor=reactor)
            self.addCleanup(client.disconnect)
            with self.assertRaises(ServerTooOld) as caught:
                await client.append("p", events("a"))
            self.assertIn(f"Redis {REDIS_HOST}:{REDIS_PORT}", str(caught.exception))
            self.assertIn("speaks only version 1", str(caught.exception))

        return run(go())
