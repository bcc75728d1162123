"""
Version 2 of the protocol against the real Redis and MariaDB: the replies'
shapes, expected versions, idempotency, strictness, error codes and the
fetch columns (docs/PROTOCOL.md, "Version 2").  Concurrency and faults are
proven in tests/test_v2_correctness.py.
"""

import json
import uuid

from twisted.internet import defer

from eventsource import query
from tests.support import IntegrationTestCase, LogCapture, sql, unique


def doc(pid="p1", name="n", data=None, **extra):
    return dict({"pid": pid, "domain": "d", "name": name, "data": data}, **extra)


def deep(levels):
    """A JSON value nested ``levels`` arrays deep."""
    value = 1
    for _ in range(levels):
        value = [value]
    return value


def ids(count):
    return [str(uuid.uuid4()) for _ in range(count)]


class Version2Case(IntegrationTestCase):
    @defer.inlineCallbacks
    def send(self, kind, body, v=2):
        """Publish ``body`` (a dict, given a new reply channel) and return every message to the last word."""
        channel = unique("reply")
        yield self.client.subscribe(channel)
        body = dict(body, channel=channel)
        if v is not None:
            body["v"] = v
        yield self.client.request(kind, body)
        if kind == "fetch":
            messages = yield self.client.drain(channel)
            return messages
        yield self.client.wait_end(channel)
        return self.client.decoded(channel)

    def persist(self, documents, **fields):
        return self.send("persist", dict(fields, query={"$insert": {"$documents": documents}}))

    def fetch(self, select, **fields):
        return self.send("fetch", dict(fields, query={"$select": select}))

    def assertError(self, reply, code, **fields):
        self.assertEqual(len(reply), 2, reply)
        self.assertEqual(reply[1], "end")
        error = reply[0]["error"]
        self.assertEqual(error["code"], code, error)
        self.assertIsInstance(error["message"], str)
        for key, value in fields.items():
            self.assertEqual(error[key], value, error)
        return error


