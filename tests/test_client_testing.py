"""
Tests for :mod:`eventsource.client.testing`, the in-memory doubles shipped
for people who test code that uses the client (as ``treq.testing``).
"""

import json
import os
import unittest

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from eventsource.client import EventSourceClient, NoServerError, ServerError
from eventsource.client.testing import FakeServer, MemoryPubSub
from eventsource.wire import encode_ok_packet


class DocumentedExampleTests(SynchronousTestCase):
    def test_module_example(self):
        """The module's own example runs as written, synchronously."""
        pubsub = MemoryPubSub()
        FakeServer(pubsub, rows=[{"pid": "p1", "name": "created", "data": "{}"}])
        client = EventSourceClient(pubsub, Clock())
        rows = self.successResultOf(client.fetch_all({"$select": {}}))
        self.assertEqual(rows, [{"pid": "p1", "name": "created", "data": {}}])

    def test_docs_example(self):
        """docs/CLIENT.md's example of testing code that uses the client runs and passes."""
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "docs", "CLIENT.md")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        section = text[text.index("## Testing code that uses the client"):]
        code = section[section.index("```python\n") + 10:section.index("```\n", 1)]
        namespace = {"__name__": "client_md_example"}
        exec(compile(code, path, "exec"), namespace)
        result = unittest.TestResult()
        namespace["LastEventTests"]("test_last_event_name").run(result)
        self.assertEqual((result.errors, result.failures), ([], []))
        self.assertEqual(result.testsRun, 1)

    def test_all(self):
        from eventsource.client import testing

        self.assertEqual(sorted(testing.__all__), ["FakeServer", "MemoryPubSub"])


class MemoryPubSubTests(SynchronousTestCase):
    def setUp(self):
        self.pubsub = MemoryPubSub()
        self.heard = []
        self.pubsub.receiver = self

    def message_received(self, channel, body):
        self.heard.append((channel, body))

    def test_echo_and_receivers(self):
        """A channel subscribed to hears what is published on it, as Redis echoes it."""
        self.successResultOf(self.pubsub.subscribe("c"))
        self.assertEqual(self.successResultOf(self.pubsub.publish("c", '"x"')), 1)
        self.assertEqual(self.successResultOf(self.pubsub.publish("d", '"y"')), 0)
        self.assertEqual(self.heard, [("c", '"x"')])
        self.successResultOf(self.pubsub.unsubscribe("c"))
        self.pubsub.deliver("c", '"z"')
        self.assertEqual(self.heard, [("c", '"x"')])
        self.assertEqual(self.pubsub.calls, [("subscribe", "c"), ("publish", "c", '"x"'),
                                             ("publish", "d", '"y"'), ("unsubscribe", "c")])
        self.assertEqual(self.pubsub.published("c"), ["x"])

    def test_held_calls(self):
        self.pubsub.hold_subscribes = True
        d = self.pubsub.subscribe("c")
        self.assertNoResult(d)
        self.assertEqual(self.pubsub.subscribed, set())
        self.pubsub.held.popleft().callback(None)
        self.assertEqual(self.successResultOf(d), ["subscribe", "c", 1])
        self.pubsub.hold_publishes = True
        d = self.pubsub.publish("c", "1")
        self.assertNoResult(d)
        self.pubsub.held.popleft().callback(None)
        self.assertEqual(self.successResultOf(d), 1)

    def test_disconnect(self):
        self.successResultOf(self.pubsub.disconnect())
        self.assertTrue(self.pubsub.disconnected)


class FakeServerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.pubsub = MemoryPubSub()

    def test_persist_answers_the_servers_ok_packet(self):
        FakeServer(self.pubsub)
        client = EventSourceClient(self.pubsub, self.clock)
        result = self.successResultOf(client.persist([{"pid": "p"}, {"pid": "q"}]))
        self.assertEqual(result.raw, json.loads(encode_ok_packet(2, 1)))

    def test_scripted_answer(self):
        server = FakeServer(self.pubsub)
        server.persist_answer = ["error"]
        client = EventSourceClient(self.pubsub, self.clock)
        self.failureResultOf(client.persist({"pid": "p"}), ServerError)

    def test_prefix(self):
        server = FakeServer(self.pubsub, rows=[{"n": 1}], prefix="es:app1:")
        client = EventSourceClient(self.pubsub, self.clock, channel_prefix="es:", tenant="app1")
        self.assertEqual(self.successResultOf(client.fetch_all({"$select": {}})), [{"n": 1}])
        self.assertEqual(len(server.requests), 1)
        self.failureResultOf(EventSourceClient(self.pubsub, self.clock).persist({"pid": "p"}),
                             NoServerError)

    def test_window_and_acceptances(self):
        """Rows go out as the window allows; acceptances make room, recorded."""
        server = FakeServer(self.pubsub, rows=[{"n": i} for i in range(5)], max_window=2)
        client = EventSourceClient(self.pubsub, self.clock)
        stream = client.fetch({"$select": {}}, window=4)
        self.assertEqual(self.successResultOf(stream.next_row()), {"n": 0})
        self.assertEqual(server.streams[stream.channel]["out"], 2)
        rows = self.successResultOf(client.fetch_all({"$select": {}}, window=2))
        self.assertEqual(len(rows), 5)
        self.assertTrue(server.acceptances)
        self.successResultOf(stream.aclose())
        self.assertNotIn(stream.channel, server.streams)
