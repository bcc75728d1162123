"""
Tests for :mod:`eventsource.query`: the JSON query language to SQL.

Three layers:

* exact SQL and parameters for every operator, clause and refusal;
* property tests (hypothesis): generated valid queries compile to SQL whose
  text does not depend on the values, names only allowed identifiers and
  only the schema's table; random JSON and hostile strings either compile
  safely or raise QueryError, never anything else;
* against a real MariaDB: generated plans execute and return exactly what a
  Python reference of the query language says.
"""

import json
import os
import re
import secrets
import sys
import time
from datetime import datetime

from hypothesis import HealthCheck, given, settings, strategies as st
import pymysql
from twisted.trial.unittest import SynchronousTestCase

from tests.support import MYSQL
from eventsource import schema
from eventsource.query import (
    InsertPlan, Limits, QueryError, SelectPlan, TableSchema,
    compile_insert, compile_select, parse_timestamp,
)


SCHEMA = TableSchema("eventsource", "event")
TABLE = "`eventsource`.`event`"
DEFAULT_SELECT = "`timestamp`, `pid`, `domain`, `name`, `data`"
ESCAPE = "ESCAPE '\\\\'"       # the SQL text ESCAPE '\\'


def where_of(where, schema=SCHEMA):
    """The compiled WHERE fragment and its parameters of ``{"$where": where}``."""
    plan = compile_select({"$where": where}, schema)
    return plan.where_sql, plan.where_params


def offset_sql(select, skip=0, high_water=100, size=10, schema=SCHEMA):
    return compile_select(select, schema).offset_sql(skip, high_water, size)


class TableSchemaTests(SynchronousTestCase):
    """The table the queries run against."""

    def test_matches(self):
        self.assertTrue(SCHEMA.matches("event"))
        self.assertTrue(SCHEMA.matches("eventsource.event"))
        for ref in ("other", "eventsource.other", "other.event", "`eventsource`.`event`",
                    "EVENT", "event ", "eventsource.event.x", None, 1, ["event"], {"event": 1}):
            self.assertFalse(SCHEMA.matches(ref), ref)

    def test_quoted(self):
        self.assertEqual(SCHEMA.quoted, TABLE)
        self.assertEqual(TableSchema("es", "log").quoted, "`es`.`log`")

    def test_defaults(self):
        self.assertEqual(SCHEMA.columns, ("id", "timestamp", "pid", "domain", "name", "data"))
        self.assertEqual(SCHEMA.default_columns, ("timestamp", "pid", "domain", "name", "data"))

    def test_indexes_are_the_ones_the_store_creates(self):
        named = dict(SCHEMA.keyset_indexes)
        named.update((name, (column,)) for name, column in SCHEMA.range_indexes)
        created = {index.name: index.columns + ("id",) for index in schema.INDEXES}
        self.assertEqual({name: columns + ("id",) for name, columns in named.items()}, created)

    def test_bad_identifiers_refused(self):
        for database, name in (("a`b", "event"), ("es", "ev`ent"), ("es", "ev%ent"),
                               ("", "event"), ("es", "")):
            self.assertRaises(ValueError, TableSchema, database, name)
        self.assertRaises(ValueError, TableSchema, "es", "event", columns=("id", "x`y"))
        self.assertRaises(ValueError, TableSchema, "es", "event", columns=("pid",),
                          default_columns=("pid",), datetime_columns=())
        self.assertRaises(ValueError, TableSchema, "es", "event", default_columns=("nope",))


class TimestampTests(SynchronousTestCase):
    """ISO-8601 strings become naive UTC datetimes."""

    def test_forms(self):
        cases = {
            "2020-04-06T11:35:18.414Z": datetime(2020, 4, 6, 11, 35, 18, 414000),
            "2020-04-06T11:35:18.414": datetime(2020, 4, 6, 11, 35, 18, 414000),
            "2020-04-06 11:35:18": datetime(2020, 4, 6, 11, 35, 18),
            "2020-04-06T11:35": datetime(2020, 4, 6, 11, 35),
            "2020-04-06": datetime(2020, 4, 6),
            "2020-04-06T11:35:18.414+02:00": datetime(2020, 4, 6, 9, 35, 18, 414000),
            "2020-04-06T11:35:18-0130": datetime(2020, 4, 6, 13, 5, 18),
            "2020-04-06T23:00:00-02": datetime(2020, 4, 7, 1, 0),
            "2020-04-06T11:35:18.123456789Z": datetime(2020, 4, 6, 11, 35, 18, 123456),
            "2020-04-06T11:35:18,5z": datetime(2020, 4, 6, 11, 35, 18, 500000),
        }
        for text, expected in cases.items():
            self.assertEqual(parse_timestamp(text), expected, text)
            self.assertIsNone(parse_timestamp(text).tzinfo)

    def test_invalid(self):
        for text in ("", "yesterday", "2020-13-01", "2020-02-30", "2020-04-06T25:00",
                     "2020-04-06T11:60", "2020-04-06Z", "2020-04-06T11:35+24:00",
                     "0001-01-01T00:00+01:00", "2020-04-06T11:35:18.Z", " 2020-04-06",
                     "2020-04-06\n", "20200406", 20200406, None, ["2020-04-06"]):
            self.assertRaises(QueryError, parse_timestamp, text)

    def test_where_converts(self):
        self.assertEqual(
            where_of({"timestamp": {"$gte": "2020-04-06T11:35:18.414Z"}}),
            ("`timestamp` >= %s", (datetime(2020, 4, 6, 11, 35, 18, 414000),)))
        self.assertEqual(
            where_of({"timestamp": "2020-01-01"}),
            ("`timestamp` = %s", (datetime(2020, 1, 1),)))
        self.assertEqual(
            where_of({"timestamp": {"$in": ["2020-01-01", "2020-01-02T00:00+01:00"]}})[1],
            (datetime(2020, 1, 1), datetime(2020, 1, 1, 23, 0)))

    def test_where_refuses(self):
        for value in ("not a date", 1586172918414, True):
            self.assertRaises(QueryError, where_of, {"timestamp": value})
            self.assertRaises(QueryError, where_of, {"timestamp": {"$lt": value}})

    def test_like_on_timestamp_is_text(self):
        self.assertEqual(where_of({"timestamp": {"$startsWith": "2020-04"}}),
                         ("`timestamp` LIKE %s " + ESCAPE, ("2020-04%",)))


