"""
Tests for :mod:`eventsource.client`.

The first part drives :class:`EventSourceClient` over the in-memory pub/sub
and scripted server of :mod:`eventsource.client.testing` with a
:class:`Clock`: no reactor, no Redis, milliseconds.  The second part
(:class:`IntegrationTests`) runs the real client against a private
redis-server and a real ``twistd eventsource`` process on MariaDB.
"""

import ast
import atexit
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from transitions import Machine
from transitions.core import MachineError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from eventsource import client as client_module
from eventsource import wire
from eventsource.client import _requests
from eventsource.client._requests import RequestState
from eventsource.config import REQUEST_CHANNELS
from eventsource.client import (
    BadReply,
    EventSourceClient,
    NoServerError,
    PersistResult,
    RedisConnectionError,
    RedisPubSub,
    ReplyTimeout,
    Row,
    ServerError,
    StreamTimeout,
    connect,
)
from eventsource.client.testing import FakeServer, MemoryPubSub
from tests.redis_server import RedisServer
from tests.support import free_port, sleep, unique

OK_PACKET = ('{"fieldCount":0,"affectedRows":%d,"insertId":%d,"serverStatus":2,'
             '"warningCount":0,"message":"","protocol41":true,"changedRows":0}')


def rows_of(n, pid="p1"):
    return [{"timestamp": "2020-04-06T11:35:18.414Z", "pid": pid, "domain": "user",
             "name": f"e{i}", "data": json.dumps({"i": i})} for i in range(n)]


def run(coroutine):
    return Deferred.fromCoroutine(coroutine)


class ClientTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.pubsub = MemoryPubSub()
        self.server = FakeServer(self.pubsub)
        self.client = EventSourceClient(self.pubsub, self.clock)

    def tearDown(self):
        # every test leaves no timer behind and no request open
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def consume(self, stream, limit=None):
        rows = []

        async def go():
            async for row in stream:
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    break
            return rows

        return run(go())


class PersistTests(ClientTestCase):
    def test_subscribes_before_publishing(self):
        """The reply channel is confirmed subscribed before the request goes out."""
        self.pubsub.hold_subscribes = True
        d = self.client.persist({"pid": "p", "domain": "d", "name": "n"})
        self.assertEqual([c[0] for c in self.pubsub.calls], ["subscribe"])
        self.assertNoResult(d)
        self.pubsub.held.popleft().callback(None)
        self.assertEqual([c[0] for c in self.pubsub.calls], ["subscribe", "publish", "unsubscribe"])
        self.assertEqual(self.successResultOf(d).affected_rows, 1)

    def test_request_and_result(self):
        """The request is the protocol's persist body; the result is the OkPacket's."""
        documents = [{"pid": "p", "domain": "d", "name": "n", "data": {"k": i}} for i in range(3)]
        result = self.successResultOf(self.client.persist(documents, table="db.events"))
        request = self.server.requests[0]
        self.assertEqual(request["query"], {"$insert": {"$table": "db.events",
                                                        "$documents": documents}})
        self.assertTrue(request["channel"].startswith("eventsource:reply:"))
        self.assertIsInstance(result, PersistResult)
        self.assertEqual((result.affected_rows, result.insert_id), (3, 1))
        self.assertEqual(result.raw["protocol41"], True)
        self.assertEqual(self.pubsub.subscribed, set())
        self.assertEqual(self.client.open_requests, 0)

    def test_no_table_means_default(self):
        self.successResultOf(self.client.persist_event("p", "d", "n", {"x": 1}))
        self.assertEqual(self.server.requests[0]["query"],
                         {"$insert": {"$documents": {"pid": "p", "domain": "d", "name": "n",
                                                     "data": {"x": 1}}}})

    def test_reply_channels_are_unique(self):
        for _ in range(50):
            self.successResultOf(self.client.persist({"pid": "p", "domain": "d", "name": "n"}))
        channels = {r["channel"] for r in self.server.requests}
        self.assertEqual(len(channels), 50)

    def test_channel_prefix(self):
        """A server started with --channel-prefix listens on prefixed request channels."""
        pubsub = MemoryPubSub()
        server = FakeServer(pubsub, rows_of(2), prefix="shop:")
        client = EventSourceClient(pubsub, self.clock, channel_prefix="shop:")
        self.successResultOf(client.persist({"pid": "p", "domain": "d", "name": "n"}))
        rows = self.successResultOf(client.fetch_all({"$select": {}}))
        self.assertEqual(len(rows), 2)
        self.assertEqual(len(server.requests), 2)
        self.assertEqual({c[1] for c in pubsub.calls if c[0] == "publish"},
                         {"shop:persist", "shop:fetch", "shop:fetch-next"})
        unprefixed = EventSourceClient(pubsub, self.clock)
        self.failureResultOf(unprefixed.persist({"pid": "p"}), NoServerError)

    def test_reply_prefix(self):
        client = EventSourceClient(self.pubsub, self.clock, reply_prefix="app:42:")
        self.successResultOf(client.persist({"pid": "p", "domain": "d", "name": "n"}))
        self.assertRegex(self.server.requests[0]["channel"], r"^app:42:[0-9a-f]{32}$")

    def test_server_error(self):
        self.server.persist_answer = ["error"]
        failure = self.failureResultOf(self.client.persist({"pid": "p"}), ServerError)
        self.assertIn("error", str(failure.value))
        self.assertEqual(failure.value.channel, self.server.requests[0]["channel"])
        self.assertEqual(self.pubsub.subscribed, set())

    def test_end_without_result(self):
        self.server.persist_answer = []
        self.failureResultOf(self.client.persist({"pid": "p"}), BadReply)

    def test_no_server_fails_at_once(self):
        """PUBLISH reaching 0 subscribers fails the request without waiting."""
        del self.pubsub.handlers["persist"]
        failure = self.failureResultOf(self.client.persist({"pid": "p"}), NoServerError)
        self.assertIn("no eventsource server", str(failure.value))
        self.assertEqual(self.pubsub.subscribed, set())

    def test_reply_before_publish_count(self):
        """The answer may overtake PUBLISH's own reply; a later count changes nothing."""
        self.pubsub.hold_publishes = True
        d = self.client.persist({"pid": "p", "domain": "d", "name": "n"})
        self.assertEqual(self.successResultOf(d).affected_rows, 1)
        self.pubsub.held.popleft().callback(None)

    def test_timeout(self):
        self.pubsub.handlers["persist"] = lambda channel, body: None
        d = self.client.persist({"pid": "p"}, timeout=3)
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.failureResultOf(d, ReplyTimeout)
        self.assertEqual(self.pubsub.subscribed, set())

    def test_redis_away(self):
        """No subscription confirmed in time: Redis is away, and the request is
        never published once it comes back."""
        self.pubsub.hold_subscribes = True
        d = self.client.persist({"pid": "p"}, timeout=1)
        self.clock.advance(1)
        failure = self.failureResultOf(d, RedisConnectionError)
        self.assertIn("Redis did not confirm", str(failure.value))
        self.pubsub.held.popleft().callback(None)
        self.assertEqual(self.server.requests, [])

    def test_default_timeout(self):
        self.pubsub.handlers["persist"] = lambda channel, body: None
        d = self.client.persist({"pid": "p"})
        self.clock.advance(client_module.DEFAULT_TIMEOUT)
        self.failureResultOf(d, ReplyTimeout)

    def test_late_answer_ignored(self):
        answers = []
        self.pubsub.handlers["persist"] = lambda channel, body: answers.append(
            json.loads(body)["channel"])
        d = self.client.persist({"pid": "p"}, timeout=1)
        self.clock.advance(1)
        self.failureResultOf(d, ReplyTimeout)
        self.client.message_received(answers[0], OK_PACKET % (1, 1))

    def test_connection_lost(self):
        self.pubsub.handlers["persist"] = lambda channel, body: None
        d = self.client.persist({"pid": "p"})
        self.client.connection_lost(None)
        self.failureResultOf(d, RedisConnectionError)

    def test_subscription_confirmed_after_connection_lost(self):
        """A subscribe that completes on the next connection is undone."""
        self.pubsub.hold_subscribes = True
        d = self.client.persist({"pid": "p"})
        self.client.connection_lost(None)
        self.failureResultOf(d, RedisConnectionError)
        self.pubsub.held.popleft().callback(None)
        self.assertEqual(self.pubsub.subscribed, set())
        self.assertEqual(self.server.requests, [])

    def test_publish_failure(self):
        def broken(channel, body):
            raise ConnectionError("boom")

        self.pubsub.publish = broken
        failure = self.failureResultOf(self.client.persist({"pid": "p"}), RedisConnectionError)
        self.assertIn("boom", str(failure.value))

    def test_cancel(self):
        self.pubsub.handlers["persist"] = lambda channel, body: None
        d = self.client.persist({"pid": "p"})
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.client.open_requests, 0)
        self.assertEqual(self.pubsub.subscribed, set())

    def test_bad_documents(self):
        for documents in ([], "x", [1], None):
            self.assertRaises(ValueError, self.client.persist, documents)
        self.assertRaises(TypeError, self.client.persist, {"data": object()})
        self.assertEqual(self.pubsub.calls, [])


