"""
The server on a real 3-node MariaDB Galera cluster
(:class:`tests.clusters.GaleraCluster`, shared by this module; Redis is the
machine's, with a channel prefix of the test's own).

Galera steps auto-increment ids by the cluster size from each node's own
offset (``wsrep_auto_increment_control``), so the writer gives positions
itself: the next after the table's largest, read under the append lock,
whose row every write transaction changes, so that certification lets only
one of two transactions that took it on different nodes commit (the other
is refused with 1213 and written again).  These tests prove it on the real
thing: version 2 appends written through node 1 and read through node 2
have exact versions and the positions they were acknowledged with, dense;
servers on two and on all three nodes appending at once, to the same
streams and to their own, commit in position order (a reader tailing each
node never sees a row appear below one it has read) with exact versions.
Nothing here asserts on time.
"""

import sys
import threading
import time
import uuid

from twisted.internet import defer, reactor, threads

from eventsource import schema
from eventsource.client import ANY, Busy, NewEvent, NoServerError, RetryPolicy, connect
from eventsource.ids import uuid7
from tests.clusters import GaleraCluster, shared
from tests.support import REDIS_HOST, REDIS_PORT, IntegrationTestCase, LogCapture, unique


def galera():
    return shared(__name__, GaleraCluster)


class Tail(threading.Thread):
    """
    A reader on one node that reads the rows after the last position it
    read, again and again (a subscription's tailer does the same), into
    :attr:`seen`: a row that commits below a position it has read is never
    read.  :meth:`finish` reads what is left, once the node has applied
    every write the cluster made (``wsrep_sync_wait``), and stops it.
    """

    def __init__(self, node, table):
        super().__init__(daemon=True)
        self.node = node
        self.table = table
        self.seen = []
        self.polls = 0
        self.error = None
        self._finishing = threading.Event()

    def run(self):
        try:
            connection = self.node.connect()
            try:
                with connection.cursor() as cursor:
                    self._tail(cursor)
            finally:
                connection.close()
        except BaseException as error:  # (reported by finish, in the test's thread)
            self.error = error

    def _tail(self, cursor):
        last = 0
        while True:
            stopping = self._finishing.is_set()
            if stopping:
                cursor.execute("SET SESSION wsrep_sync_wait = 1")
            cursor.execute(f"SELECT id FROM {self.table} WHERE id > %s ORDER BY id LIMIT 5000",
                           (last,))
            self.polls += 1
            positions = [row[0] for row in cursor.fetchall()]
            self.seen += positions
            if positions:
                last = positions[-1]
            elif stopping:
                return
            else:
                time.sleep(0.002)

    def finish(self):
        """Read the rest and stop (blocking); raises what the reader met."""
        self._finishing.set()
        self.join(60)
        if self.error is not None:
            error, self.error = self.error, None
            raise error


class Tooling(threading.Thread):
    """
    A writer other than the server, on one node, as docs/OPERATIONS.md asks
    tooling to write: each transaction takes the append lock first (the
    server's own statement), then INSERTs one event of its stream
    :attr:`pid` with an auto-increment position; a transaction refused with
    1213 is written again, and so is one whose position was taken (1062 on
    the primary key, counted in :attr:`taken`: the lock did not keep it from
    a transaction of another writer).  :attr:`written` counts its commits.
    """

    pid = "tooling"

    def __init__(self, node, database, count):
        super().__init__(daemon=True)
        self.node = node
        self.database = database
        self.count = count
        self.written = 0
        self.refused = 0
        self.taken = 0
        self.error = None

    def run(self):
        import pymysql

        try:
            connection = self.node.connect()
            connection.autocommit(False)
        except BaseException as error:
            self.error = error
            return
        table = f"`{self.database}`.`event`"
        lock = schema.lock_append_sql(f"`{self.database}`.`event_append_lock`")
        try:
            with connection.cursor() as cursor:
                while self.written < self.count:
                    try:
                        cursor.execute(lock)
                        cursor.execute(f"SELECT MAX(version) FROM {table} WHERE pid = %s",
                                       (self.pid,))
                        last = cursor.fetchone()[0]
                        cursor.execute(
                            f"INSERT INTO {table} (pid, domain, name, data, version, event_id)"
                            " VALUES (%s, 'd', 'tool', '{}', %s, %s)",
                            (self.pid, 0 if last is None else last + 1, uuid7()))
                        connection.commit()
                        self.written += 1
                    except pymysql.err.MySQLError as error:
                        if error.args[0] not in (1062, 1213):
                            raise
                        connection.rollback()
                        if error.args[0] == 1062:
                            self.taken += 1
                        else:
                            self.refused += 1
                    time.sleep(0.01)
        except BaseException as error:
            self.error = error
        finally:
            connection.close()

    def finish(self):
        self.join(120)
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def report(text):
    """A figure for the person running the slow tests (and for the docs)."""
    print("\n" + text, file=sys.stderr)