class WhereOperatorTests(SynchronousTestCase):
    """Every ``$where`` operator: its exact SQL and parameters."""

    def test_absent_where(self):
        self.assertIsNone(compile_select({}, SCHEMA).where_sql)

    def test_empty_where(self):
        self.assertEqual(where_of({}), ("TRUE", ()))

    def test_equality(self):
        self.assertEqual(where_of({"pid": "p1"}), ("`pid` = %s", ("p1",)))
        self.assertEqual(where_of({"id": 7}), ("`id` = %s", (7,)))
        self.assertEqual(where_of({"id": 1.5}), ("`id` = %s", (1.5,)))
        self.assertEqual(where_of({"pid": True}), ("`pid` = %s", ("true",)))
        self.assertEqual(where_of({"id": True}), ("`id` = %s", (True,)))

    def test_numbers_compared_with_text_columns_are_text(self):
        # JavaScript's String(n): MariaDB would otherwise cast the column
        # to a number, and {"name": 0} matched every non-numeric name
        for value, text in ((0, "0"), (-0.0, "0"), (1.5, "1.5"), (1.0, "1"), (-2, "-2"),
                            (1e21, "1e+21"), (10 ** 21, "1e+21"), (1e20, "100000000000000000000"),
                            (1e-7, "1e-7"), (0.000001, "0.000001"), (2 ** 53 + 1, "9007199254740992"),
                            (True, "true"), (False, "false")):
            for column in ("pid", "domain", "name", "data"):
                self.assertEqual(where_of({column: value}), ("`%s` = %%s" % column, (text,)))
        self.assertEqual(where_of({"name": {"$ne": 1, "$gt": 2, "$gte": 3, "$lt": 4, "$lte": 5.5}})[1],
                         ("1", "2", "3", "4", "5.5"))
        self.assertEqual(where_of({"name": {"$in": [1, "1", True], "$nin": [0.5]}})[1],
                         ("1", "1", "true", "0.5"))
        self.assertEqual(where_of({"name": {"$between": {"$min": 1, "$max": 2e21}}})[1], ("1", "2e+21"))
        self.assertIn("too large", str(self.assertRaises(QueryError, where_of, {"name": 10 ** 400})))

    @settings(max_examples=500, deadline=None, database=None)
    @given(st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-2 ** 80, 2 ** 80)))
    def test_number_text_reads_back_as_the_same_number(self, number):
        (text,) = where_of({"name": number})[1]
        self.assertEqual(float(text), float(number))
        self.assertNotIn("E", text)
        self.assertFalse(text.endswith(".0"), text)

    def test_numeric_column_takes_decimal_integers_only(self):
        self.assertEqual(where_of({"id": "42"}), ("`id` = %s", (42,)))
        self.assertEqual(where_of({"id": {"$in": ["-7", 8, 2.5]}})[1], (-7, 8, 2.5))
        for op in ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte"):
            self.assertEqual(where_of({"id": {op: "9"}})[1], (9,))
        for bad in ("abc", "", " 1", "1 ", "1.5", "1e3", "0x10", "+1", "\u0661", "1" * 65):
            for where in ({"id": bad}, {"id": {"$gt": bad}}, {"id": {"$in": [1, bad]}},
                          {"id": {"$nin": [bad]}}, {"id": {"$between": {"$min": 1, "$max": bad}}}):
                with self.assertRaises(QueryError) as caught:
                    where_of(where)
                self.assertIn("is not a decimal integer", str(caught.exception))
        # aggregates other than $min/$max of text are numbers too
        select = {"$columns": ["pid", {"n": {"$count": "*"}}, {"m": {"$max": "name"}}],
                  "$groupBy": ["pid"], "$having": {"n": {"$gte": "2"}, "m": 3}}
        self.assertEqual(compile_select(select, SCHEMA).having_params, (2, "3"))
        select["$having"] = {"n": "two"}
        self.assertRaises(QueryError, compile_select, select, SCHEMA)

    def test_equality_null(self):
        self.assertEqual(where_of({"name": None}), ("`name` IS NULL", ()))
        self.assertEqual(where_of({"name": {"$eq": None}}), ("`name` IS NULL", ()))
        self.assertEqual(where_of({"name": {"$ne": None}}), ("`name` IS NOT NULL", ()))

    def test_comparisons(self):
        for op, sql in (("$eq", "="), ("$ne", "<>"), ("$gt", ">"), ("$gte", ">="),
                        ("$lt", "<"), ("$lte", "<=")):
            self.assertEqual(where_of({"id": {op: 3}}), ("`id` %s %%s" % sql, (3,)))

    def test_order_comparison_with_null_refused(self):
        for op in ("$gt", "$gte", "$lt", "$lte"):
            self.assertRaises(QueryError, where_of, {"id": {op: None}})

    def test_in(self):
        self.assertEqual(where_of({"pid": {"$in": ["a", "b", 3]}}),
                         ("`pid` IN (%s, %s, %s)", ("a", "b", "3")))
        self.assertEqual(where_of({"pid": {"$nin": ["a"]}}), ("`pid` NOT IN (%s)", ("a",)))

    def test_in_refusals(self):
        for operand in ([], "a", {"a": 1}, [None], ["a", None], [["a"]], [{"a": 1}], None):
            self.assertRaises(QueryError, where_of, {"pid": {"$in": operand}})
            self.assertRaises(QueryError, where_of, {"pid": {"$nin": operand}})

    def test_like(self):
        self.assertEqual(where_of({"name": {"$like": "a%_\\%"}}),
                         ("`name` LIKE %s", ("a%_\\%",)))

    def test_starts_ends_contains(self):
        self.assertEqual(where_of({"name": {"$startsWith": "a"}}),
                         ("`name` LIKE %s " + ESCAPE, ("a%",)))
        self.assertEqual(where_of({"name": {"$endsWith": "a"}}),
                         ("`name` LIKE %s " + ESCAPE, ("%a",)))
        self.assertEqual(where_of({"name": {"$contains": "a"}}),
                         ("`name` LIKE %s " + ESCAPE, ("%a%",)))

    def test_patterns_escape(self):
        self.assertEqual(where_of({"name": {"$contains": "50%_off\\"}})[1],
                         ("%50\\%\\_off\\\\%",))
        self.assertEqual(where_of({"name": {"$startsWith": ""}})[1], ("%",))

    def test_pattern_refusals(self):
        for op in ("$like", "$startsWith", "$endsWith", "$contains"):
            for operand in (1, None, True, ["a"], {"a": "b"}, "\ud800"):
                self.assertRaises(QueryError, where_of, {"name": {op: operand}})

    def test_between(self):
        self.assertEqual(where_of({"id": {"$between": {"$min": 1, "$max": 9}}}),
                         ("`id` BETWEEN %s AND %s", (1, 9)))
        self.assertEqual(where_of({"id": {"$between": {"$max": 9, "$min": 1}}})[1], (1, 9))

    def test_between_refusals(self):
        for operand in ({"$min": 1}, {"$max": 1}, {}, [1, 2], {"$min": 1, "$max": 2, "$x": 3},
                        {"$min": None, "$max": 2}, {"$min": 1, "$max": [2]}, 5):
            self.assertRaises(QueryError, where_of, {"id": {"$between": operand}})

    def test_is_null(self):
        self.assertEqual(where_of({"name": {"$isNull": True}}), ("`name` IS NULL", ()))
        self.assertEqual(where_of({"name": {"$isNull": False}}), ("`name` IS NOT NULL", ()))
        for operand in (1, 0, "true", None, []):
            self.assertRaises(QueryError, where_of, {"name": {"$isNull": operand}})

    def test_keys_are_anded(self):
        self.assertEqual(where_of({"pid": "p", "name": "n"}),
                         ("`pid` = %s AND `name` = %s", ("p", "n")))

    def test_operators_on_one_column_are_anded(self):
        self.assertEqual(where_of({"id": {"$gt": 1, "$lt": 5}}),
                         ("(`id` > %s AND `id` < %s)", (1, 5)))

    def test_and_or(self):
        self.assertEqual(where_of({"$or": [{"pid": "a"}, {"pid": "b", "name": "c"}]}),
                         ("(`pid` = %s OR (`pid` = %s AND `name` = %s))", ("a", "b", "c")))
        self.assertEqual(where_of({"$and": [{"pid": "a"}, {"name": None}]}),
                         ("(`pid` = %s AND `name` IS NULL)", ("a",)))
        self.assertEqual(where_of({"$or": [{"pid": "a"}]}), ("`pid` = %s", ("a",)))

    def test_and_or_object_form(self):
        self.assertEqual(where_of({"$or": {"pid": "a", "name": "b"}}),
                         ("(`pid` = %s OR `name` = %s)", ("a", "b")))

    def test_not(self):
        self.assertEqual(where_of({"$not": {"pid": "a", "name": "b"}}),
                         ("NOT ((`pid` = %s AND `name` = %s))", ("a", "b")))
        self.assertEqual(where_of({"$not": {}}), ("NOT (TRUE)", ()))

    def test_nested(self):
        where = {"$or": [{"$and": [{"pid": {"$in": ["a", "b"]}},
                                   {"$not": {"name": {"$startsWith": "x"}}}]},
                         {"timestamp": {"$between": {"$min": "2020-01-01", "$max": "2020-02-01"}}}],
                 "domain": "user"}
        self.assertEqual(where_of(where), (
            "((`pid` IN (%s, %s) AND NOT (`name` LIKE %s " + ESCAPE + ")) OR "
            "`timestamp` BETWEEN %s AND %s) AND `domain` = %s",
            ("a", "b", "x%", datetime(2020, 1, 1), datetime(2020, 2, 1), "user")))

    def test_logical_refusals(self):
        for where in ({"$and": []}, {"$or": []}, {"$and": {}}, {"$and": "x"}, {"$or": [1]},
                      {"$or": [[{"pid": 1}]]}, {"$not": []}, {"$not": "x"}, {"$not": None},
                      {"$and": [{"pid": "a"}, "pid"]}):
            self.assertRaises(QueryError, where_of, where)

    def test_value_refusals(self):
        for value in ([], ["a"], float("nan"), float("inf"), -float("inf"), "\udc80x"):
            self.assertRaises(QueryError, where_of, {"pid": value})
            self.assertRaises(QueryError, where_of, {"pid": {"$ne": value}})
        self.assertRaises(QueryError, where_of, {"pid": {}})
        self.assertRaises(QueryError, where_of, {"pid": {"$eq": {"$eq": 1}}})
        self.assertRaises(QueryError, where_of, {"pid": {"$in": [float("nan")]}})


class RefusalTests(SynchronousTestCase):
    """Everything outside the language is a QueryError with a short,
    useful message."""

    def assertRefused(self, select, fragment, compile=compile_select, **kwargs):
        with self.assertRaises(QueryError) as caught:
            compile(select, SCHEMA, **kwargs)
        message = str(caught.exception)
        self.assertIn(fragment, message)
        self.assertLess(len(message), 200)
        return message

    def test_not_an_object(self):
        for select in (None, [], "SELECT 1", 1, True):
            self.assertRefused(select, "$select must be an object")

    def test_unknown_select_keys(self):
        self.assertRefused({"$foo": 1}, '"$foo"')
        self.assertRefused({"pid": 1}, '"pid"')
        self.assertRefused({"$into": "x"}, '"$into"')
        self.assertRefused({"$union": {}}, '"$union"')

    def test_joins(self):
        for key in ("$join", "$leftJoin", "$innerJoin"):
            self.assertRefused({key: {"other": {"$on": {}}}}, "joins are not supported")

    def test_raw_sql_helpers(self):
        self.assertRefused({"$where": {"$__": "1=1"}}, "raw SQL")
        self.assertRefused({"$where": {"pid": {"$__": "1=1"}}}, "raw SQL")
        self.assertRefused({"$columns": [{"$__": "version()"}]}, "raw SQL")
        self.assertRefused({"$__": "DROP TABLE x"}, "raw SQL")

    def test_unknown_operators(self):
        self.assertRefused({"$where": {"$xor": [{"pid": 1}]}}, '"$xor"')
        self.assertRefused({"$where": {"pid": {"$regex": "a.*"}}}, '"$regex"')
        self.assertRefused({"$where": {"pid": {"eq": 1}}}, '"eq"')
        self.assertRefused({"$where": {"$select": {}}}, '"$select"')

    def test_other_tables(self):
        for table in ("other", "mysql.user", "eventsource.other", "information_schema.tables",
                      "event; DROP TABLE event", "`event`", None, ["event"], {"event": "e"}):
            self.assertRefused({"$from": table}, "is not available")

    def test_table_accepted(self):
        for table in ("event", "eventsource.event"):
            self.assertEqual(compile_select({"$from": table}, SCHEMA).columns, SCHEMA.default_columns)

    def test_unknown_columns(self):
        self.assertRefused({"$where": {"password": "x"}}, 'unknown column "password"')
        self.assertRefused({"$where": {"PID": "x"}}, 'unknown column "PID"')
        self.assertRefused({"$where": {"pid`": "x"}}, "unknown column")
        self.assertRefused({"$where": {"`pid`": "x"}}, "unknown column")
        self.assertRefused({"$where": {"event.pid": "x"}}, "unknown column")
        self.assertRefused({"$columns": ["password"]}, "unknown column")
        self.assertRefused({"$columns": ["pid`, (SELECT 1) AS `x"]}, "unknown column")
        self.assertRefused({"$orderBy": {"password": 1}}, "unknown column")
        self.assertRefused({"$groupBy": ["password"]}, "unknown column")

    def test_long_input_is_truncated(self):
        message = self.assertRefused({"$where": {"x" * 10000: 1}}, "unknown column")
        self.assertIn("...", message)
        message = self.assertRefused({"$from": "y" * 10000}, "is not available")
        self.assertLess(len(message), 120)

    def test_limit_offset(self):
        for value in (-1, 1.5, 1.0, True, False, [], {}, 2 ** 64, "-1", "1.5", " 1", "1 ", "",
                      "1e3", "0x10", "١", "9" * 17, "12345678901234567890"):
            self.assertRefused({"$limit": value}, "$limit")
            self.assertRefused({"$offset": value}, "$offset")

    def test_limit_offset_as_decimal_strings(self):
        """The original took ``"2"`` for 2; so do we (digits only)."""
        plan = compile_select({"$limit": "2", "$offset": "007", "$orderBy": {"pid": 1}}, SCHEMA)
        self.assertEqual((plan.limit, plan.offset), (2, 7))
        plan = compile_select({"$limit": "0"}, SCHEMA)
        self.assertEqual(plan.limit, 0)

    def test_distinct(self):
        for value in (1, "true", None, []):
            self.assertRefused({"$distinct": value}, "$distinct")

    def test_insert_refused_in_select(self):
        self.assertRefused({"$insert": {}}, '"$insert"')