class PersistTests(Version2Case):
    @defer.inlineCallbacks
    def test_success_names_every_event_in_request_order(self):
        reply = yield self.persist([doc("a"), doc("b"), doc("a")])
        self.assertEqual(reply[1], "end")
        self.assertEqual(list(reply[0]), ["events", "duplicate"])
        self.assertFalse(reply[0]["duplicate"])
        events = reply[0]["events"]
        self.assertEqual([list(e) for e in events], [["eventId", "pid", "version", "position"]] * 3)
        self.assertEqual([(e["pid"], e["version"]) for e in events], [("a", 0), ("b", 0), ("a", 1)])
        stored = self.rows("id, pid, version, LOWER(HEX(event_id))")
        self.assertEqual([(e["position"], e["pid"], e["version"], e["eventId"].replace("-", ""))
                          for e in events], [tuple(row) for row in stored])
        # server-made ids are UUIDv7
        self.assertEqual({uuid.UUID(e["eventId"]).version for e in events}, {7})

    @defer.inlineCallbacks
    def test_the_client_event_ids_are_kept(self):
        given = ids(2)
        reply = yield self.persist([doc(eventId=given[0]), doc(eventId=given[1].upper())])
        self.assertEqual([e["eventId"] for e in reply[0]["events"]], given)

    @defer.inlineCallbacks
    def test_data_is_the_value_itself(self):
        reply = yield self.persist([doc(data="text"), doc(data={"b": 1, "a": [1.5, None]}), doc()])
        self.assertIn("events", reply[0])
        self.assertEqual([row[0] for row in self.rows("data")],
                         ['"text"', '{"b":1,"a":[1.5,null]}', "null"])

    @defer.inlineCallbacks
    def test_expected_version(self):
        for spec in ("noStream", "any"):
            reply = yield self.persist([doc("fresh-" + spec)], expectedVersion=spec)
            self.assertIn("events", reply[0])
        reply = yield self.persist([doc(), doc()], expectedVersion="noStream")
        self.assertEqual([e["version"] for e in reply[0]["events"]], [0, 1])
        reply = yield self.persist([doc()], expectedVersion=1)
        self.assertEqual(reply[0]["events"][0]["version"], 2)
        reply = yield self.persist([doc()], expectedVersion="streamExists")
        self.assertEqual(reply[0]["events"][0]["version"], 3)
        for spec, actual in ((1, 3), (4, 3), ("noStream", 3)):
            reply = yield self.persist([doc()], expectedVersion=spec)
            error = self.assertError(reply, "wrongExpectedVersion", pid="p1", expected=spec,
                                     actual=actual)
            self.assertIn("p1", error["message"])
        reply = yield self.persist([doc("nobody")], expectedVersion="streamExists")
        self.assertError(reply, "wrongExpectedVersion", pid="nobody", actual=None)
        reply = yield self.persist([doc("nobody")], expectedVersion=0)
        self.assertError(reply, "wrongExpectedVersion", actual=None, expected=0)
        self.assertEqual(len(self.rows(where="WHERE pid = 'p1'")), 4)
        self.assertEqual(len(self.rows(where="WHERE pid = 'nobody'")), 0)

    @defer.inlineCallbacks
    def test_expected_versions_append_to_several_streams_or_none(self):
        yield self.persist([doc("a"), doc("b")])
        reply = yield self.persist([doc("a"), doc("b"), doc("c")],
                                   expectedVersions={"a": 0, "b": 1, "c": "noStream"})
        self.assertError(reply, "wrongExpectedVersion", pid="b", expected=1, actual=0)
        self.assertEqual(len(self.rows()), 2)
        reply = yield self.persist([doc("a"), doc("b"), doc("c")],
                                   expectedVersions={"a": 0, "b": 0, "c": "noStream"})
        self.assertEqual([(e["pid"], e["version"]) for e in reply[0]["events"]],
                         [("a", 1), ("b", 1), ("c", 0)])

    @defer.inlineCallbacks
    def test_the_checks_of_one_batch_follow_request_order(self):
        # Sent at once, these land in one or more group commits: either way
        # exactly one of the requests expecting version 0 succeeds.
        yield self.persist([doc()])
        replies = yield defer.gatherResults([self.persist([doc()], expectedVersion=0)
                                             for _ in range(5)])
        codes = sorted("events" if "events" in r[0] else r[0]["error"]["code"] for r in replies)
        self.assertEqual(codes, ["events"] + ["wrongExpectedVersion"] * 4)
        self.assertEqual({r[0]["error"]["actual"] for r in replies if "error" in r[0]}, {1})
        self.assertEqual([row[0] for row in self.rows("version")], [0, 1])

    @defer.inlineCallbacks
    def test_version_1_and_2_share_streams(self):
        yield self.client.persist([doc(), doc()])
        reply = yield self.persist([doc()], expectedVersion=1)
        self.assertEqual(reply[0]["events"][0]["version"], 2)
        reply = yield self.persist([doc(" p1 ".strip() + "  ")], expectedVersion=2)
        self.assertEqual(reply[0]["events"][0]["version"], 3)


