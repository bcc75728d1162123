"""
eventsource.matcher: the index keys, and a differential test against
MariaDB: random events with awkward identifiers (trailing spaces, tabs,
case, accents, emoji, digits), random ``$where`` filters, and for each the
events the matcher's predicate accepts must be exactly those MariaDB's
``SELECT ... WHERE`` (the compiled query the subscription's history reads
with) returns.
"""

import datetime
import random
import uuid

import pymysql
from twisted.trial.unittest import SynchronousTestCase, TestCase

from eventsource import query, schema, store
from eventsource.matcher import (DOMAIN, NAME, PID, Matcher, MatcherIndex, compile_matcher,
                                 pad_key)
from tests.support import MYSQL, unique

V2 = query.TableSchema.version2("db", "event")


def event(position=1, pid="p", domain="d", name="n", version=0, event_id=b"\0" * 16,
          timestamp=datetime.datetime(2020, 1, 1)):
    return (position, event_id, pid, version, domain, name, timestamp)


class IndexKeyTests(SynchronousTestCase):
    def key(self, where):
        return compile_matcher(where, V2).index

    def test_equalities_give_keys_preferring_pid(self):
        self.assertEqual(self.key({"pid": "a"}), ("pid", frozenset({"a"})))
        self.assertEqual(self.key({"name": "x", "pid": {"$eq": "a "}}), ("pid", frozenset({"a"})))
        self.assertEqual(self.key({"domain": {"$in": ["a", "b", "b  "]}}),
                         ("domain", frozenset({"a", "b"})))
        self.assertEqual(self.key({"$and": [{"version": 1}, {"name": 5}]}),
                         ("name", frozenset({"5"})))

    def test_no_key_without_a_required_equality(self):
        for where in ({}, {"pid": {"$ne": "a"}}, {"$or": [{"pid": "a"}, {"pid": "b"}]},
                      {"$not": {"pid": "a"}}, {"version": 3}, {"pid": {"$startsWith": "a"}}):
            self.assertIsNone(self.key(where), where)

    def test_a_bare_key_needs_no_predicate(self):
        self.assertIsNone(compile_matcher({"pid": "a"}, V2).predicate)
        self.assertIsNone(compile_matcher({"pid": {"$in": ["a", "b"]}}, V2).predicate)
        self.assertIsNotNone(compile_matcher({"pid": "a", "version": 1}, V2).predicate)
        self.assertIsNotNone(compile_matcher({"pid": {"$eq": "a", "$ne": "b"}}, V2).predicate)

    def test_what_mariadb_decides(self):
        for where in ({"name": {"$like": "a%"}}, {"data": "x"}, {"version": 2 ** 70},
                      {"version": {"$startsWith": "1"}}, {"$or": [{"pid": "a"}, {"data": 1}]}):
            self.assertTrue(compile_matcher(where, V2).sql, where)
        self.assertEqual(compile_matcher({"pid": "a", "data": 1}, V2).index,
                         ("pid", frozenset({"a"})))

    def test_the_index_visits_only_the_keys_an_event_has(self):
        index = MatcherIndex()
        members = {}
        for i in range(1000):
            members[i] = f"sub{i}"
            index.add(members[i], compile_matcher({"pid": f"p{i}"}, V2))
        index.add("broad", compile_matcher({"version": {"$gte": 0}}, V2))
        index.add("by-name", compile_matcher({"name": "n "}, V2))
        found = [member for member, _ in index.candidates(event(pid="p7 ", name="n"))]
        self.assertEqual(found, ["sub7", "by-name", "broad"])
        index.remove("sub7")
        index.remove("by-name")
        found = [member for member, _ in index.candidates(event(pid="p7", name="n"))]
        self.assertEqual(found, ["broad"])
        self.assertEqual(len(index), 1000)

    def test_field_order(self):
        self.assertEqual((PID, DOMAIN, NAME), (2, 4, 5))
        self.assertEqual(pad_key("a  "), "a")
        self.assertTrue(Matcher().matches(event()))


# -- against MariaDB --------------------------------------------------------------------

TEXTS = ["a", "a ", "a  ", "A", "a\t", "a\tb", "ab", "b", "é", "e", "É", "😀", "a😀", " a",
         "10", "9", "1.5", "true", "z" * 5, "ä b", "a b"]
NUMBER_OPERANDS = [0, 1, 2, 3, 5, 7, -1, 1.5, 2.0, "3", "10", 2 ** 62, True, False]


