"""
The append lock and the writer's transaction (issue 13, "Commit order across
writers and nodes"): the lock is a change of its row (so that Galera
certifies it), a transaction that a deadlock or certification refuses is
written again whole, at COMMIT too, with the same event ids, a bounded
number of times; positions are given by the writer after the table's
largest when auto-increment ids are not consecutive (Galera); an append lock
table of an earlier release is upgraded in place.

The first tests run the writer's transaction against :class:`FakeTable`, an
in-memory double of the events table at the level of the writer's statements
(Galera's refusals are scripted: real ones are in tests/slow/test_galera.py);
the others run the server against the real MariaDB.
"""

import json
import uuid

import pymysql
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from eventsource import appends, schema
from eventsource import writer as write_path
from eventsource.query import InsertPlan
from tests.support import IntegrationTestCase, LogCapture, sql, unique

TABLE = "`db`.`event`"
LOCK = "`db`.`event_append_lock`"


def deadlock():
    return pymysql.err.OperationalError(1213, "Deadlock found when trying to get lock;"
                                              " try restarting transaction")


class FakeTable:
    """
    The events table and its append lock row as the writer's statements see
    them, for one connection: the statements of a transaction are pending
    until :meth:`commit`; its reads see the rows committed when it first
    read (InnoDB's snapshot), and its INSERTs meet the keys of every
    committed row.  ``refuse`` scripts errors: statement kind (``"lock"``,
    ``"insert"``, ``"commit"``) -> errors to raise at its next runs;
    ``meanwhile``: rows another writer commits while the next lock is
    waited for.
    """

    def __init__(self, top=0, lock_row=True):
        #: committed rows: (id, pid, version, event_id)
        self.rows = []
        self.top = top
        self.lock_row = lock_row
        self.taken = 0
        self.refuse = {}
        #: every statement run, as ``(kind, params)``
        self.log = []
        self._pending = []
        self._pending_lock = None
        self._snapshot = None
        self.meanwhile = []
        self.rowcount = 0
        self.lastrowid = 0
        self._result = []
        self.connection = self

    # the cursor

    def _maybe_refuse(self, kind):
        errors = self.refuse.get(kind)
        if errors:
            raise errors.pop(0)

    def execute(self, statement, params=()):
        params = list(params or ())
        if statement.startswith("UPDATE") and LOCK in statement:
            kind = "lock"
        elif statement.startswith("INSERT") and LOCK in statement:
            kind = "restore"
        elif statement.startswith("INSERT"):
            kind = "insert"
        elif "`event_id` IN" in statement:
            kind = "stored"
        else:
            kind = "versions"
        self.log.append((kind, params))
        self._maybe_refuse(kind)
        getattr(self, "_" + kind)(statement, params)

    def _lock(self, statement, params):
        self.assert_statement(statement, schema.lock_append_sql(LOCK))
        self.rows += self.meanwhile
        self.meanwhile = []
        self.rowcount = 1 if self.lock_row else 0
        if self.lock_row:
            self._pending_lock = (self._pending_lock or self.taken) + 1

    def _restore(self, statement, params):
        self.assert_statement(statement, schema.restore_lock_row_sql(LOCK))
        self._pending_lock = 1
        self.rowcount = 1

    def _visible(self):
        """What a read sees: the snapshot of its transaction's first read, and its own rows."""
        if self._snapshot is None:
            self._snapshot = list(self.rows)
        return self._snapshot + self._pending

    def _latest(self):
        return self.rows + self._pending

    def _versions(self, statement, params):
        result = []
        if statement.startswith("SELECT NULL, COALESCE(MAX(`id`), 0)"):
            result.append((None, max([self.top] + [r[0] for r in self._visible()])))
        for pid in params:
            versions = [r[2] for r in self._visible() if r[1] == pid]
            result.append((pid, max(versions)) if versions else (None, None))
        self._result = result

    def _stored(self, statement, params):
        wanted = set(params)
        self._result = [(r[3], r[1], r[2], r[0]) for r in self._visible() if r[3] in wanted]

    def _insert(self, statement, params):
        positions = statement.startswith(f"INSERT INTO {TABLE} (`id`,")
        width = len(schema.INSERT_COLUMNS) + positions
        rows = [params[k:k + width] for k in range(0, len(params), width)]
        next_id = max([self.top] + [r[0] for r in self._latest()]) + 1
        added = []
        for row in rows:
            if positions:
                position, row = row[0], row[1:]
            else:
                position, next_id = next_id, next_id + 1
            pid, version, event_id = row[0], row[4], row[5]
            keys = {key for r in self._latest() + added for key in (r[0], (r[1], r[2]), r[3])}
            if {position, (pid, version), event_id} & keys:
                raise pymysql.err.IntegrityError(1062, "Duplicate entry")
            added.append((position, pid, version, event_id))
        self._pending += added
        self.rowcount = len(rows)
        self.lastrowid = added[0][0]

    def fetchall(self):
        result, self._result = self._result, []
        return result

    def assert_statement(self, statement, expected):
        if statement != expected:
            raise AssertionError(f"{statement!r} != {expected!r}")

    # the transaction and its connection

    def commit(self):
        self.log.append(("commit", []))
        try:
            self._maybe_refuse("commit")
        except pymysql.err.OperationalError as error:
            if error.args[0] == 1213:  # (refused: rolled back, as MariaDB does)
                self.rollback(logged=False)
            raise
        self.rows += self._pending
        if self._pending_lock is not None:
            self.taken, self.lock_row = self._pending_lock, True
        self.rollback(logged=False)

    def rollback(self, logged=True):
        if logged:
            self.log.append(("rollback", []))
        self._pending = []
        self._pending_lock = None
        self._snapshot = None

    def kinds(self):
        return [kind for kind, _ in self.log]


