"""
The events table on the real MariaDB: created when missing, and a table
made by the original Node.js service upgraded in place without losing a row.
"""

import json

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.support import MYSQL, REDIS_HOST, REDIS_PORT, LogCapture, WireClient, sql, unique
from eventsource.config import Config
from eventsource.service import make_server


class SchemaTests(TestCase):
    timeout = 120

    def setUp(self):
        self.database = unique("es_schema")
        self.prefix = unique("t") + ":"
        self.addCleanup(sql, f"DROP DATABASE IF EXISTS `{self.database}`")

    @defer.inlineCallbacks
    def start(self, user=MYSQL["user"], password=MYSQL["password"]):
        server = make_server(Config(
            table=f"{self.database}.event", redis_host=REDIS_HOST, redis_port=REDIS_PORT,
            mysql_host=MYSQL["host"], mysql_port=MYSQL["port"], mysql_user=user,
            mysql_password=password, channel_prefix=self.prefix), stop_reactor_on_failure=False)
        server.startService()
        self.addCleanup(server.stopService)
        yield server.ready
        return server

    def columns(self):
        return {name: (column_type, charset, collation)
                for name, column_type, charset, collation in sql(
                    "SELECT COLUMN_NAME, COLUMN_TYPE, CHARACTER_SET_NAME, COLLATION_NAME"
                    " FROM information_schema.COLUMNS"
                    " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'event'", (self.database,))}

    def nullable(self):
        return dict(sql("SELECT COLUMN_NAME, IS_NULLABLE FROM information_schema.COLUMNS"
                        " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'event'"
                        " AND COLUMN_NAME IN ('version', 'event_id')", (self.database,)))

    def assertBinaryIds(self):
        columns = self.columns()
        for text in ("pid", "domain", "name", "data"):
            self.assertEqual(columns[text][1:], ("utf8mb4", "utf8mb4_bin"), text)

    def indexes(self):
        return {(name, seq, column) for name, seq, column in sql(
            "SELECT INDEX_NAME, SEQ_IN_INDEX, COLUMN_NAME FROM information_schema.STATISTICS"
            " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'event'", (self.database,))}

    EXPECTED_INDEXES = {("PRIMARY", 1, "id"), ("pid_id", 1, "pid"), ("pid_id", 2, "id"),
                        ("domain_name_id", 1, "domain"), ("domain_name_id", 2, "name"),
                        ("domain_name_id", 3, "id"), ("domain_id", 1, "domain"), ("domain_id", 2, "id"),
                        ("name_id", 1, "name"), ("name_id", 2, "id"),
                        ("timestamp_id", 1, "timestamp"), ("timestamp_id", 2, "id"),
                        ("pid_version", 1, "pid"), ("pid_version", 2, "version"),
                        ("event_id", 1, "event_id")}

    @defer.inlineCallbacks
    def test_creates_database_and_table(self):
        yield self.start()
        columns = self.columns()
        self.assertEqual(set(columns), {"id", "timestamp", "pid", "domain", "name", "data",
                                        "version", "event_id"})
        self.assertEqual(columns["id"][0], "bigint(20) unsigned")
        self.assertEqual(columns["version"][0], "bigint(20) unsigned")
        self.assertEqual(columns["event_id"][0], "binary(16)")
        self.assertEqual(self.nullable(), {"version": "NO", "event_id": "NO"})
        unique = sql("SELECT DISTINCT INDEX_NAME FROM information_schema.STATISTICS"
                     " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'event' AND NON_UNIQUE = 0",
                     (self.database,))
        self.assertEqual({row[0] for row in unique}, {"PRIMARY", "pid_version", "event_id"})
        self.assertEqual(columns["timestamp"][0], "datetime(6)")
        self.assertBinaryIds()
        self.assertEqual(self.indexes(), self.EXPECTED_INDEXES)

    @defer.inlineCallbacks
    def test_start_is_idempotent(self):
        server = yield self.start()
        yield server.stopService()
        yield self.start()
        self.assertEqual(self.indexes(), self.EXPECTED_INDEXES)

    @defer.inlineCallbacks
    def test_upgrades_the_original_table_in_place(self):
        sql(f"CREATE DATABASE `{self.database}` CHARACTER SET utf8")
        sql(f"CREATE TABLE `{self.database}`.`event` ("
            " `timestamp` DATETIME(6) NOT NULL DEFAULT NOW(6),"
            " `pid` VARCHAR(255) NOT NULL, `domain` VARCHAR(255) NOT NULL,"
            " `name` VARCHAR(255) NOT NULL, `data` JSON"
            ") ENGINE=InnoDB DEFAULT CHARSET=utf8")
        originals = [(f"2020-01-01 00:00:{i:02d}.{i:06d}", f"p{i % 3}", "user", f"n{i}",
                      json.dumps({"i": i})) for i in range(30)]
        for row in originals:
            sql(f"INSERT INTO `{self.database}`.`event` VALUES (%s, %s, %s, %s, %s)", row)
        self.assertEqual(self.columns()["pid"][1], "utf8mb3")

        yield self.start()

        columns = self.columns()
        self.assertIn("id", columns)
        self.assertBinaryIds()
        self.assertEqual(self.indexes(), self.EXPECTED_INDEXES)
        rows = sql(f"SELECT id, timestamp, pid, domain, name, data FROM `{self.database}`.`event` ORDER BY id")
        self.assertEqual([row[0] for row in rows], list(range(1, 31)))
        self.assertEqual([row[4] for row in rows], [f"n{i}" for i in range(30)])  # original order
        self.assertEqual([json.loads(row[5]) for row in rows], [{"i": i} for i in range(30)])

        client = yield WireClient(self.prefix).connect()
        self.addCleanup(client.disconnect)
        reply = yield client.persist({"pid": "😀", "domain": "user", "name": "new", "data": {}})
        self.assertEqual(reply[0]["insertId"], 31)
        messages = yield client.fetch({"$where": {"pid": "p1"}, "$columns": ["timestamp", "name"]})
        self.assertEqual(messages[0], {"timestamp": "2020-01-01T00:00:01.000Z", "name": "n1"})
        self.assertEqual([m["name"] for m in messages[:-1]], [f"n{i}" for i in range(1, 30, 3)])

    def create_earlier_version(self, rows=(("p", "n1", "1"), ("q", "n2", "2"))):
        """
        The table as the previous release created it: two secondary indexes,
        ids collated case-insensitively (utf8mb4_unicode_ci).
        """
        sql(f"CREATE DATABASE `{self.database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
        sql(f"CREATE TABLE `{self.database}`.`event` ("
            " `id` BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,"
            " `timestamp` DATETIME(6) NOT NULL DEFAULT NOW(6),"
            " `pid` VARCHAR(255) NOT NULL, `domain` VARCHAR(255) NOT NULL,"
            " `name` VARCHAR(255) NOT NULL, `data` JSON,"
            " KEY `pid_id` (`pid`, `id`), KEY `domain_name_id` (`domain`, `name`, `id`)"
            ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci")
        for pid, name, data in rows:
            sql(f"INSERT INTO `{self.database}`.`event` (`pid`, `domain`, `name`, `data`)"
                " VALUES (%s, 'd', %s, %s)", (pid, name, data))

    @defer.inlineCallbacks
    def test_adds_new_indexes_to_a_table_of_an_earlier_version(self):
        self.create_earlier_version()
        yield self.start()
        self.assertEqual(self.indexes(), self.EXPECTED_INDEXES)
        client = yield WireClient(self.prefix).connect()
        self.addCleanup(client.disconnect)
        messages = yield client.fetch({"$where": {"domain": "d"}, "$columns": ["name"]})
        self.assertEqual(messages[:-1], [{"name": "n1"}, {"name": "n2"}])

    @defer.inlineCallbacks
    def test_upgrade_without_privileges_is_a_clear_start_failure(self):
        self.create_earlier_version()
        user = unique("es_ro")[:32]
        for host in ("%", "localhost"):
            sql(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY 'ro-pass'")
            sql(f"GRANT SELECT ON `{self.database}`.* TO '{user}'@'{host}'")
            self.addCleanup(sql, f"DROP USER IF EXISTS '{user}'@'{host}'")
        failure = yield self.assertFailure(self.start(user, "ro-pass"), RuntimeError)
        self.assertIn("added index domain_id, added index name_id, added index timestamp_id,"
                      " added index pid_version, added index event_id)"
                      " that this MariaDB user may not make", str(failure))
        self.flushLoggedErrors(RuntimeError)
        # once a user that may ALTER has started it, the SELECT-only user can
        yield (yield self.start()).stopService()
        yield self.start(user, "ro-pass")

    @defer.inlineCallbacks
    def test_original_binary_table_stays_binary(self):
        """
        The original's own schema (utf8, utf8_bin, VARCHAR(200), prefix
        indexes): converted to utf8mb4 and still compared byte for byte, so
        the answers of queries that worked before do not change.
        """
        sql(f"CREATE DATABASE `{self.database}`")
        sql(f"CREATE TABLE `{self.database}`.`event` ("
            " `timestamp` TIMESTAMP DEFAULT CURRENT_TIMESTAMP NOT NULL,"
            " `pid` VARCHAR(200) NOT NULL, `domain` VARCHAR(200) NOT NULL,"
            " `name` VARCHAR(200) NOT NULL, `data` JSON NULL"
            ") ENGINE=InnoDB DEFAULT CHARACTER SET utf8 COLLATE utf8_bin")
        sql(f"CREATE INDEX `eventsource_event_pid` ON `{self.database}`.`event` (`pid`(10))")
        for pid in ("p1", "P1", "p1"):
            sql(f"INSERT INTO `{self.database}`.`event` (pid, domain, name, data)"
                " VALUES (%s, 'user', 'created', '{}')", (pid,))
        before = sql(f"SELECT COUNT(*) FROM `{self.database}`.`event` WHERE pid = 'p1'")[0][0]
        self.assertEqual(before, 2)

        yield self.start()

        self.assertBinaryIds()
        client = yield WireClient(self.prefix).connect()
        self.addCleanup(client.disconnect)
        messages = yield client.fetch({"$where": {"pid": "p1"}, "$columns": ["id", "pid"]})
        self.assertEqual(messages, [{"id": 1, "pid": "p1"}, {"id": 3, "pid": "p1"}, "end"])

    @defer.inlineCallbacks
    def test_case_insensitive_table_of_an_earlier_release_is_made_binary(self):
        """
        A table this project created before ids were binary
        (utf8mb4_unicode_ci): converted, with a log line saying so.
        """
        self.create_earlier_version(rows=[(pid, "created", "{}") for pid in ("Order-1", "order-1")])
        logged = LogCapture(self)

        yield self.start()

        self.assertBinaryIds()
        self.assertEqual(self.indexes(), self.EXPECTED_INDEXES)
        warnings = [event for event in logged if "collations" in event]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["collations"], "utf8mb4_unicode_ci")
        client = yield WireClient(self.prefix).connect()
        self.addCleanup(client.disconnect)
        messages = yield client.fetch({"$where": {"pid": "order-1"}, "$columns": ["id"]})
        self.assertEqual(messages, [{"id": 2}, "end"])

    @defer.inlineCallbacks
    def test_table_missing_columns_is_a_clear_start_failure(self):
        sql(f"CREATE DATABASE `{self.database}`")
        sql(f"CREATE TABLE `{self.database}`.`event` (`x` INT)")
        server = make_server(Config(table=f"{self.database}.event",
                                    redis_host=REDIS_HOST, redis_port=REDIS_PORT,
                                    channel_prefix=self.prefix), stop_reactor_on_failure=False)
        server.startService()
        self.addCleanup(server.stopService)
        failure = yield self.assertFailure(server.ready, RuntimeError)
        self.assertIn("lacks the columns", str(failure))
        self.flushLoggedErrors(RuntimeError)
