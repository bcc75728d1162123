"""
Stream versions and event ids on the real MariaDB: every event gets its
0-based version within its pid and a UUIDv7 from the server's one writer
(also behind another writer's back), and existing tables are numbered in
place, resumably, before the server serves.
"""

import collections
import datetime
import os
import uuid

import pymysql
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from eventsource import ids, schema, store, writer
from eventsource.config import Config
from eventsource.query import InsertPlan
from eventsource.service import make_server
from eventsource.testing import MemoryStore
from tests.support import (MYSQL, REDIS_HOST, REDIS_PORT, IntegrationTestCase, LogCapture,
                           WireClient, sql, unique)

#: rows of the upgrade tests' tables (EVENTSOURCE_UPGRADE_ROWS=1000000 measures
#: the upgrade of a million events; the suite keeps it small)
UPGRADE_ROWS = int(os.environ.get("EVENTSOURCE_UPGRADE_ROWS", "30000"))


def assert_v7(testcase, event_id, timestamp=None):
    """``event_id`` is 16 bytes of a UUIDv7 (of ``timestamp``'s millisecond, if given)."""
    testcase.assertIsInstance(event_id, bytes)
    value = uuid.UUID(bytes=event_id)
    testcase.assertEqual(value.version, 7)
    testcase.assertEqual(value.variant, uuid.RFC_4122)
    if timestamp is not None:
        epoch = datetime.datetime(1970, 1, 1)
        testcase.assertEqual(value.int >> 80, (timestamp - epoch) // datetime.timedelta(milliseconds=1))


def assert_streams_exact(testcase, rows):
    """``rows`` of ``(id, pid, version, event_id)``: per pid 0..n-1 in id order, ids unique v7."""
    expected = collections.Counter()
    for row_id, pid, version, event_id in sorted(rows):
        testcase.assertEqual(version, expected[pid], f"row {row_id} of {pid!r}")
        expected[pid] += 1
        assert_v7(testcase, event_id)
    testcase.assertEqual(len({row[3] for row in rows}), len(rows))
    return dict(expected)


class UUID7Tests(SynchronousTestCase):
    def test_layout(self):
        made = ids.UUID7(clock=lambda: 1700000000.123456)()
        value = uuid.UUID(bytes=made)
        self.assertEqual((value.version, value.variant), (7, uuid.RFC_4122))
        self.assertEqual(value.int >> 80, 1700000000123)
        random = (1 << 74) - 1
        self.assertEqual(ids.uuid7_bytes(0, random).hex(), "000000000000" "7fff" "bfffffffffffffff")

    def test_increasing_within_a_millisecond(self):
        make = ids.UUID7(clock=lambda: 1800000000.0)
        made = [make() for _ in range(1000)]
        self.assertEqual(made, sorted(set(made)))
        self.assertEqual({uuid.UUID(bytes=m).int >> 80 for m in made}, {1800000000000})

    def test_a_clock_going_back_keeps_ids_increasing(self):
        times = iter([2.0, 1.0, 3.0])
        make = ids.UUID7(clock=lambda: next(times))
        made = [make() for _ in range(3)]
        self.assertEqual(made, sorted(made))
        self.assertEqual([uuid.UUID(bytes=m).int >> 80 for m in made], [2000, 2000, 3000])


class MemoryStoreTests(SynchronousTestCase):
    def test_events_get_versions_and_event_ids(self):
        memory = MemoryStore()
        memory.add(pid="a")
        memory.insert(InsertPlan(rows=(("a", "d", "n", "1"), ("b", "d", "n", "2"),
                                       ("a", "d", "n", "3"))))
        version = schema.COLUMN_NAMES.index("version")
        event_id = schema.COLUMN_NAMES.index("event_id")
        self.assertEqual([e[version] for e in memory.events], [0, 1, 0, 2])
        for event in memory.events:
            assert_v7(self, event[event_id])


class WritePathTests(IntegrationTestCase):
    timeout = 180

    def streams(self):
        return self.rows("id, pid, version, event_id")

    @defer.inlineCallbacks
    def test_concurrent_clients_get_exact_versions(self):
        clients = [WireClient(self.prefix) for _ in range(20)]
        yield defer.gatherResults([c.connect() for c in clients])
        for client in clients:
            self.addCleanup(client.disconnect)
        requests = []
        for i in range(200):
            docs = [{"pid": f"s{(i + j) % 3}", "domain": "d", "name": f"n{i}-{j}", "data": i}
                    for j in range(1 + i % 3)]
            requests.append(clients[i % 20].persist(docs))
        replies = yield defer.gatherResults(requests)
        self.assertEqual({reply[-1] for reply in replies}, {"end"})
        self.assertTrue(all("affectedRows" in reply[0] for reply in replies))
        counts = assert_streams_exact(self, self.streams())
        self.assertEqual(sum(counts.values()), sum(1 + i % 3 for i in range(200)))
        self.assertEqual(set(counts), {"s0", "s1", "s2"})

    @defer.inlineCallbacks
    def test_a_batch_numbers_its_events_in_request_order(self):
        self.insert_events(2, pid="a")
        row = ("d", "n", "null")
        results = yield self.server.store._write([
            (("a",) + row, ("b",) + row, ("a",) + row),
            (("c",) + row, ("a",) + row, ("b",) + row)])
        self.assertEqual(results, [(3, 3), (3, 6)])
        rows = self.streams()
        self.assertEqual([(r[1], r[2]) for r in rows],
                         [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("a", 3),
                          ("c", 0), ("a", 4), ("b", 1)])
        assert_streams_exact(self, rows)

    @defer.inlineCallbacks
    def test_trailing_spaces_are_the_same_stream_as_the_unique_key_says(self):
        reply = yield self.client.persist([{"pid": p, "domain": "d", "name": "n", "data": 1}
                                           for p in ("t", "t ", "t  ", "u")])
        self.assertEqual(reply[0]["affectedRows"], 4)
        self.assertEqual(self.rows("pid, version"), (("t", 0), ("t ", 1), ("t  ", 2), ("u", 0)))

    def behind_the_servers_back(self, times):
        """
        Just before the writer's INSERT, another connection appends the
        event the writer is about to write for each of its streams, ``times``
        times: as another server or a migration would, between the writer's
        numbering and its INSERT.
        """
        real = writer._insert_numbered
        done = []

        def racing(txn, table, batch, *rest):
            if len(done) < times:
                firsts = {}
                for request in batch:
                    for row in request:
                        firsts.setdefault(row[0], row[4])
                done.append(firsts)
                other = pymysql.connect(autocommit=True, **MYSQL)
                try:
                    with other.cursor() as cursor:
                        for pid, version in firsts.items():
                            cursor.execute(
                                f"INSERT INTO {table} (pid, domain, name, data, version, event_id)"
                                " VALUES (%s, 'd', 'external', '{}', %s, %s)",
                                (pid, version, ids.uuid7()))
                finally:
                    other.close()
            return real(txn, table, batch, *rest)

        self.patch(writer, "_insert_numbered", racing)
        return done

    @defer.inlineCallbacks
    def test_an_external_writer_taking_the_next_version_is_retried(self):
        yield self.client.persist([{"pid": "x", "domain": "d", "name": "first", "data": 1}])
        raced = self.behind_the_servers_back(2)
        reply = yield self.client.persist([{"pid": "x", "domain": "d", "name": "mine", "data": 2},
                                           {"pid": "y", "domain": "d", "name": "mine", "data": 3}])
        self.assertEqual(len(raced), 2)
        self.assertEqual(reply[1], "end")
        self.assertEqual(reply[0]["affectedRows"], 2)
        first = reply[0]["insertId"]
        mine = self.rows("pid, version, name", f"WHERE id >= {first} AND id < {first + 2}")
        self.assertEqual(mine, (("x", 3, "mine"), ("y", 2, "mine")))
        self.assertEqual([r[2] for r in self.rows("pid, version, name", "WHERE pid = 'x'")],
                         ["first", "external", "external", "mine"])
        assert_streams_exact(self, self.streams())
        self.flushLoggedErrors(pymysql.err.IntegrityError)

    @defer.inlineCallbacks
    def test_a_stream_appended_to_between_two_persists_continues_after_it(self):
        """The writer remembers the versions it wrote; another writer's make it read again."""
        reply = yield self.client.persist([{"pid": "x", "domain": "d", "name": "mine", "data": 1}])
        self.assertEqual(reply[0]["affectedRows"], 1)
        for version in (1, 2):
            sql(f"INSERT INTO `{self.database}`.`event` (pid, domain, name, data, version,"
                " event_id) VALUES ('x', 'd', 'external', '{}', %s, %s)", (version, ids.uuid7()))
        reply = yield self.client.persist([{"pid": "x", "domain": "d", "name": "mine", "data": 2}])
        self.assertEqual(reply[0]["affectedRows"], 1)
        self.assertEqual(self.rows("name, version"),
                         (("mine", 0), ("external", 1), ("external", 2), ("mine", 3)))
        reply = yield self.client.persist([{"pid": "x", "domain": "d", "name": "mine", "data": 3}])
        self.assertEqual(self.rows("version", "WHERE name = 'mine'"), ((0,), (3,), (4,)))
        self.flushLoggedErrors(pymysql.err.IntegrityError)

    @defer.inlineCallbacks
    def test_retries_are_bounded(self):
        self.behind_the_servers_back(writer.VERSION_RETRIES + 1)
        reply = yield self.client.persist([{"pid": "x", "domain": "d", "name": "mine", "data": 1}])
        self.assertEqual(reply, ["error", "end"])
        self.assertEqual([r[2] for r in self.rows("pid, version, name")],
                         ["external"] * (writer.VERSION_RETRIES + 1))
        assert_streams_exact(self, self.streams())
        self.flushLoggedErrors(writer.VersionConflict)
        # the next persist is numbered after the external writer's events
        reply = yield self.client.persist([{"pid": "x", "domain": "d", "name": "mine", "data": 2}])
        self.assertEqual(reply[0]["affectedRows"], 1)
        self.assertEqual(self.rows("version", "WHERE name = 'mine'"), ((writer.VERSION_RETRIES + 1,),))

    @defer.inlineCallbacks
    def test_version_1_cannot_see_the_stream_columns(self):
        yield self.client.persist([{"pid": "x", "domain": "d", "name": "n", "data": 1}])
        for select in ({"$columns": ["version"]}, {"$where": {"version": 0}},
                       {"$columns": ["event_id"]}, {"$orderBy": {"version": 1}}):
            messages = yield self.client.fetch(select)
            self.assertEqual(messages, ["error", "end"])
        messages = yield self.client.fetch({})
        self.assertEqual(sorted(messages[0]), ["data", "domain", "name", "pid", "timestamp"])
        self.flushLoggedErrors()


class UpgradeTests(TestCase):
    """An existing table numbered in place at start, before the server serves."""

    timeout = 600

    def setUp(self):
        self.database = unique("es_versions")
        self.prefix = unique("t") + ":"
        self.table = f"`{self.database}`.`event`"
        self.addCleanup(sql, f"DROP DATABASE IF EXISTS `{self.database}`")

    def starting(self):
        """A server starting on the table (its ``ready`` not fired yet)."""
        server = make_server(Config(
            table=f"{self.database}.event", redis_host=REDIS_HOST, redis_port=REDIS_PORT,
            mysql_host=MYSQL["host"], mysql_port=MYSQL["port"], mysql_user=MYSQL["user"],
            mysql_password=MYSQL["password"], channel_prefix=self.prefix),
            stop_reactor_on_failure=False)
        server.startService()
        self.addCleanup(server.stopService)
        return server

    @defer.inlineCallbacks
    def start(self):
        server = self.starting()
        yield server.ready
        return server

    def fill(self, rows):
        """``rows`` events of 7 pids (one case variant), a millisecond apart, in one statement."""
        sql(f"INSERT INTO {self.table} (timestamp, pid, domain, name, data)"
            " SELECT TIMESTAMP'2020-01-01 00:00:00' + INTERVAL seq * 1001 MICROSECOND,"
            " ELT(1 + seq % 7, 'p0', 'p1', 'P1', 'p3', 'p4', 'p5', 'long'), 'd',"
            f" CONCAT('n', seq), JSON_OBJECT('i', seq) FROM `{self.database}`.seq_1_to_{rows}")

    def create_original(self, rows=UPGRADE_ROWS):
        """The Node.js original's table: utf8, no id, no key."""
        sql(f"CREATE DATABASE `{self.database}` CHARACTER SET utf8")
        sql(f"CREATE TABLE {self.table} ("
            " `timestamp` DATETIME(6) NOT NULL DEFAULT NOW(6),"
            " `pid` VARCHAR(255) NOT NULL, `domain` VARCHAR(255) NOT NULL,"
            " `name` VARCHAR(255) NOT NULL, `data` JSON"
            ") ENGINE=InnoDB DEFAULT CHARSET=utf8 COLLATE=utf8_bin")
        self.fill(rows)

    def create_earlier_release(self, rows=UPGRADE_ROWS):
        """This project's table before stream versions."""
        sql(f"CREATE DATABASE `{self.database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        sql(f"CREATE TABLE {self.table} ("
            " `id` BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,"
            " `timestamp` DATETIME(6) NOT NULL DEFAULT NOW(6),"
            " `pid` VARCHAR(255) NOT NULL, `domain` VARCHAR(255) NOT NULL,"
            " `name` VARCHAR(255) NOT NULL, `data` JSON,"
            " KEY `pid_id` (`pid`, `id`), KEY `domain_name_id` (`domain`, `name`, `id`),"
            " KEY `domain_id` (`domain`, `id`), KEY `name_id` (`name`, `id`),"
            " KEY `timestamp_id` (`timestamp`, `id`)"
            ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin")
        self.fill(rows)

    def assertNumbered(self, rows=UPGRADE_ROWS):
        table = sql(f"SELECT id, pid, version, event_id, timestamp FROM {self.table} ORDER BY id")
        self.assertEqual(len(table), rows)
        counts = assert_streams_exact(self, [row[:4] for row in table])
        self.assertEqual(counts["p1"] + counts["P1"] + counts["p0"], sum(
            1 for i in range(1, rows + 1) if i % 7 in (0, 1, 2)))
        for row in table[:: max(1, rows // 1000)]:
            assert_v7(self, row[3], row[4])
        nullable = sql("SELECT COLUMN_NAME, IS_NULLABLE FROM information_schema.COLUMNS"
                       " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'event'"
                       " AND COLUMN_NAME IN ('version', 'event_id')", (self.database,))
        self.assertEqual(dict(nullable), {"version": "NO", "event_id": "NO"})
        keys = sql("SELECT DISTINCT INDEX_NAME FROM information_schema.STATISTICS"
                   " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'event' AND NON_UNIQUE = 0",
                   (self.database,))
        self.assertEqual({k[0] for k in keys}, {"PRIMARY", "pid_version", "event_id"})
        return table

    @defer.inlineCallbacks
    def persist_after(self, table):
        client = yield WireClient(self.prefix).connect()
        self.addCleanup(client.disconnect)
        reply = yield client.persist([{"pid": "p1", "domain": "d", "name": "new", "data": {}}])
        self.assertGreater(reply[0]["insertId"], table[-1][0])
        last = max(row[2] for row in table if row[1] == "p1")
        self.assertEqual(sql(f"SELECT version FROM {self.table} WHERE name = 'new'"), ((last + 1,),))

    @defer.inlineCallbacks
    def test_the_original_table_is_numbered(self):
        self.create_original()
        self.patch(store.Store, "progress_interval", 0)
        logged = LogCapture(self)
        yield self.start()
        table = self.assertNumbered()
        progress = [e for e in logged if "numbered {done} events, {left} left" in e.get("log_format", "")]
        # one line per transaction of fill_batch ids (the interval is 0 here)
        self.assertEqual(len(progress), -(-UPGRADE_ROWS // store.Store.fill_batch))
        self.assertEqual(progress[-1]["done"], UPGRADE_ROWS)
        self.assertEqual(progress[-1]["left"], 0)
        self.assertGreater(progress[0]["rate"], 0)
        finished = [e for e in logged if "are NOT NULL" in e.get("log_format", "")]
        self.assertEqual(finished[0]["done"], UPGRADE_ROWS)
        ready = [e for e in logged if "ready ({changes})" in e.get("log_format", "")]
        self.assertIn("added index pid_version, added index event_id, created event_append_lock, "
                      f"numbered {UPGRADE_ROWS} events", ready[0]["changes"])
        yield self.persist_after(table)

    @defer.inlineCallbacks
    def test_a_table_of_an_earlier_release_is_numbered(self):
        self.create_earlier_release()
        yield self.start()
        table = self.assertNumbered()
        yield self.persist_after(table)

    @defer.inlineCallbacks
    def test_a_stopped_fill_resumes_with_the_same_numbering(self):
        self.create_earlier_release()
        self.patch(store.Store, "fill_batch", 1000)
        real = store.fill_range
        calls = []

        def stopping(txn, table, first, end):
            if len(calls) == 10:
                raise RuntimeError("killed half-way")
            calls.append(first)
            return real(txn, table, first, end)

        self.patch(store, "fill_range", stopping)
        server = self.starting()
        yield self.assertFailure(server.ready, RuntimeError)
        self.flushLoggedErrors(RuntimeError)
        yield server.stopService()
        before = sql(f"SELECT id, version, event_id FROM {self.table} WHERE version IS NOT NULL"
                     " ORDER BY id")
        self.assertEqual([row[0] for row in before], list(range(1, 10001)))
        self.assertEqual(sql(f"SELECT COUNT(*) FROM {self.table} WHERE version IS NULL"),
                         ((UPGRADE_ROWS - 10000,),))
        nullable = sql("SELECT COUNT(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s"
                       " AND COLUMN_NAME IN ('version', 'event_id') AND IS_NULLABLE = 'YES'",
                       (self.database,))
        self.assertEqual(nullable, ((2,),))

        self.patch(store, "fill_range", real)
        yield self.start()
        table = self.assertNumbered()
        # the rows filled before the stop kept their numbers and event ids
        self.assertEqual([(row[0], row[2], row[3]) for row in table[:10000]], list(before))