class FetchTests(ClientTestCase):
    def test_version_1_stream(self):
        """One row per acceptance, accepted on fetch-next when the next is asked for."""
        self.server.rows = rows_of(3)
        stream = self.client.fetch({"$select": {"$where": {"pid": "p1"}}})
        self.assertEqual(self.pubsub.calls, [], "nothing happens before the first row is asked for")
        first = self.successResultOf(stream.next_row())
        request = self.server.requests[0]
        self.assertEqual(request, {"channel": stream.channel,
                                   "query": {"$select": {"$where": {"pid": "p1"}}}})
        self.assertEqual(first["name"], "e0")
        self.assertEqual(self.server.acceptances, [])
        self.assertEqual(self.successResultOf(stream.next_row())["name"], "e1")
        self.assertEqual(self.pubsub.published("fetch-next"), [{"channel": stream.channel}])
        self.assertEqual(self.successResultOf(stream.next_row())["name"], "e2")
        self.assertIsNone(self.successResultOf(stream.next_row()))
        self.assertEqual(len(self.pubsub.published("fetch-next")), 3)
        self.assertEqual(self.pubsub.subscribed, set())
        self.assertIsNone(self.successResultOf(stream.next_row()))

    def test_async_for(self):
        self.server.rows = rows_of(5)
        rows = self.successResultOf(self.consume(self.client.fetch({"$select": {}})))
        self.assertEqual([r["name"] for r in rows], [f"e{i}" for i in range(5)])

    def test_data_decoded_raw_kept(self):
        self.server.rows = rows_of(1)
        [row] = self.successResultOf(self.consume(self.client.fetch({"$select": {}})))
        self.assertIsInstance(row, Row)
        self.assertEqual(row["data"], {"i": 0})
        self.assertEqual(row.raw["data"], '{"i": 0}')
        self.assertEqual(row["pid"], "p1")

    def test_raw_rows(self):
        self.server.rows = rows_of(1)
        [row] = self.successResultOf(self.consume(self.client.fetch({"$select": {}}, raw=True)))
        self.assertEqual(row, rows_of(1)[0])
        self.assertNotIsInstance(row, Row)

    def test_data_not_json_left_alone(self):
        self.server.rows = [{"data": "not json"}, {"data": None}, {"n": 1}]
        rows = self.successResultOf(self.consume(self.client.fetch({"$select": {}})))
        self.assertEqual(rows, [{"data": "not json"}, {"data": None}, {"n": 1}])

    def test_empty_result(self):
        rows = self.successResultOf(self.consume(self.client.fetch({"$select": {}})))
        self.assertEqual(rows, [])
        self.assertEqual(self.pubsub.published("fetch-next"), [])

    def test_window_batches_acceptances(self):
        """With a window, rows are accepted window//2 at a time, in one message."""
        self.server.rows = rows_of(10)
        stream = self.client.fetch({"$select": {}}, window=4)
        rows = self.successResultOf(self.consume(stream))
        self.assertEqual(len(rows), 10)
        self.assertEqual(self.server.requests[0]["window"], 4)
        accepts = self.pubsub.published("fetch-next")
        self.assertTrue(accepts)
        self.assertTrue(all(a == {"channel": stream.channel, "accepted": 2} for a in accepts),
                        accepts)

    def test_window_1_sends_no_window(self):
        self.server.rows = rows_of(1)
        self.successResultOf(self.consume(self.client.fetch({"$select": {}}, window=1)))
        self.assertNotIn("window", self.server.requests[0])

    def test_window_capped_by_server(self):
        """A server granting less than window//2 does not deadlock the stream."""
        self.server.rows = rows_of(7)
        self.server.max_window = 2
        d = self.consume(self.client.fetch({"$select": {}}, window=100))
        for _ in range(10):
            self.clock.advance(client_module.IDLE_ACCEPT_DELAY)
        self.assertEqual(len(self.successResultOf(d)), 7)

    def test_slow_row_not_accepted_early(self):
        """A row in flight (window not full) does not trigger an early acceptance."""
        self.server.rows = rows_of(1)
        self.server.max_window = 1
        stream = self.client.fetch({"$select": {}}, window=8)
        self.successResultOf(stream.next_row())
        d = stream.next_row()
        self.assertEqual(self.server.acceptances, [])
        self.clock.advance(client_module.IDLE_ACCEPT_DELAY)
        self.assertEqual(len(self.server.acceptances), 1)
        self.assertIsNone(self.successResultOf(d))

    def test_accept_via_reply_channel(self):
        """The original client's way: "accepted" on the reply channel; echoes ignored."""
        client = EventSourceClient(self.pubsub, self.clock, accept_via="reply")
        self.server.rows = rows_of(3)
        stream = client.fetch({"$select": {}})
        rows = self.successResultOf(self.consume(stream))
        self.assertEqual(len(rows), 3)
        self.assertEqual(self.pubsub.published(stream.channel), ["accepted"] * 3)
        self.assertEqual(self.pubsub.published("fetch-next"), [])

    def test_windowed_fetch_accepts_on_fetch_next_whatever_accept_via_says(self):
        """The server does not listen on a windowed stream's reply channel."""
        client = EventSourceClient(self.pubsub, self.clock, accept_via="reply")
        self.server.rows = rows_of(10)
        stream = client.fetch({"$select": {}}, window=4)
        rows = self.successResultOf(self.consume(stream))
        self.assertEqual(len(rows), 10)
        self.assertEqual(self.pubsub.published(stream.channel), [])
        self.assertTrue(all(a == {"channel": stream.channel, "accepted": 2}
                            for a in self.pubsub.published("fetch-next")))

    def test_windowed_fetch_accepts_large_rows_by_bytes(self):
        """The server bounds a window in bytes: large rows are accepted before window // 2 of them."""
        big = [dict(row, data=json.dumps({"s": "x" * 300_000})) for row in rows_of(6)]
        self.server.rows = big
        self.server.max_window = 3  # as a server whose byte window holds 3 of these
        stream = self.client.fetch({"$select": {}}, window=1000)
        rows = self.successResultOf(self.consume(stream))  # with no idle acceptance (no clock)
        self.assertEqual(len(rows), 6)
        self.assertEqual(self.pubsub.published("fetch-next"),
                         [{"channel": stream.channel, "accepted": 2}] * 2)
        self.assertEqual(client_module.ACCEPT_BYTES, 512 * 1024)

    def test_windowed_break_sends_end_on_fetch_next(self):
        """A windowed stream is ended with {"channel": c, "end": true} on fetch-next."""
        self.server.rows = rows_of(10)
        stream = self.client.fetch({"$select": {}}, window=4)
        rows = self.successResultOf(self.consume(stream, limit=2))
        self.assertEqual(len(rows), 2)
        self.successResultOf(stream.aclose())
        channel = self.server.requests[0]["channel"]
        self.assertEqual(self.pubsub.published("fetch-next")[-1], {"channel": channel, "end": True})
        self.assertEqual(self.pubsub.published(channel), [])
        self.assertNotIn(channel, self.server.streams)
        self.assertEqual(self.client.open_requests, 0)

    def test_break_sends_end(self):
        """Leaving the loop early sends "end" on the reply channel and unsubscribes."""
        self.server.rows = rows_of(5)
        rows = self.successResultOf(self.consume(self.client.fetch({"$select": {}}), limit=2))
        gc.collect()
        self.assertEqual(len(rows), 2)
        channel = self.server.requests[0]["channel"]
        self.assertEqual(self.pubsub.published(channel), ["end"])
        self.assertNotIn(channel, self.server.streams)
        self.assertEqual(self.pubsub.subscribed, set())
        self.assertEqual(self.client.open_requests, 0)

    def test_break_sends_end_at_once(self):
        """The common `async for row in client.fetch(...): break` ends the stream
        right at the break, before the code after the loop runs."""
        self.server.rows = rows_of(5)

        async def go():
            async for _row in self.client.fetch({"$select": {}}):
                break
            return self.pubsub.published(self.server.requests[0]["channel"])

        self.assertEqual(self.successResultOf(run(go())), ["end"])

    def test_exception_in_loop_sends_end(self):
        self.server.rows = rows_of(5)

        async def go():
            async for _row in self.client.fetch({"$select": {}}):
                raise KeyError("consumer bug")

        self.failureResultOf(run(go()), KeyError)
        gc.collect()
        self.assertEqual(self.pubsub.published(self.server.requests[0]["channel"]), ["end"])

    def test_async_with_and_aclose(self):
        self.server.rows = rows_of(5)

        async def go():
            async with self.client.fetch({"$select": {}}) as rows:
                return (await rows.__anext__())["name"]

        self.assertEqual(self.successResultOf(run(go())), "e0")
        channel = self.server.requests[0]["channel"]
        self.assertEqual(self.pubsub.published(channel), ["end"])

    def test_close_after_end_sends_nothing(self):
        self.server.rows = rows_of(1)
        stream = self.client.fetch({"$select": {}}, window=5)
        self.successResultOf(self.consume(stream))
        self.successResultOf(stream.aclose())
        self.assertEqual(self.pubsub.published(stream.channel), [])

    def test_close_before_start(self):
        stream = self.client.fetch({"$select": {}})
        self.successResultOf(stream.aclose())
        self.assertEqual(self.pubsub.calls, [])
        self.assertIsNone(self.successResultOf(stream.next_row()))

    def test_close_while_waiting(self):
        self.server.rows = rows_of(1)
        self.server.max_window = 1
        stream = self.client.fetch({"$select": {}})
        self.successResultOf(stream.next_row())
        self.pubsub.handlers["fetch-next"] = lambda channel, body: None
        d = stream.next_row()
        self.assertNoResult(d)
        stream.aclose()
        self.assertIsNone(self.successResultOf(d))

    def test_end_sent_before_the_waiting_consumer_wakes(self):
        """A consumer woken by another's aclose() that disconnects at once does
        not keep "end" from the server (it was sent from inside the transition)."""
        self.server.rows = rows_of(3)
        self.server.max_window = 1
        stream = self.client.fetch({"$select": {}}, window=2)
        self.successResultOf(stream.next_row())
        self.pubsub.handlers["fetch-next"] = lambda channel, body: self.pubsub.calls.append(
            ("heard", body))
        d = stream.next_row()
        self.assertNoResult(d)
        d.addCallback(lambda _: self.client.disconnect())
        self.successResultOf(stream.aclose())
        self.assertIn(("heard", '{"channel":"%s","end":true}' % stream.channel),
                      self.pubsub.calls)

    def test_stream_timeout_after_rows(self):
        """Rows that came before "timeout" are delivered, then StreamTimeout."""
        stream = self.client.fetch({"$select": {}}, window=10)
        self.pubsub.handlers["fetch"] = lambda _, body: None
        d = stream.next_row()
        for message in (rows_of(2)[0], rows_of(2)[1], "timeout"):
            self.server.send(stream.channel, message)
        self.assertEqual(self.successResultOf(d)["name"], "e0")
        self.assertEqual(self.successResultOf(stream.next_row())["name"], "e1")
        self.failureResultOf(stream.next_row(), StreamTimeout)
        self.assertIsNone(self.successResultOf(stream.next_row()))

    def test_server_error_in_loop(self):
        self.pubsub.handlers["fetch"] = lambda _, body: self.server.send(
            json.loads(body)["channel"], "error")
        self.failureResultOf(self.consume(self.client.fetch({"$select": {}})), ServerError)

    def test_no_server(self):
        del self.pubsub.handlers["fetch"]
        self.failureResultOf(self.consume(self.client.fetch({"$select": {}})), NoServerError)
        self.assertEqual(self.pubsub.subscribed, set())

    def test_server_gone_mid_stream(self):
        """An acceptance reaching 0 subscribers fails the stream at once."""
        self.server.rows = rows_of(3)
        stream = self.client.fetch({"$select": {}})
        self.successResultOf(stream.next_row())
        del self.pubsub.handlers["fetch-next"]
        self.failureResultOf(stream.next_row(), NoServerError)

    def test_reply_timeout_sends_end(self):
        self.pubsub.handlers["fetch"] = lambda _, body: None
        stream = self.client.fetch({"$select": {}}, timeout=2)
        d = stream.next_row()
        self.clock.advance(2)
        self.failureResultOf(d, ReplyTimeout)
        self.assertEqual(self.pubsub.published(stream.channel), ["end"])
        self.assertEqual(self.pubsub.subscribed, set())

    def test_slow_consumer_no_client_timeout(self):
        """The client timeout only runs while the client waits for the server."""
        self.server.rows = rows_of(2)
        stream = self.client.fetch({"$select": {}}, timeout=1)
        self.successResultOf(stream.next_row())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(60)
        self.assertEqual(self.successResultOf(stream.next_row())["name"], "e1")
        self.assertIsNone(self.successResultOf(stream.next_row()))

    def test_connection_lost(self):
        self.pubsub.handlers["fetch"] = lambda _, body: None
        d = self.consume(self.client.fetch({"$select": {}}))
        self.client.connection_lost(None)
        self.failureResultOf(d, RedisConnectionError)

    def test_concurrent_fetches(self):
        """Streams interleave on one client, each with its own channel and rows."""
        self.pubsub.handlers["fetch"] = lambda _, body: None
        streams = [self.client.fetch({"$select": {"$where": {"pid": f"p{i}"}}}) for i in range(3)]
        results = [self.consume(s) for s in streams]
        self.assertEqual(len({s.channel for s in streams}), 3)
        for n in range(2):
            for i, s in enumerate(streams):
                self.server.send(s.channel, rows_of(2, f"p{i}")[n])
                if n:
                    # the second row of a stream came after the first was accepted
                    self.assertEqual(self.pubsub.published("fetch-next")[-1:],
                                     [{"channel": s.channel}])
        for s in reversed(streams):
            self.server.send(s.channel, "end")
        for i, d in enumerate(results):
            self.assertEqual([r["pid"] for r in self.successResultOf(d)], [f"p{i}"] * 2)

    def test_two_waiters_refused(self):
        self.pubsub.handlers["fetch"] = lambda _, body: None
        stream = self.client.fetch({"$select": {}})
        stream.next_row()
        self.assertRaises(RuntimeError, stream.next_row)
        stream.aclose()

    def test_cancel_waiting_consumer(self):
        self.pubsub.handlers["fetch"] = lambda _, body: None
        stream = self.client.fetch({"$select": {}})
        d = stream.next_row()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.successResultOf(stream.aclose())

    def test_arguments(self):
        self.assertRaises(ValueError, self.client.fetch, {"$select": {}}, window=0)
        self.assertRaises(ValueError, self.client.fetch, {"$select": {}}, window=1.5)
        self.assertRaises(ValueError, self.client.fetch, "SELECT 1")
        self.assertRaises(ValueError, EventSourceClient, self.pubsub, self.clock,
                          accept_via="carrier pigeon")

    def test_shortcuts(self):
        self.server.rows = rows_of(1)
        self.successResultOf(self.consume(self.client.fetch_by_pid("p9")))
        self.successResultOf(self.consume(self.client.fetch_by_name("user")))
        self.successResultOf(self.consume(self.client.fetch_by_name("user", "created",
                                                                    table="db.t", window=3)))
        queries = [r["query"] for r in self.server.requests]
        self.assertEqual(queries, [
            {"$select": {"$where": {"pid": "p9"}}},
            {"$select": {"$where": {"domain": "user"}}},
            {"$select": {"$where": {"domain": "user", "name": "created"}, "$from": "db.t"}},
        ])
        self.assertEqual(self.server.requests[2]["window"], 3)


