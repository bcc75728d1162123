"""
The page (:mod:`eventsource.page`): its helpers and throughput samples with a
Clock; its files and routes over real HTTP on loopback with the server on
in-memory doubles (what each route takes and refuses, that none writes, the
token, the bounds, the live tail's server-sent events); then against the
real MariaDB: filters, paging, one stream, hostile values, and that every
read is fetch's own (compiled plans of the events table, under the statement
time limit).  The page in a real browser is tests/slow/test_page_browser.py.
"""

import json
import re
from urllib.parse import quote

import pymysql
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from eventsource import page, store as store_module
from eventsource.config import Config
from eventsource.http import HTTPService
from eventsource.page import (
    BadParameter, Tail, Throughput, count_value, parameters, shown_row, sse, traffic)
from eventsource.service import EventSourceService
from eventsource.store import StatementTimeLimit
from eventsource.testing import MemoryBus, MemoryStore
from tests.support import IntegrationTestCase, LogCapture, sql, wait_until
from tests.test_http import http_request

TOKEN = "page-token-for-the-tests-Qx7_Lm"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

#: every route of the HTTP port, the page's included
ROUTES = ["/", "/static/page.js", "/static/page.css", "/api/events", "/api/stream/p1",
          "/api/state", "/api/tail", "/metrics", "/health/live", "/health/ready"]


def answer_json(body):
    return json.loads(body.decode("utf-8"))


# -- helpers, with no server --------------------------------------------------------


class FakeArgs:
    def __init__(self, args):
        self.args = args


class ParameterTests(SynchronousTestCase):
    def test_parameters(self):
        self.assertEqual(parameters(FakeArgs({b"pid": [b"p1"], b"name": [b""]}), ("pid", "name")),
                         {"pid": "p1"})  # (an empty field is no filter)
        self.assertEqual(parameters(FakeArgs({b"pid": ["é".encode()]}), ("pid",)), {"pid": "é"})
        for args, reason in [
                ({b"table": [b"mysql.user"]}, "unknown parameter 'table'"),
                ({b"$from": [b"mysql.user"]}, "unknown parameter '$from'"),
                ({b"pid": [b"a", b"b"]}, "pid is given more than once"),
                ({b"pid": [b"\xff"]}, "pid is not UTF-8"),
                ({b"\xff": [b"x"]}, "a parameter's name is not UTF-8")]:
            with self.assertRaises(BadParameter) as caught:
                parameters(FakeArgs(args), ("pid",))
            self.assertIn(reason, str(caught.exception))

    def test_counts(self):
        def count(text, **kwargs):
            return count_value({"n": text}, "n", 7, **kwargs)

        self.assertEqual(count_value({}, "n", 7), 7)
        self.assertEqual(count("12"), 12)
        self.assertEqual(count("0012"), 12)
        self.assertEqual(count("300", most=200), 200)
        self.assertEqual(count("9" * 500, most=200), 200)  # a huge limit is cut, not refused
        for text in ["-1", "1e3", " 1", "1 ", "0x10", "1.0", "+1", "١٢", "9" * 20]:
            with self.assertRaises(BadParameter, msg=text):
                count(text)
        with self.assertRaises(BadParameter):
            count("0", least=1)

    def test_shown_row(self):
        small = '{"position":1,"pid":"p","data":{"a":1}}'
        self.assertIs(shown_row(small), small)
        big = ('{"position":7,"eventId":"e","pid":"p,\\"data\\":","version":0,"domain":"d",'
               '"name":"n","timestamp":"t","data":{"blob":"' + "x" * page.MAX_ROW_BYTES + '"}}')
        shown = json.loads(shown_row(big))
        self.assertEqual(shown, {"position": 7, "eventId": "e", "pid": 'p,"data":', "version": 0,
                                 "domain": "d", "name": "n", "timestamp": "t", "data": None,
                                 "omittedBytes": len(big)})

    def test_server_sent_events(self):
        self.assertEqual(sse("event", '{"a":1}', 5), b'id: 5\nevent: event\ndata: {"a":1}\n\n')
        # line breaks in data (a row written behind the server's back) become data lines
        self.assertEqual(sse(None, "{\n\"a\":\r\n1\r}"), b'data: {\ndata: "a":\ndata: 1\ndata: }\n\n')


class ThroughputTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.counts = [0, 0]
        self.throughput = Throughput(self.clock, lambda: tuple(self.counts), period=10, size=3)

    def test_samples_the_differences_every_period(self):
        self.counts[:] = [5, 50]  # (before the start: not counted)
        self.throughput.start()
        self.counts[:] = [8, 60]
        self.clock.advance(10)
        self.counts[:] = [8, 61]
        self.clock.advance(10)
        self.assertEqual(list(self.throughput.samples), [(10.0, 3, 10), (20.0, 0, 1)])
        self.assertEqual(self.throughput.as_json(), {
            "period": 10, "capacity": 3, "samples": [{"end": 10.0, "written": 3, "sent": 10},
                                                     {"end": 20.0, "written": 0, "sent": 1}]})

    def test_keeps_the_last_samples(self):
        self.throughput.start()
        for i in range(1, 6):
            self.counts[0] = i * i
            self.clock.advance(10)
        self.assertEqual([written for _, written, _ in self.throughput.samples], [5, 7, 9])

    def test_stop_leaves_no_timer(self):
        self.throughput.start()
        self.throughput.start()  # (once)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.throughput.stop()
        self.throughput.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_traffic_counts_open_streams(self):
        class Stats:
            events_written = 4
            closed_rows_sent = 10

        class Stream:
            def __init__(self, sent):
                self.rows_sent = sent

        class Server:
            stats = Stats()
            streams = {"a": Stream(3), "b": Stream(2)}

        self.assertEqual(traffic(Server()), (4, 15))


class FakeTransport:
    def __init__(self):
        self.aborted = False

    def abortConnection(self):
        self.aborted = True


class FakeChannel:
    def __init__(self):
        self.transport = FakeTransport()


class FakeRequest:
    """What a :class:`Tail` uses of a request."""

    def __init__(self):
        self.code = None
        self.headers = {}
        self.written = []
        self.producer = None
        self.finished = False
        self.channel = FakeChannel()
        self._finish = defer.Deferred()

    def setResponseCode(self, code):
        self.code = code

    def setHeader(self, name, value):
        self.headers[name] = value

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def notifyFinish(self):
        return self._finish

    def write(self, data):
        assert not self.finished
        self.written.append(data)

    def finish(self):
        self.finished = True
        self._finish.callback(None)

    def lose(self):
        self._finish.errback(Exception("connection lost"))

    def text(self):
        return b"".join(self.written).decode()


class TailTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.request = FakeRequest()
        self.closed = []
        self.tail = Tail(self.request, self.clock, self.closed.append)
        self.tail.start()

    def test_events(self):
        self.assertEqual(self.request.code, 200)
        self.assertEqual(self.request.headers[b"content-type"], b"text/event-stream; charset=utf-8")
        self.assertIs(self.request.producer, self.tail)
        self.tail.join(41)
        self.tail.deliver([(42, '{"position":42}', 15), (44, '{"position":44}', 15)])
        self.assertEqual(self.request.text().split("\n\n")[1:], [
            'event: ready\ndata: {"position": 41}', 'id: 42\nevent: event\ndata: {"position":42}',
            'id: 44\nevent: event\ndata: {"position":44}', ""])
        self.assertEqual((self.tail.events, self.tail.position), (2, 44))

    def test_heartbeat(self):
        self.clock.advance(page.HEARTBEAT)
        self.clock.advance(page.HEARTBEAT)
        self.assertEqual(self.request.text().count(": heartbeat\n\n"), 2)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_client_gone(self):
        self.request.lose()
        self.assertEqual(self.closed, [self.tail])
        self.assertFalse(self.tail.is_live)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.tail.deliver([(1, "{}", 2)])  # (late: dropped)
        self.assertNotIn("id: 1", self.request.text())

    def test_source_failed(self):
        self.tail.fail("reading new events failed")
        self.assertTrue(self.request.finished)
        self.assertIn('event: failed\ndata: {"error": "reading new events failed"}',
                      self.request.text())
        self.assertEqual(self.closed, [self.tail])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_client_that_reads_nothing_is_cut_off(self):
        self.tail.pauseProducing()
        row = '{"data":"' + "x" * 1000 + '"}'
        for position in range(page.TAIL_BUFFER_BYTES // 2000):
            self.tail.deliver([(position, row, len(row))])
        self.assertTrue(self.tail.is_live)
        self.tail.resumeProducing()  # (the client read: the count starts again)
        self.tail.pauseProducing()
        for position in range(page.TAIL_BUFFER_BYTES // 1000 + 10):
            self.tail.deliver([(position, row, len(row))])
        self.assertFalse(self.tail.is_live)
        self.assertTrue(self.request.channel.transport.aborted)
        self.assertEqual(self.closed, [self.tail])
        self.assertEqual(self.clock.getDelayedCalls(), [])


# -- the routes, over HTTP, on in-memory doubles ---------------------------------------


class MemoryTail:
    """A tail source that delivers what the test commits."""

    def __init__(self, position=0):
        self.position = position
        self.following = {}
        self.left = []

    def follow(self, listener, where):
        self.following[listener] = where
        listener.join(self.position)

    def unfollow(self, listener):
        if self.following.pop(listener, None) is not None:
            self.left.append(listener)

    def commit(self, *rows):
        events = []
        for row in rows:
            self.position += 1
            body = json.dumps(dict(row, position=self.position))
            events.append((self.position, body, len(body)))
        for listener in list(self.following):
            listener.deliver(events)


class StreamingClient(protocol.Protocol):
    """A raw HTTP/1.1 client that keeps everything it receives (an open tail)."""

    def __init__(self):
        self.data = b""
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.closed.callback(None)


@defer.inlineCallbacks
def open_stream(port, path, headers=None):
    client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                   StreamingClient())
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    client.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    return client


class PageTestCase(TestCase):
    """A server on in-memory doubles with its HTTP port, a MemoryTail its tail source."""

    config = {}
    #: the tail source is a MemoryTail (else the server's own: its tailer)
    memory_tail = True

    def setUp(self):
        self.bus = MemoryBus()
        self.store = MemoryStore()
        self.source = MemoryTail() if self.memory_tail else None
        self.server = EventSourceService(Config(http_port=0, **self.config), reactor,
                                         store=self.store, bus=self.bus.attach,
                                         stop_reactor_on_failure=False)
        self.http = HTTPService(self.server, reactor, process_metrics=False,
                                tail_source=self.source)
        self.http.setServiceParent(self.server)
        self.server.startService()
        self.addCleanup(self._stop)
        self.port = self.http.port
        self.plans = []
        real = self.store.read_page

        def read_page(plan, *args, **kwargs):
            self.plans.append(plan)
            return real(plan, *args, **kwargs)

        self.store.read_page = read_page

    def _stop(self):
        if self.server.running:
            return self.server.stopService()

    def get(self, path, **kwargs):
        headers = dict(kwargs.pop("headers", {}))
        headers.setdefault("Host", f"127.0.0.1:{self.port}")
        if self.config.get("http_token"):
            headers.setdefault("Authorization", f"Bearer {TOKEN}")
        return http_request(self.port, path, headers=headers, **kwargs)

    @defer.inlineCallbacks
    def get_json(self, path, status=200):
        code, headers, body = yield self.get(path)
        self.assertEqual(code, status, (path, body))
        self.assertEqual(headers["content-type"], "application/json; charset=utf-8")
        self.assertEqual(headers["cache-control"], "no-store")
        return answer_json(body)


class FilesTests(PageTestCase):
    @defer.inlineCallbacks
    def test_the_page(self):
        status, headers, body = yield self.get("/")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "text/html; charset=utf-8")
        self.assertIn(b'<script src="static/page.js" defer></script>', body)
        self.assertIn(b'<link rel="stylesheet" href="static/page.css">', body)
        self.assertNotIn(b"<script>", body)  # (no inline script: the policy allows none)
        csp = headers["content-security-policy"]
        self.assertIn("default-src 'none'", csp)
        self.assertIn("script-src 'self'", csp)
        self.assertIn("frame-ancestors 'none'", csp)
        self.assertEqual(headers["x-content-type-options"], "nosniff")
        self.assertEqual(headers["referrer-policy"], "no-referrer")
        for path, kind in [("/static/page.js", "text/javascript; charset=utf-8"),
                           ("/static/page.css", "text/css; charset=utf-8")]:
            status, headers, body = yield self.get(path)
            self.assertEqual((status, headers["content-type"]), (200, kind))
            self.assertEqual(body, page.read_file(path.rsplit("/", 1)[1]))
            status, _, body = yield self.get(path, headers={"If-None-Match": headers["etag"]})
            self.assertEqual((status, body), (304, b""))
        status, _, body = yield self.get("/", method="HEAD")
        self.assertEqual((status, body), (200, b""))

    def test_the_script_builds_the_page_as_text(self):
        """Values from the server go into the page as text: no innerHTML, no eval."""
        script = page.read_file("page.js").decode()
        for unsafe in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                       "eval(", "new Function", "localStorage"]:
            self.assertNotIn(unsafe, script)
        self.assertIn("sessionStorage", script)
        self.assertIn('Authorization: "Bearer " + token', script)
        # no request of the script puts the token in its URL
        self.assertFalse(re.search(r"fetch\([^)]*token", script))

    def test_one_file_each(self):
        html = page.read_file("index.html").decode()
        self.assertEqual(re.findall(r'(?:src|href)="(static/[^"]+)"', html),
                         ["static/page.css", "static/page.js"])
        self.assertNotIn("http://", html.replace("http://www.w3.org/2000/svg", ""))
        self.assertNotIn("https://", html)  # (no CDN)


