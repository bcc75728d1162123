"""
Group commit: concurrent persists written together by one writer, each
answered with its own result, failures isolated, rows committed in id order.
"""

import json
import threading

import pymysql
from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from eventsource.appends import Append, WrongExpectedVersion
from eventsource.writer import GroupCommitWriter
from tests.support import MYSQL, IntegrationTestCase, WireClient


class FakeStore:
    """Records each batch handed to the writer; the test answers it."""

    def __init__(self):
        self.batches = []

    def _write(self, batch):
        d = defer.Deferred()
        self.batches.append((batch, d))
        return d


def rows(*names):
    return [(name, "d", "n", "null", None) for name in names]


class WriterTests(SynchronousTestCase):
    def setUp(self):
        self.store = FakeStore()
        self.writer = GroupCommitWriter(self.store, max_rows=5)

    def test_requests_arriving_during_a_write_go_together(self):
        first = self.writer.submit(rows("a"))
        later = [self.writer.submit(rows("b", "c")), self.writer.submit(rows("d"))]
        self.assertEqual(len(self.store.batches), 1)
        self.store.batches[0][1].callback([(1, 1)])
        self.assertEqual(self.successResultOf(first), (1, 1))
        (batch, d) = self.store.batches[1]
        self.assertEqual(batch, [rows("b", "c"), rows("d")])
        d.callback([(2, 2), (1, 4)])
        self.assertEqual([self.successResultOf(x) for x in later], [(2, 2), (1, 4)])

    def test_batches_are_bounded(self):
        self.writer.submit(rows("a"))
        for name in "bcdefgh":
            self.writer.submit(rows(name))
        self.store.batches[0][1].callback([(1, 1)])
        self.assertEqual(len(self.store.batches[1][0]), 5)
        self.store.batches[1][1].callback([(1, i) for i in range(5)])
        self.assertEqual(len(self.store.batches[2][0]), 2)

    def test_a_failed_batch_is_retried_one_by_one(self):
        self.writer.submit(rows("a"))
        good1 = self.writer.submit(rows("b"))
        bad = self.writer.submit(rows("x"))
        good2 = self.writer.submit(rows("c"))
        self.store.batches[0][1].callback([(1, 1)])
        self.store.batches[1][1].errback(Failure(RuntimeError("constraint")))
        singles = self.store.batches[2:]
        self.assertEqual(singles[0][0], [rows("b")])
        singles[0][1].callback([(1, 2)])
        self.store.batches[3][1].errback(Failure(RuntimeError("constraint")))
        self.store.batches[4][1].callback([(1, 3)])
        self.assertEqual(self.successResultOf(good1), (1, 2))
        self.failureResultOf(bad, RuntimeError)
        self.assertEqual(self.successResultOf(good2), (1, 3))
        self.assertEqual(len(self.store.batches), 5)

    def test_a_request_repeating_event_ids_waits_for_the_next_batch(self):
        first, other = b"\x01" * 16, b"\x02" * 16
        append = Append(tuple(rows("b")), (first,), detailed=True)
        self.writer.submit(rows("a"))
        answers = [self.writer.submit(append), self.writer.submit(rows("c")),
                   self.writer.submit(append), self.writer.submit(Append(tuple(rows("d")), (other,))),
                   self.writer.submit(rows("e"))]
        self.store.batches[0][1].callback([(1, 1)])
        self.assertEqual(self.store.batches[1][0], [append, rows("c")])
        self.store.batches[1][1].callback(["first", (1, 3)])
        self.assertEqual(self.store.batches[2][0][0], append)
        self.assertEqual(len(self.store.batches[2][0]), 3)
        self.store.batches[2][1].callback(["repeat", "d", (1, 5)])
        self.assertEqual([self.successResultOf(d) for d in answers],
                         ["first", (1, 3), "repeat", "d", (1, 5)])

    def test_refusals_fail_their_own_request_only(self):
        self.writer.submit(rows("a"))
        refused, written = self.writer.submit(rows("b")), self.writer.submit(rows("c"))
        self.store.batches[0][1].callback([(1, 1)])
        self.store.batches[1][1].callback([WrongExpectedVersion("b", 0, None), (1, 2)])
        self.assertEqual(self.failureResultOf(refused, WrongExpectedVersion).value.pid, "b")
        self.assertEqual(self.successResultOf(written), (1, 2))

    def test_one_write_at_a_time(self):
        for name in "abc":
            self.writer.submit(rows(name))
        self.assertEqual(len(self.store.batches), 1)


def nested(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


class GroupCommitIntegrationTests(IntegrationTestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_each_request_gets_its_own_result(self):
        requests = [[{"pid": f"r{i}", "domain": "d", "name": f"r{i}-{j}", "data": {"j": j}}
                     for j in range(1 + i % 4)] for i in range(200)]
        replies = yield defer.gatherResults([self.client.persist(docs) for docs in requests])
        for docs, reply in zip(requests, replies):
            result, end = reply
            self.assertEqual(end, "end")
            self.assertEqual(result["affectedRows"], len(docs))
            first = result["insertId"]
            stored = self.rows("name", f"WHERE id >= {first} AND id < {first + len(docs)}")
            self.assertEqual([row[0] for row in stored], [doc["name"] for doc in docs])
        self.assertEqual(len(self.rows()), sum(map(len, requests)))
        self.assertLess(self.server.store._writer.batches, len(requests))

    @defer.inlineCallbacks
    def test_a_bad_request_fails_alone(self):
        # MariaDB's json_valid() refuses nesting deeper than 32: a database-level failure.
        bad = {"pid": "bad", "domain": "d", "name": "n", "data": nested(40)}
        good = [{"pid": f"g{i}", "domain": "d", "name": "n", "data": i} for i in range(20)]
        replies = yield defer.gatherResults(
            [self.client.persist(doc) for doc in good[:10]] + [self.client.persist(bad)]
            + [self.client.persist(doc) for doc in good[10:]])
        self.assertEqual(replies[10], ["error", "end"])
        for reply in replies[:10] + replies[11:]:
            self.assertEqual(reply[0]["affectedRows"], 1)
        self.assertEqual(sorted(row[0] for row in self.rows("pid")), sorted(d["pid"] for d in good))
        self.flushLoggedErrors(pymysql.err.OperationalError, pymysql.err.IntegrityError)

    @defer.inlineCallbacks
    def test_tailing_reader_never_skips_a_row(self):
        total = 600
        seen = []
        stop = threading.Event()

        def tail():
            # Reads forward by id, as a paging reader does, until the writers
            # are done, then once more.
            connection = pymysql.connect(autocommit=True, **MYSQL)
            last = 0
            try:
                with connection.cursor() as cursor:
                    while True:
                        finished = stop.is_set()
                        cursor.execute(f"SELECT id FROM `{self.database}`.`event` WHERE id > %s"
                                       " ORDER BY id", (last,))
                        for (row_id,) in cursor.fetchall():
                            seen.append(row_id)
                            last = row_id
                        if finished:
                            return
            finally:
                connection.close()

        reader = threads.deferToThread(tail)
        writers = [WireClient(self.prefix) for _ in range(3)]
        yield defer.gatherResults([w.connect() for w in writers])
        try:
            yield defer.gatherResults([
                writers[i % 3].persist([{"pid": f"w{i}", "domain": "d", "name": "n",
                                         "data": json.dumps({"i": i})}])
                for i in range(total)])
        finally:
            stop.set()
            yield reader
            yield defer.gatherResults([w.disconnect() for w in writers])
        all_ids = [row[0] for row in self.rows("id")]
        self.assertEqual(len(all_ids), total)
        self.assertEqual(seen, all_ids)