class ColumnsTests(SynchronousTestCase):
    """``$columns``: names, aliases and aggregates."""

    def test_default(self):
        plan = compile_select({}, SCHEMA)
        self.assertEqual(plan.columns, ("timestamp", "pid", "domain", "name", "data"))
        self.assertIn("SELECT " + DEFAULT_SELECT + ", `id` AS `__keyset` FROM",
                      plan.page_sql(0, 1, 1)[0])

    def test_list(self):
        plan = compile_select({"$columns": ["id", "pid"]}, SCHEMA)
        self.assertEqual(plan.columns, ("id", "pid"))
        # (the output id is the keyset: read there, no __keyset of its own)
        self.assertEqual(plan.keyset_index, 0)
        self.assertTrue(plan.page_sql(0, 1, 1)[0].startswith("SELECT `id`, `pid` FROM"))

    def test_string_and_star(self):
        self.assertEqual(compile_select({"$columns": "pid"}, SCHEMA).columns, ("pid",))
        self.assertEqual(compile_select({"$columns": ["*"]}, SCHEMA).columns, SCHEMA.default_columns)
        self.assertEqual(compile_select({"$columns": ["id", "*"]}, SCHEMA).columns,
                         ("id",) + SCHEMA.default_columns)

    def test_aggregates(self):
        plan = compile_select({"$columns": [
            {"n": {"$count": "*"}}, {"c": {"$count": "name"}}, {"first": {"$min": "timestamp"}},
            {"last": {"$max": "id"}}, {"total": {"$sum": "id"}}, {"mean": {"$avg": "id"}}]}, SCHEMA)
        self.assertEqual(plan.columns, ("n", "c", "first", "last", "total", "mean"))
        self.assertFalse(plan.keyset)
        sql, params = plan.offset_sql(0, 100, 10)
        self.assertEqual(sql, (
            "SELECT COUNT(*) AS `n`, COUNT(`name`) AS `c`, MIN(`timestamp`) AS `first`, "
            "MAX(`id`) AS `last`, SUM(`id`) AS `total`, AVG(`id`) AS `mean` FROM " + TABLE
            + " WHERE `id` <= %s LIMIT %s OFFSET %s"))
        self.assertEqual(params, (100, 10, 0))

    def test_object_form(self):
        plan = compile_select({"$columns": {"pid": True, "name": 1, "data": False, "domain": 0,
                                            "timestamp": "ts", "n": {"$count": "*"}}}, SCHEMA)
        self.assertEqual(plan.columns, ("pid", "name", "ts", "n"))
        self.assertIn("SELECT `pid`, `name`, `timestamp` AS `ts`, COUNT(*) AS `n` FROM",
                      plan.offset_sql(0, 1, 1)[0])
        self.assertEqual(compile_select({"$columns": [{"pid": "p"}, "name"]}, SCHEMA).columns,
                         ("p", "name"))
        self.assertEqual(compile_select({"$columns": {"pid": "pid"}}, SCHEMA).columns, ("pid",))

    def test_refusals(self):
        for columns in ([], {}, {"pid": False}, [1], [None], [["pid"]], 5, True,
                        ["pid", "pid"], ["*", "pid"], [{"n": {"$count": "*"}}, {"n": {"$max": "id"}}],
                        [{"N": {"$count": "*"}}, {"n": {"$count": "*"}}],
                        [{"pid": {"$count": "*"}}], [{"PID": {"$count": "*"}}],
                        [{"__keyset": {"$count": "*"}}], [{"n`": {"$count": "*"}}],
                        [{"a b": {"$count": "*"}}], [{"1n": {"$count": "*"}}],
                        [{"n": {"$count": "nope"}}], [{"n": {"$sum": "*"}}],
                        [{"n": {"$count": "*", "$max": "id"}}], [{"n": {}}],
                        [{"n": {"$median": "id"}}], [{"n": {"$count": ["id"]}}],
                        [{"n": "*"}], {"pid": 2}, {"pid": None}, {"pid": "name"},
                        {"pid": "p", "name": "p"}, {"pid": "x" * 100}):
            self.assertRaises(QueryError, compile_select, {"$columns": columns}, SCHEMA)


class OrderGroupTests(SynchronousTestCase):
    """``$orderBy``, ``$groupBy``, ``$having``, ``$distinct``."""

    def test_order_forms(self):
        for order in ({"pid": 1, "id": -1}, {"pid": "ASC", "id": "DESC"},
                      {"pid": "asc", "id": "desc"}, {"pid": True, "id": False},
                      [{"pid": 1}, {"id": -1}], {"pid": 1, "name": 0, "id": -1}):
            sql = offset_sql({"$orderBy": order})[0]
            self.assertIn(" ORDER BY `pid` ASC, `id` DESC LIMIT", sql, order)
        self.assertIn(" ORDER BY `pid` ASC, `name` ASC, `id` ASC LIMIT",
                      offset_sql({"$orderBy": ["pid", "name"]})[0])
        self.assertIn(" ORDER BY `name` ASC, `id` ASC LIMIT",
                      offset_sql({"$orderBy": "name"})[0])

    def test_order_keeps_key_order(self):
        self.assertIn(" ORDER BY `name` DESC, `pid` ASC, `id` ASC LIMIT",
                      offset_sql({"$orderBy": {"name": -1, "pid": 1}})[0])

    def test_order_refusals(self):
        for order in ({"pid": 2}, {"pid": "up"}, {"pid": None}, {"pid": 1.0}, {"pid": [1]},
                      [1], [None], ["pid", "pid"], {"$rand": 1}, 5, {"pid": {"$desc": 1}}):
            self.assertRaises(QueryError, compile_select, {"$orderBy": order}, SCHEMA)

    def test_order_by_id_is_keyset(self):
        self.assertTrue(compile_select({"$orderBy": {"id": 1}}, SCHEMA).keyset)
        self.assertTrue(compile_select({"$orderBy": []}, SCHEMA).keyset)
        self.assertFalse(compile_select({"$orderBy": {"id": -1}}, SCHEMA).keyset)
        self.assertIn(" ORDER BY `id` DESC LIMIT", offset_sql({"$orderBy": {"id": -1, "pid": 1}})[0])

    def test_group_having(self):
        sql, params = offset_sql({
            "$columns": ["domain", {"n": {"$count": "*"}}, {"last": {"$max": "timestamp"}}],
            "$where": {"pid": "p"},
            "$groupBy": ["domain"],
            "$having": {"n": {"$gt": 2}, "last": {"$lt": "2021-01-01T00:00:00+01:00"},
                        "domain": {"$ne": "x"}},
            "$orderBy": {"n": -1}}, skip=5, high_water=99, size=7)
        self.assertEqual(sql, (
            "SELECT `domain`, COUNT(*) AS `n`, MAX(`timestamp`) AS `last` FROM " + TABLE
            + " WHERE (`pid` = %s) AND `id` <= %s GROUP BY `domain`"
            " HAVING `n` > %s AND `last` < %s AND `domain` <> %s"
            " ORDER BY `n` DESC, `domain` ASC LIMIT %s OFFSET %s"))
        self.assertEqual(params, ("p", 99, 2, datetime(2020, 12, 31, 23, 0), "x", 7, 5))

    def test_group_forms(self):
        for group in ("domain", ["domain", "name"], {"domain": True, "name": 1, "pid": False}):
            plan = compile_select({"$columns": ["domain"], "$groupBy": group}, SCHEMA)
            self.assertFalse(plan.keyset)
            self.assertIn(" GROUP BY `domain`", plan.offset_sql(0, 1, 1)[0])
        self.assertIn(" GROUP BY `domain`, `name` ORDER BY `domain` ASC, `name` ASC LIMIT",
                      offset_sql({"$columns": ["domain"], "$groupBy": ["domain", "name"]})[0])

    def test_group_refusals(self):
        for group in ({"pid": "yes"}, {"pid": -1}, [1], ["n"], ["pid", "pid"], 3, {"$x": 1}):
            self.assertRaises(QueryError, compile_select,
                              {"$columns": ["pid", {"n": {"$count": "*"}}], "$groupBy": group}, SCHEMA)

    def test_having_names(self):
        base = {"$columns": ["domain", {"n": {"$count": "*"}}], "$groupBy": ["domain"]}
        self.assertRaises(QueryError, compile_select, dict(base, **{"$having": {"pid": "x"}}), SCHEMA)
        self.assertRaises(QueryError, compile_select, dict(base, **{"$having": {"m": 1}}), SCHEMA)
        self.assertRaises(QueryError, compile_select, dict(base, **{"$having": []}), SCHEMA)
        self.assertEqual(
            compile_select(dict(base, **{"$having": {"$or": [{"n": 1}, {"domain": None}]}}),
                           SCHEMA).having_params, (1,))

    def test_having_alias_of_renamed_column(self):
        sql = offset_sql({"$columns": {"pid": "p"}, "$having": {"p": "x"}})[0]
        self.assertIn(" HAVING `p` = %s ORDER BY `id` ASC", sql)

    def test_order_by_alias(self):
        sql = offset_sql({"$columns": ["pid", {"n": {"$count": "id"}}], "$groupBy": "pid",
                          "$orderBy": ["n"]})[0]
        self.assertIn(" ORDER BY `n` ASC, `pid` ASC LIMIT", sql)

    def test_distinct(self):
        plan = compile_select({"$distinct": True, "$columns": ["pid", {"name": "nm"}],
                               "$orderBy": {"nm": -1}}, SCHEMA)
        self.assertFalse(plan.keyset)
        self.assertEqual(plan.offset_sql(3, 50, 10), (
            "SELECT DISTINCT `pid`, `name` AS `nm` FROM " + TABLE
            + " WHERE `id` <= %s ORDER BY `nm` DESC, `pid` ASC LIMIT %s OFFSET %s", (50, 10, 3)))
        self.assertTrue(compile_select({"$distinct": False}, SCHEMA).keyset)

    def test_aggregate_without_group_has_no_order(self):
        sql = offset_sql({"$columns": [{"n": {"$count": "*"}}], "$where": {"pid": "x"}})[0]
        self.assertEqual(sql, "SELECT COUNT(*) AS `n` FROM " + TABLE
                         + " WHERE (`pid` = %s) AND `id` <= %s LIMIT %s OFFSET %s")


