"""
Large rows against the real Redis and MariaDB: a windowed fetch cannot drown
the server's own Redis connection, Redis's buffer limits are checked at
start, and the server's memory is bounded in bytes and comes back.
"""

import gc
import json

from twisted.internet import defer
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from eventsource.bus import redis_limit_warnings
from eventsource.config import Config
from eventsource.service import make_server
from eventsource.testing import MemoryBus
from tests.redis_server import PrivateRedisTestCase, RedisServer
from tests.support import (
    SEQ_STREAM_COLUMNS, IntegrationTestCase, LogCapture, rss_kb, sleep, sql, unique, wait_until)

log = Logger()

#: Redis's pubsub buffer limit in the drowning test: far below what a window
#: of 1,000 rows of 200 KB (200 MB) would push, above the test server's
#: window (1 MiB) plus a row
SMALL_PUBSUB = "client-output-buffer-limit pubsub 2mb 1mb 60"


def insert_big_rows(database, count, size, pid="big"):
    """``count`` rows whose data is a JSON object holding ``size`` characters."""
    sql(f"INSERT INTO `{database}`.`event` (pid, domain, name, data, version, event_id)"
        f" SELECT %s, 'd', CONCAT('n', seq), JSON_OBJECT('s', REPEAT('x', {size})),"
        f" {SEQ_STREAM_COLUMNS} FROM `{database}`.seq_1_to_{count}", (pid,))


class ConfiguredRedisTestCase(PrivateRedisTestCase):
    """A server and a client on a private redis-server configured by the test, logs captured."""

    unique_prefix = True
    redis_extra = ()
    redis_acl = ()
    server_redis = {}

    def make_redis(self):
        return RedisServer(self, acl=self.redis_acl, extra=self.redis_extra)

    def server_settings(self):
        return dict(**self.server_redis, **self.server_config)

    def setUp(self):
        self.logs = LogCapture(self)
        return super().setUp()


class DrowningTests(ConfiguredRedisTestCase):
    """A windowed fetch of large rows never comes back to the server's subscriber."""

    redis_extra = [SMALL_PUBSUB]
    server_config = {"max_window_bytes": 1024 * 1024, "max_echo_bytes": 1024 * 1024}
    timeout = 180

    @defer.inlineCallbacks
    def test_windowed_fetch_of_large_rows_leaves_the_server_connected(self):
        lost = []
        on_lost = self.server.bus._on_connection_lost
        self.server.bus._on_connection_lost = lambda: (lost.append(1), on_lost())
        insert_big_rows(self.database, 150, 200_000)
        yield self.client.persist([{"pid": "small", "domain": "d", "name": f"s{i}", "data": i}
                                   for i in range(30)])
        big, small = unique("big"), unique("small")
        yield self.client.subscribe(big)
        yield self.client.request("fetch", {"channel": big, "window": 1000, "query": {
            "$select": {"$where": {"pid": "big"}}}})
        bystander = self.client.fetch({"$where": {"pid": "small"}}, channel=small)
        rows = yield self.client.drain(big)
        small_rows = yield bystander
        self.assertEqual(rows[-1], "end")
        self.assertEqual([row["name"] for row in rows[:-1]], [f"n{i}" for i in range(1, 151)])
        self.assertTrue(all(len(json.loads(row["data"])["s"]) == 200_000 for row in rows[:-1]))
        self.assertEqual(small_rows[-1], "end")
        self.assertEqual([row["data"] for row in small_rows[:-1]], [str(i) for i in range(30)])
        # the server's subscriber connection was never dropped
        self.assertEqual(lost, [])
        self.assertIsNone(self.server.bus._away_since)
        self.assertNotIn("output buffer limits", self.redis.log_text())
        self.assertEqual(self.server.streams, {})


class RedisLimitsCheckTests(ConfiguredRedisTestCase):
    """At start the server reads Redis's limits and says how to fix them."""

    redis_extra = ["client-output-buffer-limit pubsub 1mb 512kb 60", "proto-max-bulk-len 1mb"]

    def test_low_limits_are_logged_with_their_fix(self):
        texts = [t for t in self.logs.texts() if "Fix:" in t]
        self.assertEqual(len(texts), 2, texts)
        self.assertIn("CONFIG SET proto-max-bulk-len 4mb "
                      "(redis.conf: proto-max-bulk-len 4mb)", texts[0])
        self.assertIn('CONFIG SET client-output-buffer-limit "pubsub 12mb 6mb 60" '
                      "(redis.conf: client-output-buffer-limit pubsub 12mb 6mb 60)", texts[1])
        levels = {e["log_level"].name for e in self.logs if "problem" in e}
        self.assertEqual(levels, {"warn"})

    @defer.inlineCallbacks
    def test_the_fix_silences_the_warning(self):
        self.redis.cli("CONFIG", "SET", "proto-max-bulk-len", "4mb")
        self.redis.cli("CONFIG", "SET", "client-output-buffer-limit", "pubsub 12mb 6mb 60")
        del self.logs[:]
        yield self.server.stopService()
        server = make_server(Config(**dict(
            vars(self.server.config), table=unique("es_test") + ".event")),
            stop_reactor_on_failure=False)
        self.addCleanup(sql, f"DROP DATABASE IF EXISTS `{server.config.database}`")
        server.startService()
        self.addCleanup(lambda: server.running and server.stopService())
        yield server.ready
        self.assertEqual([t for t in self.logs.texts() if "Fix:" in t or "check" in t], [])


