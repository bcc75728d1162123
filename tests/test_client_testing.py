"""
Tests for :mod:`eventsource.client.testing`, the in-memory doubles shipped
for people who test code that uses the client (as ``treq.testing``).
"""

import json
import os
import unittest

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from eventsource.client import (
    EventSourceClient,
    NoServerError,
    ServerError,
    WrongExpectedVersion,
)
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

    def test_docs_version_2_example(self):
        """docs/CLIENT.md's version 2 testing example runs, in the setting of the first."""
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "docs", "CLIENT.md")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        section = text[text.index("## Testing code that uses the client"):]
        section = section[section.index("With version 2:"):]
        code = section[section.index("```python\n") + 10:section.index("```\n", 1)]
        pubsub = MemoryPubSub()
        namespace = {"self": self, "clock": Clock(), "pubsub": pubsub,
                     "server": FakeServer(pubsub), "EventSourceClient": EventSourceClient,
                     "FakeServer": FakeServer}
        exec(compile(code, path, "exec"), namespace)
        self.assertEqual(len(namespace["server"].events), 2)

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


class FakeServerVersion2Tests(SynchronousTestCase):
    """The fake server's version 2: what it answers, on the wire, to requests a
    client could send (docs/PROTOCOL.md's shapes, the server's codec)."""

    ID = "01890a5d-ac96-774b-bcce-b30209%06d"

    def setUp(self):
        self.pubsub = MemoryPubSub()
        self.heard = []
        self.pubsub.receiver = self
        self.server = FakeServer(self.pubsub)
        self.channels = 0

    def message_received(self, channel, body):
        self.heard.append((channel, json.loads(body)))

    def request(self, kind, body):
        if kind == "fetch":
            body = dict({"window": 100}, **body)  # (nothing to accept)
        self.channels += 1
        channel = f"r{self.channels}"
        self.pubsub.subscribe(channel)
        self.pubsub.publish(kind, json.dumps(dict(body, channel=channel)))
        messages = [m for c, m in self.heard if c == channel]
        self.assertEqual(messages[-1], "end", messages)
        return messages[:-1]

    def persist(self, documents, **fields):
        [answer] = self.request("persist", dict(
            {"v": 2, "query": {"$insert": {"$documents": documents}}}, **fields))
        return answer

    def doc(self, pid="p", n=None, **extra):
        document = dict({"pid": pid, "domain": "d", "name": "n"}, **extra)
        if n is not None:
            document["eventId"] = self.ID % n
        return document

    def code(self, answer):
        return answer["error"]["code"]

    def test_versions_positions_and_ids(self):
        answer = self.persist([self.doc("a", 1), self.doc("b", 2), self.doc("a", 3)])
        self.assertEqual(answer, {"events": [
            {"eventId": self.ID % 1, "pid": "a", "version": 0, "position": 1},
            {"eventId": self.ID % 2, "pid": "b", "version": 0, "position": 2},
            {"eventId": self.ID % 3, "pid": "a", "version": 1, "position": 3}],
            "duplicate": False})
        made = self.persist([self.doc("a")])["events"][0]
        self.assertEqual((made["version"], made["position"]), (2, 4))
        self.assertRegex(made["eventId"], r"^[0-9a-f-]{36}$")
        self.assertEqual(len(self.server.events), 4)

    def test_expected_versions(self):
        self.persist([self.doc("a")])
        self.assertNotIn("error", self.persist([self.doc("a")], expectedVersion=0))
        self.assertEqual(self.persist([self.doc("a")], expectedVersion=0)["error"], {
            "code": "wrongExpectedVersion", "message": 'stream "a" is at version 1, not version 0',
            "pid": "a", "expected": 0, "actual": 1})
        self.assertEqual(self.persist([self.doc("b")], expectedVersion="streamExists")["error"]
                         ["message"], 'stream "b" has no events, not at least one event')
        self.assertEqual(self.persist([self.doc("a")], expectedVersion="noStream")["error"]
                         ["message"], 'stream "a" is at version 1, not no events')
        answer = self.persist([self.doc("a"), self.doc("b")],
                              expectedVersions={"b": "noStream", "a": 5})
        self.assertEqual((answer["error"]["pid"], answer["error"]["actual"]), ("a", 1))
        self.assertEqual(len(self.server.events), 2)
        self.assertNotIn("error", self.persist([self.doc("a"), self.doc("b")],
                                               expectedVersions={"b": "noStream", "a": 1}))

    def test_idempotency(self):
        first = self.persist([self.doc("a", 1), self.doc("a", 2)])
        again = self.persist([self.doc("a", 1), self.doc("a", 2)], expectedVersion="noStream")
        self.assertEqual(again, dict(first, duplicate=True))
        for documents in ([self.doc("a", 1)] * 1 + [self.doc("a", 3)],   # only some
                          [self.doc("b", 1), self.doc("b", 2)],          # another stream
                          [self.doc("a", 2), self.doc("a", 1)]):         # another order
            answer = self.persist(documents)
            self.assertEqual(self.code(answer), "idempotencyConflict", documents)
            self.assertIn(answer["error"]["eventId"], (self.ID % 1, self.ID % 2))
        self.assertEqual(len(self.server.events), 2)

    def test_bad_requests(self):
        self.assertEqual(self.code(self.persist([self.doc()], colour=1)), "badRequest")
        self.assertEqual(self.code(self.persist([self.doc(colour=1)])), "badRequest")
        self.assertEqual(self.code(self.persist([self.doc(n=1), self.doc()])), "badRequest")
        self.assertEqual(self.code(self.persist([self.doc(n=1), self.doc(n=1)])), "badRequest")
        self.assertEqual(self.code(self.persist([self.doc(eventId="x")])), "badRequest")
        self.assertEqual(self.code(self.persist([self.doc("a"), self.doc("b")],
                                                expectedVersion=0)), "badRequest")
        self.assertEqual(self.code(self.persist([self.doc("a")], expectedVersions={"b": 0})),
                         "badRequest")
        self.assertEqual(self.code(self.persist([self.doc("a")], expectedVersion=0,
                                                expectedVersions={"a": 0})), "badRequest")
        self.assertEqual(self.code(self.persist([self.doc("a")], expectedVersion="never")),
                         "badRequest")
        self.assertEqual(self.code(self.persist([self.doc(pid="")])), "badRequest")
        self.assertEqual(self.server.events, [])

    def test_read_only_and_too_large(self):
        self.server.max_documents = 2
        self.assertEqual(self.code(self.persist([self.doc()] * 3)), "tooLarge")
        self.server.read_only = True
        self.assertEqual(self.code(self.persist([self.doc()])), "readOnly")
        self.assertEqual(self.server.events, [])

    def test_fetch(self):
        self.persist([self.doc("a", data={"i": i}) for i in range(4)] + [self.doc("b")])
        rows = self.request("fetch", {"v": 2, "query": {"$select": {
            "$where": {"pid": "a", "version": {"$gte": 1, "$lt": 3}}}}})
        self.assertEqual([list(row) for row in rows], [list(V2_ROW)] * 2)
        self.assertEqual([(r["version"], r["data"]) for r in rows], [(1, {"i": 1}), (2, {"i": 2})])
        rows = self.request("fetch", {"v": 2, "query": {"$select": {
            "$columns": ["pid", "position"], "$where": {"pid": {"$in": ["b"]}}}}})
        self.assertEqual(rows, [{"pid": "b", "position": 5}])
        self.assertEqual(self.request("fetch", {"v": 2, "query": {"$select": {"$limit": 2}}})
                         [-1]["version"], 1)
        self.assertEqual(self.request("fetch", {"v": 2, "query": {"$select": {
            "$columns": ["position"], "$limit": 0}}}), [])
        [refused] = self.request("fetch", {"v": 2, "query": {"$select": {"$columns": ["id"]}}})
        self.assertEqual(self.code(refused), "refused")
        [bad] = self.request("fetch", {"v": 2, "window": 2, "colour": 1, "query": {"$select": {}}})
        self.assertEqual(self.code(bad), "badRequest")
        self.assertRaises(NotImplementedError, self.request, "fetch", {"v": 2, "query": {
            "$select": {"$orderBy": {"version": -1}}}})
        self.assertRaises(NotImplementedError, self.request, "fetch", {"v": 2, "query": {
            "$select": {"$where": {"name": {"$like": "a%"}}}}})

    def test_version_1_server(self):
        """version=1: a server that ignores "v": 2, as an old one does."""
        server = FakeServer(self.pubsub, prefix="old:", version=1)
        [ok] = self.request("old:persist", {"v": 2, "expectedVersion": 7, "query": {
            "$insert": {"$documents": [self.doc()]}}})
        self.assertEqual(ok, json.loads(encode_ok_packet(1, 1)))
        self.assertEqual(self.request("old:fetch", {"v": 2, "query": {"$select": {
            "$columns": ["position"], "$limit": 0}}}), ["error"])
        self.assertEqual(server.events, [])

    def test_scripted_persists(self):
        self.server.persist_answers.extend([FakeServer.LOSE_REPLY, FakeServer.IGNORE,
                                            [{"error": {"code": "busy", "message": "m"}}]])
        for expected_events in (1, 1):
            self.pubsub.publish("persist", json.dumps({"v": 2, "channel": "x", "query": {
                "$insert": {"$documents": [self.doc()]}}}))
            self.assertEqual(len(self.server.events), expected_events)
        self.assertEqual(self.heard, [])
        self.assertEqual(self.code(self.persist([self.doc()])), "busy")
        self.assertEqual(len(self.server.events), 1)
        self.assertIn("duplicate", self.persist([self.doc()]))

    def test_module_example(self):
        """The module docstring's version 2 example runs as written."""
        from eventsource.client import testing

        text = testing.__doc__
        code = text[text.index("    server = FakeServer(pubsub)\n"):].split("\n\n")[0]
        code = "\n".join(line[4:] for line in code.splitlines())
        namespace = {"self": self, "pubsub": MemoryPubSub(), "Clock": Clock,
                     "EventSourceClient": EventSourceClient, "FakeServer": FakeServer,
                     "NO_STREAM": "noStream", "WrongExpectedVersion": WrongExpectedVersion}
        exec(code, namespace)
        self.assertEqual(len(namespace["server"].events), 1)

    def test_module_subscription_example(self):
        """The module docstring's subscription example runs as written."""
        from eventsource.client import testing

        text = testing.__doc__
        code = text[text.index("    subscription = client.subscribe("):].split("\n\"\"\"")[0]
        code = "\n".join(line[4:] for line in code.splitlines())
        pubsub = MemoryPubSub()
        server = FakeServer(pubsub)
        namespace = {"self": self, "server": server,
                     "client": EventSourceClient(pubsub, Clock())}
        exec(code, namespace)
        self.assertEqual(server.subscriptions, {})