class PagingTests(SynchronousTestCase):
    """Keyset and offset paging SQL, and when each is chosen."""

    def test_keyset_sql(self):
        plan = compile_select({"$where": {"pid": "p1", "name": {"$in": ["a", "b"]}}, "$limit": 5}, SCHEMA)
        self.assertEqual((plan.columns, plan.keyset, plan.limit, plan.offset),
                         (SCHEMA.default_columns, True, 5, 0))
        self.assertEqual(plan.page_sql(10, 20, 3), (
            "SELECT " + DEFAULT_SELECT + ", `id` AS `__keyset` FROM " + TABLE
            + " FORCE INDEX (`pid_id`)"
            + " WHERE (`pid` = %s AND `name` IN (%s, %s)) AND `id` > %s AND `id` <= %s"
            " ORDER BY `id` LIMIT %s", ("p1", "a", "b", 10, 20, 3)))

    def test_keyset_sql_of_an_in_list(self):
        # one (pid, id) range per value, merged; the rest of $where written once
        plan = compile_select({"$columns": ["name"], "$where": {"pid": {"$in": ["a", 2]},
                                                                "name": {"$ne": "x"}}}, SCHEMA)
        branch = ("(SELECT `id` FROM `__base` WHERE `pid` = %s AND `id` > %s AND `id` <= %s"
                  " ORDER BY `id` LIMIT %s)")
        self.assertEqual(plan.page_sql(10, 20, 3), (
            "WITH `__base` AS (SELECT * FROM " + TABLE + " FORCE INDEX (`pid_id`) WHERE `name` <> %s),"
            " `__page` AS (" + branch + " UNION " + branch + " ORDER BY `id` LIMIT %s)"
            " SELECT `name`, `id` AS `__keyset` FROM `__page` STRAIGHT_JOIN " + TABLE
            + " USING (`id`) ORDER BY `id`", ("x", "a", 10, 20, 3, "2", 10, 20, 3, 3)))
        self.assertEqual(plan.offset_sql(0, 20, 3)[1], ("a", "2", "x", 20, 3, 0))
        only = compile_select({"$where": {"domain": {"$in": ["a", "b", "c"]}}}, SCHEMA)
        self.assertTrue(only.page_sql(0, 9, 1)[0].startswith(
            "WITH `__base` AS (SELECT * FROM " + TABLE + " FORCE INDEX (`domain_id`)), `__page` AS ("))

    def test_keyset_without_where(self):
        self.assertEqual(compile_select({"$columns": ["pid"]}, SCHEMA).page_sql(0, 9, 100), (
            "SELECT `pid`, `id` AS `__keyset` FROM " + TABLE
            + " FORCE INDEX (PRIMARY) WHERE `id` > %s AND `id` <= %s ORDER BY `id` LIMIT %s", (0, 9, 100)))

    def test_keyset_index_follows_equalities(self):
        def hint(where):
            return compile_select({"$where": where}, SCHEMA).page_sql(0, 9, 100)[0].split(" WHERE ")[0]
        self.assertTrue(hint({"pid": "p", "name": "x"}).endswith(" FORCE INDEX (`pid_id`)"))
        self.assertTrue(hint({"pid": {"$eq": 3}}).endswith(" FORCE INDEX (`pid_id`)"))
        self.assertTrue(hint({"domain": "d", "name": "n"}).endswith(" FORCE INDEX (`domain_name_id`)"))
        self.assertTrue(hint({"domain": "d"}).endswith(" FORCE INDEX (`domain_id`)"))
        self.assertTrue(hint({"name": {"$eq": "n", "$ne": "m"}}).endswith(" FORCE INDEX (`name_id`)"))
        self.assertTrue(hint({"pid": {"$in": ["a"]}}).endswith(" FORCE INDEX (`pid_id`)"))
        self.assertTrue(hint({"pid": {"$in": list(range(16))}}).startswith("WITH `__base` AS ("))
        self.assertTrue(hint({"pid": {"$in": list(range(17))}})
                        .endswith(" FORCE INDEX (PRIMARY, `pid_id`)"))
        self.assertTrue(hint({"$and": [{"id": 3}, {"$and": {"domain": "d"}}]})
                        .endswith(" FORCE INDEX (`domain_id`)"))
        for condition in ({"$gte": "2020-01-01"}, {"$lt": "2020-01-01", "$ne": "2019-01-01"},
                          {"$between": {"$min": "2020-01-01", "$max": "2021-01-01"}}, "2020-01-01",
                          {"$in": ["2020-01-01", "2020-01-02"]}):
            self.assertTrue(hint({"timestamp": condition, "data": {"$ne": "null"}})
                            .endswith(" FORCE INDEX (PRIMARY, `timestamp_id`)"), condition)
        for where in ({"pid": None}, {"$or": [{"pid": "a"}]}, {"$not": {"pid": "a"}},
                      {"pid": {"$ne": "a"}}, {"timestamp": {"$ne": "2020-01-01"}}, {"id": 5}):
            self.assertTrue(hint(where).endswith(" FORCE INDEX (PRIMARY)"), where)
        offset_plan = compile_select({"$where": {"pid": "p"}, "$orderBy": {"name": 1}}, SCHEMA)
        self.assertNotIn("FORCE", offset_plan.offset_sql(0, 9, 100)[0])

    def test_offset_sql(self):
        plan = compile_select({"$where": {"pid": "p1"}, "$orderBy": {"name": -1},
                               "$limit": 10, "$offset": 4}, SCHEMA)
        self.assertEqual((plan.keyset, plan.limit, plan.offset), (False, 10, 4))
        self.assertEqual(plan.offset_sql(6, 77, 2), (
            "SELECT " + DEFAULT_SELECT + " FROM " + TABLE
            + " WHERE (`pid` = %s) AND `id` <= %s ORDER BY `name` DESC, `id` ASC"
            " LIMIT %s OFFSET %s", ("p1", 77, 2, 6)))

    def test_offset_sql_of_keyset_plan(self):
        self.assertEqual(compile_select({}, SCHEMA).offset_sql(0, 5, 5)[0],
                         "SELECT " + DEFAULT_SELECT + " FROM " + TABLE
                         + " WHERE `id` <= %s ORDER BY `id` ASC LIMIT %s OFFSET %s")

    def test_mode_choice(self):
        keyset = [{}, {"$where": {"pid": 1}}, {"$limit": 3}, {"$offset": 0}, {"$limit": None},
                  {"$orderBy": {"id": "ASC"}}, {"$columns": ["id"]}, {"$groupBy": []},
                  {"$offset": None}, {"$distinct": False}]
        offset = [{"$offset": 1}, {"$orderBy": {"pid": 1}}, {"$orderBy": ["id", "pid"]},
                  {"$distinct": True}, {"$groupBy": ["pid"], "$columns": ["pid"]},
                  {"$having": {"pid": "x"}, "$columns": ["pid"]},
                  {"$columns": [{"n": {"$count": "*"}}]},
                  {"$columns": ["pid", {"n": {"$max": "id"}}]}]
        for select in keyset:
            self.assertTrue(compile_select(select, SCHEMA).keyset, select)
        for select in offset:
            self.assertFalse(compile_select(select, SCHEMA).keyset, select)

    def test_limit_offset_values(self):
        plan = compile_select({"$limit": 0, "$offset": 2 ** 53 - 1}, SCHEMA)
        self.assertEqual((plan.limit, plan.offset), (0, 2 ** 53 - 1))
        self.assertEqual(compile_select({}, SCHEMA).limit, None)

    def test_paging_arguments_checked(self):
        keyset = compile_select({}, SCHEMA)
        offset = compile_select({"$offset": 1}, SCHEMA)
        self.assertRaises(ValueError, offset.page_sql, 0, 1, 1)
        for bad in (-1, None, "1", True, 1.0):
            self.assertRaises(ValueError, keyset.page_sql, bad, 1, 1)
            self.assertRaises(ValueError, keyset.page_sql, 0, bad, 1)
            self.assertRaises(ValueError, offset.offset_sql, 0, 1, bad)

    def test_plan_is_reusable(self):
        plan = compile_select({"$where": {"pid": "p"}}, SCHEMA)
        self.assertEqual(plan.page_sql(0, 10, 5)[1], ("p", 0, 10, 5))
        self.assertEqual(plan.page_sql(5, 10, 5)[1], ("p", 5, 10, 5))


TERM_FORMS = ("columns", "column_items", "column_object", "group", "order", "order_items",
              "where_or", "where_in", "where_and", "having")


def count_calls(function, *args):
    """How many Python and C function calls ``function(*args)`` makes."""
    calls = [0]

    def profile(frame, event, arg):
        if event in ("call", "c_call"):
            calls[0] += 1

    sys.setprofile(profile)
    try:
        function(*args)
    finally:
        sys.setprofile(None)
    return calls[0]


def cpu_time(function, *args):
    """The process CPU time ``function(*args)`` takes."""
    start = time.process_time()
    function(*args)
    return time.process_time() - start


@st.composite
def termed_selects(draw, shape=None, scale=None):
    """
    A valid ``$select`` built from every form that spends terms, and how
    many terms the docs say it has: each listed column or key of a
    ``$columns`` item or object, each group and order entry (list items and
    keys of objects), each condition and ``$in`` value.  With ``scale``,
    every form in ``shape`` has about ``scale`` entries.
    """
    def size(form):
        if scale is not None:
            return scale * shape[form]
        return draw(st.integers(0, 12))

    aliases, columns, terms = [], [], 0

    def alias():
        aliases.append("a%d" % len(aliases))
        return aliases[-1]

    count = size("columns")
    columns += [{alias(): {"$count": "*"}} for _ in range(count)]
    terms += count
    count = size("column_items")
    per_item = 3 if scale is not None else draw(st.integers(1, 4))
    for _ in range(0, count, per_item):
        columns.append({alias(): {"$max": "id"} for _ in range(per_item)})
        terms += per_item
    count = size("column_object")
    if count or not columns:
        count = max(count, 1)
        columns.append({alias(): {"$sum": "id"} for _ in range(count)})
        terms += count
    select = {"$columns": columns}
    if len(columns) == 1 and isinstance(columns[0], dict) and draw(st.booleans()):
        select["$columns"] = columns[0]               # the object form itself
    groups = ["pid", "domain", "name", "timestamp", "data", "id"][:min(6, size("group"))]
    if groups:
        select["$groupBy"] = draw(st.sampled_from([groups, [{g: True for g in groups}],
                                                   {g: 1 for g in groups}]))
        terms += len(groups)
    order = aliases[:size("order")]
    order_items = aliases[len(order):len(order) + size("order_items")]
    if order or order_items:
        select["$orderBy"] = order + ([{a: -1 for a in order_items}] if order_items else [])
        terms += len(order) + len(order_items)
    where = {}
    count = size("where_or")
    if count:
        where["$or"] = [{"pid": "p%d" % i} for i in range(count)]
        terms += count
    count = size("where_in")
    if count:
        where["name"] = {"$in": ["n%d" % i for i in range(count)]}
        terms += count
    count = size("where_and")
    if count:
        where["$and"] = {"domain": {"$ne": "x"}} if count == 1 else [
            {"id": {"$gt": i}} for i in range(count)]
        terms += count
    if where or (scale is None and draw(st.booleans())):
        select["$where"] = where
        terms += 0 if where else 1                     # {} is a term
    count = size("having")
    if count and aliases:
        select["$having"] = {"$or": [{aliases[i % len(aliases)]: {"$gte": i}} for i in range(count)]}
        terms += count
    return select, terms