class Differential(TestCase):
    """Random filters over random events: the matcher agrees with MariaDB on each."""

    timeout = 120
    EVENTS = 160
    FILTERS = 600

    def setUp(self):
        self.database = unique("es_match")
        self.connection = pymysql.connect(autocommit=True, conv=store._conversions(),
                                          init_command="SET time_zone = '+00:00', sql_mode = '"
                                          + store.SQL_MODE + "'", **MYSQL)
        self.addCleanup(self.connection.close)
        self.cursor = self.connection.cursor()
        for statement in schema.create_statements(self.database, "event"):
            self.cursor.execute(statement)
        self.addCleanup(self.cursor.execute, f"DROP DATABASE IF EXISTS `{self.database}`")
        self.schema = query.TableSchema.version2(self.database, "event")
        self.subscribe_schema = query.TableSchema(**{**self.schema.__dict__, "stream_reads": False})
        self.rng = random.Random()
        self.seed = self.rng.randrange(10 ** 9)
        self.rng.seed(self.seed)
        self.fill()

    def fill(self):
        rng = self.rng
        versions = {}
        self.event_ids = []
        self.times = []
        base = datetime.datetime(2024, 5, 1, 12, 0, 0)
        for _ in range(self.EVENTS):
            pid = rng.choice(TEXTS)
            stream = pid.rstrip(" ")
            version = versions.get(stream, -1) + 1
            versions[stream] = version
            event_id = uuid.uuid4().bytes
            moment = base + datetime.timedelta(microseconds=rng.randrange(0, 5_000_000, 250))
            self.event_ids.append(event_id)
            self.times.append(moment)
            self.cursor.execute(
                f"INSERT INTO `{self.database}`.`event` (pid, domain, name, data, version,"
                " event_id, timestamp) VALUES (%s, %s, %s, 'null', %s, %s, %s)",
                (pid, rng.choice(TEXTS), rng.choice(TEXTS), version, event_id, moment))
        self.events = store._read_tail(self.cursor, f"`{self.database}`.`event`", 0, 100000)
        self.assertEqual(len(self.events), self.EVENTS)

    # -- random filters

    def operand(self, column):
        rng = self.rng
        if column in ("pid", "domain", "name"):
            return rng.choice(TEXTS + [10, 9, 1.5, True])
        if column in ("version", "position"):
            return rng.choice(NUMBER_OPERANDS + [rng.randint(0, self.EVENTS)])
        if column == "eventId":
            return str(uuid.UUID(bytes=rng.choice(self.event_ids + [uuid.uuid4().bytes])))
        moment = rng.choice(self.times) + datetime.timedelta(
            microseconds=rng.choice([0, 0, 1, -1, 500, -250]))
        text = moment.isoformat(timespec=rng.choice(["microseconds", "milliseconds", "seconds"]))
        return text + rng.choice(["", "Z", "+00:00"])

    def condition(self, depth=0):
        rng = self.rng
        if depth < 2 and rng.random() < 0.25:
            kind = rng.choice(["$and", "$or", "$not"])
            if kind == "$not":
                return {"$not": self.condition(depth + 1)}
            return {kind: [self.condition(depth + 1) for _ in range(rng.randint(1, 3))]}
        column = rng.choice(["pid", "domain", "name", "version", "position", "eventId",
                             "timestamp"])
        if column == "eventId":
            op = rng.choice(["$eq", "$ne", "$in", "$nin", "$isNull"])
        elif column in ("pid", "domain", "name"):
            op = rng.choice(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin",
                             "$between", "$isNull", "$startsWith", "$endsWith", "$contains",
                             "plain"])
        else:
            op = rng.choice(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin",
                             "$between", "$isNull", "plain"])
        if op == "plain":
            return {column: self.operand(column)}
        if op in ("$in", "$nin"):
            return {column: {op: [self.operand(column) for _ in range(rng.randint(1, 4))]}}
        if op == "$between":
            return {column: {op: {"$min": self.operand(column), "$max": self.operand(column)}}}
        if op == "$isNull":
            return {column: {op: rng.choice([True, False])}}
        if op in ("$startsWith", "$endsWith", "$contains"):
            return {column: {op: rng.choice(TEXTS + ["", " ", "\t"])}}
        if op in ("$eq", "$ne") and rng.random() < 0.05:
            return {column: {op: None}}
        return {column: {op: self.operand(column)}}

    def where(self):
        parts = [self.condition() for _ in range(self.rng.randint(1, 3))]
        where = {}
        for part in parts:
            for key, value in part.items():
                if key in where:
                    where.setdefault("$and", []).append({key: value})
                else:
                    where[key] = value
        return where

    def mariadb(self, where):
        """
        The events a subscription's history reads (its keyset pages, with
        their index hints: MariaDB's answer to a LIKE can depend on the
        access path, see docs/PROTOCOL.md).
        """
        plan = query.compile_select({"$where": where}, self.subscribe_schema)
        sql, params = plan.page_sql(0, self.EVENTS, self.EVENTS)
        self.cursor.execute(sql, params)
        at = -1 if plan.keyset_index is None else plan.keyset_index  # (__keyset, or position)
        return sorted(row[at] for row in self.cursor.fetchall())

    def test_the_matcher_agrees_with_mariadb(self):
        decided = 0
        for _ in range(self.FILTERS):
            where = self.where()
            try:
                query.compile_select({"$where": where}, self.subscribe_schema)
            except query.QueryError:
                continue  # (a filter the language refuses: not a subscription)
            matcher = compile_matcher(where, self.schema)
            if matcher.sql:
                continue
            decided += 1
            ours = sorted(position for position, _, fields in self.events
                          if (matcher.index is None
                              or pad_key(fields[{"pid": PID, "domain": DOMAIN, "name": NAME}[
                                  matcher.index[0]]]) in matcher.index[1])
                          and matcher.matches(fields))
            self.assertEqual(ours, self.mariadb(where),
                             f"seed {self.seed}: where {where!r}")
        self.assertGreater(decided, self.FILTERS // 2, f"seed {self.seed}")