def rows(pid, count):
    return tuple((pid, "d", "n", json.dumps({"k": k})) for k in range(count))


def v2(pid, count, event_ids=None):
    return appends.Append(rows(pid, count), event_ids, (), True)


def client_ids(count):
    return tuple(uuid.uuid4().bytes for _ in range(count))


def write(table, batch, consecutive_ids=True, known=None):
    return write_path._insert_batch(table, TABLE, batch, consecutive_ids, known, LOCK)


class CommitRetryTests(SynchronousTestCase):
    """The whole transaction again when a deadlock or certification refuses it."""

    def setUp(self):
        self.logged = LogCapture(self)
        self.pauses = []
        self.patch(write_path, "_pause", self.pauses.append)

    def assert_stored_once(self, table, outcomes):
        stored = {r[3]: (r[1], r[2], r[0]) for r in table.rows}
        self.assertEqual(len(stored), len(table.rows))
        for outcome in outcomes:
            for event in outcome.events:
                self.assertEqual(stored[event.event_id], (event.pid, event.version, event.position))

    def test_a_commit_refused_by_certification_is_written_again(self):
        table = FakeTable()
        table.refuse["commit"] = [deadlock()]
        mine = client_ids(2)
        outcomes, last = write(table, [v2("a", 2, mine), v2("b", 1)])
        self.assertEqual(table.kinds(), ["lock", "versions", "insert", "commit", "rollback",
                                         "lock", "versions", "insert", "commit"])
        self.assertEqual(len(table.rows), 3)
        self.assert_stored_once(table, outcomes)
        self.assertEqual([e.version for o in outcomes for e in o.events], [0, 1, 0])
        self.assertEqual(last, {"a": 1, "b": 0})
        # both tries wrote the same event ids, the server's own included
        inserts = [params for kind, params in table.log if kind == "insert"]
        self.assertEqual(inserts[0], inserts[1])
        self.assertEqual([e.event_id for e in outcomes[0].events], list(mine))
        self.assertEqual(table.taken, 1)
        self.assertEqual(len([t for t in self.logged.texts() if "committed first" in t]), 1)

    def test_a_statement_refused_with_1213_is_written_again(self):
        """A transaction that a conflicting one aborted (Galera's brute-force abort, a deadlock)."""
        table = FakeTable()
        table.refuse["insert"] = [deadlock(), deadlock()]
        outcomes, _ = write(table, [v2("a", 1)])
        self.assertEqual(table.kinds().count("insert"), 3)
        self.assertEqual(table.kinds().count("commit"), 1)
        self.assert_stored_once(table, outcomes)

    def test_remembered_versions_are_read_again_after_a_refusal(self):
        """The transaction that went first may have appended to the batch's streams."""
        table = FakeTable()
        write(table, [v2("a", 2)])
        table.refuse["commit"] = [deadlock()]
        del table.log[:]
        outcomes, _ = write(table, [v2("a", 1)], known={"a": 1})
        self.assertEqual(table.kinds(), ["lock", "insert", "commit", "rollback",
                                         "lock", "versions", "insert", "commit"])
        self.assertEqual(outcomes[0].events[0].version, 2)

    def test_the_retries_are_bounded(self):
        table = FakeTable()
        table.refuse["commit"] = [deadlock() for _ in range(write_path.CONFLICT_RETRIES + 1)]
        error = self.assertRaises(write_path.VersionConflict, write, table, [v2("a", 1)])
        self.assertIn("committing first", str(error))
        self.assertEqual(table.kinds().count("commit"), write_path.CONFLICT_RETRIES + 1)
        self.assertEqual(table.rows, [])

    def test_each_conflict_is_followed_by_a_random_pause_that_grows_to_a_bound(self):
        """Writers that keep meeting each other stop doing so in step."""
        table = FakeTable()
        count = write_path.CONFLICT_RETRIES
        table.refuse["commit"] = [deadlock() for _ in range(count)]
        write(table, [v2("a", 1)])
        self.assertEqual(len(self.pauses), count)
        for n, pause in enumerate(self.pauses):
            self.assertGreaterEqual(pause, 0)
            self.assertLessEqual(pause, min(write_path.CONFLICT_PAUSE, 0.001 * 2 ** n))
        self.assertGreater(max(self.pauses[10:]), 0.01)
        self.assertEqual(len(set(self.pauses)), count)
        # (a version taken is read again at once: no other writer to let by)
        table.refuse["insert"] = [pymysql.err.IntegrityError(1062, "Duplicate entry")]
        write(table, [v2("a", 1)])
        self.assertEqual(len(self.pauses), count)

    def test_conflicts_and_taken_versions_have_budgets_of_their_own(self):
        table = FakeTable()
        table.refuse["commit"] = [deadlock() for _ in range(write_path.CONFLICT_RETRIES)]
        table.refuse["insert"] = [pymysql.err.IntegrityError(1062, "Duplicate entry")
                                  for _ in range(write_path.VERSION_RETRIES)]
        outcomes, _ = write(table, [v2("a", 1)])
        self.assert_stored_once(table, outcomes)

    def test_a_connection_lost_at_commit_is_not_written_again(self):
        """The outcome is unknown (MariaDB may have committed): the store fails the batch."""
        table = FakeTable()
        table.refuse["commit"] = [pymysql.err.OperationalError(2013, "Lost connection")]
        self.assertRaises(pymysql.err.OperationalError, write, table, [v2("a", 1)])
        self.assertEqual(table.kinds(), ["lock", "versions", "insert", "commit"])

    def test_a_duplicate_found_before_a_refused_commit_stays_answered(self):
        """
        A request whose ids the table holds (an earlier send of it) is
        settled as their duplicate; the COMMIT of the rest refused, that
        answer stands and only the rest is written again.
        """
        table = FakeTable()
        mine = client_ids(1)
        first, _ = write(table, [v2("a", 1, mine)])
        table.refuse["commit"] = [deadlock()]
        outcomes, _ = write(table, [v2("a", 1, mine), v2("b", 1)], known={"a": 0})
        self.assertTrue(outcomes[0].duplicate)
        self.assertEqual(outcomes[0].events, first[0].events)
        self.assertEqual(len(table.rows), 2)


    def test_the_try_after_a_repeat_reads_under_the_lock(self):
        """
        The lookup of a repeat's event ids reads outside the lock: the next
        try must not read its versions and positions in that snapshot.  Here
        another writer commits while the lock is waited for, at a position
        past a gap (an auto-increment one): the batch's position follows it.
        """
        table = FakeTable()
        mine = client_ids(1)
        write(table, [v2("a", 1, mine)], consecutive_ids=False)
        del table.log[:]
        real_lock = table._lock

        def lock(statement, params):
            if table.kinds().count("lock") == 2:
                table.meanwhile = [(5, "c", 0, uuid.uuid4().bytes)]
            real_lock(statement, params)

        table._lock = lock
        outcomes, _ = write(table, [v2("a", 1, mine), v2("b", 1)], consecutive_ids=False)
        self.assertTrue(outcomes[0].duplicate)
        self.assertEqual(outcomes[1].events[0].position, 6)
        self.assertEqual(table.kinds(), ["lock", "versions", "insert", "rollback", "stored",
                                         "rollback", "lock", "versions", "insert", "commit"])