class LimitsTests(SynchronousTestCase):
    """Limits on depth, terms and list lengths."""

    def nest(self, levels, leaf=None):
        where = leaf if leaf is not None else {"pid": "x"}
        for _ in range(levels):
            where = {"$not": where}
        return where

    def test_depth(self):
        limits = Limits(max_depth=5)
        compile_select({"$where": self.nest(4)}, SCHEMA, limits)
        with self.assertRaises(QueryError) as caught:
            compile_select({"$where": self.nest(5)}, SCHEMA, limits)
        self.assertEqual(str(caught.exception), "$where is nested too deeply (more than 5 levels)")
        compile_select({"$where": {"$and": [{"$or": [{"pid": 1}]}]}}, SCHEMA, limits)
        self.assertRaises(QueryError, compile_select,
                          {"$where": {"$and": [{"$or": [{"pid": {"$in": [1]}}]}]}}, SCHEMA, limits)

    def test_default_depth(self):
        compile_select({"$where": self.nest(30)}, SCHEMA)
        self.assertRaises(QueryError, compile_select, {"$where": self.nest(32)}, SCHEMA)

    def test_having_depth(self):
        select = {"$columns": ["pid"], "$having": self.nest(40)}
        self.assertRaises(QueryError, compile_select, select, SCHEMA)

    def test_very_deep_input_is_query_error(self):
        deep = {"pid": 1}
        for _ in range(100000):
            deep = {"$and": [deep]}
        self.assertRaises(QueryError, compile_select, {"$where": deep}, SCHEMA)
        self.assertRaises(QueryError, compile_select, {"$where": self.nest(100000)}, SCHEMA)

    def test_terms(self):
        limits = Limits(max_terms=10)
        compile_select({"$where": {"pid": {"$in": list(range(10))}}}, SCHEMA, limits)
        with self.assertRaises(QueryError) as caught:
            compile_select({"$where": {"pid": {"$in": list(range(11))}}}, SCHEMA, limits)
        self.assertEqual(str(caught.exception), "query is too large: more than 10 terms")
        self.assertRaises(QueryError, compile_select,
                          {"$where": {"$or": [{"pid": i} for i in range(11)]}}, SCHEMA, limits)
        self.assertRaises(QueryError, compile_select,
                          {"$where": {"$or": [{} for i in range(11)]}}, SCHEMA, limits)
        # where and having share one budget
        self.assertRaises(QueryError, compile_select,
                          {"$columns": ["pid"], "$where": {"$or": [{"pid": i} for i in range(5)]},
                           "$having": {"$or": [{"pid": i} for i in range(5)]}}, SCHEMA, limits)

    def test_terms_default(self):
        many = {"$or": [{"pid": i} for i in range(1001)]}
        self.assertRaises(QueryError, compile_select, {"$where": many}, SCHEMA)
        many_aliases = [{"a%d" % i: {"$count": "*"}} for i in range(1001)]
        self.assertRaises(QueryError, compile_select, {"$columns": many_aliases}, SCHEMA)

    def test_every_key_of_a_list_item_is_a_term(self):
        # one list item holding 20,000 aggregates was accepted (1 term)
        one_item = {"a%d" % i: {"$count": "*"} for i in range(20000)}
        for select in ({"$columns": [one_item]}, {"$columns": one_item},
                       {"$columns": ["pid"], "$orderBy": [{c: 1 for c in SCHEMA.columns}]},
                       {"$columns": ["pid"], "$groupBy": [{c: True for c in SCHEMA.columns}]}):
            with self.assertRaises(QueryError) as caught:
                compile_select(select, SCHEMA, Limits(max_terms=5))
            self.assertEqual(str(caught.exception), "query is too large: more than 5 terms")
        compile_select({"$columns": ["pid"], "$orderBy": [{"pid": 1, "name": -1}],
                        "$groupBy": [{"pid": True, "name": True}]}, SCHEMA, Limits(max_terms=5))

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.data())
    def test_terms_counted_in_every_form(self, data):
        select, terms = data.draw(termed_selects())
        limit = max(1, terms + data.draw(st.integers(-3, 3)))
        limits = Limits(max_terms=limit, max_in_list=10 ** 6)
        if terms > limit:
            with self.assertRaises(QueryError) as caught:
                compile_select(select, SCHEMA, limits)
            self.assertEqual(str(caught.exception), "query is too large: more than %d terms" % (limit,))
        else:
            compile_select(select, SCHEMA, limits)

    @settings(max_examples=25, deadline=None, database=None)
    @given(st.data())
    def test_compile_work_is_linear(self, data):
        # Python and C calls made while compiling a query of every form, at
        # a size and at eight times that size: no more than ~8 times as many
        shape = data.draw(st.fixed_dictionaries({form: st.integers(0, 3) for form in TERM_FORMS}))
        small, _ = data.draw(termed_selects(shape=shape, scale=40))
        large, _ = data.draw(termed_selects(shape=shape, scale=320))
        distinct = data.draw(st.booleans())
        small["$distinct"] = large["$distinct"] = distinct
        limits = Limits(max_terms=10 ** 7, max_in_list=10 ** 7)
        counts = [count_calls(compile_select, select, SCHEMA, limits) for select in (small, large)]
        self.assertLess(counts[1], 8.5 * counts[0] + 1000, counts)
        # and loops inside C calls (``x in list``): CPU time, with a ratio
        # far from both 8 (linear) and 64 (quadratic)
        times = [min(cpu_time(compile_select, select, SCHEMA, limits) for _ in range(3))
                 for select in (small, large)]
        self.assertLess(times[1], 24 * times[0] + 0.005, times)

    def test_in_list(self):
        limits = Limits(max_in_list=3)
        compile_select({"$where": {"pid": {"$nin": [1, 2, 3]}}}, SCHEMA, limits)
        with self.assertRaises(QueryError) as caught:
            compile_select({"$where": {"pid": {"$nin": [1, 2, 3, 4]}}}, SCHEMA, limits)
        self.assertEqual(str(caught.exception), "$nin list is too long: 4 values, at most 3")
        huge = {"$where": {"pid": {"$in": list(range(10 ** 6))}}}
        self.assertIn("at most 1000", str(self.assertRaises(QueryError, compile_select, huge, SCHEMA)))


class InsertTests(SynchronousTestCase):
    """``$insert`` validation."""

    DOC = {"pid": "p1", "domain": "user", "name": "created", "data": {"foo": "bar"}}

    def rows(self, insert, **kwargs):
        return compile_insert(insert, SCHEMA, **kwargs).rows

    def test_one_document(self):
        self.assertEqual(self.rows({"$table": "eventsource.event", "$documents": self.DOC}),
                         (("p1", "user", "created", '{"foo":"bar"}'),))
        self.assertIsInstance(compile_insert({"$documents": self.DOC}, SCHEMA), InsertPlan)

    def test_many_documents(self):
        docs = [dict(self.DOC, pid="p%d" % i) for i in range(3)]
        self.assertEqual([row[0] for row in self.rows({"$documents": docs, "$table": "event"})],
                         ["p0", "p1", "p2"])

    def test_data(self):
        """``data`` is stored as JavaScript's JSON.stringify would write it."""
        cases = [(None, "null"), (1, "1"), ([1, {"a": None}], '[1,{"a":null}]'),
                 ({"é": "ü", "b": [True, False]}, '{"é":"ü","b":[true,false]}'), (1.5, "1.5"),
                 (True, "true"), (1.0, "1"), (1e21, "1e+21"), (1e-7, "1e-7"), (2 ** 64, "18446744073709552000"),
                 ({"b": 1, "10": 2, "2": 3}, '{"2":3,"10":2,"b":1}'), ({"\udfff": 1}, '{"\\udfff":1}'),
                 (float("nan"), "null"), ({"x": float("inf")}, '{"x":null}'), ([-float("inf")], "[null]")]
        for data, text in cases:
            self.assertEqual(self.rows({"$documents": dict(self.DOC, data=data)})[0][3], text)
        no_data = {k: v for k, v in self.DOC.items() if k != "data"}
        self.assertEqual(self.rows({"$documents": no_data})[0][3], "null")

    def test_data_as_json_text(self):
        """
        A string ``data`` is JSON text (the original's own test sends
        ``"{\\"foo\\":\\"bar\\"}"``): the value it encodes is stored, not a
        JSON string.
        """
        cases = [('{"foo":"bar"}', '{"foo":"bar"}'), ('{"foo": "bar", "n": 1.0}', '{"foo":"bar","n":1}'),
                 ('"x"', '"x"'), ("[1, 2]", "[1,2]"), ("null", "null"), (" 12 ", "12")]
        for data, text in cases:
            self.assertEqual(self.rows({"$documents": dict(self.DOC, data=data)})[0][3], text)

    def test_data_refused(self):
        for data in ("x", "\ud800", "{", "{'a': 1}", "NaN", "[1,]", ""):
            with self.assertRaises(QueryError) as caught:
                self.rows({"$documents": dict(self.DOC, data=data)})
            self.assertIn("not JSON text", str(caught.exception))
        deep = []
        for _ in range(100000):
            deep = [deep]
        self.assertRaises(QueryError, self.rows, {"$documents": dict(self.DOC, data=deep)})
        self.assertRaises(QueryError, self.rows, {"$documents": dict(self.DOC, data="[" * 100000)})
        self.assertRaises(QueryError, self.rows, {"$documents": dict(self.DOC, data="[" * 32 + "]" * 32)})
        self.assertEqual(self.rows({"$documents": dict(self.DOC, data="[" * 31 + "]" * 31)})[0][3],
                         "[" * 31 + "]" * 31)
        self.assertRaises(QueryError, self.rows, {"$documents": dict(self.DOC, data={1, 2})})

    def test_timestamp_is_ignored(self):
        """The append time is always the server's, as in the original."""
        for value in ("2020-04-06T13:35:18.414+02:00", None, "now", 1586172918414, []):
            plan = compile_insert({"$documents": dict(self.DOC, timestamp=value)}, SCHEMA)
            self.assertEqual(plan.rows, (("p1", "user", "created", '{"foo":"bar"}'),))
            self.assertEqual(plan.ignored, ((0, ("timestamp",)),))

    def test_required_fields(self):
        for field in ("pid", "domain", "name"):
            for value in (None, "", 1, ["a"], {"a": 1}, True, "x" * 256, "\ud800"):
                self.assertRaises(QueryError, self.rows, {"$documents": dict(self.DOC, **{field: value})})
            missing = {k: v for k, v in self.DOC.items() if k != field}
            with self.assertRaises(QueryError) as caught:
                self.rows({"$documents": missing})
            self.assertIn(field, str(caught.exception))
        self.assertEqual(self.rows({"$documents": dict(self.DOC, pid="é" * 255)})[0][0], "é" * 255)

    def test_fields_that_are_not_written_are_ignored(self):
        """As the original did; the plan names them, for the log."""
        docs = [self.DOC, dict(self.DOC, id=7, extra=[1], Pid="x", **{"$set": 1})]
        plan = compile_insert({"$documents": docs}, SCHEMA)
        self.assertEqual(plan.rows, (("p1", "user", "created", '{"foo":"bar"}'),) * 2)
        self.assertEqual(plan.ignored, ((1, ("id", "extra", "Pid", "$set")),))

    def test_shape_refusals(self):
        for insert in (None, [], "x", {}, {"$documents": []}, {"$documents": "x"},
                       {"$documents": [self.DOC, "x"]}, {"$documents": [[self.DOC]]},
                       {"$documents": self.DOC, "$table": "other"},
                       {"$documents": self.DOC, "$table": None},
                       {"$documents": self.DOC, "$columns": ["pid"]},
                       {"$documents": self.DOC, "$onConflict": {}},
                       {"$documents": self.DOC, "$__": "x"},
                       {"$documents": self.DOC, "table": "event"}):
            self.assertRaises(QueryError, self.rows, insert)

    def test_max_documents(self):
        self.assertEqual(len(self.rows({"$documents": [self.DOC] * 3}, max_documents=3)), 3)
        with self.assertRaises(QueryError) as caught:
            self.rows({"$documents": [self.DOC] * 4}, max_documents=3)
        self.assertEqual(str(caught.exception), "too many documents: 4, at most 3")

    def test_error_names_document(self):
        with self.assertRaises(QueryError) as caught:
            self.rows({"$documents": [self.DOC, dict(self.DOC, pid="")]})
        self.assertIn("document 1", str(caught.exception))


