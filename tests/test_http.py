"""
The HTTP side (:mod:`eventsource.http`): the readiness check with a Clock and
doubles; the routes, the token and the read-only rules over real HTTP on
loopback (the server on in-memory doubles); then against the real Redis and
MariaDB: the metrics after real traffic, ``promtool check metrics`` on them,
and readiness through a MariaDB outage and a Redis restart.
"""

import http.client
import shutil
import subprocess

import pymysql
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from eventsource import http as eventsource_http
from eventsource.config import Config
from eventsource.http import HTTPService, Readiness
from eventsource.service import EventSourceService, make_server
from eventsource.testing import MemoryBus, MemoryStore
from tests.redis_server import PrivateRedisTestCase
from tests.support import IntegrationTestCase, LogCapture, MYSQL, sleep, sql, unique, wait_until
from tests.test_faults import TCPProxy

TOKEN = "t0ken-for-the-tests-Zx9_Qw"


def http_request(port, path, method="GET", headers=None, body=None, host="127.0.0.1"):
    """``(status, headers with lower-case names, body)`` of one request, on its own connection."""
    def call():
        connection = http.client.HTTPConnection(host, port, timeout=10)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return (response.status, {k.lower(): v for k, v in response.getheaders()},
                    response.read())
        finally:
            connection.close()
    return threads.deferToThread(call)


