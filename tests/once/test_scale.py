"""
Streaming without holding resources: a million-row fetch in constant memory,
and a thousand concurrently open streams on a pool of ten connections.
"""

import json
import threading

from twisted.internet import defer, reactor
from twisted.logger import Logger

from eventsource.testing import MemoryBus
from tests.support import SEQ_STREAM_COLUMNS, IntegrationTestCase, rss_kb, sql, unique
from eventsource.stream import MACHINE

log = Logger()


class CountingBus(MemoryBus):
    """
    Stands in for Redis in front of the real database: counts rows and
    accepts them in batches from the reactor, like a windowed client.
    """

    def __init__(self, service, batch):
        super().__init__()
        self.service = service
        self.batch = batch
        self.rows = 0
        self.unaccepted = 0
        self.last = None
        self.first_row = None
        self.peak_rss_kb = 0
        self.ended = defer.Deferred()

    def publish(self, channel, body):
        if body.startswith("{"):
            self.rows += 1
            self.unaccepted += 1
            if self.rows % 10000 == 0:
                self.peak_rss_kb = max(self.peak_rss_kb, rss_kb())
            if self.first_row is None:
                self.first_row = body
            if self.unaccepted == self.batch:
                self.unaccepted = 0
                reactor.callLater(0, self.service.message_received,
                                  self.service.config.channel_prefix + "fetch-next",
                                  json.dumps({"channel": channel, "accepted": self.batch}))
        else:
            self.last = json.loads(body)
            if not self.ended.called:
                self.ended.callback(self.last)
        return defer.succeed(1)



class MillionRowTests(IntegrationTestCase):
    """The server side of a 1,000,000-row fetch, against the real MariaDB."""

    timeout = 600

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        # MariaDB's SEQUENCE engine: one statement, about two seconds.
        sql(f"INSERT INTO `{self.database}`.`event` (pid, domain, name, data, version, event_id)"
            f" SELECT 'p', 'd', 'n', '{{\"k\": 1}}', {SEQ_STREAM_COLUMNS}"
            f" FROM `{self.database}`.seq_1_to_1000000")

    @defer.inlineCallbacks
    def test_million_rows_in_constant_memory(self):
        bus = CountingBus(self.server, batch=500)
        self.server.bus, real_bus = bus, self.server.bus
        self.addCleanup(setattr, self.server, "bus", real_bus)
        before = rss_kb()
        self.server.message_received(self.prefix + "fetch", json.dumps(
            {"channel": "million", "query": {"$select": {"$where": {"pid": "p"}}}, "window": 1000}))
        last = yield bus.ended
        grown_mb = (bus.peak_rss_kb - before) / 1024
        self.assertEqual(last, "end")
        self.assertEqual(bus.rows, 1_000_000)
        self.assertEqual(json.loads(bus.first_row)["data"], '{"k": 1}')
        # A result held in memory whole would take several hundred MB.
        self.assertLess(grown_mb, 40, f"peak RSS grew by {grown_mb:.1f} MB")
        log.info("measured: 1,000,000-row stream: peak RSS grew {grown:.1f} MB", grown=grown_mb)


class ThousandStreamsTests(IntegrationTestCase):
    """1,000 open streams, all waiting on their clients, on a pool of 10."""

    server_config = {"pool_size": 10, "row_timeout": 60}
    timeout = 300

    @defer.inlineCallbacks
    def test_thousand_open_streams(self):
        yield self.client.persist([{"pid": "p", "domain": "d", "name": f"n{i}", "data": i}
                                   for i in range(3)])
        channels = [unique("s") for _ in range(1000)]
        yield defer.gatherResults([self.client.subscribe(c) for c in channels])
        threads_before = threading.active_count()
        for channel in channels:
            self.client.request("fetch", {"channel": channel, "query": {"$select": {}}})
        yield self.client.wait_for(lambda: all(self.client.messages[c] for c in channels), timeout=120)
        self.assertEqual(len(self.server.streams), 1000)
        self.assertTrue(all(s.is_live for s in self.server.streams.values()))
        self.assertEqual(MACHINE.models, [])  # (driven by the shared machine, never registered)
        # No thread or connection per stream: the pool's ten at most.
        self.assertLessEqual(threading.active_count() - threads_before, 10)
        self.assertLessEqual(self.server.store._pool.threadpool.max, 10)
        self.assertLessEqual(len(self.server.store._pool.connections), 10)
        results = yield defer.gatherResults([self.client.drain(c) for c in channels])
        for messages in results:
            self.assertEqual([m["name"] for m in messages[:-1]], ["n0", "n1", "n2"])
            self.assertEqual(messages[-1], "end")
        self.assertEqual(self.server.streams, {})
