"""
Version 1 as the original really behaved, over the real Redis and MariaDB:
ids compared byte for byte, ``data`` stored as JavaScript's ``JSON.stringify``
wrote it (JSON text in a string included), the fields and forms the original
accepted, and no answer where there is nothing to answer.
"""

import json
import shutil
import subprocess

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from eventsource import wire
from eventsource.query import TableSchema, compile_select
from tests.support import IntegrationTestCase, sleep, sql, unique


def event(pid, name="created", domain="order", data=None):
    return {"pid": pid, "domain": domain, "name": name, "data": data}


class CaseSensitiveIdTests(IntegrationTestCase):
    """``p1`` is not ``P1``: stream ids, domains and names are identifiers."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.client.persist([
            event("p1"), event("P1"), event("p1", "Created"), event("P1", "CREATED"),
            event("p1", "paid", "Order"), event("p10"), event("P10")])

    @defer.inlineCallbacks
    def names(self, select):
        select.setdefault("$columns", ["id"])
        messages = yield self.client.fetch(select)
        self.assertEqual(messages[-1], "end")
        return [row["id"] for row in messages[:-1]]

    @defer.inlineCallbacks
    def test_every_query_shape_compares_case(self):
        shapes = [
            ({"$where": {"pid": "p1"}}, [1, 3, 5]),
            ({"$where": {"pid": {"$eq": "P1"}}}, [2, 4]),
            ({"$where": {"pid": {"$ne": "p1"}}}, [2, 4, 6, 7]),
            ({"$where": {"name": "created"}}, [1, 2, 6, 7]),
            ({"$where": {"pid": "p1", "name": "created"}}, [1]),
            ({"$where": {"domain": "Order"}}, [5]),
            ({"$where": {"domain": "order", "name": "CREATED"}}, [4]),
            ({"$where": {"name": {"$like": "created"}}}, [1, 2, 6, 7]),
            ({"$where": {"name": {"$like": "C%"}}}, [3, 4]),
            ({"$where": {"pid": {"$startsWith": "p1"}}}, [1, 3, 5, 6]),
            ({"$where": {"name": {"$endsWith": "ED"}}}, [4]),
            ({"$where": {"name": {"$contains": "reat"}}}, [1, 2, 3, 6, 7]),
            ({"$where": {"pid": {"$in": ["p1", "p10"]}}}, [1, 3, 5, 6]),
            ({"$where": {"pid": {"$nin": ["p1", "p10"]}}}, [2, 4, 7]),
            ({"$where": {"$or": [{"pid": "P1"}, {"name": "Created"}]}}, [2, 3, 4]),
            ({"$where": {"pid": {"$gt": "p"}}}, [1, 3, 5, 6]),
            ({"$where": {"pid": {"$between": {"$min": "P", "$max": "P9"}}}}, [2, 4, 7]),
        ]
        for select, expected in shapes:
            got = yield self.names(dict(select))
            self.assertEqual(got, expected, select)

    @defer.inlineCallbacks
    def test_order_and_groups_are_binary(self):
        messages = yield self.client.fetch({"$columns": ["pid"], "$distinct": True,
                                            "$orderBy": {"pid": 1}})
        self.assertEqual([row["pid"] for row in messages[:-1]], ["P1", "P10", "p1", "p10"])
        messages = yield self.client.fetch({"$columns": ["name", {"n": {"$count": "*"}}],
                                            "$groupBy": ["name"], "$orderBy": {"name": -1}})
        self.assertEqual([(row["name"], row["n"]) for row in messages[:-1]],
                         [("paid", 1), ("created", 4), ("Created", 1), ("CREATED", 1)])

    def explain(self, select):
        plan = compile_select(select, TableSchema(self.database, "event"))
        self.assertTrue(plan.keyset)
        statement, params = plan.page_sql(0, 1000, 100)
        rows = sql("EXPLAIN " + statement, params)
        return [dict(zip(("id", "select_type", "table", "type", "possible_keys", "key",
                          "key_len", "ref", "rows", "extra"), row)) for row in rows]

    def test_indexes_still_serve_keyset_pages_and_pid_lookups(self):
        for select, key in (({"$where": {"pid": "p1"}}, "pid_id"),
                            ({"$where": {"domain": "order", "name": "created"}}, "domain_name_id"),
                            ({}, "PRIMARY")):
            (step,) = self.explain(select)
            self.assertEqual(step["key"], key, step)
            self.assertEqual(step["type"], "range", step)   # from the last id on, not a scan
            self.assertNotIn("filesort", step["extra"] or "", step)


class DataTests(IntegrationTestCase):
    """``data`` is stored and fetched as the original stored it."""

    @defer.inlineCallbacks
    def stored_and_fetched(self, data):
        pid = unique("d")
        reply = yield self.client.persist(event(pid, data=data))
        self.assertEqual(reply[-1], "end")
        self.assertEqual(reply[0]["affectedRows"], 1, reply)
        ((text,),) = sql(f"SELECT data FROM `{self.database}`.event WHERE pid = %s", (pid,))
        messages = yield self.client.fetch({"$where": {"pid": pid}, "$columns": ["data"]})
        self.assertEqual(messages, [{"data": text}, "end"])
        return text

    @defer.inlineCallbacks
    def test_the_originals_own_test_data_sent_as_a_string(self):
        text = yield self.stored_and_fetched('{"foo":"bar"}')
        self.assertEqual(text, '{"foo":"bar"}')
        (row, end) = yield self.client.fetch({"$columns": ["data"]})
        self.assertEqual(json.loads(row["data"]), {"foo": "bar"})   # a value, not a JSON string

    @defer.inlineCallbacks
    def test_json_text_in_a_string_is_stored_as_its_value(self):
        for data, expected in (('{"foo": "bar",  "n": 1.0}', '{"foo":"bar","n":1}'),
                               ("[1, 2]", "[1,2]"), ('"x"', '"x"'), ("true", "true")):
            text = yield self.stored_and_fetched(data)
            self.assertEqual(text, expected)

    @defer.inlineCallbacks
    def test_a_string_that_is_not_json_is_an_error(self):
        for data in ("x", "{", "{'a': 1}", "NaN", ""):
            channel = unique("reply")
            reply = yield self.client.persist(event("bad", data=data), channel=channel)
            self.assertEqual(reply, ["error", "end"], data)
        self.assertEqual(self.rows(), ())

    @defer.inlineCallbacks
    def test_stored_text_is_json_stringify_output(self):
        data = {"foo": "bar", "baz": "qux", "é": "😀", "n": [1.0, 1.5, 1e21, 1e-7, None, True],
                "2": "index keys first", "1": 0, "\u2028": "\\"}
        text = yield self.stored_and_fetched(data)
        self.assertEqual(text, '{"1":0,"2":"index keys first","foo":"bar","baz":"qux",'
                               '"é":"😀","n":[1,1.5,1e+21,1e-7,null,true],"\u2028":"\\\\"}')
        self.assertEqual(len(text.encode("utf-8")), len(text) + 1 + 3 + 2)   # é 😀 U+2028 raw


NODE = shutil.which("node") or shutil.which("nodejs")

#: JSON texts as a client might send them: numbers of every size and form,
#: integer-like keys, escapes, lone surrogates
_keys = st.one_of(st.text(max_size=6), st.integers(0, 2 ** 33).map(str), st.sampled_from(
    ["0", "00", "01", "-1", "4294967294", "4294967295", "1.5", "__proto__", "\ud800"]))
_numbers = st.one_of(st.integers(-(2 ** 70), 2 ** 70), st.floats(allow_nan=False),
                     st.sampled_from([0.0, -0.0, 1e21, 1e-7, 5e-324, 1e300 * 10, 123456789012345678]))
_values = st.recursive(
    st.none() | st.booleans() | _numbers | st.text(max_size=8)
    | st.sampled_from(["\ud800", "a\udfffb", "\u2028\u2029", "\x7f\x00\x1f", "é😀"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=12)


class JavaScriptStringifyTests(SynchronousTestCase):
    """
    Our ``data`` text against Node's own ``JSON.stringify(JSON.parse(text))``
    (what the original stored), on texts hypothesis draws. CI installs
    Node (``.ci/run``): no skipping.
    """

    def node(self, texts):
        script = ("let lines = require('fs').readFileSync(0, 'utf8').split('\\n');"
                  "process.stdout.write(JSON.stringify(lines.filter(l => l).map("
                  "l => JSON.stringify(JSON.parse(l)))));")
        result = subprocess.run([NODE, "-e", script], input="\n".join(texts), capture_output=True,
                                text=True, check=True, encoding="utf-8", errors="surrogatepass")
        return json.loads(result.stdout)

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(_values, min_size=50, max_size=50))
    def test_same_text_as_node(self, values):
        self.assertIsNotNone(NODE, "Node.js is needed (the original's runtime): .ci/run installs it")
        texts = [json.dumps(value, allow_nan=True) for value in values]   # ASCII: escapes kept
        ours = [wire.json_stringify(wire.decode_json(text.replace("Infinity", "1e999")))
                for text in texts]
        theirs = self.node([text.replace("Infinity", "1e999") for text in texts])
        self.assertEqual(ours, theirs)


class LenientFieldsTests(IntegrationTestCase):
    """What the original accepted, where it is unambiguous and safe."""

    @defer.inlineCallbacks
    def test_limit_and_offset_as_decimal_strings(self):
        yield self.client.persist([event(f"p{i}") for i in range(5)])
        messages = yield self.client.fetch({"$columns": ["pid"], "$limit": "2", "$offset": "1"})
        self.assertEqual(messages, [{"pid": "p1"}, {"pid": "p2"}, "end"])

    @defer.inlineCallbacks
    def test_extra_request_fields_are_ignored(self):
        channel = unique("reply")
        yield self.client.subscribe(channel)
        yield self.client.request("persist", {"channel": channel, "requestId": 7, "query": {
            "$insert": {"$documents": event("p1")}}})
        yield self.client.wait_end(channel)
        self.assertEqual(self.client.decoded(channel)[0]["affectedRows"], 1)
        messages = yield self.client.fetch({"$columns": ["pid"]}, channel=unique("reply"))
        self.assertEqual(messages, [{"pid": "p1"}, "end"])

    @defer.inlineCallbacks
    def test_a_stray_field_on_fetch_next_does_not_kill_the_stream(self):
        yield self.client.persist([event(f"p{i}") for i in range(3)])
        channel = unique("reply")
        yield self.client.subscribe(channel)
        yield self.client.request("fetch", {"channel": channel, "requestId": "r1",
                                            "query": {"$select": {"$columns": ["pid"]}}})
        for count in (1, 2, 3):
            yield self.client.wait_count(channel, count)
            yield self.client.request("fetch-next", {"channel": channel, "ts": count, "debug": [1]})
        yield self.client.wait_end(channel)
        self.assertEqual(self.client.decoded(channel),
                         [{"pid": "p0"}, {"pid": "p1"}, {"pid": "p2"}, "end"])

    @defer.inlineCallbacks
    def test_document_fields_that_are_not_columns_and_timestamps_are_ignored(self):
        reply = yield self.client.persist([
            dict(event("p1"), id=99, extra={"x": 1}, Pid="P"),
            dict(event("p2"), timestamp="1999-01-01T00:00:00.000Z")])
        self.assertEqual((reply[0]["affectedRows"], reply[0]["insertId"]), (2, 1))
        rows = sql(f"SELECT id, pid, YEAR(timestamp) FROM `{self.database}`.event ORDER BY id")
        self.assertEqual([row[:2] for row in rows], [(1, "p1"), (2, "p2")])
        self.assertTrue(all(row[2] >= 2026 for row in rows), rows)   # the server's time

    @defer.inlineCallbacks
    def test_unknown_query_keys_stay_refused(self):
        messages = yield self.client.fetch({"$where": {"pid": {"$regex": "p"}}})
        self.assertEqual(messages, ["error", "end"])


class NoStrayAnswerTests(IntegrationTestCase):
    """An acceptance with no live stream behind it is never answered."""

    @defer.inlineCallbacks
    def acknowledge_everything(self, channel, seconds=0.5):
        """A raw client that acknowledges every message it gets, for a while."""
        seen = [0]

        def on_message():
            bodies = self.client.messages.get(channel, [])
            while seen[0] < len(bodies):
                seen[0] += 1
                if bodies[seen[0] - 1] == '"accepted"':
                    continue   # our own, echoed
                for d in (self.client.request("fetch-next", {"channel": channel}),
                          self.client.publish(channel, '"accepted"')):
                    d.addErrback(lambda failure: None)   # the test judges what arrives
            return False

        self.client._waiters.append(on_message)
        on_message()
        yield sleep(seconds)
        self.client._waiters.remove(on_message)

    def replies(self, channel):
        return [body for body in self.client.messages.get(channel, []) if body != '"accepted"']

    @defer.inlineCallbacks
    def test_never_opened(self):
        channel = unique("reply")
        yield self.client.subscribe(channel)
        yield self.client.request("fetch-next", {"channel": channel})
        yield self.client.request("fetch-next", {"channel": channel, "accepted": -1})
        yield sleep(0.3)
        self.assertEqual(self.replies(channel), [])

    @defer.inlineCallbacks
    def test_already_ended_and_acknowledged_forever(self):
        yield self.client.persist(event("p1"))
        channel = unique("reply")
        yield self.client.subscribe(channel)
        yield self.client.request("fetch", {"channel": channel, "query": {"$select": {}}})
        yield self.client.wait_count(channel, 1)
        yield self.acknowledge_everything(channel)
        self.assertEqual(len(self.replies(channel)), 2)   # the row, "end": no ping-pong
        self.assertEqual(json.loads(self.replies(channel)[-1]), "end")

    @defer.inlineCallbacks
    def test_ended_by_an_early_error(self):
        channel = unique("reply")
        yield self.client.subscribe(channel)
        yield self.client.request("fetch", {"channel": channel,
                                            "query": {"$select": {"$from": "mysql.user"}}})
        yield self.client.wait_end(channel)
        yield self.acknowledge_everything(channel)
        self.assertEqual(self.replies(channel), ['"error"', '"end"'])