def samples(text):
    """``{(name, sorted labels): value}`` of a scrape."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


class FakeServer:
    """What the readiness check reads of the service."""

    def __init__(self):
        self.accepting = False
        self.table_ready = False
        self.ready = defer.Deferred()
        self.bus = MemoryBus()
        self.store = MemoryStore(hold=True)

    def serve(self):
        self.accepting = self.table_ready = self.bus.connected = True
        self.ready.callback(self)


class ReadinessTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.server = FakeServer()
        self.readiness = Readiness(self.server, self.clock)

    def check(self):
        return self.successResultOf(self.readiness.check())

    def test_starting(self):
        self.assertEqual(self.check(), (False, "starting: the events table is not ready yet"))
        self.server.table_ready = True
        self.assertEqual(self.check(), (False, "starting: not subscribed to Redis yet"))
        self.assertEqual(self.server.store.pending, [])  # (no database question meanwhile)

    def test_ready_asks_the_database_at_most_once_a_second(self):
        self.server.serve()
        first, second = self.readiness.check(), self.readiness.check()
        self.assertNoResult(first)
        self.assertEqual(self.server.store.release(), 1)  # one ping for both
        self.assertEqual(self.successResultOf(first), (True, "ready"))
        self.assertEqual(self.successResultOf(second), (True, "ready"))
        self.clock.advance(0.5)
        self.assertEqual(self.check(), (True, "ready"))  # kept
        self.clock.advance(0.6)
        third = self.readiness.check()
        self.assertEqual(self.server.store.release(), 1)  # asked again
        self.assertEqual(self.successResultOf(third), (True, "ready"))

    def test_database_that_does_not_answer(self):
        self.server.serve()
        d = self.readiness.check()
        self.clock.advance(eventsource_http.PING_TIMEOUT)
        self.assertEqual(self.successResultOf(d),
                         (False, "the database did not answer within 1 s"))
        self.server.store.release()  # a late answer changes nothing
        self.assertEqual(self.check(), (False, "the database did not answer within 1 s"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_database_unreachable(self):
        self.server.serve()
        self.server.store.hold = False
        self.server.store.fail_next = pymysql.err.OperationalError(
            2003, "Can't connect to MySQL server on 'db' (111)")
        self.assertEqual(self.check(), (False, "the database is unreachable (MySQL error 2003)"))
        self.clock.advance(1.1)
        self.server.store.fail_next = RuntimeError("the store is not running")
        self.assertEqual(self.check(), (False, "the database is unreachable (RuntimeError)"))
        self.clock.advance(1.1)
        self.assertEqual(self.check(), (True, "ready"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_redis_away(self):
        self.server.serve()
        self.server.bus.connected = False
        self.assertEqual(self.check(), (False, "not subscribed to Redis: reconnecting"))

    def test_stopping(self):
        self.server.serve()
        waiting = self.readiness.check()
        self.server.accepting = False
        self.assertEqual(self.check(), (False, "the server is stopping"))
        self.readiness.cancel()
        self.assertEqual(self.successResultOf(waiting), (False, "the server is stopping"))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RoutesTestCase(TestCase):
    """The HTTP side of a server on in-memory doubles, on the real reactor and loopback."""

    config = {}

    def setUp(self):
        self.bus = MemoryBus()
        self.store = MemoryStore()
        self.server = EventSourceService(Config(http_port=0, **self.config), reactor,
                                         store=self.store, bus=self.bus.attach,
                                         stop_reactor_on_failure=False)
        self.http = HTTPService(self.server, reactor, process_metrics=False)
        self.http.setServiceParent(self.server)
        self.server.startService()
        self.addCleanup(self.server.stopService)
        self.port = self.http.port

    def get(self, path, **kwargs):
        return http_request(self.port, path, **kwargs)


class RoutesTests(RoutesTestCase):
    @defer.inlineCallbacks
    def test_health(self):
        status, headers, body = yield self.get("/health/live")
        self.assertEqual((status, body), (200, b"live\n"))
        self.assertEqual(headers["content-type"], "text/plain; charset=utf-8")
        status, _, body = yield self.get("/health/ready")
        self.assertEqual((status, body), (200, b"ready\n"))
        self.bus.lose_connection()
        status, _, body = yield self.get("/health/ready")
        self.assertEqual((status, body), (503, b"not subscribed to Redis: reconnecting\n"))
        status, _, body = yield self.get("/health/live", method="HEAD")
        self.assertEqual((status, body), (200, b""))

    @defer.inlineCallbacks
    def test_metrics_in_both_formats(self):
        status, headers, body = yield self.get("/metrics")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "text/plain; version=0.0.4; charset=utf-8")
        self.assertEqual(samples(body.decode())[("eventsource_serving", ())], 1)
        status, headers, body = yield self.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("application/openmetrics-text"))
        self.assertTrue(body.endswith(b"# EOF\n"))

    @defer.inlineCallbacks
    def test_nothing_else(self):
        for path in ["/index.html", "/metrics/", "/metrics/x", "/health", "/health/",
                     "/health/ready/x", "/health/nope", "/../etc/passwd", "/%2e%2e/metrics",
                     "/static", "/static/", "/static/nope.js", "/static/page.js/x",
                     "/static/../metrics", "/static/%2e%2e/setup.py", "/static/__init__.py",
                     "/api", "/api/", "/api/nope", "/api/state/x", "/api/events/x"]:
            status, _, body = yield self.get(path)
            self.assertEqual(status, 404, path)
            self.assertIn(b"not found", body)

    @defer.inlineCallbacks
    def test_read_only(self):
        """Every route answers GET and HEAD only; a body is never stored or acted on."""
        for path in ["/metrics", "/health/live", "/health/ready"]:
            for method in ["POST", "PUT", "DELETE", "PATCH"]:
                status, headers, _ = yield self.get(
                    path, method=method, body=b'{"pid": "x"}' * 10000,
                    headers={"Content-Type": "application/json"})
                self.assertEqual(status, 405, (path, method))
                self.assertIn("GET", headers["allow"])
        self.assertEqual(self.store.events, [])
        self.assertEqual(self.bus.published, [])

    def test_bodies_are_dropped_as_they_arrive(self):
        from twisted.web.test.requesthelper import DummyChannel

        channel = DummyChannel()
        channel.site = self.http.site
        request = self.http.site.requestFactory(channel)
        request.gotLength(10)
        request.handleContentChunk(b"0123456789")
        request.content.seek(0)
        self.assertEqual(request.content.read(), b"")

    def test_listens_on_loopback(self):
        self.assertEqual(self.http._listening.getHost().host, "127.0.0.1")
        self.assertEqual(Config().http_interface, "127.0.0.1")

    def test_no_http_unless_asked(self):
        server = make_server(Config(), reactor, stop_reactor_on_failure=False)
        self.assertRaises(KeyError, server.getServiceNamed, "http")
        server = make_server(Config(http_port=0), reactor, stop_reactor_on_failure=False)
        self.assertIsNone(server.getServiceNamed("http").port)  # (not started: not listening)


class IPv6Tests(RoutesTestCase):
    config = {"http_interface": "::1"}

    def setUp(self):
        import socket

        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            raise SkipTest("no IPv6 loopback here") from None
        super().setUp()

    @defer.inlineCallbacks
    def test_ipv6_loopback(self):
        self.assertEqual(self.http._listening.getHost().host, "::1")
        status, _, _ = yield self.get("/health/live", host="::1")
        self.assertEqual(status, 200)


class TokenTests(RoutesTestCase):
    config = {"http_token": TOKEN}

    @defer.inlineCallbacks
    def test_every_route_but_health_needs_the_token(self):
        log = LogCapture(self)
        for path in ["/metrics", "/nope", "/metrics/x", "/api/state", "/api/events",
                     "/api/stream/p1", "/api/tail", "/api/nope"]:
            for headers in [{}, {"Authorization": "Bearer wrong-" + TOKEN},
                            {"Authorization": "Bearer " + TOKEN[:-1]},
                            {"Authorization": "Basic " + TOKEN},
                            {"Authorization": TOKEN}, {"Authorization": "Bearer"},
                            {"X-Token": TOKEN}]:
                status, answer, body = yield self.get(path, headers=headers)
                self.assertEqual(status, 401, (path, headers))
                self.assertEqual(answer["www-authenticate"], 'Bearer realm="eventsource"')
                self.assertNotIn(b"eventsource_", body)
            status, _, _ = yield self.get(path, method="POST")
            self.assertEqual(status, 401)
        for scheme in ("Bearer", "bearer", "BEARER"):
            status, _, body = yield self.get("/metrics",
                                             headers={"Authorization": f"{scheme} {TOKEN}"})
            self.assertEqual(status, 200)
            self.assertIn(b"eventsource_requests_total", body)
        status, _, _ = yield self.get("/nope", headers={"Authorization": f"Bearer {TOKEN}"})
        self.assertEqual(status, 404)
        status, _, _ = yield self.get("/metrics", method="POST",
                                      headers={"Authorization": f"Bearer {TOKEN}"})
        self.assertEqual(status, 405)
        for path in ["/health/live", "/health/ready", "/", "/static/page.js",
                     "/static/page.css"]:
            status, _, _ = yield self.get(path)
            self.assertEqual(status, 200, path)
        self.assertFalse([text for text in log.details() if TOKEN[:12] in text])

    @defer.inlineCallbacks
    def test_compared_in_constant_time(self):
        compared = []
        real = eventsource_http.hmac.compare_digest

        def compare_digest(a, b):
            compared.append((a, b))
            return real(a, b)

        self.patch(eventsource_http.hmac, "compare_digest", compare_digest)
        status, _, _ = yield self.get("/metrics", headers={"Authorization": "Bearer abc"})
        self.assertEqual(status, 401)
        self.assertEqual(compared, [(b"abc", TOKEN.encode())])


class HTTPIntegrationTests(IntegrationTestCase):
    """The metrics of a server on the real Redis and MariaDB, after real traffic."""

    server_config = {"http_port": 0, "pool_size": 3}

    def get(self, path, **kwargs):
        return http_request(self.server.getServiceNamed("http").port, path, **kwargs)

    @defer.inlineCallbacks
    def scrape(self):
        status, _, body = yield self.get("/metrics")
        self.assertEqual(status, 200)
        return body.decode()

    @defer.inlineCallbacks
    def test_metrics_after_traffic(self):
        status, _, body = yield self.get("/health/ready")
        self.assertEqual((status, body), (200, b"ready\n"))
        docs = [{"pid": "m1", "domain": "d", "name": "n", "data": {"i": i}} for i in range(3)]
        for _ in range(2):
            reply = yield self.client.persist(docs)
            self.assertEqual(reply[0]["affectedRows"], 3)
        rows = yield self.client.fetch({"$where": {"pid": "m1"}})
        self.assertEqual(len(rows), 7)
        rows = yield self.client.fetch({"$where": {"pid": "m1"}}, window=4, accept="fetch-next")
        self.assertEqual(len(rows), 7)
        yield self.client.fetch({"$where": {"nope": 1}})
        found = samples((yield self.scrape()))

        def requests(kind, result):
            return found[("eventsource_requests_total", (("kind", kind), ("result", result)))]

        self.assertEqual(requests("persist", "ok"), 2)
        self.assertEqual(requests("fetch", "ok"), 2)
        self.assertEqual(requests("fetch", "refused"), 1)
        # the windowed stream sent its 4 rows, heard two acceptances (one row
        # each), sent the last two rows and "end": the 4 acceptances after it
        # ended are ignored and were never counted as accepted rows
        self.assertEqual(requests("fetch-next", "ok"), 8)
        self.assertEqual(requests("fetch-next", "ignored"), 4)
        self.assertEqual(found[("eventsource_events_written_total", ())], 6)
        self.assertEqual(found[("eventsource_rows_sent_total", ())], 12)
        self.assertEqual(found[("eventsource_rows_accepted_total", ())], 8)
        self.assertEqual(found[("eventsource_streams_closed_total", (("state", "ended"),))], 2)
        self.assertEqual(found[("eventsource_first_row_latency_seconds_count", ())], 2)
        self.assertEqual(found[("eventsource_append_latency_seconds_count", ())], 2)
        self.assertEqual(found[("eventsource_group_commit_persists_sum", ())], 2)
        self.assertGreaterEqual(found[("eventsource_group_commit_duration_seconds_count", ())], 1)
        (top,) = sql(f"SELECT MAX(id) FROM `{self.database}`.event")[0]
        self.assertEqual(found[("eventsource_last_position", ())], top)
        self.assertEqual(found[("eventsource_mysql_pool_threads", ())], 3)
        self.assertEqual(found[("eventsource_redis_connected", ())], 1)
        self.assertEqual(found[("eventsource_serving", ())], 1)
        self.assertGreater(found[("process_resident_memory_bytes", ())], 0)
        for _, labels in found:
            for _, value in labels:
                self.assertNotIn(self.prefix, value)  # no channel ever becomes a label
                self.assertNotIn("m1", value)  # nor a pid

    @defer.inlineCallbacks
    def test_promtool_check_metrics(self):
        """Prometheus' own linter passes the output (Debian's ``prometheus`` package has it)."""
        promtool = shutil.which("promtool")
        if promtool is None:
            raise SkipTest("promtool is not installed (apt-get install prometheus)")
        yield self.client.persist({"pid": "p", "domain": "d", "name": "n"})
        text = yield self.scrape()
        result = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                                capture_output=True, timeout=60)
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))


class DatabaseReadinessTests(IntegrationTestCase):
    """Not ready while MariaDB cannot be reached (through a proxy this test takes down)."""

    @defer.inlineCallbacks
    def setUp(self):
        self.proxy = TCPProxy(self, MYSQL["host"], MYSQL["port"])
        self.proxy.up()
        self.server_config = {"mysql_port": self.proxy.port, "pool_size": 2, "http_port": 0}
        yield super().setUp()

    def get(self, path):
        return http_request(self.server.getServiceNamed("http").port, path)

    @defer.inlineCallbacks
    def ready(self):
        status, _, body = yield self.get("/health/ready")
        return status, body.decode().strip()

    @defer.inlineCallbacks
    def wait_for(self, expected):
        seen = []

        @defer.inlineCallbacks
        def poll():
            seen.append((yield self.ready()))

        def matches():
            return seen and seen[-1] == expected

        yield poll()
        while not matches():
            yield sleep(0.2)
            yield poll()
            if len(seen) > 100:
                self.fail(f"readiness never became {expected}: {seen[-3:]}")

    @defer.inlineCallbacks
    def test_not_ready_while_the_database_is_away(self):
        yield self.wait_for((200, "ready"))
        yield self.proxy.down()
        yield self.wait_for((503, "the database is unreachable (MySQL error 2003)"))
        status, _, body = yield self.get("/metrics")
        self.assertGreater(samples(body.decode())[
            ("eventsource_mysql_errors_total", (("code", "2003"),))], 0)
        self.proxy.up()
        yield self.wait_for((200, "ready"))
        self.flushLoggedErrors()


class RedisReadinessTests(PrivateRedisTestCase):
    """Not ready while Redis is away; the reconnect is counted."""

    unique_prefix = True
    server_config = {"http_port": 0, "redis_max_delay": 0.2}

    def get(self, path):
        return http_request(self.server.getServiceNamed("http").port, path)

    @defer.inlineCallbacks
    def test_not_ready_while_redis_is_away(self):
        status, _, _ = yield self.get("/health/ready")
        self.assertEqual(status, 200)
        yield self.redis.stop()
        yield wait_until(lambda: not self.server.bus.connected, what="the bus to notice")
        status, _, body = yield self.get("/health/ready")
        self.assertEqual((status, body), (503, b"not subscribed to Redis: reconnecting\n"))
        status, _, body = yield self.get("/health/live")
        self.assertEqual(status, 200)
        _, _, body = yield self.get("/metrics")
        self.assertEqual(samples(body.decode())[("eventsource_redis_connected", ())], 0)
        yield self.redis.start()
        yield wait_until(lambda: self.server.bus.connected, what="the bus to come back")
        status, _, _ = yield self.get("/health/ready")
        self.assertEqual(status, 200)
        _, _, body = yield self.get("/metrics")
        self.assertEqual(samples(body.decode())[("eventsource_redis_reconnects_total", ())], 1)


class StartTests(TestCase):
    """A port that cannot be had stops the start, with the reason."""

    def test_port_taken(self):
        from twisted.internet.error import CannotListenError

        taken = reactor.listenTCP(0, __import__("twisted.internet.protocol",
                                                fromlist=["Factory"]).Factory(),
                                  interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        server = make_server(Config(http_port=taken.getHost().port, table=unique("db") + ".e"),
                             reactor, stop_reactor_on_failure=False)
        self.assertRaises(CannotListenError, server.privilegedStartService)