class IdempotencyTests(Version2Case):
    @defer.inlineCallbacks
    def test_a_repeat_is_answered_as_the_original_and_writes_nothing(self):
        documents = [doc("a", eventId=i) for i in ids(2)] + [doc("b", eventId=ids(1)[0])]
        first = yield self.persist(documents, expectedVersions={"a": "noStream"})
        again = yield self.persist(documents, expectedVersions={"a": "noStream"})
        self.assertFalse(first[0]["duplicate"])
        self.assertTrue(again[0]["duplicate"])
        self.assertEqual(again[0]["events"], first[0]["events"])
        self.assertEqual(again[1], "end")
        self.assertEqual(len(self.rows()), 3)
        # whatever the expected version says now, or none at all
        for fields in ({}, {"expectedVersions": {"a": 7}}):
            reply = yield self.persist(documents, **fields)
            self.assertEqual(reply[0], again[0])
        self.assertEqual(len(self.rows()), 3)

    @defer.inlineCallbacks
    def test_a_repeat_in_the_same_batch_is_a_duplicate(self):
        logged = LogCapture(self)
        documents = [doc(eventId=i) for i in ids(3)]
        replies = yield defer.gatherResults([self.persist(documents) for _ in range(4)]
                                            + [self.persist([doc()]) for _ in range(4)])
        replies = replies[:4]
        self.assertEqual(sorted(r[0]["duplicate"] for r in replies), [False, True, True, True])
        self.assertEqual(len({json.dumps(r[0]["events"]) for r in replies}), 1)
        self.assertEqual(len(self.rows()), 7)
        # the repeats waited for the next batch: none made its batch fail
        self.assertEqual([text for text in logged.texts() if "writing" in text], [])

    @defer.inlineCallbacks
    def test_partly_stored_or_elsewhere_is_a_conflict(self):
        first, second, third = ids(3)
        yield self.persist([doc("a", eventId=first), doc("a", eventId=second)])
        reply = yield self.persist([doc("a", eventId=first), doc("a", eventId=third)])
        self.assertError(reply, "idempotencyConflict", eventId=first)
        reply = yield self.persist([doc("b", eventId=first), doc("b", eventId=second)])
        self.assertError(reply, "idempotencyConflict")
        reply = yield self.persist([doc("a", eventId=second), doc("a", eventId=first)])
        self.assertError(reply, "idempotencyConflict")
        self.assertEqual(len(self.rows()), 2)
        # a request in the same batch as a conflicting one is still written
        replies = yield defer.gatherResults([
            self.persist([doc("a", eventId=first), doc("a", eventId=third)]),
            self.persist([doc("c")])])
        self.assertError(replies[0], "idempotencyConflict")
        self.assertEqual(replies[1][0]["events"][0]["pid"], "c")


class StrictnessTests(Version2Case):
    @defer.inlineCallbacks
    def test_unknown_fields_are_bad_requests(self):
        for body, word in (
                ({"query": {"$insert": {"$documents": [doc()]}}, "requestId": 1}, "requestId"),
                ({"query": {"$insert": {"$documents": [doc(timestamp="2020-01-01")]}}}, "timestamp"),
                ({"query": {"$insert": {"$documents": [doc(id=1)]}}}, "id"),
                ({"query": {"$insert": {"$documents": [doc()]}}, "expectedVersion": 0,
                  "expectedVersions": {"p1": 0}}, "both")):
            reply = yield self.send("persist", body)
            error = self.assertError(reply, "badRequest")
            self.assertIn(word, error["message"])
        reply = yield self.send("fetch", {"query": {"$select": {}}, "debug": True})
        self.assertError(reply, "badRequest")
        self.assertEqual(self.rows(), ())

    @defer.inlineCallbacks
    def test_bad_event_ids_and_expectations(self):
        one = ids(1)[0]
        cases = [
            ([doc(eventId="not-a-uuid")], {}),
            ([doc(eventId=one.replace("-", ""))], {}),
            ([doc(eventId=7)], {}),
            ([doc(eventId=one), doc()], {}),
            ([doc(eventId=one), doc(eventId=one)], {}),
            ([doc("a"), doc("b")], {"expectedVersion": 0}),
            ([doc()], {"expectedVersion": -1}),
            ([doc()], {"expectedVersion": 1.5}),
            ([doc()], {"expectedVersion": True}),
            ([doc()], {"expectedVersion": "NoStream"}),
            ([doc()], {"expectedVersion": None}),
            ([doc()], {"expectedVersions": {"other": 0}}),
            ([doc()], {"expectedVersions": {"p1": 0, "p1 ": 0}}),
            ([doc()], {"expectedVersions": []}),
            ([doc()], {"expectedVersions": {}}),
            ([doc(data=deep(32))], {}),
        ]
        for documents, fields in cases:
            reply = yield self.persist(documents, **fields)
            self.assertError(reply, "badRequest")
        self.assertEqual(self.rows(), ())

    @defer.inlineCallbacks
    def test_other_versions_are_version_1(self):
        body = {"query": {"$insert": {"$documents": [doc(eventId="x", other=1)]}}}
        for v in (1, 3, "2", True, None):
            reply = yield self.send("persist", body, v=v)
            self.assertEqual(reply[0]["affectedRows"], 1, (v, reply))
            self.assertEqual(list(reply[0])[:2], ["fieldCount", "affectedRows"])