class LockStatementTests(SynchronousTestCase):
    def test_the_lock_changes_its_row(self):
        """A change (in Galera's write set), not a locking read (which no other node sees)."""
        statement = schema.lock_append_sql(LOCK)
        self.assertEqual(statement, f"UPDATE {LOCK} SET `taken` = `taken` + 1 WHERE `id` = 1")

    def test_a_deleted_lock_row_is_made_again(self):
        table = FakeTable(lock_row=False)
        write(table, [v2("a", 1)])
        self.assertEqual(table.kinds()[:2], ["lock", "restore"])
        self.assertTrue(table.lock_row)
        write(table, [v2("a", 1)])
        self.assertEqual(table.taken, 2)


class GivenPositionsTests(SynchronousTestCase):
    """Without consecutive auto-increment ids (Galera): positions after the table's largest."""

    def test_positions_follow_the_top_densely(self):
        table = FakeTable(top=41)
        outcomes, last = write(table, [v2("a", 2), v2("b", 3), v2("a", 1)], consecutive_ids=False)
        self.assertEqual(table.kinds(), ["lock", "versions", "insert", "commit"])
        self.assertEqual([e.position for o in outcomes for e in o.events], list(range(42, 48)))
        self.assertEqual(sorted(r[0] for r in table.rows), list(range(42, 48)))
        self.assertEqual([e.version for o in outcomes for e in o.events], [0, 1, 0, 1, 2, 2])
        self.assertEqual(last, {"a": 2, "b": 2})
        outcomes, _ = write(table, [rows("c", 2)], consecutive_ids=False)
        self.assertEqual(outcomes, [(2, 48)])

    def test_every_version_is_read_under_the_lock(self):
        """Remembered versions are not used: another node may have appended since."""
        table = FakeTable()
        write(table, [v2("a", 3)], consecutive_ids=False)
        del table.log[:]
        outcomes, _ = write(table, [v2("a", 1)], consecutive_ids=False, known={"a": 0})
        self.assertEqual(table.log[1], ("versions", ["a"]))
        self.assertEqual(outcomes[0].events[0].version, 3)