class EventsRouteTests(PageTestCase):
    @defer.inlineCallbacks
    def test_last_events(self):
        for i in range(3):
            self.store.add(pid=f"p{i}", data={"i": i})
        answer = yield self.get_json("/api/events")
        self.assertEqual([e["pid"] for e in answer["events"]], ["p0", "p1", "p2"])  # (the double does not order)
        self.assertEqual(answer["events"][0]["data"], {"i": 0})
        self.assertEqual(set(answer["events"][0]), {"position", "eventId", "pid", "version",
                                                    "domain", "name", "timestamp", "data"})
        self.assertEqual((answer["limit"], answer["more"]), (50, False))
        (plan,) = set(self.plans)
        self.assertEqual(plan.limit, 50)
        self.assertFalse(plan.keyset)
        self.assertEqual(plan.order_sql, "`id` DESC")

    @defer.inlineCallbacks
    def test_filters_are_bound_values(self):
        hostile = "x' OR '1'='1'; DROP TABLE event; --"
        answer = yield self.get_json(
            "/api/events?" + "&".join(f"{n}={quote(hostile)}" for n in ("pid", "domain", "name"))
            + "&before=10&limit=5")
        self.assertEqual(answer["limit"], 5)
        (plan,) = set(self.plans)
        sql_text, params = plan.offset_sql(0, 100, 5)
        self.assertNotIn("DROP", sql_text)
        self.assertEqual(params[:4], (hostile, hostile, hostile, 10))
        self.assertTrue(sql_text.startswith("SELECT "))
        self.assertEqual(sql_text.count("FROM"), 1)
        self.assertIn("FROM `eventsource`.`event`", sql_text)

    @defer.inlineCallbacks
    def test_limits_are_cut(self):
        for limit in ["201", "1000", "9" * 400]:
            answer = yield self.get_json("/api/events?limit=" + limit)
            self.assertEqual(answer["limit"], page.MAX_EVENTS_LIMIT)
            self.assertEqual(self.plans[-1].limit, page.MAX_EVENTS_LIMIT)

    @defer.inlineCallbacks
    def test_hostile_parameters_are_refused(self):
        for query_string, reason in [
                ("$from=mysql.user", "unknown parameter '$from'"),
                ("table=mysql.user", "unknown parameter 'table'"),
                ("where=%7B%22%24or%22%3A1%7D", "unknown parameter 'where'"),
                ("columns=password", "unknown parameter 'columns'"),
                ("pid=a&pid=b", "pid is given more than once"),
                ("pid=%FF", "pid is not UTF-8"),
                ("pid=" + "p" * 256, "pid is longer than 255 characters"),
                ("limit=-1", "limit must be a whole number"),
                ("limit=0", "limit must be at least 1"),
                ("limit=1e3", "limit must be a whole number"),
                ("before=1%20OR%201", "before must be a whole number"),
                ("before=" + "9" * 30, "before is too large"),
                ("before=0", "before must be at least 1")]:
            answer = yield self.get_json("/api/events?" + query_string, status=400)
            self.assertIn(reason, answer["error"], query_string)
        self.assertEqual(self.plans, [])  # (nothing was read)

    @defer.inlineCallbacks
    def test_answers_are_bounded_in_bytes(self):
        row = {"blob": "y" * 30_000}
        for _ in range(60):
            self.store.add(data=row)
        status, _, body = yield self.get("/api/events?limit=200")
        self.assertEqual(status, 200)
        answer = answer_json(body)
        self.assertTrue(answer["more"])
        self.assertLess(len(body), page.MAX_ANSWER_BYTES + 40_000)
        self.assertGreater(len(answer["events"]), 10)

    @defer.inlineCallbacks
    def test_a_huge_row_comes_without_its_data(self):
        self.store.add(data={"blob": "z" * (page.MAX_ROW_BYTES + 1)})
        answer = yield self.get_json("/api/events")
        (event,) = answer["events"]
        self.assertIsNone(event["data"])
        self.assertGreater(event["omittedBytes"], page.MAX_ROW_BYTES)

    @defer.inlineCallbacks
    def test_reads_at_once_are_bounded(self):
        self.store.hold = True
        waiting = [self.get("/api/events") for _ in range(page.MAX_READS)]
        yield wait_until(lambda: len(self.store.pending) == page.MAX_READS)
        answer = yield self.get_json("/api/events", status=503)
        self.assertIn("busy", answer["error"])
        self.store.release()
        for d in waiting:
            status, _, _ = yield d
            self.assertEqual(status, 200)
        self.assertEqual(self.http.page.reader.reading, 0)

    @defer.inlineCallbacks
    def test_read_failures(self):
        self.store.fail_next = StatementTimeLimit(
            "the query ran longer than the statement time limit (30 s)")
        answer = yield self.get_json("/api/events", status=503)
        self.assertEqual(answer["error"], "the query ran longer than the statement time limit (30 s)")
        self.store.fail_next = pymysql.err.OperationalError(
            2003, "Can't connect to MySQL server on 'db-secret-host.internal' (111)")
        answer = yield self.get_json("/api/events", status=503)
        self.assertEqual(answer["error"], "the database could not be reached")
        self.store.fail_next = RuntimeError("SELECT `secret` FROM somewhere")
        answer = yield self.get_json("/api/events", status=500)
        self.assertNotIn("SELECT", answer["error"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.http.page.reader.reading, 0)


class StreamRouteTests(PageTestCase):
    @defer.inlineCallbacks
    def test_one_stream(self):
        self.store.add(pid="order/1", data={"total": 3})
        answer = yield self.get_json("/api/stream/order%2F1?from_version=2&limit=100000")
        self.assertEqual((answer["pid"], answer["fromVersion"], answer["limit"]),
                         ("order/1", 2, page.MAX_STREAM_LIMIT))
        (plan,) = set(self.plans)
        self.assertTrue(plan.keyset)
        self.assertEqual(plan.index_hint, " FORCE INDEX (`pid_version`)")
        self.assertEqual(plan.where_params, ("order/1", 2))

    @defer.inlineCallbacks
    def test_refused(self):
        for path, status, reason in [
                ("/api/stream", 404, "name a stream"),
                ("/api/stream/", 400, "name a stream"),
                ("/api/stream/" + "p" * 256, 400, "longer than 255"),
                ("/api/stream/%FF", 400, "not UTF-8"),
                ("/api/stream/p1?from_version=-1", 400, "from_version must be a whole number"),
                ("/api/stream/p1?pid=p2", 400, "unknown parameter 'pid'")]:
            answer = yield self.get_json(path, status=status)
            self.assertIn(reason, answer["error"], path)
        status, _, _ = yield self.get("/api/stream/p1/more")
        self.assertEqual(status, 404)
        self.assertEqual(self.plans, [])


class ReadOnlyTests(PageTestCase):
    @defer.inlineCallbacks
    def test_no_route_writes(self):
        """Every route, the page's too: only GET and HEAD; a body is never read."""
        body = json.dumps({"pid": "x", "domain": "d", "name": "n",
                           "query": {"$insert": {"$documents": [{"pid": "x"}]}}}).encode()
        for path in ROUTES + ["/api/events?pid=x"]:
            for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"]:
                status, headers, _ = yield self.get(
                    path, method=method, body=body, headers={"Content-Type": "application/json"})
                self.assertEqual(status, 405, (path, method))
                self.assertEqual(headers["allow"], "GET, HEAD")
        self.assertEqual(self.store.events, [])
        self.assertEqual(self.bus.published, [])
        self.assertEqual(self.plans, [])


class StateRouteTests(PageTestCase):
    config = {"http_token": TOKEN, "mysql_password": "mysql-secret-pw-3141",
              "redis_password": "redis-secret-pw-2718", "table": "shop.event"}

    @defer.inlineCallbacks
    def test_state(self):
        self.store.add()
        answer = yield self.get_json("/api/state")
        self.assertEqual(answer["table"], "shop.event")
        self.assertTrue(answer["serving"])
        self.assertEqual(answer["streams"], {"open": 0, "max": 10000, "listed": [],
                                             "byState": {"awaiting-row": 0, "awaiting-accept": 0}})
        self.assertEqual(answer["tails"], {"open": 0, "max": page.MAX_TAILS})
        self.assertEqual(answer["throughput"]["period"], page.THROUGHPUT_PERIOD)
        status, _, _ = yield self.get("/api/state?x=1")
        self.assertEqual(status, 400)

    @defer.inlineCallbacks
    def test_no_secret_anywhere(self):
        log = LogCapture(self)
        for path in ROUTES + ["/api/nope", "/api/events?x=1"]:
            for headers in [{"Authorization": "Bearer wrong"}, {}]:
                # (an authorized GET of /api/tail never ends: its head is what is said)
                method = "HEAD" if path == "/api/tail" and not headers else "GET"
                _, answer_headers, body = yield self.get(path, method=method, headers=headers)
                text = body.decode("utf-8", "replace") + repr(answer_headers)
                for secret in (TOKEN, "mysql-secret-pw-3141", "redis-secret-pw-2718"):
                    self.assertNotIn(secret, text, path)
        for secret in (TOKEN[:12], "mysql-secret", "redis-secret"):
            self.assertFalse([t for t in log.details() if secret in t])

    @defer.inlineCallbacks
    def test_open_streams_listed(self):
        for _ in range(3):
            self.store.add()
        self.bus.deliver("fetch", json.dumps({"channel": "reply-77", "query": {"$select": {}}}))
        answer = yield self.get_json("/api/state")
        self.assertEqual(answer["streams"]["open"], 1)
        (listed,) = answer["streams"]["listed"]
        self.assertEqual((listed["channel"], listed["state"], listed["rowsSent"]),
                         ("reply-77", "awaiting-accept", 1))


class SubscriptionsStateTests(PageTestCase):
    @defer.inlineCallbacks
    def test_subscriptions_listed(self):
        answer = yield self.get_json("/api/state")
        self.assertEqual(answer["subscriptions"], {
            "open": 0, "max": self.server.config.max_subscriptions, "listed": [],
            "byState": {"catching-up": 0, "live": 0}})
        self.store.add()
        self.bus.deliver("subscribe", json.dumps({"v": 2, "channel": "reply-sub", "from": "end",
                                                  "query": {"$select": {}}}))
        yield wait_until(lambda: self.server.subscriptions.get("reply-sub") is not None
                         and self.server.subscriptions["reply-sub"].state.value == "live")
        answer = yield self.get_json("/api/state")
        self.assertEqual(answer["subscriptions"]["open"], 1)
        self.assertEqual(answer["subscriptions"]["listed"], [{
            "channel": "reply-sub", "state": "live", "position": 1, "window": 100, "rowsSent": 0,
            "heldBytes": 0}])


class TokenTests(PageTestCase):
    config = {"http_token": TOKEN}

    @defer.inlineCallbacks
    def test_data_needs_the_token_and_the_page_does_not(self):
        for path in ["/api/events", "/api/stream/p1", "/api/state", "/api/tail"]:
            for headers in [{"Authorization": ""}, {"Authorization": "Bearer nope"},
                            {"Authorization": TOKEN},
                            {"Authorization": "", "Cookie": f"token={TOKEN}"}]:
                status, _, _ = yield self.get(path, headers=headers)
                self.assertEqual(status, 401, (path, headers))
            status, _, _ = yield self.get(path + f"?token={TOKEN}", headers={"Authorization": ""})
            self.assertEqual(status, 401)
        for path in ["/", "/static/page.js", "/static/page.css"]:
            status, _, body = yield self.get(path, headers={"Authorization": ""})
            self.assertEqual(status, 200, path)
            self.assertNotIn(TOKEN.encode(), body)
        # with a token, any Host: the token is the defence
        status, _, _ = yield self.get("/api/state", headers={"Host": "events.example.org"})
        self.assertEqual(status, 200)


class HostTests(PageTestCase):
    @defer.inlineCallbacks
    def test_without_a_token_only_an_address_or_localhost_reads_events(self):
        """A DNS name pointed at loopback by another site (DNS rebinding) reads nothing."""
        for host in ["evil.example", "evil.example:80", "127.0.0.1.evil.example",
                     "localhost.evil.example", ""]:
            status, _, body = yield self.get("/api/events", headers={"Host": host})
            self.assertEqual(status, 403, host)
            self.assertIn(b"DNS rebinding", body)
        for host in [f"127.0.0.1:{self.port}", f"localhost:{self.port}", "localhost",
                     "[::1]:8080", "127.0.0.1", "LOCALHOST"]:
            status, _, _ = yield self.get("/api/state", headers={"Host": host})
            self.assertEqual(status, 200, host)
        status, _, _ = yield self.get("/", headers={"Host": "evil.example"})
        self.assertEqual(status, 200)  # (the page's files hold no data)
        self.assertEqual(self.plans, [])


class TailRouteTests(PageTestCase):
    @defer.inlineCallbacks
    def test_new_events_as_server_sent_events(self):
        client = yield open_stream(self.port, "/api/tail?pid=p1&name=paid")
        yield wait_until(lambda: b"event: ready" in client.data)
        head = client.data.split(b"\r\n\r\n", 1)[0].decode().lower()
        self.assertIn("content-type: text/event-stream; charset=utf-8", head)
        self.assertIn("cache-control: no-store", head)
        ((listener, where),) = self.source.following.items()
        self.assertEqual(where, {"pid": "p1", "name": "paid"})
        self.source.commit({"pid": "p1", "name": "paid", "data": {"amount": 3}})
        yield wait_until(lambda: b"id: 1\nevent: event\n" in client.data)
        self.assertIn(b'data: {"pid": "p1", "name": "paid", "data": {"amount": 3}, "position": 1}\n\n',
                      client.data)
        state = yield self.get_json("/api/state")
        self.assertEqual(state["tails"]["open"], 1)
        _, _, metrics = yield self.get("/metrics")
        self.assertIn(b"\neventsource_page_tails 1.0\n", metrics)
        client.transport.loseConnection()
        yield client.closed
        yield wait_until(lambda: self.source.left == [listener])
        self.assertEqual(self.http.page.tail.tails, set())

    @defer.inlineCallbacks
    def test_tails_are_bounded(self):
        self.patch(page, "MAX_TAILS", 2)
        clients = []
        for _ in range(2):
            clients.append((yield open_stream(self.port, "/api/tail")))
        yield wait_until(lambda: len(self.source.following) == 2)
        answer = yield self.get_json("/api/tail", status=503)
        self.assertIn("2 live tails are open", answer["error"])
        for client in clients:
            client.transport.loseConnection()
            yield client.closed

    @defer.inlineCallbacks
    def test_refused(self):
        answer = yield self.get_json("/api/tail?pid=" + "p" * 300, status=400)
        self.assertIn("longer than 255", answer["error"])
        answer = yield self.get_json("/api/tail?position=1", status=400)
        self.assertIn("unknown parameter", answer["error"])
        status, headers, body = yield self.get("/api/tail", method="HEAD")
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(self.source.following, {})
        self.http.page.tail.source = None
        answer = yield self.get_json("/api/tail", status=501)
        self.assertEqual(answer["error"], "this server has no live tail")

    @defer.inlineCallbacks
    def test_the_server_stopping_ends_the_tails(self):
        client = yield open_stream(self.port, "/api/tail")
        yield wait_until(lambda: b"event: ready" in client.data)
        yield self.server.stopService()
        yield client.closed
        self.assertTrue(client.data.endswith(b"0\r\n\r\n"))  # (the chunked answer's end)
        self.assertEqual(self.source.following, {})


class SubscriptionTailTests(PageTestCase):
    """The server's own tail source: the subscriptions' tailer (on the in-memory store)."""

    memory_tail = False

    def persist(self, pid):
        self.bus.deliver("persist", json.dumps({"channel": "reply-1", "query": {"$insert": {
            "$documents": [{"pid": pid, "domain": "d", "name": "n", "data": {"pid": pid}}]}}}))

    @defer.inlineCallbacks
    def test_the_tailer_feeds_the_tail(self):
        self.persist("p1")  # (before the tail: not in it)
        client = yield open_stream(self.port, "/api/tail?pid=p1")
        yield wait_until(lambda: b"event: ready" in client.data)
        self.assertIn(b'data: {"position": 1}', client.data)
        tailer = self.server.tailer
        self.assertEqual(len(tailer), 1)
        reads = len(self.store.tail_reads)
        for pid in ["p2", "p1", "p3", "p1"]:
            self.persist(pid)
        yield wait_until(lambda: client.data.count(b"event: event") == 2)
        events = [json.loads(line[6:]) for line in client.data.decode().split("\n")
                  if line.startswith("data: {\"position\"") and "eventId" in line]
        self.assertEqual([(e["position"], e["pid"], e["version"]) for e in events],
                         [(3, "p1", 1), (5, "p1", 2)])
        self.assertEqual(events[0]["data"], {"pid": "p1"})
        self.assertEqual(self.plans, [])  # (the tail read nothing itself: the tailer did)
        self.assertGreater(len(self.store.tail_reads), reads)
        client.transport.loseConnection()
        yield client.closed
        yield wait_until(lambda: len(tailer) == 0)


# -- against the real MariaDB ------------------------------------------------------------


class PageIntegrationTests(IntegrationTestCase):
    server_config = {"http_port": 0, "http_token": TOKEN, "max_statement_time": 2.5}

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.port = self.server.getServiceNamed("http").port
        self.reads = []
        real = store_module._read_page

        def recorded(txn, plan, table, high_water, position, size, statement_time=0,
                     *rest):
            self.reads.append((plan, table, statement_time))
            return real(txn, plan, table, high_water, position, size, statement_time, *rest)

        self.patch(store_module, "_read_page", recorded)

    @defer.inlineCallbacks
    def api(self, path, status=200):
        code, _, body = yield http_request(self.port, path, headers=AUTH)
        self.assertEqual(code, status, body)
        return answer_json(body)

    @defer.inlineCallbacks
    def persist_some(self):
        documents = [{"pid": "order-1", "domain": "order", "name": "created", "data": {"n": 1}},
                     {"pid": "order-2", "domain": "order", "name": "created", "data": {"n": 2}},
                     {"pid": "order-1", "domain": "order", "name": "paid", "data": {"n": 3}},
                     {"pid": "user-1", "domain": "user", "name": "created", "data": {"n": 4}},
                     {"pid": "order-1", "domain": "order", "name": "shipped", "data": {"n": 5}}]
        for document in documents:
            reply = yield self.client.persist([document])
            self.assertEqual(reply[0]["affectedRows"], 1)

    @defer.inlineCallbacks
    def test_last_events_filtered_and_paged(self):
        yield self.persist_some()

        @defer.inlineCallbacks
        def data(query_string):
            answer = yield self.api("/api/events" + query_string)
            return [event["data"]["n"] for event in answer["events"]]

        self.assertEqual((yield data("")), [5, 4, 3, 2, 1])  # newest first
        self.assertEqual((yield data("?pid=order-1")), [5, 3, 1])
        self.assertEqual((yield data("?domain=user")), [4])
        self.assertEqual((yield data("?name=created")), [4, 2, 1])
        self.assertEqual((yield data("?domain=order&name=created")), [2, 1])
        self.assertEqual((yield data("?pid=order-1&name=paid")), [3])
        self.assertEqual((yield data("?pid=ORDER-1")), [])  # (byte for byte, as fetch)
        answer = yield self.api("/api/events?limit=2")
        self.assertEqual(([e["data"]["n"] for e in answer["events"]], answer["more"]), ([5, 4], True))
        before = answer["events"][-1]["position"]
        answer = yield self.api(f"/api/events?limit=2&before={before}")
        self.assertEqual([e["data"]["n"] for e in answer["events"]], [3, 2])
        answer = yield self.api("/api/events?pid=order-1")
        self.assertEqual([e["version"] for e in answer["events"]], [2, 1, 0])
        self.check_reads()

    @defer.inlineCallbacks
    def test_one_stream(self):
        yield self.persist_some()
        answer = yield self.api("/api/stream/order-1")
        self.assertEqual([(e["version"], e["name"]) for e in answer["events"]],
                         [(0, "created"), (1, "paid"), (2, "shipped")])
        positions = [e["position"] for e in answer["events"]]
        self.assertEqual(positions, sorted(positions))
        answer = yield self.api("/api/stream/order-1?from_version=1&limit=1")
        self.assertEqual(([e["name"] for e in answer["events"]], answer["more"]), (["paid"], True))
        answer = yield self.api("/api/stream/nobody")
        self.assertEqual(answer["events"], [])
        self.check_reads()

    @defer.inlineCallbacks
    def test_hostile_values_reach_no_other_table(self):
        yield self.persist_some()
        sql(f"CREATE TABLE `{self.database}`.`secrets` (pid VARCHAR(255), secret TEXT)")
        sql(f"INSERT INTO `{self.database}`.`secrets` VALUES ('order-1', 'the-secret-value')")
        hostile = ["x' OR '1'='1", "order-1' UNION SELECT secret FROM secrets --",
                   f"{self.database}.secrets", "`secrets`", "%", "_", "\\", "order-1\x00",
                   "'; DROP TABLE event; --", "order-1`; DELETE FROM event; --"]
        for value in hostile:
            for name in ("pid", "domain", "name"):
                answer = yield self.api(f"/api/events?{name}={quote(value)}")
                self.assertEqual(answer["events"], [], value)
            answer = yield self.api("/api/stream/" + quote(value, safe=""))
            self.assertEqual(answer["events"], [], value)
        self.assertEqual(len(self.rows()), 5)  # (nothing dropped or deleted)
        status, _, body = yield http_request(self.port, "/api/events?table=secrets", headers=AUTH)
        self.assertEqual(status, 400)
        self.assertNotIn(b"the-secret-value", body)
        self.check_reads()

    @defer.inlineCallbacks
    def test_the_database_away(self):
        """A read that fails says so in a sentence: no SQL, no host."""
        yield self.persist_some()
        def lost(*args, **kwargs):
            raise pymysql.err.OperationalError(2013, "Lost connection to MySQL server during "
                                               "query on db-secret-host.internal")

        self.patch(store_module, "_read_page", lost)
        answer = yield self.api("/api/events", status=503)
        self.assertEqual(answer, {"error": "the database could not be reached"})

    def check_reads(self):
        """Every read was fetch's: a version 2 plan of the events table, under the time limit."""
        self.assertTrue(self.reads)
        for plan, table, statement_time in self.reads:
            self.assertEqual(table, f"`{self.database}`.`event`")
            self.assertEqual(plan.table_sql, f"`{self.database}`.`event`")
            self.assertEqual(statement_time, 2.5)
            self.assertTrue(plan.encodings)  # (version 2 columns)
            sql_text = plan.offset_sql(0, 1, 1)[0] if not plan.keyset else plan.page_sql(
                plan.keyset_start, 1, 1)[0]
            self.assertTrue(sql_text.startswith("SELECT "), sql_text)
            self.assertEqual(re.findall(r"FROM (\S+)", sql_text), [f"`{self.database}`.`event`"])