class ErrorCodeTests(Version2Case):
    server_config = {"max_documents": 3, "max_streams": 1, "row_timeout": 5}

    @defer.inlineCallbacks
    def test_codes(self):
        reply = yield self.send("persist", {"query": {"$insert": {"$table": "mysql.user",
                                                                  "$documents": [doc()]}}})
        self.assertError(reply, "refused")
        reply = yield self.persist([doc()] * 4)
        error = self.assertError(reply, "tooLarge")
        self.assertIn("3", error["message"])
        for select in ({"$where": {"id": 1}}, {"$from": "mysql.user"}, {"$where": {"$raw": 1}},
                       {"$where": {"eventId": {"$like": "%"}}}, {"$columns": ["event_id"]}):
            reply = yield self.fetch(select)
            self.assertError(reply, "refused")
        reply = yield self.fetch({"$where": {"eventId": "nope"}})
        self.assertError(reply, "badRequest")
        reply = yield self.fetch({"$where": {"pid": {"$in": ["a"] * 2000}}})
        self.assertError(reply, "tooLarge")
        # busy: the one stream the server allows is open (a version 1 one)
        held = unique("held")
        yield self.persist([doc()])
        yield self.client.subscribe(held)
        yield self.client.request("fetch", {"channel": held, "query": {"$select": {}}})
        yield self.client.wait_count(held, 1)
        reply = yield self.fetch({})
        self.assertError(reply, "busy")
        # the reply channel of a live stream: busy, and that stream ends
        yield self.client.request("persist", {"v": 2, "channel": held,
                                              "query": {"$insert": {"$documents": [doc()]}}})
        yield self.client.wait_end(held)
        self.assertEqual(self.client.decoded(held)[-2:], ["error", "end"])

    @defer.inlineCallbacks
    def test_messages_hold_no_sql(self):
        reply = yield self.fetch({"$where": {"pid": {"$nope": 1}}})
        error = self.assertError(reply, "refused")
        for word in ("SELECT", "`", "Traceback", "pymysql"):
            self.assertNotIn(word, error["message"])


class CheckedDataTests(Version2Case):
    @defer.inlineCallbacks
    def test_data_is_decoded_only_where_mariadb_does_not_check_it(self):
        # The server's own table has MariaDB's json_valid check: rows go out as stored.
        self.assertTrue(self.server.store.data_checked)
        yield self.server.stopService()
        sql(f"ALTER TABLE `{self.database}`.`event` MODIFY `data` LONGTEXT")
        logged = LogCapture(self)
        yield self.start_server(**self.server_config)
        self.assertFalse(self.server.store.data_checked)
        self.assertTrue(any("does not check that data is JSON" in text for text in logged.texts()))
        self.insert_events(2)
        sql(f"UPDATE `{self.database}`.`event` SET `data` = '1,\"a\":2' WHERE `version` = 1")
        rows = yield self.fetch({"$columns": ["version", "data"]})
        self.assertEqual(rows, [{"version": 0, "data": {"i": 0}}, {"version": 1, "data": '1,"a":2'},
                                "end"])


class ProbeTests(Version2Case):
    @defer.inlineCallbacks
    def test_the_version_2_probe_is_answered_with_a_bare_end(self):
        # (docs/PROTOCOL.md, "Telling a version 1 server"; a version 1 server refuses it)
        yield self.persist([doc()])
        probe = {"query": {"$select": {"$columns": ["position"], "$limit": 0}}}
        reply = yield self.send("fetch", probe)
        self.assertEqual(reply, ["end"])
        reply = yield self.send("fetch", probe, v=None)
        self.assertEqual(reply, ["error", "end"])


class ReadOnlyTests(Version2Case):
    server_config = {"read_only": True}

    @defer.inlineCallbacks
    def test_persists_are_refused(self):
        reply = yield self.persist([doc()])
        self.assertError(reply, "readOnly")
        reply = yield self.send("persist", {"query": {"$insert": {"$documents": [doc()]}}}, v=None)
        self.assertEqual(reply, ["error", "end"])


