"""
Every filter shape the docs show is read through an index, page by page:
proved with MariaDB's own account of the plan (``ANALYZE FORMAT=JSON``
runs the page and reports, per table access, its type, index, estimated
rows and the rows it actually read) on a table of 40,000 events made by
the server's own schema code.  Each page is also checked against a Python
reference, so a plan can never trade a row for speed.
"""

import json
import os
import secrets
from datetime import datetime, timedelta

import pymysql
from twisted.trial.unittest import SynchronousTestCase

from tests.support import MYSQL, numbered
from eventsource.query import TableSchema, compile_select
from eventsource.store import ensure_schema

DB = "es_test_indexes_%d_%s" % (os.getpid(), secrets.token_hex(3))
SCHEMA = TableSchema(DB, "event")

#: rows in the table; the last OUT_OF_ORDER carry old timestamps (as
#: documents with their own ``timestamp``, or rows of an upgraded table, do)
ROWS = 40000
OUT_OF_ORDER = 300
START = datetime(2020, 1, 1)
PAGE = 100


def _event(i):
    """Row i (id i + 1): 1,000 pids of 40 rows, 50 domains, 300 names, one
    second apart."""
    if i < ROWS - OUT_OF_ORDER:
        moment = START + timedelta(seconds=i)
    else:
        moment = START + timedelta(seconds=(i * 7919) % (ROWS // 2))
    return moment, "p%d" % (i % 1000), "d%d" % (i % 50), "n%d" % ((i // 7) % 300), json.dumps({"i": i})


EVENTS = [_event(i) for i in range(ROWS)]


def _iso(seconds):
    return (START + timedelta(seconds=seconds)).isoformat() + "Z"


def _connect():
    return pymysql.connect(autocommit=True, init_command="SET time_zone = '+00:00'", **MYSQL)


class IndexTests(SynchronousTestCase):
    """Each shape: the page's plan reads an index range, never the table."""

    def setUp(self):
        # (trial has no per-class fixtures: each test makes its table, ~1 s)
        self.connection = _connect()
        self.addCleanup(self.connection.close)
        self.cursor = cursor = self.connection.cursor()
        cursor.execute("DROP DATABASE IF EXISTS `%s`" % (DB,))
        self.addCleanup(cursor.execute, "DROP DATABASE IF EXISTS `%s`" % (DB,))
        ensure_schema(cursor, DB, "event")
        cursor.execute("INSERT INTO " + SCHEMA.quoted + " (`timestamp`, `pid`, `domain`, `name`,"
                       " `data`, `version`, `event_id`)"
                       " VALUES " + ", ".join(["(%s, %s, %s, %s, %s, %s, %s)"] * ROWS),
                       [value for event in numbered(EVENTS, pid_index=1) for value in event])
        cursor.execute("ANALYZE TABLE " + SCHEMA.quoted)
        cursor.fetchall()
        self.rows = [dict(zip(("id", "timestamp", "pid", "domain", "name"), (i + 1,) + e[:4]))
                     for i, e in enumerate(EVENTS)]

    def analyze(self, sql, params):
        """The page's rows, and every access to the events table in its plan:
        ``(access_type, key, estimated rows, rows actually read)``."""
        self.cursor.execute(sql, params)
        rows = self.cursor.fetchall()
        self.cursor.execute("ANALYZE FORMAT=JSON " + self.cursor.mogrify(sql, params))
        plan = json.loads(self.cursor.fetchone()[0])
        accesses = []

        def walk(node):
            if isinstance(node, dict):
                if node.get("table_name") == "event":
                    read = (node.get("r_rows") or 0) * (node.get("r_loops") or 0)
                    accesses.append((node["access_type"], node.get("key"), node.get("rows"), read))
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(plan)
        return rows, accesses

    def expected(self, keep, after, size=PAGE):
        return [r["id"] for r in self.rows if r["id"] > after and keep(r)][:size]

    def check_shape(self, where, keep, keys, most_read, afters=(0, ROWS // 2, ROWS - 2 * PAGE),
                    size=PAGE, share=0.05):
        """Pages of ``where`` at several points of the stream: the right rows,
        read through ``keys`` only, by range or key lookups (no table or
        index scan), reading at most ``most_read`` rows (and under ``share``
        of the table), at the end of the stream as at its start."""
        plan = compile_select({"$columns": ["id"], "$where": where}, SCHEMA)
        self.assertTrue(plan.keyset)
        for after in afters:
            rows, accesses = self.analyze(*plan.page_sql(after, ROWS, size))
            shown = json.dumps(where)[:200], after, sorted(set(accesses))[:8], len(accesses)
            self.assertEqual([r[0] for r in rows], self.expected(keep, after, size), shown)
            self.assertTrue(accesses)
            for access_type, key, estimate, _ in accesses:
                self.assertIn(access_type, ("range", "ref", "eq_ref"), shown)
                self.assertIn(key, keys, shown)
                if key != "PRIMARY":
                    # (for the primary key MariaDB estimates the whole id
                    # range; the read stops when the page is full)
                    self.assertLess(estimate, ROWS / 10, shown)
            read = sum(access[3] for access in accesses)
            self.assertLessEqual(read, most_read, shown)
            self.assertLess(read, ROWS * share, shown)
        return accesses

    def test_pid(self):
        self.check_shape({"pid": "p7"}, lambda r: r["pid"] == "p7", ["pid_id"], 40)

    def test_pid_in(self):
        pids = ["p3", "p500", "p999", "p3", "p12"]
        accesses = self.check_shape({"pid": {"$in": pids}}, lambda r: r["pid"] in pids,
                                    ["pid_id", "PRIMARY"], 5 * 40 + PAGE)
        # one range per distinct value (and key lookups of the page's rows)
        self.assertEqual(sorted(a[1] for a in accesses), ["PRIMARY"] + ["pid_id"] * 5)

    def test_pid_in_costs_a_page_per_value_however_far_the_stream_is(self):
        # 16 pids spread over the table (one row in 62), pages of 10: a page
        # reads at most 10 index entries per pid and its own 10 rows, at
        # the start of the stream as at its end (by the primary key it
        # would read ~600 rows a page)
        pids = ["p%d" % i for i in range(0, 1000, 63)]
        self.assertEqual(len(pids), 16)
        self.check_shape({"pid": {"$in": pids}}, lambda r: r["pid"] in pids,
                         ["pid_id", "PRIMARY"], 16 * 10 + 10,
                         afters=(0, 5000, 20000, ROWS - 2000), size=10)

    def test_long_pid_lists(self):
        # past 16 values: the primary key or one range of the whole list,
        # as MariaDB estimates (here 100 pids, a tenth of the table: at most
        # the list's rows, ~1,000 rows by the primary key)
        pids = ["p%d" % i for i in range(0, 1000, 10)]
        self.check_shape({"pid": {"$in": pids}}, lambda r: r["pid"] in pids,
                         ["pid_id", "PRIMARY"], 4000, share=0.11)
        few = ["p%d" % i for i in range(17)] + ["nobody%d" % i for i in range(300)]
        self.check_shape({"pid": {"$in": few}}, lambda r: r["pid"] in few, ["pid_id", "PRIMARY"], 700)

    def test_domain(self):
        self.check_shape({"domain": "d7"}, lambda r: r["domain"] == "d7", ["domain_id"], PAGE)

    def test_domain_and_name(self):
        # d7 and n13 meet every 350 rows
        self.check_shape({"domain": "d7", "name": "n13"},
                         lambda r: (r["domain"], r["name"]) == ("d7", "n13"), ["domain_name_id"], PAGE)

    def test_name(self):
        self.check_shape({"name": {"$eq": "n299"}}, lambda r: r["name"] == "n299", ["name_id"], PAGE)

    def test_time_ranges(self):
        late, early = ROWS - 800, 400
        middle = (ROWS // 2, ROWS // 2 + 399)
        shapes = [
            ({"$gt": _iso(late)}, lambda t: t > START + timedelta(seconds=late)),
            ({"$gte": _iso(late)}, lambda t: t >= START + timedelta(seconds=late)),
            ({"$lt": _iso(early)}, lambda t: t < START + timedelta(seconds=early)),
            ({"$lte": _iso(early)}, lambda t: t <= START + timedelta(seconds=early)),
            ({"$between": {"$min": _iso(middle[0]), "$max": _iso(middle[1])}},
             lambda t: START + timedelta(seconds=middle[0]) <= t <= START + timedelta(seconds=middle[1])),
            ({"$gt": _iso(middle[0]), "$lt": _iso(middle[1])},
             lambda t: START + timedelta(seconds=middle[0]) < t < START + timedelta(seconds=middle[1])),
        ]
        for condition, keep in shapes:
            # at most the rows of the range (and the out-of-order rows that
            # fall in it), plus a page
            self.check_shape({"timestamp": condition}, lambda r, keep=keep: keep(r["timestamp"]),
                             ["timestamp_id", "PRIMARY"], 800 + PAGE + 20)

    def test_combinations(self):
        since = START + timedelta(seconds=ROWS // 2)
        pids = ["p1", "p2", "p3"]
        cases = [
            ({"pid": "p7", "name": {"$ne": "n1"}, "timestamp": {"$gte": _iso(ROWS // 2)}},
             lambda r: r["pid"] == "p7" and r["name"] != "n1" and r["timestamp"] >= since,
             ["pid_id"], 40),
            ({"pid": {"$in": pids}, "domain": {"$in": ["d1", "d2"]}, "timestamp": {"$gte": _iso(ROWS // 2)}},
             lambda r: r["pid"] in pids and r["domain"] in ("d1", "d2") and r["timestamp"] >= since,
             ["pid_id", "PRIMARY"], 3 * 40 + PAGE),
            ({"domain": "d7", "timestamp": {"$lt": _iso(ROWS // 2)}},
             lambda r: r["domain"] == "d7" and r["timestamp"] < since, ["domain_id"], 800),
            ({"$and": [{"name": "n5"}, {"$or": [{"pid": "p35"}, {"domain": "d36"}]}]},
             lambda r: r["name"] == "n5" and (r["pid"] == "p35" or r["domain"] == "d36"),
             ["name_id"], 140),
            ({"name": "n5", "domain": {"$startsWith": "d3"}, "id": {"$gt": 100}},
             lambda r: r["name"] == "n5" and r["domain"].startswith("d3") and r["id"] > 100,
             ["name_id"], 140),
        ]
        for where, keep, keys, most_read in cases:
            self.check_shape(where, keep, keys, most_read)

    def test_small_pages_never_skip_or_repeat(self):
        # keyset paging through each special plan, out-of-order timestamps
        # included, sees exactly the matching rows once each
        cut = START + timedelta(seconds=ROWS // 2 - 200)
        cases = [
            ({"timestamp": {"$gte": _iso(ROWS // 2 - 200)}}, lambda r: r["timestamp"] >= cut),
            ({"timestamp": {"$lt": _iso(150)}}, lambda r: r["timestamp"] < START + timedelta(seconds=150)),
            ({"pid": {"$in": ["p1", "p2", "p999", "p1"]}}, lambda r: r["pid"] in ("p1", "p2", "p999")),
            ({"pid": {"$in": ["p1", "p2"]}, "timestamp": {"$lt": _iso(ROWS // 2)}},
             lambda r: r["pid"] in ("p1", "p2") and r["timestamp"] < START + timedelta(seconds=ROWS // 2)),
        ]
        high_water = ROWS - 50
        for where, keep in cases:
            plan = compile_select({"$columns": ["id", "pid"], "$where": where}, SCHEMA)
            after, seen = 0, []
            while True:
                self.cursor.execute(*plan.page_sql(after, high_water, 37))
                page = self.cursor.fetchall()
                seen += [row[0] for row in page]
                # (the output id is the keyset: no __keyset column of its own)
                self.assertEqual(plan.keyset_index, 0)
                self.assertEqual({len(row) for row in page} or {2}, {2})
                if len(page) < 37:
                    break
                after = page[-1][plan.keyset_index]
            expected = [r["id"] for r in self.rows if r["id"] <= high_water and keep(r)]
            self.assertTrue(expected)
            self.assertEqual(seen, expected, where)

    def test_values_equal_under_the_collation_give_each_row_once(self):
        # "p1" and "p1 " are equal for MariaDB (PAD SPACE collations): one
        # range each, but every row once
        plan = compile_select({"$columns": ["id"], "$where": {"pid": {"$in": ["p1", "p1 ", "p2"]}}}, SCHEMA)
        self.cursor.execute(*plan.page_sql(0, ROWS, 1000))
        self.assertEqual([row[0] for row in self.cursor.fetchall()],
                         [r["id"] for r in self.rows if r["pid"] in ("p1", "p2")])
