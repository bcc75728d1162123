"""
Version 2 in the service and the compiler, with the in-memory doubles and a
Clock: how each failure is told (its code, a sentence without internals),
shutdown and Redis loss on version 2 streams, and what the compiler makes of
version 2 persists and queries.
"""

import json

import pymysql
from twisted.trial.unittest import SynchronousTestCase

from eventsource import appends, query, wire
from eventsource.store import StatementTimeLimit, StoreStopping
from eventsource.writer import VersionConflict
from tests.test_service import ServiceTestCase, doc

EVENT_ID = "0192f7b0-8c4e-7cc1-9f0e-2b6a3c1d5e4f"


def persist2(channel, documents, **fields):
    return json.dumps(dict(fields, v=2, channel=channel,
                           query={"$insert": {"$documents": documents}}))


def fetch2(channel, select=None, **fields):
    return json.dumps(dict(fields, v=2, channel=channel, query={"$select": select or {}}))


class PersistFailureTests(ServiceTestCase):
    def error(self, channel="r"):
        messages = self.out(channel)
        self.assertEqual(messages[-1], "end")
        return messages[-2]["error"]

    def test_database_failures_have_codes_and_no_internals(self):
        self.make()
        cases = [
            (pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query"),
             "unavailable", "same event ids"),
            (pymysql.err.InterfaceError(0, ""), "unavailable", "unknown"),
            (StoreStopping("the server is shutting down"), "unavailable", "shutting down"),
            (VersionConflict("versions kept being taken"), "busy", "try again"),
            (RuntimeError("SELECT secret FROM mysql.user"), "internal", "log"),
        ]
        for i, (failure, code, words) in enumerate(cases):
            self.store.fail_next = failure
            self.send("persist", persist2(f"r{i}", [doc()]))
            error = self.error(f"r{i}")
            self.assertEqual(error["code"], code)
            self.assertIn(words, error["message"])
            for internal in ("MySQL", "SELECT", "2013", "Lost connection"):
                self.assertNotIn(internal, error["message"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.store.events, [])

    def test_refusals_from_the_store(self):
        self.make()
        self.send("persist", persist2("r", [doc(), doc()]))
        self.send("persist", persist2("w", [doc()], expectedVersion="noStream"))
        self.assertEqual(self.error("w"), {"code": "wrongExpectedVersion", "pid": "p1",
                                           "expected": "noStream", "actual": 1,
                                           "message": 'stream "p1" is at version 1, not no events'})
        self.send("persist", persist2("a", [doc(eventId=EVENT_ID)]))
        self.send("persist", persist2("c", [doc("other", eventId=EVENT_ID)]))
        self.assertEqual(self.error("c")["code"], "idempotencyConflict")
        self.assertEqual(self.error("c")["eventId"], EVENT_ID)
        self.send("persist", persist2("d", [doc(eventId=EVENT_ID.upper())], expectedVersion=0))
        self.assertEqual(self.out("d")[0], dict(self.out("a")[0], duplicate=True))
        self.assertEqual(len(self.store.events), 3)

    def test_shutting_down(self):
        self.make()
        self.service._accepting = False
        self.send("persist", persist2("r", [doc()]))
        self.assertEqual(self.error()["code"], "unavailable")


class StreamFailureTests(ServiceTestCase):
    def test_a_version_2_stream_fails_with_an_error_object(self):
        self.make(hold_store=True)
        for i, failure in enumerate((StatementTimeLimit("the query ran longer than the statement"
                                                         " time limit (5 s)"),
                                     pymysql.err.OperationalError(2006, "MySQL server has gone away"))):
            self.send("fetch", fetch2(f"r{i}"))
            self.store.pending.pop(0)[0].errback(failure)
        self.assertEqual(self.out("r0")[0]["error"]["code"], "tooLarge")
        self.assertIn("statement time limit", self.out("r0")[0]["error"]["message"])
        self.assertEqual(self.out("r1"), [{"error": {"code": "unavailable", "message":
                                                     "the database could not be reached"}}, "end"])
        self.flushLoggedErrors()

    def test_shutdown_and_redis_loss(self):
        self.make()
        self.store.add()
        self.send("fetch", fetch2("a"))
        self.send("fetch", fetch2("b"))
        self.send("fetch", json.dumps({"channel": "c", "query": {"$select": {}}}))
        self.service.redis_lost()
        self.assertEqual(self.out("a")[-2:], [{"error": {"code": "unavailable",
                                                         "message": "lost the Redis connection"}}, "end"])
        self.assertEqual(self.out("c")[-2:], ["error", "end"])

    def test_rows_carry_version_2_columns(self):
        self.make()
        self.store.add(pid="p", data={"a": [1]})
        self.send("fetch", fetch2("r", window=10))
        row, end = self.out("r")
        self.assertEqual(end, "end")
        self.assertEqual(list(row), ["position", "eventId", "pid", "version", "domain", "name",
                                     "timestamp", "data"])
        self.assertEqual((row["position"], row["version"], row["data"]), (1, 0, {"a": [1]}))


class CompileAppendTests(SynchronousTestCase):
    schema = query.TableSchema("db", "event")

    def compile(self, documents, expected=None):
        return query.compile_append({"$documents": documents}, self.schema, 10, expected)

    def test_plan(self):
        plan = self.compile([doc("a", data="s", eventId=EVENT_ID), doc("b", eventId=EVENT_ID[:-1] + "0")],
                            ("expectedVersions", {"a": 3, "b": "any"}))
        self.assertEqual(plan.rows[0], ("a", "user", "created", '"s"'))
        self.assertEqual(plan.event_ids[0], bytes.fromhex(EVENT_ID.replace("-", "")))
        self.assertEqual(plan.expected, (appends.Expectation("a", 3),))
        request = plan.append(detailed=True)
        self.assertEqual((request.rows, request.detailed), (plan.rows, True))
        self.assertEqual(self.compile([doc()], ("expectedVersion", "any")).expected, ())
        self.assertEqual(self.compile([doc(), doc("p1 ")], ("expectedVersion", "noStream")).expected,
                         (appends.Expectation("p1", "noStream"),))

    def test_codes(self):
        with self.assertRaises(query.QueryTooLarge):
            self.compile([doc()] * 11)
        with self.assertRaises(query.QueryRefused):
            query.compile_append({"$table": "other", "$documents": [doc()]}, self.schema)
        with self.assertRaises(query.QueryRefused):
            query.compile_append({"$documents": [doc()], "$raw": 1}, self.schema)
        try:
            self.compile([doc(extra=1)])
        except query.QueryError as error:
            self.assertEqual(error.code, "badRequest")
            self.assertIn("extra", str(error))
        else:
            self.fail("an unknown document field was accepted")


class Version2SelectTests(SynchronousTestCase):
    schema = query.TableSchema.version2("db", "event")

    def test_names_map_to_the_table(self):
        plan = query.compile_select({"$columns": ["position", "eventId", "data"],
                                     "$where": {"position": {"$gt": 5}, "eventId": EVENT_ID}},
                                    self.schema)
        self.assertEqual(plan.columns, ("position", "eventId", "data"))
        self.assertIn("`id` AS `position`", plan.select_sql)
        self.assertIn("`event_id` AS `eventId`", plan.select_sql)
        self.assertIn("`id` > %s", plan.where_sql)
        self.assertEqual(plan.where_params, (5, bytes.fromhex(EVENT_ID.replace("-", ""))))
        self.assertEqual(plan.encodings, (wire.PLAIN_VALUE, wire.UUID_VALUE, wire.JSON_VALUE))
        self.assertTrue(plan.keyset)

    def test_a_plan_that_outputs_its_keyset_reads_it_there(self):
        """
        A keyset plan whose outputs hold the keyset column (version 2's
        default columns: ``position``; a stream read: ``version``) pages
        without a ``__keyset`` column of its own; one that does not (version
        1's default columns) reads one.
        """
        default = query.compile_select({}, self.schema)
        self.assertEqual(default.keyset_index, default.columns.index("position"))
        sql, _ = default.page_sql(0, 100, 10)
        self.assertNotIn("__keyset", sql)
        stream = query.compile_select({"$where": {"pid": "p", "version": {"$gte": 3}}},
                                      self.schema)
        self.assertEqual(stream.keyset_column, "`version`")
        self.assertEqual(stream.keyset_index, stream.columns.index("version"))
        union = query.compile_select({"$where": {"pid": {"$in": ["a", "b"]}}}, self.schema)
        self.assertTrue(union.union_values)
        self.assertNotIn("__keyset", union.page_sql(0, 100, 10)[0])
        for plan in (query.compile_select({}, query.TableSchema("db", "event")),
                     query.compile_select({"$columns": ["pid", "data"]}, self.schema),
                     query.compile_select({"$columns": [{"n": {"$max": "position"}}]},
                                          self.schema)):
            self.assertIsNone(plan.keyset_index)
            if plan.keyset:
                self.assertIn("`__keyset`", plan.page_sql(0, 100, 10)[0])

    def test_version_1_sees_none_of_it(self):
        v1 = query.TableSchema("db", "event")
        for name in ("position", "eventId", "version", "event_id"):
            with self.assertRaises(query.QueryRefused):
                query.compile_select({"$columns": [name]}, v1)
        self.assertEqual(query.compile_select({}, v1).encodings, ())

    def test_stream_reads_page_by_version(self):
        plan = query.compile_select({"$where": {"pid": "p", "version": {"$gte": 3}}}, self.schema)
        self.assertEqual((plan.keyset, plan.keyset_column, plan.keyset_start),
                         (True, "`version`", -1))
        statement, params = plan.page_sql(-1, 100, 10)
        self.assertIn("FORCE INDEX (`pid_version`)", statement)
        self.assertIn("ORDER BY `version` LIMIT %s", statement)
        self.assertEqual(params[-3:], (-1, 100, 10))
        self.assertRaises(ValueError, plan.page_sql, -2, 100, 10)
        # not one stream, or another order: the usual id keyset
        for select in ({"$where": {"pid": {"$in": ["a", "b"]}}},
                       {"$where": {"pid": "p"}, "$orderBy": {"version": -1}},
                       {"$where": {"$or": [{"pid": "p"}, {"pid": "q"}]}}):
            plan = query.compile_select(select, self.schema)
            self.assertNotEqual(plan.keyset_column if plan.keyset else None, "`version`", select)

    def test_uuid_columns_take_equality_only(self):
        for op in ("$gt", "$like", "$startsWith", "$between"):
            with self.assertRaises(query.QueryRefused):
                query.compile_select({"$where": {"eventId": {op: EVENT_ID}}}, self.schema)
        with self.assertRaises(query.QueryError):
            query.compile_select({"$where": {"eventId": 1}}, self.schema)


class RowEncoderTests(SynchronousTestCase):
    def test_the_usual_row_is_the_general_encoding(self):
        """Data last (version 2's default columns): the quick path writes what the general one does."""
        names = ["position", "eventId", "pid", "data"]
        encodings = [wire.PLAIN_VALUE, wire.UUID_VALUE, wire.PLAIN_VALUE, wire.JSON_VALUE]
        raw = bytes.fromhex(EVENT_ID.replace("-", ""))
        for checked in (True, False):
            quick = wire.row_encoder(names, encodings, checked)
            general = wire.row_encoder(names[::-1], encodings[::-1], checked)
            for row in ([1, raw, "p\u00e9\"q", '{"a":[1.5,null]}'], [2, None, "", None],
                        [3, raw, "x", '"text"']):
                self.assertEqual(json.loads(quick(row)), json.loads(general(row[::-1])))
                self.assertEqual(list(json.loads(quick(row))), names)
            self.assertIn('"data":{"a":[1.5,null]}}', quick([1, raw, "p", '{"a":[1.5,null]}']))

    def test_the_default_row_by_one_format_is_the_general_encoders_text(self):
        """
        A row of version 2's default columns is encoded by one format
        (wire._encode_v2_default): byte for byte what the general encoder
        writes, for every value a row can hold, the unusual ones included.
        """
        names = ["position", "eventId", "pid", "version", "domain", "name", "timestamp", "data"]
        encodings = [wire.PLAIN_VALUE, wire.UUID_VALUE] + [wire.PLAIN_VALUE] * 5 + [
            wire.JSON_VALUE]
        raw = bytes.fromhex(EVENT_ID.replace("-", ""))
        rows = [
            [1, raw, "p", 1, "d", "n", "2026-11-30T05:00:00.123Z", '{"a":[1.5,null]}'],
            [2 ** 62, raw, "p\u00e9\"q\\\n\u2028\U0001f600\x00\x1f", 0, "", "\ud800",
             "t", '"text"'],
            [3, None, "p", 1, "d", "n", "t", None],          # (no event id: a fallback)
            [4, bytearray(raw), "p", 1, "d", "n", "t", "1"],  # (not bytes)
            [5, raw, b"p", 1, "d", "n", "t", "1"],            # (bytes: a binary column)
            [6, raw, "p", None, None, "n", "t", "[]"],
            [7, raw, "p", True, "d", "n", "t", "{}"],          # (a bool is not an int here)
            [8, raw[:8], "p", 1, "d", "n", "t", "{}"],
        ]
        for checked in (True, False):
            quick = wire.row_encoder(names, encodings, checked)
            general = wire._spliced_encoder(
                names, [1], [wire._row_encoder.encode(n) for n in names],
                wire._checked_json_text if checked else wire._json_text, 7)
            self.assertIsNot(quick, general)
            for row in rows:
                self.assertEqual(quick(row), general(row))
        self.assertEqual(
            wire.row_encoder(names, encodings, True)(rows[0]),
            '{"position":1,"eventId":"%s","pid":"p","version":1,"domain":"d","name":"n",'
            '"timestamp":"2026-11-30T05:00:00.123Z","data":{"a":[1.5,null]}}' % EVENT_ID)

    def test_json_text_goes_in_as_it_is(self):
        encode = wire.row_encoder(["a", "id", "data"], [wire.PLAIN_VALUE, wire.UUID_VALUE,
                                                        wire.JSON_VALUE])
        raw = bytes.fromhex(EVENT_ID.replace("-", ""))
        self.assertEqual(encode(["x", raw, '{"n":1e+21,"s":"é"}']),
                         '{"a":"x","id":"%s","data":{"n":1e+21,"s":"é"}}' % EVENT_ID)
        self.assertEqual(encode(["x", None, None]), '{"a":"x","id":null,"data":null}')
        # as MariaDB checked it: in as it is, not decoded first
        checked = wire.row_encoder(["data"], [wire.JSON_VALUE], checked_json=True)
        self.assertEqual(checked(['{"n":1e+21}']), '{"data":{"n":1e+21}}')
        self.assertEqual(checked([None]), '{"data":null}')
        # text that is not JSON (no table with MariaDB's JSON check holds any) stays a string
        self.assertEqual(json.loads(encode(["x", raw, '1,"a":2'])), {"a": "x", "id": EVENT_ID,
                                                                      "data": '1,"a":2'})

    def test_the_encoder_made_once_writes_what_json_does(self):
        """
        Rows are encoded by a C encoder made once (wire._one_shot), not by
        JSONEncoder.encode, which makes one per call: the text is the same
        for every kind of value a row holds, and so is the fallback.
        """
        import datetime
        import decimal

        values = [
            {"i": 1, "f": 12.5, "big": 1e21, "neg": -0.0, "nan": float("nan"),
             "inf": float("inf"), "s": "p\u00e9\"q\\\n\u2028\U0001f600", "none": None,
             "t": True, "list": [1, [2, {"x": "y"}]]},
            {"when": datetime.datetime(2020, 4, 6, 11, 35, 18, 414123),
             "day": datetime.date(2020, 4, 6), "d1": decimal.Decimal("7"),
             "d2": decimal.Decimal("7.25"), "b": b"caf\xc3\xa9", "gap": datetime.timedelta(1.5)},
            "just a string \u00e9", 42, None, [],
        ]
        indented = json.JSONEncoder(indent=2, default=wire._encode_value)
        fallback = wire._one_shot(indented)
        for value in values:
            self.assertEqual(wire._encode(value), wire._row_encoder.encode(value))
            self.assertEqual(fallback(value), indented.encode(value))
        with self.assertRaises(TypeError):
            wire._encode({"x": object()})
        ascii_only = wire._one_shot(json.JSONEncoder(ensure_ascii=True))
        self.assertEqual(ascii_only({"s": "é"}), '{"s": "\\u00e9"}')

    def test_message_bodies_are_what_the_body_encoder_writes(self):
        """encode_body (the C encoder made once, a str written at once) writes what json does."""
        values = ["end", "accepted", "p\u00e9\"q\\\n\u2028\ud800\U0001f600", "",
                  {"events": [{"eventId": EVENT_ID, "pid": "p\u00e9", "version": 3,
                               "position": 2 ** 53}], "duplicate": False},
                  {"error": {"code": "x", "message": "m", "n": 1.5e300}}, [1, None, True],
                  {"caughtUp": 12}, 7, None]
        for value in values:
            self.assertEqual(wire.encode_body(value), wire._body_encoder.encode(value))
            # (and persisted data, when nothing in it needs JavaScript's layout)
            self.assertEqual(wire._compact_encode(value), wire._compact_encoder.encode(value))

    def test_an_appends_answer_by_format_is_the_encoders_text(self):
        """wire.encode_appended's format writes what encode_body writes, for any values."""
        cases = [
            ([(EVENT_ID, "p", 1, 2)], False),
            ([(EVENT_ID, "p\u00e9\"q\\\n\ud800", 2 ** 60, 3), (EVENT_ID, "", 0, 4)], True),
            ([(EVENT_ID, "p", True, 2)], False),      # (a bool: the encoder's way)
            ([(EVENT_ID, "p", 1.5, 2)], False),
            ([(EVENT_ID, b"p", 1, 2)], False),
            ([(None, "p", 1, 2)], False),
            ([], False),
            ([(EVENT_ID, "p", 1, 2)], 1),             # (not a bool)
        ]
        for events, duplicate in cases:
            expected = wire.encode_body({"events": [
                {"eventId": e, "pid": p, "version": v, "position": n} for e, p, v, n in events],
                "duplicate": duplicate}) if not any(type(p) is bytes for _, p, _, _ in events) \
                else None
            if expected is None:
                with self.assertRaises(TypeError):
                    wire.encode_appended(events, duplicate)
                continue
            self.assertEqual(wire.encode_appended(events, duplicate), expected)

    def test_without_the_c_encoder_the_encoders_own(self):
        self.patch(json.encoder, "c_make_encoder", None)
        encoder = json.JSONEncoder(separators=(",", ":"))
        self.assertEqual(wire._one_shot(encoder), encoder.encode)