class FetchTests(Version2Case):
    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        reply = yield self.persist([doc("a", data={"n": 1.5, "s": "x"}), doc("b", data="text"),
                                    doc("a", name="m", data=[1, None])])
        self.events = reply[0]["events"]

    @defer.inlineCallbacks
    def test_rows_carry_every_column_and_data_as_its_value(self):
        rows = yield self.fetch({})
        self.assertEqual(rows[-1], "end")
        self.assertEqual([list(r) for r in rows[:-1]],
                         [["position", "eventId", "pid", "version", "domain", "name",
                           "timestamp", "data"]] * 3)
        self.assertEqual([r["data"] for r in rows[:-1]], [{"n": 1.5, "s": "x"}, "text", [1, None]])
        self.assertEqual([(r["eventId"], r["pid"], r["version"], r["position"]) for r in rows[:-1]],
                         [(e["eventId"], e["pid"], e["version"], e["position"]) for e in self.events])
        # the stored text itself, unquoted (version 1 sends it as a string)
        body = self.client.messages[list(self.client.messages)[-1]][0]
        self.assertIn('"data":{"n":1.5,"s":"x"}}', body)
        v1 = yield self.client.fetch({"$columns": ["data"]})
        self.assertEqual(v1[0], {"data": '{"n":1.5,"s":"x"}'})

    @defer.inlineCallbacks
    def test_new_columns_in_queries(self):
        second = self.events[1]
        rows = yield self.fetch({"$where": {"eventId": second["eventId"].upper()}})
        self.assertEqual([r["position"] for r in rows[:-1]], [second["position"]])
        rows = yield self.fetch({"$where": {"eventId": {"$in": [e["eventId"] for e in self.events[1:]]}},
                                 "$columns": ["eventId"]})
        self.assertEqual(rows[:-1], [{"eventId": e["eventId"]} for e in self.events[1:]])
        rows = yield self.fetch({"$where": {"position": {"$gt": self.events[0]["position"]}},
                                 "$orderBy": {"position": "DESC"}, "$columns": ["position", "pid"]})
        self.assertEqual(rows[:-1], [{"position": e["position"], "pid": e["pid"]}
                                     for e in reversed(self.events[1:])])
        rows = yield self.fetch({"$columns": {"pid": True, "last": {"$max": "version"},
                                              "first": {"$min": "eventId"}},
                                 "$groupBy": ["pid"], "$orderBy": ["pid"]})
        self.assertEqual([(r["pid"], r["last"]) for r in rows[:-1]], [("a", 1), ("b", 0)])
        self.assertEqual(rows[0]["first"], min(self.events[0]["eventId"], self.events[2]["eventId"]))
        rows = yield self.fetch({"$columns": {"version": "v", "data": "payload"},
                                 "$where": {"version": 1}})
        self.assertEqual(rows[:-1], [{"v": 1, "payload": [1, None]}])
        for alias in ("id", "event_id", "EventId"):
            rows = yield self.fetch({"$columns": {"pid": alias}})
            self.assertError(rows, "badRequest")

    @defer.inlineCallbacks
    def test_one_stream_from_a_version_in_version_order(self):
        reply = yield self.persist([doc("a", data=i) for i in range(40)])
        self.assertIn("events", reply[0])
        rows = yield self.fetch({"$where": {"pid": "a", "version": {"$gte": 25}}}, window=7)
        self.assertEqual([r["version"] for r in rows[:-1]], list(range(25, 42)))
        rows = yield self.fetch({"$where": {"pid": "a"}, "$orderBy": {"version": 1}, "$limit": 3})
        self.assertEqual([r["version"] for r in rows[:-1]], [0, 1, 2])
        plan = query.compile_select({"$where": {"pid": "a", "version": {"$gte": 25}}},
                                    query.TableSchema.version2(self.database, "event"))
        self.assertTrue(plan.keyset)
        statement, params = plan.page_sql(plan.keyset_start, 10 ** 9, 10)
        (explained,) = [dict(zip(("id", "select_type", "table", "type", "possible_keys", "key"),
                                 row)) for row in sql("EXPLAIN " + statement, params)]
        self.assertEqual((explained["key"], explained["type"]), ("pid_version", "range"))