# --------------------------------------------------------------------------
# property tests

INJECTIONS = [
    "x`; DROP TABLE event; --", "' OR 1=1 --", "\" OR \"\"=\"", "1; SELECT SLEEP(10)",
    "%s%s%s", "%(x)s", "\\'; DROP TABLE event; #", "`id` OR 1", "pid` = 1 OR `pid",
    "eventsource.event", "mysql.user", "/* comment */", "\x00\x1a\\", "'; --",
    "UNION SELECT password FROM mysql.user",
]

SQL_WORDS = {
    "SELECT", "DISTINCT", "FORCE", "INDEX", "PRIMARY", "FROM", "WHERE", "AND", "OR", "NOT", "IS", "NULL", "IN", "LIKE",
    "ESCAPE", "BETWEEN", "GROUP", "BY", "HAVING", "ORDER", "ASC", "DESC", "LIMIT", "OFFSET",
    "AS", "COUNT", "MIN", "MAX", "SUM", "AVG", "TRUE", "WITH", "UNION", "STRAIGHT_JOIN", "USING",
}

ALIASES = ("n", "total", "first", "last", "mean", "p", "nm", "ts")

SETTINGS = settings(max_examples=250, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def assert_safe_sql(test, sql, params, schema=SCHEMA, aliases=ALIASES):
    """The SQL text names only allowed identifiers (backquoted), only the
    schema's table, SQL keywords and punctuation; placeholders match params."""
    test.assertEqual(sql.count("%s"), len(params))
    test.assertNotIn("%", sql.replace("%s", ""))
    indexes = [n for n, _ in schema.keyset_indexes]
    names = "|".join("`%s`" % n for n in indexes + [n for n, _ in schema.range_indexes])
    hint = r"( FORCE INDEX \((PRIMARY|PRIMARY, (%s)|%s)\))?" % (names, names)
    if sql.startswith("WITH "):        # a page of `column $in [...]`
        test.assertRegex(sql, r"\AWITH `__base` AS \(SELECT \* FROM " + re.escape(schema.quoted)
                         + hint + "[ )]")
        for table in re.findall(r" (?:FROM|JOIN) (\S+)", sql):
            test.assertIn(table, (schema.quoted, "`__base`", "`__page`"))
    else:
        test.assertEqual(sql.count(" FROM "), 1)
        test.assertRegex(sql, " FROM " + re.escape(schema.quoted) + hint + " WHERE ")
    allowed = (set(schema.columns) | set(aliases) | {"__keyset", "__base", "__page"} | set(indexes)
               | {n for n, _ in schema.range_indexes})
    stripped = sql.replace(schema.quoted, " ")
    for ident in re.findall(r"`([^`]*)`", stripped):
        test.assertIn(ident, allowed)
    rest = re.sub(r"`[^`]*`", " ", stripped).replace("%s", " ").replace("ESCAPE '\\\\'", " ESCAPE ")
    for forbidden in ("'", '"', ";", "--", "#", "/*", "`", "\\"):
        test.assertNotIn(forbidden, rest)
    for word in re.findall(r"[A-Za-z_0-9.]+", rest):
        test.assertIn(word, SQL_WORDS)
    test.assertTrue(re.fullmatch(r"[A-Z_ (),=<>*]*", rest), rest)


def plan_sqls(plan):
    """Every SQL text the server may run for a plan."""
    out = [plan.offset_sql(7, 1000, 50)]
    if plan.keyset:
        out.append(plan.page_sql(3, 1000, 50))
    return out


class _Slot:
    """A value position in a generated query, filled in later (so one
    query shape can be compiled with two different sets of values)."""

    def __init__(self, kind):
        self.kind = kind        # "any", "num" (numeric columns), "text" (patterns) or "ts"


text_values = st.one_of(st.text(max_size=12), st.sampled_from(INJECTIONS))
any_values = st.one_of(text_values, st.integers(-2 ** 70, 2 ** 70),
                       st.floats(allow_nan=False, allow_infinity=False), st.booleans())
num_values = st.one_of(st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=False, allow_infinity=False),
                       st.booleans(), st.integers(-2 ** 70, 2 ** 70).map(str))
timestamp_values = st.builds(
    lambda moment, zone: moment.isoformat() + zone,
    st.datetimes(min_value=datetime(1000, 1, 2), max_value=datetime(9999, 12, 30)),
    st.sampled_from(["", "Z", "+02:00", "-0530", "+01"]))

COLUMN_OPS = ["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$like",
              "$startsWith", "$endsWith", "$contains", "$between", "$isNull", "=", "null"]


#: the numeric columns and aggregate aliases of the generated queries
NUMERIC_NAMES = ("id", "n", "total", "mean")


@st.composite
def conditions(draw, columns):
    """One column condition with value slots."""
    column = draw(st.sampled_from(columns))
    kind = ("ts" if column in SCHEMA.datetime_columns
            else "num" if column in NUMERIC_NAMES else "any")
    op = draw(st.sampled_from(COLUMN_OPS))
    if op == "=":
        return {column: _Slot(kind)}
    if op == "null":
        return {column: draw(st.sampled_from([None, {"$eq": None}, {"$ne": None}]))}
    if op in ("$in", "$nin"):
        return {column: {op: [_Slot(kind) for _ in range(draw(st.integers(1, 4)))]}}
    if op in ("$like", "$startsWith", "$endsWith", "$contains"):
        return {column: {op: _Slot("text")}}
    if op == "$between":
        return {column: {op: {"$min": _Slot(kind), "$max": _Slot(kind)}}}
    if op == "$isNull":
        return {column: {op: draw(st.booleans())}}
    return {column: {op: _Slot(kind)}}


def merge(objects):
    """AND several where-objects into one object where keys allow it."""
    merged = {}
    for obj in objects:
        for key, value in obj.items():
            merged.setdefault(key, value)
    return merged


def where_trees(columns):
    return st.recursive(
        conditions(columns),
        lambda children: st.one_of(
            st.lists(children, min_size=1, max_size=3).map(lambda items: {"$and": items}),
            st.lists(children, min_size=1, max_size=3).map(lambda items: {"$or": items}),
            children.map(lambda c: {"$not": c}),
            st.lists(children, min_size=2, max_size=3).map(merge),
        ),
        max_leaves=8)


@st.composite
def select_shapes(draw):
    """A valid ``$select`` with value slots."""
    select = {}
    grouped = draw(st.booleans())
    aggregates = [{"n": {"$count": "*"}}, {"total": {"$sum": "id"}},
                  {"first": {"$min": "timestamp"}}, {"last": {"$max": "timestamp"}},
                  {"mean": {"$avg": "id"}}]
    if grouped:
        groups = draw(st.lists(st.sampled_from(["pid", "domain", "name"]), min_size=1,
                               max_size=2, unique=True))
        chosen = draw(st.lists(st.sampled_from(aggregates), max_size=3, unique_by=lambda a: list(a)[0]))
        select["$groupBy"] = groups
        select["$columns"] = groups + chosen
        names = groups + [list(a)[0] for a in chosen]
        if draw(st.booleans()):
            having_columns = [n for n in names if n not in ("first", "last")]
            select["$having"] = draw(where_trees(having_columns))
    else:
        if draw(st.booleans()):
            select["$columns"] = draw(st.lists(st.sampled_from(SCHEMA.columns), min_size=1, unique=True))
        names = list(select.get("$columns", SCHEMA.default_columns))
        if draw(st.booleans()):
            select["$distinct"] = True
    if draw(st.booleans()):
        select["$where"] = draw(where_trees(SCHEMA.columns))
    if draw(st.booleans()):
        order = draw(st.lists(st.sampled_from(names + list(SCHEMA.columns)), max_size=3, unique=True))
        select["$orderBy"] = {name: draw(st.sampled_from([1, -1, "ASC", "desc"])) for name in order}
    if draw(st.booleans()):
        select["$limit"] = draw(st.integers(0, 10 ** 6))
    if draw(st.booleans()):
        select["$offset"] = draw(st.integers(0, 10 ** 6))
    if draw(st.booleans()):
        select["$from"] = draw(st.sampled_from(["event", "eventsource.event"]))
    return select


def fill(shape, values):
    """Replace every _Slot in ``shape`` by the next value from ``values``
    (a dict kind -> iterator)."""
    if isinstance(shape, _Slot):
        return next(values[shape.kind])
    if isinstance(shape, dict):
        return {key: fill(value, values) for key, value in shape.items()}
    if isinstance(shape, list):
        return [fill(item, values) for item in shape]
    return shape