class CallbackStyleTests(ClientTestCase):
    def test_fetch_each(self):
        self.server.rows = rows_of(3)
        seen = []
        d = self.client.fetch_each({"$select": {}}, lambda row: seen.append(row["name"]))
        self.assertEqual(self.successResultOf(d), 3)
        self.assertEqual(seen, ["e0", "e1", "e2"])

    def test_fetch_each_waits_for_deferred(self):
        """A row is accepted only once the Deferred on_row returned has fired."""
        self.server.rows = rows_of(2)
        pending = []

        def on_row(row):
            pending.append(Deferred())
            return pending[-1]

        d = self.client.fetch_each({"$select": {}}, on_row)
        self.assertEqual(len(pending), 1)
        self.assertEqual(self.server.acceptances, [])
        pending[0].callback(None)
        self.assertEqual(len(self.server.acceptances), 1)
        pending[1].callback(None)
        self.assertEqual(self.successResultOf(d), 2)

    def test_fetch_each_error_ends_stream(self):
        self.server.rows = rows_of(3)

        def on_row(row):
            raise ValueError("no")

        self.failureResultOf(self.client.fetch_each({"$select": {}}, on_row), ValueError)
        self.assertEqual(self.pubsub.published(self.server.requests[0]["channel"]), ["end"])

    def test_fetch_each_cancel_ends_stream(self):
        self.server.rows = rows_of(3)
        d = self.client.fetch_each({"$select": {}}, lambda row: Deferred())
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.pubsub.published(self.server.requests[0]["channel"]), ["end"])

    def test_fetch_all(self):
        self.server.rows = rows_of(4)
        rows = self.successResultOf(self.client.fetch_all({"$select": {}}, window=2))
        self.assertEqual([r["data"]["i"] for r in rows], [0, 1, 2, 3])