# -- the real MariaDB -------------------------------------------------------------


class AppendLockTests(IntegrationTestCase):
    def lock_table(self):
        return f"`{self.database}`.`event_append_lock`"

    def test_the_lock_table_has_its_counter(self):
        self.assertEqual(sql(f"SELECT id, taken FROM {self.lock_table()}"), ((1, 0),))

    @defer.inlineCallbacks
    def test_each_write_transaction_changes_the_lock_row(self):
        for _ in range(3):
            reply = yield self.client.persist([{"pid": "p", "domain": "d", "name": "n", "data": 1}])
            self.assertEqual(reply[0]["affectedRows"], 1)
        self.assertEqual(sql(f"SELECT taken FROM {self.lock_table()}"), ((3,),))

    @defer.inlineCallbacks
    def test_a_lock_table_of_an_earlier_release_gets_its_counter(self):
        yield self.server.stopService()
        sql(f"DROP TABLE {self.lock_table()}")
        # (the earlier release's table: its id only, locked with SELECT ... FOR UPDATE)
        sql(f"CREATE TABLE {self.lock_table()} (id TINYINT UNSIGNED NOT NULL PRIMARY KEY)"
            " ENGINE=InnoDB")
        sql(f"INSERT INTO {self.lock_table()} (id) VALUES (1)")
        logged = LogCapture(self)
        yield self.start_server()
        ready = [e for e in logged if "ready ({changes})" in e.get("log_format", "")]
        self.assertIn("added taken to event_append_lock", ready[0]["changes"])
        reply = yield self.client.persist([{"pid": "p", "domain": "d", "name": "n", "data": 1}])
        self.assertEqual(reply[0]["affectedRows"], 1)
        self.assertEqual(sql(f"SELECT id, taken FROM {self.lock_table()}"), ((1, 1),))

    @defer.inlineCallbacks
    def test_the_counter_added_without_privileges_is_a_clear_start_failure(self):
        """A SELECT-only user meets the earlier release's lock table: started once by one that may ALTER."""
        yield self.server.stopService()
        sql(f"DROP TABLE {self.lock_table()}")
        sql(f"CREATE TABLE {self.lock_table()} (id TINYINT UNSIGNED NOT NULL PRIMARY KEY)"
            " ENGINE=InnoDB")
        user = unique("es_ro")[:32]
        for host in ("%", "localhost"):
            sql(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY 'ro-pass'")
            sql(f"GRANT SELECT ON `{self.database}`.* TO '{user}'@'{host}'")
            self.addCleanup(sql, f"DROP USER IF EXISTS '{user}'@'{host}'")
        failure = yield self.assertFailure(
            self.start_server(mysql_user=user, mysql_password="ro-pass"), RuntimeError)
        self.assertIn("needs its append lock table event_append_lock (see docs/OPERATIONS.md),"
                      " with its column taken, which this MariaDB user may not make",
                      str(failure))
        self.flushLoggedErrors(RuntimeError)
        yield (yield self.start_server()).stopService()
        yield self.start_server(mysql_user=user, mysql_password="ro-pass", read_only=True)

    @defer.inlineCallbacks
    def test_a_deleted_lock_row_is_made_again(self):
        sql(f"DELETE FROM {self.lock_table()}")
        reply = yield self.client.persist([{"pid": "p", "domain": "d", "name": "n", "data": 1}])
        self.assertEqual(reply[0]["affectedRows"], 1)
        self.assertEqual(sql(f"SELECT id, taken FROM {self.lock_table()}"), ((1, 1),))

    @defer.inlineCallbacks
    def test_a_commit_refused_with_1213_is_written_again(self):
        """
        The writer's COMMIT refused as Galera's certification refuses one
        (1213, nothing committed): the batch is written again in the same
        interaction, stored once with its client's event ids, and answered.
        """
        from eventsource import store as store_module

        real = store_module._PoolConnection.commit_now
        refused = []

        def commit_now(connection):
            if not refused:
                refused.append(True)
                connection._connection.rollback()
                raise deadlock()
            return real(connection)

        self.patch(store_module._PoolConnection, "commit_now", commit_now)
        logged = LogCapture(self)
        event_ids = [uuid.uuid4() for _ in range(2)]
        plan = InsertPlan((("p", "d", "n", "1"), ("p", "d", "n", "2")),
                          event_ids=tuple(e.bytes for e in event_ids))
        appended = yield self.server.store.append(plan)
        self.assertEqual(refused, [True])
        self.assertEqual([e.event_id for e in appended.events], [e.bytes for e in event_ids])
        stored = sql(f"SELECT id, version, event_id FROM `{self.database}`.`event` ORDER BY id")
        self.assertEqual([(e.position, e.version, e.event_id) for e in appended.events],
                         [(i, v, bytes(e)) for i, v, e in stored])
        self.assertEqual([t for t in logged.texts() if "committed first" in t][0][:40],
                         "a batch of persists met another writer's")


class GivenPositionsIntegrationTests(IntegrationTestCase):
    """The writer's own positions (Galera's path) on the real MariaDB."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.server.store._consecutive_ids = False

    @defer.inlineCallbacks
    def test_positions_after_the_largest_are_dense_and_in_version_order(self):
        sql(f"INSERT INTO `{self.database}`.`event` (id, pid, domain, name, data, version,"
            " event_id) VALUES (100, 'x', 'd', 'n', '{}', 0, %s)", (uuid.uuid4().bytes,))
        plans = [InsertPlan(tuple((f"s{k % 3}", "d", "n", json.dumps(k)) for k in range(n)))
                 for n in (1, 3, 2, 5)]
        store = self.server.store
        results = yield defer.gatherResults([store.append(p) for p in plans])
        results.append((yield store.insert(plans[0])))
        positions = [e.position for r in results[:-1] for e in r.events]
        self.assertEqual(sorted(positions), list(range(101, 112)))
        self.assertEqual(results[-1], (1, 112))
        stored = sql(f"SELECT id, pid, version FROM `{self.database}`.`event` ORDER BY id")
        self.assertEqual([row[0] for row in stored], list(range(100, 113)))
        versions = {}
        for _, pid, version in stored[1:]:
            self.assertEqual(version, versions.get(pid, -1) + 1)
            versions[pid] = version
        self.assertEqual({e.position: (e.pid, e.version) for r in results[:-1] for e in r.events},
                         {row[0]: (row[1], row[2]) for row in stored[1:-1]})

    @defer.inlineCallbacks
    def test_rolled_back_positions_are_given_again(self):
        """A transaction rolled back leaves no gap: the next takes its positions."""
        store = self.server.store
        mine = uuid.uuid4().bytes
        yield store.append(InsertPlan((("p", "d", "n", "1"),), event_ids=(mine,)))
        # a duplicate event id: the INSERT fails, the transaction is rolled back
        repeat = InsertPlan((("q", "d", "n", "2"), ("p", "d", "n", "3")),
                            event_ids=(uuid.uuid4().bytes, mine))
        failure = yield self.assertFailure(store.append(repeat), appends.AppendRefused)
        self.assertIsNotNone(failure)
        appended = yield store.append(InsertPlan((("r", "d", "n", "4"),)))
        self.assertEqual(appended.events[0].position, 2)
        self.assertEqual(sql(f"SELECT id FROM `{self.database}`.`event` ORDER BY id"),
                         ((1,), (2,)))