class _Drawn:
    """An endless iterator of values drawn on demand from a strategy."""

    def __init__(self, data, strategy):
        self.data, self.strategy = data, strategy

    def __next__(self):
        return self.data.draw(self.strategy)


def value_sources(data):
    """Value iterators for fill(), drawing only as many values as needed."""
    return {"any": _Drawn(data, any_values), "text": _Drawn(data, text_values),
            "ts": _Drawn(data, timestamp_values), "num": _Drawn(data, num_values)}


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
    st.sampled_from(INJECTIONS))
json_keys = st.one_of(
    st.sampled_from(["$columns", "$distinct", "$from", "$where", "$groupBy", "$having",
                     "$orderBy", "$limit", "$offset", "$join", "$__", "$and", "$or", "$not",
                     "$min", "$max", "$count", "$sum", "$avg"] + COLUMN_OPS + list(SCHEMA.columns)
                    + list(ALIASES) + ["$documents", "$table", "other", "*"] + INJECTIONS),
    st.text(max_size=6))
json_trees = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(json_keys, children, max_size=4)),
    max_leaves=20)
garbage_selects = st.one_of(
    json_trees,
    st.dictionaries(json_keys, json_trees, max_size=6),
    st.fixed_dictionaries({}, optional={
        "$columns": st.one_of(json_trees, st.lists(st.sampled_from(list(SCHEMA.columns) + ["*", "x"]))),
        "$where": st.one_of(json_trees, where_trees(SCHEMA.columns).map(
            lambda shape: fill(shape, {k: iter([0, "x", "2020-01-01"] * 200)
                                       for k in ("any", "ts", "text", "num")}))),
        "$having": json_trees, "$orderBy": json_trees, "$groupBy": json_trees,
        "$limit": json_scalars, "$offset": json_scalars, "$distinct": json_scalars,
        "$from": st.one_of(json_scalars, st.sampled_from(["event", "eventsource.event", "other"]))}),
)


class PropertyTests(SynchronousTestCase):
    """Generated queries: values never become SQL, only allowed identifiers
    are emitted, and nothing but QueryError ever escapes."""

    @SETTINGS
    @given(select_shapes(), st.data())
    def test_values_are_only_parameters(self, shape, data):
        plan_a = compile_select(fill(shape, value_sources(data)), SCHEMA)
        plan_b = compile_select(fill(shape, value_sources(data)), SCHEMA)
        self.assertEqual(plan_a.columns, plan_b.columns)
        for (sql_a, params_a), (sql_b, params_b) in zip(plan_sqls(plan_a), plan_sqls(plan_b)):
            # the SQL text does not depend on the values at all
            self.assertEqual(sql_a, sql_b)
            self.assertEqual(len(params_a), len(params_b))
            assert_safe_sql(self, sql_a, params_a)
            for injection in INJECTIONS:
                self.assertNotIn(injection, sql_a)

    @SETTINGS
    @given(select_shapes(), st.sampled_from(INJECTIONS))
    def test_hostile_values_are_passed_through(self, shape, hostile):
        sources = {kind: iter([hostile] * 200) for kind in ("any", "text")}
        sources["ts"] = iter(["2020-04-06T11:35:18.414Z"] * 200)
        sources["num"] = iter([7] * 200)
        select = fill(shape, sources)
        plan = compile_select(select, SCHEMA)
        for sql, params in plan_sqls(plan):
            self.assertNotIn(hostile, sql)
            assert_safe_sql(self, sql, params)
        if "$where" in select and json.dumps(select["$where"]).count(json.dumps(hostile)):
            escaped = hostile.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            self.assertTrue(any(p in (hostile, escaped + "%", "%" + escaped, "%" + escaped + "%")
                                for p in plan.where_params))

    @SETTINGS
    @given(garbage_selects)
    def test_garbage_select(self, select):
        try:
            plan = compile_select(select, SCHEMA, Limits(max_depth=6, max_terms=40, max_in_list=5))
        except QueryError as e:
            self.assertLess(len(str(e)), 200)
            return
        self.assertIsInstance(plan, SelectPlan)
        aliases = [key for item in (select.get("$columns") or [])
                   if isinstance(item, dict) for key in item]
        if isinstance(select.get("$columns"), dict):
            aliases += list(select["$columns"]) + [v for v in select["$columns"].values()
                                                   if isinstance(v, str)]
        aliases += [v for item in (select.get("$columns") or []) if isinstance(item, dict)
                    for v in item.values() if isinstance(v, str)]
        for sql, params in plan_sqls(plan):
            assert_safe_sql(self, sql, params, aliases=aliases)
            for value in params:
                self.assertIsInstance(value, (str, int, float, datetime))

    @SETTINGS
    @given(st.one_of(json_trees, st.dictionaries(json_keys, json_trees, max_size=4),
                     st.fixed_dictionaries({"$documents": st.one_of(
                         json_trees, st.lists(st.dictionaries(
                             st.sampled_from(["pid", "domain", "name", "data", "timestamp", "id"]),
                             json_trees), max_size=3))},
                         optional={"$table": json_scalars})))
    def test_garbage_insert(self, insert):
        try:
            plan = compile_insert(insert, SCHEMA, max_documents=5)
        except QueryError as e:
            self.assertLess(len(str(e)), 200)
            return
        for pid, domain, name, data, timestamp in plan.rows:
            for text in (pid, domain, name):
                self.assertTrue(isinstance(text, str) and 0 < len(text) <= 255)
            json.loads(data)
            self.assertTrue(timestamp is None or isinstance(timestamp, datetime))

    @SETTINGS
    @given(st.text(max_size=30), st.integers(), st.floats())
    def test_error_messages_are_short(self, text, number, real):
        for bad in ({"$where": {text * 50: number}}, {"$from": text * 50},
                    {"$where": {"pid": {"$between": {"$min": text * 50, "$max": [real]}}}},
                    {"$where": {"timestamp": text * 50}}, {"$limit": real}, {"$offset": -1 - abs(number)}):
            try:
                compile_select(bad, SCHEMA)
            except QueryError as e:
                self.assertLess(len(str(e)), 200)


# --------------------------------------------------------------------------
# against the real MariaDB

# unique per process: the whole suite may run concurrently (tox, other
# developers) against the same server
DB = "es_test_query_%d_%s" % (os.getpid(), secrets.token_hex(3))
DB_SCHEMA = TableSchema(DB, "event")
ALPHABET = "aAb%_\\"
PATTERN_ALPHABET = "aAb%_"          # $like patterns: no escape character


def _rows():
    """The fixture events: (pid, domain, name, timestamp); name may be NULL."""
    pids = ["a", "ab", "a%", "a_b", "a\\b", "A", "b", "ba", "%", "_", "aa", "a\\"]
    out = []
    for i in range(36):
        out.append({
            "pid": pids[i % len(pids)],
            "domain": ["user", "order", "a%"][i % 3],
            "name": None if i % 5 == 0 else ["created", "a", "b_", "a%b"][i % 4],
            "timestamp": "2020-04-%02dT%02d:00:00.%03dZ" % (1 + i % 9, i % 24, i),
            "data": {"i": i},
        })
    return out


def _like_regex(pattern):
    out = []
    for char in pattern:
        out.append(".*" if char == "%" else "." if char == "_" else re.escape(char))
    return re.compile("".join(out), re.S)


def _kleene_and(values):
    if False in values:
        return False
    return None if None in values else True


def _kleene_or(values):
    if True in values:
        return True
    return None if None in values else False


def reference(where, row):
    """SQL's three-valued evaluation of a where-object for one row (a dict)."""
    results = []
    for key, value in where.items():
        if key == "$and":
            results.append(_kleene_and([reference(w, row) for w in value]))
        elif key == "$or":
            results.append(_kleene_or([reference(w, row) for w in value]))
        elif key == "$not":
            inner = reference(value, row)
            results.append(None if inner is None else not inner)
        else:
            ops = value if isinstance(value, dict) else {"$eq": value}
            results.append(_kleene_and([_column_op(row[key], key, op, arg) for op, arg in ops.items()]))
    return _kleene_and(results)


def _arg(column, value):
    return parse_timestamp(value) if column == "timestamp" else value


def _column_op(actual, column, op, arg):
    if op == "$isNull":
        return (actual is None) == arg
    if op in ("$eq", "$ne") and arg is None:
        return (actual is None) == (op == "$eq")
    if actual is None:
        return None
    if op in ("$in", "$nin"):
        found = actual in [_arg(column, a) for a in arg]
        return found if op == "$in" else not found
    if op == "$between":
        return _arg(column, arg["$min"]) <= actual <= _arg(column, arg["$max"])
    if op == "$like":
        return bool(_like_regex(arg).fullmatch(actual))
    if op == "$startsWith":
        return actual.startswith(arg)
    if op == "$endsWith":
        return actual.endswith(arg)
    if op == "$contains":
        return arg in actual
    arg = _arg(column, arg)
    return {"$eq": actual == arg, "$ne": actual != arg, "$gt": actual > arg,
            "$gte": actual >= arg, "$lt": actual < arg, "$lte": actual <= arg}[op]


FIXTURE_TEXTS = ["a", "ab", "a%", "a_b", "a\\b", "A", "b", "ba", "%", "_", "aa", "a\\",
                 "user", "order", "created", "b_", "a%b"]
db_text = st.one_of(st.sampled_from(FIXTURE_TEXTS), st.text(ALPHABET, max_size=3))


@st.composite
def db_conditions(draw):
    column = draw(st.sampled_from(["pid", "domain", "name", "id", "timestamp"]))
    if column == "id":
        value = st.integers(0, 40)
    elif column == "timestamp":
        value = st.builds(lambda d, h, z: "2020-04-%02dT%02d:00:00%s" % (d, h, z),
                          st.integers(1, 9), st.integers(0, 23), st.sampled_from(["", "Z", "+01:00"]))
    else:
        value = db_text
    op = draw(st.sampled_from(["=", "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin",
                               "$between", "$isNull", "null", "$like", "$startsWith",
                               "$endsWith", "$contains"]))
    if op in ("$like", "$startsWith", "$endsWith", "$contains"):
        if column in ("id", "timestamp"):
            op = "$eq"
        elif op == "$like":
            return {column: {op: draw(st.text(PATTERN_ALPHABET, max_size=4))}}
        else:
            return {column: {op: draw(db_text)}}
    if op == "=":
        return {column: draw(value)}
    if op == "null":
        return {column: draw(st.sampled_from([None, {"$eq": None}, {"$ne": None}]))}
    if op in ("$in", "$nin"):
        return {column: {op: draw(st.lists(value, min_size=1, max_size=4))}}
    if op == "$between":
        return {column: {op: {"$min": draw(value), "$max": draw(value)}}}
    if op == "$isNull":
        return {column: {op: draw(st.booleans())}}
    return {column: {op: draw(value)}}