class RedisLimitsUncheckedTests(ConfiguredRedisTestCase):
    """An ACL user without CONFIG: the server serves, and says it could not check."""

    redis_acl = ["user default off", "user app on >app-pw ~* &* +@all -config"]
    server_redis = {"redis_user": "app", "redis_password": "app-pw"}

    start_at_setup = False  # no client: the default user is off

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.start_server(redis_port=self.redis.port, **self.server_settings())

    def test_could_not_check_is_logged(self):
        texts = [t for t in self.logs.texts() if "could not check" in t]
        self.assertEqual(len(texts), 1, self.logs.texts()[-20:])
        self.assertIn("NOPERM", texts[0])
        self.assertTrue(self.server.bus.connected)


class MemoryTests(IntegrationTestCase):
    """
    Memory is bounded in bytes: idle and windowed fetches over 2 MB rows hold
    about a page and a window each, and give it back when they end.
    """

    server_config = {"row_timeout": 120, "max_window_bytes": 4 * 1024 * 1024}
    timeout = 300

    ROW = 2_000_000

    @defer.inlineCallbacks
    def test_rss_bounded_with_large_rows_and_comes_back(self):
        insert_big_rows(self.database, 24, self.ROW)
        bus = HoldingBus(self.server)
        self.server.bus, real_bus = bus, self.server.bus
        self.addCleanup(setattr, self.server, "bus", real_bus)
        gc.collect()
        before = rss_kb()
        select = {"$where": {"pid": "big"}}
        idle = [unique("idle") for _ in range(10)]
        windowed = [unique("win") for _ in range(4)]
        for channel in idle:
            self.server.message_received(self.prefix + "fetch", json.dumps(
                {"channel": channel, "query": {"$select": select}}))
        for channel in windowed:
            self.server.message_received(self.prefix + "fetch", json.dumps(
                {"channel": channel, "window": 1000, "query": {"$select": select}}))
        yield wait_until(lambda: all(bus.rows.get(c) for c in windowed)
                         and not any(s._fetching for s in self.server.streams.values()),
                         timeout=120, step=0.05, what="every windowed stream to fill")
        held_mb = (rss_kb() - before) / 1024
        self.assertLess(held_mb, 150, f"RSS grew {held_mb:.0f} MB with 14 streams open")
        streams = list(self.server.streams.values())
        self.assertEqual(len(streams), 14)
        # Each idle stream has its first page buffered (1 MiB, or one larger
        # row); one of them has its row out, the rest wait for the echo
        # budget (2 MiB).  Each windowed stream has 4 MiB out (two rows) and
        # one row buffered.  About 50 MB in all; 14 streams holding 32-row
        # first pages of these rows would hold 670 MB.
        for stream in streams:
            self.assertLessEqual(stream.buffered_bytes,
                                 self.server.config.page_bytes + self.ROW + 100)
            self.assertLessEqual(stream.unaccepted_bytes,
                                 self.server.config.max_window_bytes + self.ROW + 100)
        self.assertEqual(sum(1 for c in idle if bus.rows.get(c)), 1)
        self.assertLessEqual(self.server.echo_budget.used, self.ROW + 100)
        for channel in idle:
            self.server.message_received(channel, '"end"')
        for channel in windowed:
            self.server.message_received(self.prefix + "fetch-next",
                                         json.dumps({"channel": channel, "end": True}))
        self.assertEqual(self.server.streams, {})
        del streams
        gc.collect()
        yield sleep(0.1)
        after_mb = (rss_kb() - before) / 1024
        log.info("measured: 14 streams of 2 MB rows: RSS +{held:.0f} MB open, "
                 "+{after:.0f} MB after they ended", held=held_mb, after=after_mb)
        self.assertLess(after_mb, 40, f"RSS still {after_mb:.0f} MB up after the streams ended "
                                      f"(it was {held_mb:.0f} MB up while they were open)")


class HoldingBus(MemoryBus):
    """Stands in for Redis: counts the rows published per channel and accepts none."""

    def __init__(self, service):
        super().__init__()
        self.service = service
        self.rows = {}

    def publish(self, channel, body):
        if body.startswith("{"):
            self.rows[channel] = self.rows.get(channel, 0) + 1



class RedisLimitWarningTests(SynchronousTestCase):
    """The rule behind the start-up warning, on Redis's own values."""

    DEFAULT_LIMITS = "normal 0 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60"

    def test_a_default_redis_lets_one_publish_overflow_the_server(self):
        (warning,) = redis_limit_warnings(Config(), self.DEFAULT_LIMITS, "536870912")
        self.assertIn("hard limit 33554432 bytes", warning)
        self.assertTrue(warning.endswith(
            "Fix: CONFIG SET proto-max-bulk-len 4mb (redis.conf: proto-max-bulk-len 4mb)"))

    def test_the_recommended_settings_are_quiet(self):
        self.assertEqual(redis_limit_warnings(Config(), self.DEFAULT_LIMITS, "4194304"), [])
        self.assertEqual(redis_limit_warnings(
            Config(), "pubsub 12582912 6291456 60", str(4 * 1024 * 1024)), [])

    def test_the_needs_follow_the_server_limits(self):
        config = Config(max_body_bytes=16 * 1024 * 1024, max_window_bytes=8 * 1024 * 1024)
        warnings = redis_limit_warnings(config, self.DEFAULT_LIMITS, str(16 * 1024 * 1024))
        self.assertEqual(len(warnings), 1)
        self.assertIn('CONFIG SET client-output-buffer-limit "pubsub 48mb 24mb 60"', warnings[0])

    def test_no_pubsub_limit_needs_only_the_bulk_length(self):
        self.assertEqual(redis_limit_warnings(Config(), "pubsub 0 0 0", "536870912"), [])
        (warning,) = redis_limit_warnings(Config(), "pubsub 0 0 0", "1048576")
        self.assertIn("below --max-body-bytes", warning)