class FakeServerSubscriptionTests(SynchronousTestCase):
    """The fake server's subscriptions, on the wire (docs/PROTOCOL.md, "Subscriptions")."""

    def setUp(self):
        self.pubsub = MemoryPubSub()
        self.heard = []
        self.pubsub.receiver = self
        self.server = FakeServer(self.pubsub)
        for i in range(4):
            self.server.add_event("p1" if i % 2 == 0 else "p2", "d", f"n{i}", {"i": i})

    def message_received(self, channel, body):
        self.heard.append((channel, json.loads(body)))

    def subscribe(self, channel="s", **fields):
        self.pubsub.subscribe(channel)
        self.pubsub.publish("subscribe", json.dumps(dict(
            {"v": 2, "channel": channel, "query": {"$select": {}}}, **fields)))
        return channel

    def messages(self, channel="s"):
        return [m.get("position", m) if isinstance(m, dict) else m
                for c, m in self.heard if c == channel]

    def test_history_marker_live_and_window(self):
        self.subscribe(window=2, query={"$select": {"$where": {"pid": "p1"}}})
        self.assertEqual(self.messages(), [1, 3, {"caughtUp": 4}])
        self.server.add_event("p1", "d", "late")
        self.server.add_event("p2", "d", "other")
        self.server.add_event("p1", "d", "later")
        self.assertEqual(self.messages(), [1, 3, {"caughtUp": 4}])  # (the window is full)
        self.server.heartbeat()
        self.pubsub.publish("fetch-next", json.dumps({"channel": "s", "accepted": 2}))
        # the heartbeat waited behind the rows held back
        self.assertEqual(self.messages(), [1, 3, {"caughtUp": 4}, 5, 7, {"heartbeat": 7}])
        row = [m for c, m in self.heard if c == "s"][-2]
        self.assertEqual(list(row), ["position", "eventId", "pid", "version", "domain", "name",
                                     "timestamp", "data"])

    def test_from_end_and_a_position(self):
        self.subscribe("e", **{"from": "end"})
        self.subscribe("n", **{"from": 2})
        self.assertEqual(self.messages("e"), [{"caughtUp": 4}])
        self.assertEqual(self.messages("n"), [3, 4, {"caughtUp": 4}])

    def test_ends(self):
        for channel in ("a", "b", "c"):
            self.subscribe(channel)
        self.pubsub.publish("fetch-next", json.dumps({"channel": "a", "end": True}))
        self.server.time_out("b")
        self.server.shut_down()
        self.assertEqual(self.server.subscriptions, {})
        self.server.add_event("p1", "d", "after")
        self.assertEqual(self.messages("a")[-1], {"caughtUp": 4})
        self.assertEqual(self.messages("b")[-1], "timeout")
        self.assertEqual(self.messages("c")[-2]["error"]["code"], "unavailable")
        self.assertEqual(self.messages("c")[-1], "end")

    def test_refusals(self):
        cases = [({"v": 1}, "badRequest"), ({"extra": 1}, "badRequest"),
                 ({"query": {"$select": {"$limit": 1}}}, "badRequest"),
                 ({"from": -1}, "badRequest"), ({"from": "now"}, "badRequest"),
                 ({"window": 0}, "badRequest"),
                 ({"query": {"$select": {"$where": {"nope": 1}}}}, "refused")]
        for n, (fields, code) in enumerate(cases):
            channel = self.subscribe(f"r{n}", **fields)
            error, end = self.messages(channel)
            self.assertEqual((error["error"]["code"], end), (code, "end"), fields)
        self.assertEqual(self.server.subscriptions, {})

    def test_version_1_server_does_not_listen(self):
        pubsub = MemoryPubSub()
        FakeServer(pubsub, version=1)
        self.assertNotIn("subscribe", pubsub.handlers)


V2_ROW = ("position", "eventId", "pid", "version", "domain", "name", "timestamp", "data")