db_wheres = st.recursive(
    db_conditions(),
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=3).map(lambda items: {"$and": items}),
        st.lists(children, min_size=1, max_size=3).map(lambda items: {"$or": items}),
        children.map(lambda c: {"$not": c}),
        st.lists(children, min_size=2, max_size=3).map(merge),
    ),
    max_leaves=6)

DB_SETTINGS = settings(max_examples=100, deadline=None, database=None,
                       suppress_health_check=[HealthCheck.too_slow])


class DatabaseTests(SynchronousTestCase):
    """Compiled plans run on MariaDB and agree with the reference."""

    def setUp(self):
        # The real MariaDB is required (CI starts it): no skipping.
        self.connection = pymysql.connect(autocommit=True, init_command="SET time_zone = '+00:00'",
                                          **MYSQL)
        self.addCleanup(self.connection.close)
        cursor = self.connection.cursor()
        cursor.execute("DROP DATABASE IF EXISTS `%s`" % (DB,))
        cursor.execute("CREATE DATABASE `%s`" % (DB,))
        self.addCleanup(cursor.execute, "DROP DATABASE IF EXISTS `%s`" % (DB,))
        cursor.execute((
            "CREATE TABLE `%s`.`event` ("
            " `id` BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY,"
            " `timestamp` DATETIME(6) NOT NULL DEFAULT NOW(6),"
            " `pid` VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,"
            " `domain` VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,"
            " `name` VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,"
            " `data` JSON" + "".join(", KEY `%s` (%s)" % (index.name, ", ".join(index.columns + ("id",)))
                            for index in schema.INDEXES) + ")") % (DB,))
        self.cursor = cursor
        # the fixture goes in through compile_insert, like persist would
        documents = _rows()
        for doc in documents:
            if doc["name"] is None:
                doc["name"] = "tmp"
        plan = compile_insert({"$table": DB + ".event", "$documents": documents}, DB_SCHEMA)
        cursor.executemany(
            "INSERT INTO " + DB_SCHEMA.quoted
            + " (`pid`, `domain`, `name`, `data`, `timestamp`) VALUES (%s, %s, %s, %s, %s)",
            [row + (parse_timestamp(doc["timestamp"]),) for row, doc in zip(plan.rows, documents)])
        cursor.execute("UPDATE " + DB_SCHEMA.quoted + " SET `name` = NULL WHERE `id` %% 5 = 1", ())
        cursor.execute("SELECT `id`, `timestamp`, `pid`, `domain`, `name`, `data` FROM "
                       + DB_SCHEMA.quoted + " ORDER BY `id`")
        self.rows = [dict(zip(("id", "timestamp", "pid", "domain", "name", "data"), r))
                     for r in cursor.fetchall()]
        self.high_water = self.rows[-1]["id"]

    def run_sql(self, sql_params):
        sql, params = sql_params
        self.cursor.execute(sql, params)
        return self.cursor.fetchall()

    def test_fixture(self):
        self.assertEqual(len(self.rows), 36)
        self.assertEqual(self.rows[0]["data"], '{"i":0}')
        self.assertEqual(self.rows[3]["timestamp"], datetime(2020, 4, 4, 3, 0, 0, 3000))
        self.assertEqual(sum(r["name"] is None for r in self.rows), 8)

    def test_patterns_match_literally(self):
        for op, value, check in (("$startsWith", "a\\", lambda p: p.startswith("a\\")),
                                 ("$contains", "%", lambda p: "%" in p),
                                 ("$endsWith", "_", lambda p: p.endswith("_")),
                                 ("$contains", "_b", lambda p: "_b" in p)):
            plan = compile_select({"$columns": ["pid"], "$where": {"pid": {op: value}}}, DB_SCHEMA)
            got = [r[0] for r in self.run_sql(plan.page_sql(0, self.high_water, 100))]
            expected = [r["pid"] for r in self.rows if check(r["pid"])]
            self.assertTrue(expected)
            self.assertEqual(got, expected)

    def test_numbers_compare_with_text_columns_as_text(self):
        for name in ("0", "1", "1.5", "10", "1e+21", "true", "-2"):
            self.cursor.execute("INSERT INTO " + DB_SCHEMA.quoted + " (`pid`, `domain`, `name`)"
                                " VALUES ('num', 'num', %s)", (name,))
        self.cursor.execute("SELECT `id`, `name` FROM " + DB_SCHEMA.quoted + " ORDER BY `id`")
        rows = self.cursor.fetchall()
        high_water = rows[-1][0]

        def ids(where):
            plan = compile_select({"$columns": ["id"], "$where": where}, DB_SCHEMA)
            return [r[0] for r in self.run_sql(plan.page_sql(0, high_water, 1000))]

        def expected(keep):
            return [i for i, name in rows if name is not None and keep(name)]

        cases = [
            ({"name": 0}, lambda n: n == "0"),
            ({"name": {"$eq": 1.0}}, lambda n: n == "1"),
            ({"name": {"$ne": 0}}, lambda n: n != "0"),
            ({"name": {"$gt": 1}}, lambda n: n > "1"),
            ({"name": {"$gte": 1.5}}, lambda n: n >= "1.5"),
            ({"name": {"$lt": 10}}, lambda n: n < "10"),
            ({"name": {"$lte": -2}}, lambda n: n <= "-2"),
            ({"name": {"$in": [1e21, True, 0]}}, lambda n: n in ("1e+21", "true", "0")),
            ({"name": {"$nin": [1.5, 10]}}, lambda n: n not in ("1.5", "10")),
            ({"name": {"$between": {"$min": 1, "$max": 10}}}, lambda n: "1" <= n <= "10"),
            ({"pid": {"$in": [0, 1]}}, lambda n: False),
        ]
        for where, keep in cases:
            self.assertEqual(ids(where), expected(keep), where)
        self.assertEqual(ids({"id": "3"}), [3])
        self.assertEqual(ids({"id": {"$in": ["1", 2]}, "name": {"$ne": None}}), [2])
        self.assertEqual(ids({"id": {"$between": {"$min": "3", "$max": "5"}}}), [3, 4, 5])
        self.assertEqual(ids({"id": {"$gt": "34", "$lte": str(high_water)}}), list(range(35, high_water + 1)))
        self.assertEqual(ids({"id": {"$nin": [str(i) for i in range(2, high_water + 1)]}}), [1])
        self.assertRaises(QueryError, ids, {"id": "abc"})

    @DB_SETTINGS
    @given(db_wheres)
    def test_keyset_matches_reference(self, where):
        plan = compile_select({"$columns": ["id", "pid"], "$where": where}, DB_SCHEMA)
        self.assertTrue(plan.keyset)
        expected = [r["id"] for r in self.rows if reference(where, r) is True]
        rows = self.run_sql(plan.page_sql(0, self.high_water, 1000))
        self.assertEqual([r[0] for r in rows], expected)
        self.assertEqual({len(r) for r in rows} or {2}, {2})     # (the id output is the keyset)
        # small pages, up to a lower high-water mark, see the same rows
        high_water, after, paged = self.high_water - 4, 0, []
        while True:
            page = self.run_sql(plan.page_sql(after, high_water, 4))
            paged += [r[0] for r in page]
            if len(page) < 4:
                break
            after = page[-1][plan.keyset_index]
        self.assertEqual(paged, [i for i in expected if i <= high_water])

    @DB_SETTINGS
    @given(db_wheres, st.sampled_from(["pid", "name", "timestamp", "id"]), st.booleans(),
           st.integers(0, 5))
    def test_offset_matches_reference(self, where, column, descending, page_size):
        page_size += 1
        plan = compile_select({"$columns": ["id"], "$where": where,
                               "$orderBy": {column: -1 if descending else 1}}, DB_SCHEMA)
        # rows are in id order; a stable sort (also with reverse=True) keeps
        # the ascending id tie-breaker.  NULLs sort first ascending, last
        # descending, as in MariaDB.
        matching = [r for r in self.rows if reference(where, r) is True]
        matching.sort(key=lambda r: (r[column] is not None, 0 if r[column] is None else r[column]),
                      reverse=descending)
        expected = [r["id"] for r in matching]
        got, skip = [], 0
        while True:
            page = self.run_sql(plan.offset_sql(skip, self.high_water, page_size))
            got += [r[0] for r in page]
            skip += len(page)
            if len(page) < page_size:
                break
        self.assertEqual(got, expected)

    @DB_SETTINGS
    @given(db_wheres, st.sampled_from(["pid", "domain", "name"]))
    def test_group_count_matches_reference(self, where, column):
        plan = compile_select({"$columns": [column, {"n": {"$count": "*"}}, {"top": {"$max": "id"}},
                                            {"first": {"$min": "timestamp"}}],
                               "$where": where, "$groupBy": [column],
                               "$having": {"n": {"$gte": 2}}}, DB_SCHEMA)
        self.assertEqual(plan.columns, (column, "n", "top", "first"))
        groups = {}
        for r in self.rows:
            if reference(where, r) is True:
                groups.setdefault(r[column], []).append(r)
        expected = sorted(((key, len(rs), max(r["id"] for r in rs),
                            min(r["timestamp"] for r in rs))
                           for key, rs in groups.items() if len(rs) >= 2),
                          key=lambda g: (g[0] is not None, g[0] or ""))
        self.assertEqual([tuple(r) for r in self.run_sql(plan.offset_sql(0, self.high_water, 1000))],
                         expected)

    @DB_SETTINGS
    @given(select_shapes(), st.data())
    def test_generated_plans_are_valid_sql(self, shape, data):
        select = fill(shape, value_sources(data))
        select.pop("$from", None)
        plan = compile_select(select, DB_SCHEMA)
        for sql_params in plan_sqls(plan):
            rows = self.run_sql(sql_params)
            if rows:
                extra = 1 if "__keyset" in sql_params[0] else 0
                self.assertEqual(len(rows[0]), len(plan.columns) + extra)

    def test_distinct_pages(self):
        plan = compile_select({"$distinct": True, "$columns": ["domain", "name"]}, DB_SCHEMA)
        got, skip = [], 0
        while True:
            page = self.run_sql(plan.offset_sql(skip, self.high_water, 2))
            got += [tuple(r) for r in page]
            skip += len(page)
            if len(page) < 2:
                break
        expected = sorted({(r["domain"], r["name"]) for r in self.rows},
                          key=lambda t: (t[0], t[1] is not None, t[1] or ""))
        self.assertEqual(got, expected)