class LowLevelTests(ClientTestCase):
    def test_original_readme_flow(self):
        """subscribe / on / publish, with JSON in and out, as the original README."""
        messages = []
        self.successResultOf(self.client.subscribe("test-persist-channel"))
        self.client.on("test-persist-channel", messages.append)
        receivers = self.successResultOf(self.client.publish("persist", {
            "channel": "test-persist-channel",
            "query": {"$insert": {"$documents": {"pid": "p", "domain": "d", "name": "n"}}}}))
        self.assertEqual(receivers, 1)
        self.assertEqual(messages[0]["affectedRows"], 1)
        self.assertEqual(messages[1], "end")

    def test_publish_encodes_json(self):
        self.successResultOf(self.client.publish("somewhere", "end"))
        self.successResultOf(self.client.publish("somewhere", {"a": [1, "é"]}))
        self.assertEqual([c[2] for c in self.pubsub.calls], ['"end"', '{"a":[1,"é"]}'])

    def test_non_json_delivered_as_text(self):
        messages = []
        self.client.subscribe("c")
        self.client.on("c", messages.append)
        self.pubsub.deliver("c", "not json")
        self.assertEqual(messages, ["not json"])

    def test_off_and_failing_listener(self):
        messages = []

        def broken(message):
            raise RuntimeError("listener bug")

        self.client.subscribe("c")
        self.client.on("c", broken)
        self.client.on("c", messages.append)
        self.pubsub.deliver("c", "1")
        self.assertEqual(messages, [1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.client.off("c", broken)
        self.client.off("c", messages.append)
        self.pubsub.deliver("c", "2")
        self.assertEqual(messages, [1])
        self.client.on("c", messages.append)
        self.client.off("c")
        self.pubsub.deliver("c", "3")
        self.assertEqual(messages, [1])

    def test_resubscribe_after_reconnect(self):
        self.successResultOf(self.client.subscribe("a"))
        self.successResultOf(self.client.subscribe("b"))
        self.successResultOf(self.client.unsubscribe("b"))
        self.pubsub.calls.clear()
        self.client.connection_made()
        self.assertEqual(self.pubsub.calls, [("subscribe", "a")])


class DisconnectTests(ClientTestCase):
    def test_disconnect_ends_open_requests(self):
        self.server.rows = rows_of(3)
        persists = self.pubsub.handlers["persist"]
        self.pubsub.handlers["persist"] = lambda channel, body: None
        waiting_persist = self.client.persist({"pid": "p"})
        self.pubsub.handlers["persist"] = persists
        stream = self.client.fetch({"$select": {}})
        self.successResultOf(stream.next_row())
        self.successResultOf(self.client.disconnect())
        self.failureResultOf(waiting_persist, RedisConnectionError)
        self.assertEqual(self.pubsub.published(stream.channel), ["end"])
        self.failureResultOf(stream.next_row(), RedisConnectionError)
        self.assertTrue(self.pubsub.disconnected)
        self.failureResultOf(self.client.persist({"pid": "p"}), RedisConnectionError)
        self.failureResultOf(self.client.publish("x", 1), RedisConnectionError)


class DecodeTests(SynchronousTestCase):
    def test_decode(self):
        self.assertEqual(client_module.decode('"end"'), "end")
        self.assertEqual(client_module.decode("end"), "end")
        self.assertEqual(client_module.decode(b'{"a": 1}'), {"a": 1})
        self.assertEqual(client_module.decode(b"\xff"), b"\xff")
        self.assertEqual(client_module.decode(7), 7)

    def test_encode(self):
        self.assertEqual(client_module.encode("accepted"), '"accepted"')


class RedisPubSubTests(SynchronousTestCase):
    """The real Redis boundary, on an endpoint that refuses every attempt."""

    def test_first_refused_attempt_is_final(self):
        """connect() fails on the first refused attempt of either connection,
        told by the endpoint (not by txredisapi's pool internals), and stops
        retrying."""
        from twisted.internet import reactor

        clock = Clock()
        attempts = []

        class Refusing:
            def connect(self, factory):
                attempts.append(factory)
                return defer.fail(ConnectionRefusedError("refused"))

        before = set(reactor.getDelayedCalls())
        d = RedisPubSub(Refusing()).start(clock, timeout=5)
        clock.advance(0)
        failure = self.failureResultOf(d, RedisConnectionError)
        self.assertIn("cannot connect to Redis", str(failure.value))
        self.assertIn("refused", str(failure.value))
        self.assertEqual(len(attempts), 2)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual([call for call in reactor.getDelayedCalls()
                          if call not in before and call.active()], [])


class SharedProtocolTests(SynchronousTestCase):
    """The client speaks with the server's own words and codec (eventsource.wire)."""

    def test_codec_is_the_servers(self):
        self.assertIs(client_module.encode, wire.encode_body)
        self.assertIs(client_module.decode, wire.decode_body)
        self.assertEqual(wire.encode_body(wire.END), wire.END_BODY)
        self.assertEqual(wire.encode_body(wire.ACCEPTED), wire.ACCEPTED_BODY)
        self.assertEqual((client_module.PERSIST, client_module.FETCH, client_module.FETCH_NEXT),
                         REQUEST_CHANNELS[:3])

    def test_no_protocol_word_written_in_the_client(self):
        """No module of the client package spells a control word or a request
        channel itself: they come from eventsource.wire."""
        # ("subscribe" is also the name of the Redis command the client sends)
        words = {wire.END, wire.ERROR, wire.TIMEOUT, wire.ACCEPTED, *REQUEST_CHANNELS} - {
            wire.SUBSCRIBE}
        folder = os.path.dirname(client_module.__file__)
        found = []
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
                found += [(name, node.lineno, node.value) for node in ast.walk(tree)
                          if isinstance(node, ast.Constant) and node.value in words
                          and not _is_field_name(tree, node)]
        self.assertGreater(len(os.listdir(folder)), 4)
        self.assertEqual(found, [])

    def test_fetch_next_bodies_read_back_by_the_server(self):
        """What the client sends on fetch-next is what the server's parser reads."""
        for request in (wire.NextRequest("c"), wire.NextRequest("c", 7),
                        wire.NextRequest("c", end=True)):
            self.assertEqual(wire.parse_request(wire.FETCH_NEXT, wire.encode_next(request),
                                                10_000), request)
        self.assertEqual(wire.encode_next(wire.NextRequest("c")), '{"channel":"c"}')
        self.assertEqual(wire.encode_next(wire.NextRequest("c", end=True)),
                         '{"channel":"c","end":true}')


def _is_field_name(tree, constant):
    """Whether ``constant`` is a key of a dict display or subscript (a JSON
    field such as ``"end"`` in ``{"end": true}``), not a word of the protocol."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict) and constant in node.keys:
            return True
        if isinstance(node, ast.Subscript) and node.slice is constant:
            return True
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get" and node.args[:1] == [constant]):
            return True
    return False


class RequestMachineTests(ClientTestCase):
    """Each request is a model of the one shared machine of _requests."""

    def test_fetch_goes_through_its_states(self):
        self.server.rows = rows_of(1)
        self.pubsub.hold_subscribes = True
        stream = self.client.fetch({"$select": {}})
        request = stream._request
        self.assertIs(request.state, RequestState.NEW)
        d = stream.next_row()
        self.assertIs(request.state, RequestState.SUBSCRIBING)
        self.pubsub.held.popleft().callback(None)
        self.assertIs(request.state, RequestState.OPEN)
        self.assertEqual(self.successResultOf(d)["name"], "e0")
        self.assertIsNone(self.successResultOf(stream.next_row()))
        self.assertIs(request.state, RequestState.ENDED)

    def test_terminal_states(self):
        """ended, failed (with the error) and closed: as the outcome of each."""
        self.server.persist_answer = ["error"]
        d = self.client.persist({"pid": "p"})
        self.failureResultOf(d, ServerError)
        stream = self.client.fetch({"$select": {}})
        self.successResultOf(stream.aclose())
        self.assertIs(stream._request.state, RequestState.CLOSED)
        self.pubsub.handlers["persist"] = lambda channel, body: None
        d = self.client.persist({"pid": "p"})
        [request] = self.client._requests.values()
        self.assertIs(request.state, RequestState.OPEN)
        d.cancel()
        self.assertIs(request.state, RequestState.CLOSED)
        self.failureResultOf(d, defer.CancelledError)

    def test_one_shared_machine_no_models(self):
        """Requests are driven through the one machine without registering with
        it, so a request dropped unfinished leaves nothing behind there."""
        self.server.rows = rows_of(3)
        self.successResultOf(self.client.persist({"pid": "p"}))
        self.successResultOf(self.client.fetch_all({"$select": {}}, window=2))
        self.client.fetch({"$select": {}})
        gc.collect()
        self.assertIsInstance(_requests.MACHINE, Machine)
        self.assertEqual(_requests.MACHINE.models, [])
        self.assertEqual(self.client.open_requests, 0)

    def test_terminal_states_swallow_every_input(self):
        for state in _requests.TERMINAL:
            for name in _requests.INPUTS:
                pubsub = MemoryPubSub()
                request = _requests.FetchRequest(EventSourceClient(pubsub, self.clock),
                                                 {"query": {}}, 1, 1, False, "fetch-next")
                request.state = state
                args = {"request_published": (0,), "accept_published": (0,),
                        "row_received": ({"n": 1},), "result_received": ({},),
                        "unexpected_received": (1,), "redis_failed": (None,),
                        "connection_lost": (None,), "client_closed": (None,)}.get(name, ())
                _requests.MACHINE.events[name].trigger(request, *args)
                self.assertIs(request.state, state, name)
                self.assertEqual(pubsub.calls, [], name)

    def test_direct_inputs(self):
        """Only unconditional internal transitions of the table skip the trigger:
        a row on a live fetch, a subscription's marker, a message nobody
        expects, and every late input."""
        live = {(state, name): callbacks for (state, name), callbacks in _requests.DIRECT.items()
                if state not in _requests.TERMINAL}
        self.assertEqual(live, {
            (RequestState.SUBSCRIBING, "row_received"): ("take_row",),
            (RequestState.OPEN, "row_received"): ("take_row",),
            (RequestState.SUBSCRIBING, "unexpected_received"): ("warn_unexpected",),
            (RequestState.OPEN, "unexpected_received"): ("warn_unexpected",),
            (RequestState.SUBSCRIBING, "marker_received"): ("take_marker",),
            (RequestState.OPEN, "marker_received"): ("take_marker",),
        })
        late = {key for key, callbacks in _requests.DIRECT.items() if key not in live}
        self.assertEqual(late, {(state, name) for state in _requests.TERMINAL
                                for name in _requests.INPUTS if name != "subscribed"})
        self.assertFalse(any(_requests.DIRECT[key] for key in late))

    def test_impossible_input_is_a_bug(self):
        """A live request given an input its state cannot have raises (a bug),
        never silently ignores it."""
        self.pubsub.handlers["fetch"] = lambda channel, body: None
        stream = self.client.fetch({"$select": {}})
        d = stream.next_row()
        request = stream._request
        self.assertRaises(MachineError, _requests.MACHINE.events["opened"].trigger, request)
        self.assertRaises(MachineError, _requests.MACHINE.events["subscribed"].trigger,
                          request)
        self.successResultOf(stream.aclose())
        self.assertIsNone(self.successResultOf(d))

    def test_one_input_per_message(self):
        """Each message on the reply channel is exactly one input of the machine."""
        fired = []
        real = _requests._Request._fire

        def recording(request, name, *args):
            fired.append(name)
            return real(request, name, *args)

        self.patch(_requests._Request, "_fire", recording)
        self.pubsub.handlers["fetch"] = lambda channel, body: None
        stream = self.client.fetch({"$select": {}}, window=4)
        d = stream.next_row()
        del fired[:]
        for body in ('{"n":1}', '"accepted"', "null", '"timeout"'):
            self.pubsub.deliver(stream.channel, body)
        self.assertEqual(fired, ["row_received", "accepted_received", "unexpected_received",
                                 "timeout_received"])
        self.assertEqual(self.successResultOf(d), {"n": 1})
        self.failureResultOf(stream.next_row(), StreamTimeout)


# -- against a real redis-server and a real server process ----------------------------
#
# Each test run starts its own redis-server on a free port (so no other
# eventsource server on the machine's Redis hears our requests: the request
# channels are fixed names) and one ``twistd eventsource`` process on it, with
# a database of its own.  Both are started on first use, shared by this
# module and tests.test_cli, and stopped when the test process exits.

#: the fixture server's row timeout, seconds
ROW_TIMEOUT = 1.0
#: the fixture server's window cap
MAX_WINDOW = 50
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def redis_command(port, *words, timeout=2.0):
    """One Redis command over a plain socket; returns the raw reply bytes."""
    command = b"*%d\r\n" % len(words) + b"".join(
        b"$%d\r\n%s\r\n" % (len(w.encode()), w.encode()) for w in words)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(command)
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply


def _wait_for(predicate, seconds, what, process=None, log_path=None):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.05)
    log = ""
    if log_path and os.path.exists(log_path):
        with open(log_path, encoding="utf-8", errors="replace") as f:
            log = f.read()[-3000:]
    raise RuntimeError(f"{what} did not start\n{log}")


class ServerFixture:
    """A private Redis and a ``twistd eventsource`` process serving a private table."""

    def __init__(self):
        self.redis = RedisServer().start_now()
        self.redis_port = self.redis.port
        self.database = "es_test_client_" + uuid.uuid4().hex[:8]
        self.channel_prefix = "es-test:"
        self.table = self.database + ".event"
        self.folder = tempfile.mkdtemp(prefix="es-test-")
        self.log_path = os.path.join(self.folder, "server.log")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [CHECKOUT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        for name in list(env):
            if name.startswith(("REDIS_", "EVENTSOURCE_")):
                del env[name]
        self.env = env
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                 "-n", "--pidfile=", "eventsource", "--redis-port", str(self.redis_port),
                 "--table", self.table, "--row-timeout", str(ROW_TIMEOUT),
                 "--max-window", str(MAX_WINDOW), "--channel-prefix", self.channel_prefix],
                cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT)
        atexit.register(self.stop)
        _wait_for(self.listening, 30, "twistd eventsource", self.process, self.log_path)

    def listening(self):
        return redis_command(self.redis_port, "PUBSUB", "NUMSUB",
                             self.channel_prefix + "persist").endswith(
            b":1\r\n")

    async def numsub(self, client, channel):
        """How many subscribers ``channel`` has, asked over the client's publisher."""
        handler = client._pubsub._publisher_factory.handler
        reply = await handler.execute_command("PUBSUB", "NUMSUB", channel)
        return int(reply[1])

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.redis.kill()
        try:
            import pymysql

            connection = pymysql.connect(host="127.0.0.1", user="root", password="")
            with connection:
                connection.cursor().execute(f"DROP DATABASE IF EXISTS `{self.database}`")
        except Exception:
            pass


_shared = []


def shared_fixture():
    """The one server fixture of this test process, started on first use."""
    if not _shared:
        _shared.append(ServerFixture())
    return _shared[0]



class IntegrationTests(TestCase):
    """The real client, a private redis-server, ``twistd eventsource``, MariaDB."""

    timeout = 30

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.fixture = shared_fixture()
        self.pid = unique("pid")

    async def connect(self, **kwargs):
        kwargs.setdefault("port", self.fixture.redis_port)
        kwargs.setdefault("channel_prefix", self.fixture.channel_prefix)
        client = await connect(reactor=self.reactor, **kwargs)
        self.addCleanup(client.disconnect)
        return client

    async def persist_some(self, client, count, pid=None):
        documents = [{"pid": pid or self.pid, "domain": "test", "name": f"e{i}",
                      "data": {"i": i, "text": "é🎉"}} for i in range(count)]
        return await client.persist(documents)

    def test_persist_then_fetch(self):
        async def go():
            client = await self.connect()
            result = await self.persist_some(client, 3)
            self.assertEqual(result.affected_rows, 3)
            self.assertGreater(result.insert_id, 0)
            rows = [row async for row in client.fetch_by_pid(self.pid)]
            self.assertEqual([r["name"] for r in rows], ["e0", "e1", "e2"])
            self.assertEqual(rows[0]["data"], {"i": 0, "text": "é🎉"})
            self.assertIsInstance(rows[0].raw["data"], str)
            self.assertRegex(rows[0]["timestamp"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
            named = await client.fetch_all(
                {"$select": {"$where": {"pid": self.pid, "name": "e1"}}})
            self.assertEqual([r["data"]["i"] for r in named], [1])
            self.assertEqual(client.open_requests, 0)

        return run(go())

    def test_string_data_comes_back_as_that_string(self):
        """A Python str is stored as a JSON string, not read as JSON text."""
        async def go():
            client = await self.connect()
            for data in ("hello", '{"not": "an object"}', ""):
                await client.persist_event(self.pid, "test", "s", data)
            rows = [row async for row in client.fetch_by_pid(self.pid)]
            self.assertEqual([r["data"] for r in rows], ["hello", '{"not": "an object"}', ""])
            self.assertEqual(rows[0].raw["data"], '"hello"')

        return run(go())

    def test_windowed_fetch(self):
        async def go():
            client = await self.connect()
            await self.persist_some(client, 250)
            rows = [row async for row in client.fetch_by_pid(self.pid, window=64)]
            self.assertEqual([r["data"]["i"] for r in rows], list(range(250)))
            # a window above the server's cap (the fixture runs --max-window 50)
            rows = [row async for row in client.fetch_by_pid(self.pid, window=1000)]
            self.assertEqual(len(rows), 250)

        return run(go())

    def test_early_exit_ends_the_server_stream(self):
        """break sends "end": the server stops and leaves the reply channel."""
        async def go():
            client = await self.connect()
            await self.persist_some(client, 5)
            stream = client.fetch_by_pid(self.pid)
            channel = stream.channel
            async for _row in stream:
                self.assertEqual(await self.fixture.numsub(client, channel), 2)
                break
            del stream
            gc.collect()
            for _ in range(50):
                if await self.fixture.numsub(client, channel) == 0:
                    break
                await sleep(0.02)
            self.assertEqual(await self.fixture.numsub(client, channel), 0)
            self.assertEqual(client.open_requests, 0)

        return run(go())

    def test_concurrent_fetches(self):
        async def go():
            client = await self.connect()
            pids = [f"{self.pid}-{n}" for n in range(8)]
            await defer.gatherResults([
                defer.ensureDeferred(self.persist_some(client, 20, pid)) for pid in pids])

            async def read(pid, window):
                return [(r["pid"], r["data"]["i"]) async for r in
                        client.fetch_by_pid(pid, window=window)]

            results = await defer.gatherResults([
                defer.ensureDeferred(read(pid, 1 + n % 3 * 4)) for n, pid in enumerate(pids)])
            for pid, rows in zip(pids, results, strict=True):
                self.assertEqual(rows, [(pid, i) for i in range(20)])

        return run(go())

    def test_server_error_and_stream_timeout(self):
        async def go():
            client = await self.connect()
            with self.assertRaises(ServerError):
                await client.persist({"pid": self.pid, "domain": "d"})
            with self.assertRaises(ServerError):
                await client.fetch_all({"$select": {"$from": "mysql.user"}})
            await self.persist_some(client, 2)
            stream = client.fetch_by_pid(self.pid)
            await stream.next_row()
            await sleep(ROW_TIMEOUT + 0.3)
            with self.assertRaises(StreamTimeout):
                await stream.next_row()

        return run(go())

    def test_no_server_fails_fast(self):
        async def go():
            lonely = await RedisServer(self).start()
            client = await self.connect(port=lonely.port, timeout=20)
            started = self.reactor.seconds()
            with self.assertRaises(NoServerError):
                await client.persist({"pid": "p", "domain": "d", "name": "n"})
            with self.assertRaises(NoServerError):
                await client.fetch_all({"$select": {}})
            self.assertLess(self.reactor.seconds() - started, 1)

        return run(go())

    def test_redis_gone_fails_open_requests(self):
        """A Redis that dies under an open request fails it at once, not at the timeout."""
        async def go():
            redis = await RedisServer(self).start()
            client = await self.connect(port=redis.port, timeout=20)
            # something listens on persist, but never answers
            mute = await self.connect(port=redis.port)
            await mute.subscribe(self.fixture.channel_prefix + "persist")
            d = client.persist({"pid": "p", "domain": "d", "name": "n"})
            await sleep(0.1)
            started = self.reactor.seconds()
            redis.kill()
            with self.assertRaises(RedisConnectionError):
                await d
            self.assertLess(self.reactor.seconds() - started, 2)

        return run(go())

    def test_connect_refused(self):
        async def go():
            started = self.reactor.seconds()
            with self.assertRaises(RedisConnectionError) as caught:
                await connect(port=free_port(), reactor=self.reactor)
            self.assertIn("cannot connect to Redis", str(caught.exception))
            self.assertLess(self.reactor.seconds() - started, 2)

        return run(go())

    def test_low_level_original_style(self):
        """The original README's flow, message for message."""
        async def go():
            client = await self.connect()
            channel = unique("test-persist-channel")
            messages = []
            done = Deferred()
            await client.subscribe(channel)

            def on_message(message):
                messages.append(message)
                if message == "end":
                    done.callback(None)

            client.on(channel, on_message)
            await client.publish(client.request_channel("persist"), {"channel": channel, "query": {"$insert": {
                "$documents": {"pid": self.pid, "domain": "d", "name": "n", "data": {"a": 1}}}}})
            await done
            self.assertEqual(messages[0]["affectedRows"], 1)
            self.assertEqual(messages[1:], ["end"])
            await client.unsubscribe(channel)

        return run(go())