class GaleraTests(IntegrationTestCase):
    timeout = 300

    @defer.inlineCallbacks
    def setUp(self):
        started = time.monotonic()
        self.cluster = galera()  # (blocks, the first time: about 12 s here)
        if time.monotonic() - started > 1:
            report(f"Galera: 3 nodes Synced in {self.cluster.start_seconds:.1f} s")
        self.database = unique("es_test")
        self.table = f"{self.database}.event"
        self.prefix = ""
        self.logs = LogCapture(self)
        self.node1, self.node2, self.node3 = self.cluster.nodes
        self.addCleanup(self.drop_database)
        yield defer.succeed(None)

    def drop_database(self):
        for node in self.cluster.nodes:
            if node.running:
                node.sql(f"DROP DATABASE IF EXISTS `{self.database}`")
                return

    @defer.inlineCallbacks
    def serve_on(self, node, prefix):
        """A server of this process on ``node``, answering requests under ``prefix``."""
        server = yield self.start_server(mysql_host=node.host, mysql_port=node.port,
                                         channel_prefix=prefix)
        return server

    @defer.inlineCallbacks
    def client(self, prefix, **kwargs):
        client = yield connect(REDIS_HOST, REDIS_PORT, reactor=reactor, channel_prefix=prefix,
                               timeout=10, **kwargs)
        self.addCleanup(client.disconnect)
        return client

    def stored(self, node):
        """``event id hex -> (pid, version, id)`` as ``node`` has the table."""
        rows = node.sql(f"SELECT LOWER(HEX(event_id)), pid, version, id FROM {self.table}")
        self.assertEqual(len(rows), len({row[0] for row in rows}), "an event id stored twice")
        return {row[0]: (row[1], row[2], row[3]) for row in rows}

    def assert_exact_versions(self, stored):
        streams = {}
        for pid, version, _ in stored.values():
            streams.setdefault(pid, []).append(version)
        for pid, versions in streams.items():
            self.assertEqual(sorted(versions), list(range(len(versions))), pid)

    def out_of_order_streams(self, stored):
        """Streams in which a later version has a lower position (id) than an earlier one."""
        streams = {}
        for pid, version, position in stored.values():
            streams.setdefault(pid, []).append((version, position))
        bad = 0
        for pairs in streams.values():
            positions = [position for _, position in sorted(pairs)]
            bad += positions != sorted(positions)
        return bad

    @defer.inlineCallbacks
    def test_written_through_one_node_read_through_another(self):
        """
        Version 2 appends, 50 in flight over 20 streams, through a server on
        node 1: read through node 2, every event is there once, at the
        version and position it was acknowledged with.
        """
        prefix = unique("t") + ":"
        server = yield self.serve_on(self.node1, prefix)
        self.assertFalse(server.store._consecutive_ids)  # Galera's increment is 3
        self.assertEqual(self.node1.sql("SELECT @@auto_increment_increment")[0][0], 3)
        client = yield self.client(prefix)
        acknowledged = {}

        @defer.inlineCallbacks
        def lane(n):
            for i in range(20):
                events = [NewEvent("d", "n", {"lane": n, "i": i, "k": k}) for k in range(1 + i % 3)]
                result = yield client.append(f"s{n % 20}", events)
                for event in result.events:
                    acknowledged[event.event_id.replace("-", "")] = (
                        f"s{n % 20}", event.version, event.position)

        yield defer.gatherResults([lane(n) for n in range(50)], consumeErrors=True)
        # node 2 applies what node 1 committed (wsrep_sync_wait: read after it)
        connection = self.node2.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SET SESSION wsrep_sync_wait = 1")
                cursor.execute(f"SELECT LOWER(HEX(event_id)), pid, version, id FROM {self.table}")
                rows = cursor.fetchall()
        finally:
            connection.close()
        stored = {row[0]: (row[1], row[2], row[3]) for row in rows}
        self.assertEqual(len(rows), len(stored))
        self.assertEqual(stored, acknowledged)
        self.assert_exact_versions(stored)
        # positions given by the writer: dense, whatever the node's auto-increment offset
        ids = sorted(position for _, _, position in stored.values())
        self.assertEqual(ids, list(range(1, len(ids) + 1)))
        report(f"Galera, one writer on node 1: {len(stored)} events in "
               f"{server.store._writer.batches} group commits; positions 1..{ids[-1]}, dense")

    @defer.inlineCallbacks
    def test_two_servers_on_two_nodes_same_streams(self):
        """
        A server on node 1 and one on node 2 (each with a prefix and a client
        of its own) append to the same 10 streams at once, without expected
        versions: the two take the append lock on their own nodes, so
        certification refuses one of two that overlap (1213, at a statement
        or at COMMIT) and the writer writes that batch again.  Every
        acknowledged event is stored once, versions stay exact and in
        position order; what it cost is reported.
        """
        prefixes = [unique("t") + ":", unique("t") + ":"]
        servers = []
        for node, prefix in zip((self.node1, self.node2), prefixes):
            servers.append((yield self.serve_on(node, prefix)))
        retry = RetryPolicy(retries=10, max_delay=0.5)
        clients = []
        for prefix in prefixes:
            clients.append((yield self.client(prefix, retry=retry)))
        acknowledged = {}
        busy = [0]
        positions = {}

        @defer.inlineCallbacks
        def lane(n):
            client = clients[n % 2]
            for i in range(15):
                pid = f"s{(n + i) % 10}"
                events = [NewEvent("d", "n", {"lane": n, "i": i}, event_id=uuid.uuid4())]
                while True:
                    try:
                        result = yield client.append(pid, events, expected_version=ANY)
                        break
                    except (Busy, NoServerError):
                        busy[0] += 1  # (versions kept being taken: the same ids again)
                for event in result.events:
                    acknowledged[event.event_id.replace("-", "")] = (pid, event.version)
                    positions[event.event_id.replace("-", "")] = event.position

        yield defer.gatherResults([lane(n) for n in range(20)], consumeErrors=True)
        self.cluster.wait_synced()
        stored = self.stored(self.node3)
        self.assertEqual({k: v[:2] for k, v in stored.items()}, acknowledged)
        self.assertEqual({k: v[2] for k, v in stored.items()}, positions)
        self.assert_exact_versions(stored)
        self.assertEqual(self.out_of_order_streams(stored), 0)
        retried = self.retries()
        failed = [t for t in self.logs.texts() if "persists failed (" in t]
        report(f"Galera, two servers on nodes 1 and 2, same 10 streams: {len(stored)} events; "
               f"batches written again after 1062: {retried[1062]}, after 1213: "
               f"{retried[1213]}; batches that failed whole and were written again one by "
               f"one: {len(failed)}; answered busy and sent again by the test: {busy[0]}")

    def retries(self):
        """How many times batches were written again, by the error that refused them."""
        texts = self.logs.texts()
        return {1062: sum("met versions taken by another writer" in t for t in texts),
                1213: sum("which committed first" in t for t in texts)}

    @defer.inlineCallbacks
    def test_commit_order_with_writers_on_every_node(self):
        """
        A server on each node (each with its own prefix and client), 300
        appends each, 8 in flight, half to 6 streams they all share and
        half to streams of their own, while a reader on each node tails the
        table by position (as a subscription's tailer does: the rows after
        the last position it read) and a writer of its own (:class:`Tooling`,
        the append lock then an auto-increment position) writes 150 events
        through node 3.  Afterwards, on every node: every acknowledged
        event is stored once, at the version and position it was
        acknowledged with; in position order each stream's versions are 0,
        1, 2... with no gap or repeat; and each reader read every row of the
        table, in position order: no row committed below a position it had
        already read.  (With the append lock of the earlier release, a
        ``SELECT ... FOR UPDATE`` that Galera neither replicates nor
        certifies, the readers miss rows.)
        """
        nodes = self.cluster.nodes
        prefixes = [unique("t") + ":" for _ in nodes]
        servers = []
        for node, prefix in zip(nodes, prefixes):
            servers.append((yield self.serve_on(node, prefix)))
        tails = [Tail(node, self.table) for node in nodes]
        for tail in tails:
            tail.start()
            self.addCleanup(tail.finish)
        tooling = Tooling(nodes[2], self.database, 150)
        tooling.start()
        self.addCleanup(tooling.finish)
        retry = RetryPolicy(retries=10, max_delay=0.5)
        clients = []
        for prefix in prefixes:
            clients.append((yield self.client(prefix, retry=retry)))
        acknowledged = {}
        busy = [0]
        per_server, lanes = 300, 8

        @defer.inlineCallbacks
        def lane(k, n):
            client = clients[k]
            for i in range(per_server // lanes + (n < per_server % lanes)):
                pid = f"shared{(n + i) % 6}" if i % 2 else f"own{k}-{n % 4}"
                events = [NewEvent("d", "n", {"server": k, "lane": n, "i": i},
                                   event_id=uuid.uuid4()) for _ in range(1 + i % 2)]
                while True:
                    try:
                        result = yield client.append(pid, events, expected_version=ANY)
                        break
                    except (Busy, NoServerError):
                        busy[0] += 1  # (the same event ids again)
                for event in result.events:
                    acknowledged[event.event_id.replace("-", "")] = (
                        pid, event.version, event.position)

        started = time.monotonic()
        yield defer.gatherResults([lane(k, n) for k in range(len(nodes)) for n in range(lanes)],
                                  consumeErrors=True)
        seconds = time.monotonic() - started
        yield threads.deferToThread(tooling.finish)
        yield threads.deferToThread(lambda: [tail.finish() for tail in tails])
        for node, tail in zip(nodes, tails):
            rows = self.rows_in_order(node)
            self.assertEqual({row[0]: row[1:] for row in rows if row[1] != Tooling.pid},
                             acknowledged, node.name)
            self.assertEqual(sum(row[1] == Tooling.pid for row in rows), tooling.written)
            self.assert_versions_in_position_order(rows, node.name)
            positions = [row[3] for row in rows]
            self.assertEqual(tail.seen, positions,
                             f"{node.name}: {len(set(positions) - set(tail.seen))} rows committed"
                             " below a position its reader had read")
        self.assertEqual(tooling.taken, 0, "positions the tooling took were taken meanwhile")
        retried = self.retries()
        most = max((event.get("attempt", 0) for event in self.logs
                    if "committed first" in event.get("log_format", "")), default=0)
        report(f"Galera, a server on each of the 3 nodes, {len(acknowledged)} events of "
               f"{len(nodes) * per_server} appends in {seconds:.1f} s: batches written again "
               f"after 1213 (certification, deadlock): {retried[1213]} (at most {most} times "
               f"for one batch), after 1062: {retried[1062]}; answered busy and sent again by the test: {busy[0]}; "
               f"tooling on node 3: {tooling.written} events, {tooling.refused} transactions "
               f"refused (1213) and written again; readers' polls: "
               f"{', '.join(str(tail.polls) for tail in tails)}; every row read in position "
               "order on every node")

    def rows_in_order(self, node):
        """``(event id hex, pid, version, position)`` in position order, as ``node`` has them now."""
        connection = node.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SET SESSION wsrep_sync_wait = 1")
                cursor.execute(f"SELECT LOWER(HEX(event_id)), pid, version, id FROM {self.table}"
                               " ORDER BY id")
                return cursor.fetchall()
        finally:
            connection.close()

    def assert_versions_in_position_order(self, rows, where):
        following = {}
        for _, pid, version, position in rows:
            self.assertEqual(version, following.get(pid, 0),
                             f"{where}: {pid} version {version} at position {position}")
            following[pid] = version + 1

    @defer.inlineCallbacks
    def test_node_killed_and_back(self):
        """
        Node 2 is killed (``kill -9``) while a server on node 1 appends, and
        restarted: it comes back by state transfer with every event, versions exact.
        """
        prefix = unique("t") + ":"
        yield self.serve_on(self.node1, prefix)
        client = yield self.client(prefix)
        acknowledged = {}

        @defer.inlineCallbacks
        def lane(n, count):
            for i in range(count):
                result = yield client.append(f"s{n}", [NewEvent("d", "n", {"i": i})])
                event = result.events[0]
                acknowledged[event.event_id.replace("-", "")] = (f"s{n}", event.version)

        yield defer.gatherResults([lane(n, 10) for n in range(5)], consumeErrors=True)
        killed = time.monotonic()
        self.cluster.nodes[1].kill()
        yield defer.gatherResults([lane(n, 10) for n in range(5)], consumeErrors=True)
        self.cluster.wait_synced(60)
        shrunk = time.monotonic() - killed
        seconds = self.cluster.restart(1)
        yield defer.gatherResults([lane(n, 5) for n in range(5)], consumeErrors=True)
        self.cluster.wait_synced()
        stored = self.stored(self.node2)
        self.assertEqual({k: v[:2] for k, v in stored.items()}, acknowledged)
        self.assert_exact_versions(stored)
        report(f"Galera: node 2 killed under load; the others went on ({shrunk:.1f} s to see "
               f"a cluster of 2); node 2 Synced again {seconds:.1f} s after its restart, "
               f"with all {len(stored)} events")
