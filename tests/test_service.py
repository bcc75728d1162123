"""
The service with in-memory Redis and MySQL doubles and a Clock: dispatch,
refusals, busy channels, acceptance from both places, limits, shutdown.
"""

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from eventsource.stream import MACHINE
from eventsource.config import Config
from eventsource.service import EventSourceService
from eventsource.testing import MemoryBus, MemoryStore

OK = {"fieldCount": 0, "affectedRows": 1, "insertId": 1, "serverStatus": 2,
      "warningCount": 0, "message": "", "protocol41": True, "changedRows": 0}


def persist_body(channel, documents):
    return json.dumps({"channel": channel, "query": {"$insert": {"$documents": documents}}})


def fetch_body(channel, select=None, **extra):
    return json.dumps({"channel": channel, "query": {"$select": select or {}}, **extra})


def doc(pid="p1", **kw):
    return {"pid": pid, "domain": "user", "name": "created", "data": {"n": 1}, **kw}


class ServiceTestCase(SynchronousTestCase):
    def make(self, hold_bus=False, hold_store=False, **config):
        self.clock = Clock()
        self.bus = MemoryBus(hold=hold_bus)
        config = Config(**config)
        self.store = MemoryStore(hold=hold_store, page_size=config.page_size,
                                 page_bytes=config.page_bytes)
        self.service = EventSourceService(config, self.clock,
                                          bus=self.bus.attach, store=self.store)
        self.service.startService()
        self.assertTrue(self.successResultOf(self.service.ready))
        return self.service

    def send(self, channel, body):
        self.service.message_received(channel, body)

    def out(self, channel):
        return self.bus.messages(channel)


class PersistTests(ServiceTestCase):
    def test_persist_answers_ok_packet_then_end(self):
        self.make()
        self.send("persist", persist_body("r", doc()))
        self.assertEqual(self.out("r"), [OK, "end"])
        self.assertEqual(len(self.store.events), 1)

    def test_many_documents_report_count_and_first_id(self):
        self.make()
        self.store.add()
        self.send("persist", persist_body("r", [doc(), doc(), doc()]))
        result = self.out("r")[0]
        self.assertEqual((result["affectedRows"], result["insertId"]), (3, 2))

    def test_invalid_documents_error_then_end_and_nothing_written(self):
        self.make()
        for bad in ({"pid": "p"}, [doc(), {"pid": 1}], [], doc(data="{not json")):
            self.send("persist", persist_body("r", bad))
        self.assertEqual(self.out("r"), ["error", "end"] * 4)
        self.assertEqual(self.store.events, [])

    def test_fields_that_are_not_columns_are_ignored(self):
        """As in the original: ``id``, ``timestamp`` and strangers are not written."""
        self.make()
        self.send("persist", persist_body("r", dict(doc(), id=4, timestamp="1999-01-01", x=[1])))
        self.assertEqual(self.out("r"), [OK, "end"])
        (event,) = self.store.events
        self.assertEqual(event[0], 1)
        self.assertEqual(event[1].year, 2020)  # the store's own time, not the document's

    def test_database_failure_is_error_then_end(self):
        self.make()
        self.store.fail_next = RuntimeError("disk full")
        self.send("persist", persist_body("r", doc()))
        self.assertEqual(self.out("r"), ["error", "end"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_read_only(self):
        self.make(read_only=True)
        self.send("persist", persist_body("r", doc()))
        self.assertEqual(self.out("r"), ["error", "end"])
        self.assertEqual(self.store.events, [])


class BadInputTests(ServiceTestCase):
    def test_unanswerable_bodies_are_logged_only(self):
        self.make()
        for channel in ("persist", "fetch", "fetch-next"):
            for body in ("not json", "[1,2]", '"end"', "{}", '{"channel": 5}', '{"channel": ""}',
                         b"\xff\xfe", None, '{"channel": "persist"}', "NaN"):
                self.send(channel, body)
        self.assertEqual(self.bus.published, [])

    def test_answerable_bad_requests(self):
        self.make()
        bodies = [
            ("persist", '{"channel": "r", "query": 1}'),
            ("persist", '{"channel": "r", "query": {"$select": {}}}'),
            ("fetch", '{"channel": "r", "query": {"$select": {"$from": "mysql.user"}}}'),
            ("fetch", '{"channel": "r", "query": {"$select": {}}, "window": 0}'),
            ("fetch", '{"channel": "r", "query": {"$select": {}}, "window": "9"}'),
        ]
        for channel, body in bodies:
            self.send(channel, body)
        self.assertEqual(self.out("r"), ["error", "end"] * len(bodies))

    def test_fields_the_request_does_not_use_are_ignored(self):
        """A client's request id or debug field costs it nothing (as in the original)."""
        self.make()
        self.send("persist", '{"channel": "p", "query": {"$insert": {"$documents": %s}}, '
                             '"requestId": 7}' % (json.dumps(doc()),))
        self.assertEqual(self.out("p"), [OK, "end"])
        self.send("fetch", '{"channel": "r", "query": {"$select": {}}, "requestId": 7}')
        self.assertEqual(len(self.out("r")), 1)
        self.send("fetch-next", '{"channel": "r", "ts": 1}')  # accepts the row, kills nothing
        (row, end) = self.out("r")
        self.assertEqual((row["pid"], end), ("p1", "end"))

    def test_acceptance_without_a_live_stream_is_never_answered(self):
        """
        No stream there (never opened, ended, or ended by an early error):
        no reply at all, or a client acknowledging every message it gets
        would ping-pong with the server forever.
        """
        self.make()
        self.send("fetch-next", '{"channel": "never"}')
        self.send("fetch-next", '{"channel": "never", "accepted": -1}')
        self.send("fetch-next", '{"channel": "never", "accepted": "x"}')
        self.send("fetch", '{"channel": "early", "query": {"$select": {"$from": "mysql.user"}}}')
        self.assertEqual(self.out("early"), ["error", "end"])
        for _ in range(3):
            self.send("fetch-next", '{"channel": "early"}')
        self.store.add()
        self.send("fetch", '{"channel": "done", "query": {"$select": {}}}')
        self.send("fetch-next", '{"channel": "done"}')
        self.assertEqual(len(self.out("done")), 2)
        self.send("fetch-next", '{"channel": "done"}')
        self.assertEqual(self.out("never"), [])
        self.assertEqual(self.out("early"), ["error", "end"])
        self.assertEqual(len(self.out("done")), 2)

    def test_too_deep_body_is_refused_without_decoding(self):
        self.make()
        deep = "[" * 65 + "]" * 65
        self.send("fetch", '{"channel": "r", "query": %s}' % (deep,))
        self.assertEqual(self.bus.published, [])
        self.send("fetch", '{"channel": "r", "query": {"$select": {}}, "x": "%s"}' % ("[" * 99,))
        self.assertEqual(self.out("r"), ["end"])  # brackets inside strings do not count

    def test_data_deeper_than_mariadb_accepts_is_refused(self):
        self.make()
        data = 1
        for _ in range(32):
            data = [data]
        self.send("persist", persist_body("r", doc(data=data)))
        self.send("persist", persist_body("ok", doc(data=data[0])))
        self.assertEqual(self.out("r"), ["error", "end"])
        self.assertEqual(self.out("ok")[1], "end")

    def test_oversized_body_is_refused_without_decoding(self):
        self.make(max_body_bytes=1000)
        self.send("persist", persist_body("r", doc(data="x" * 2000)))
        self.assertEqual(self.bus.published, [])
        self.assertEqual(self.store.events, [])

    def test_one_bad_request_does_not_touch_other_streams(self):
        self.make()
        self.store.add()
        self.store.add()
        self.send("fetch", fetch_body("good"))
        self.send("fetch", fetch_body("bad", {"$where": {"nope": 1}}))
        self.send("fetch-next", json.dumps({"channel": "good"}))
        self.assertEqual(len(self.out("good")), 2)
        self.assertEqual(self.out("bad"), ["error", "end"])


class FetchTests(ServiceTestCase):
    def setUp(self):
        self.make()
        for i in range(3):
            self.store.add(pid=f"p{i}")

    def test_rows_one_at_a_time_with_both_acceptances(self):
        self.send("fetch", fetch_body("r"))
        self.assertIn("r", self.bus.subscribed)
        self.assertEqual([m["pid"] for m in self.out("r")], ["p0"])
        self.send("fetch-next", json.dumps({"channel": "r"}))
        self.send("r", '"accepted"')
        self.assertEqual([m["pid"] if isinstance(m, dict) else m for m in self.out("r")],
                         ["p0", "p1", "p2"])
        self.send("r", self.bus.published[-1][1])  # our own echo is not an acceptance
        self.assertEqual(len(self.out("r")), 3)
        self.send("r", '"accepted"')
        self.assertEqual(self.out("r")[-1], "end")
        self.assertNotIn("r", self.service.streams)
        self.assertNotIn("r", self.bus.subscribed)

    def test_row_encoding(self):
        self.send("fetch", fetch_body("r"))
        self.assertEqual(self.bus.published[0][1],
                         '{"timestamp":"2020-04-06T11:35:18.414Z","pid":"p0","domain":"d",'
                         '"name":"n","data":"null"}')

    def test_client_end(self):
        self.send("fetch", fetch_body("r"))
        self.send("r", '"end"')
        self.assertEqual(len(self.out("r")), 1)
        self.assertEqual(self.service.streams, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout_then_late_acceptance_is_silent(self):
        self.send("fetch", fetch_body("r"))
        self.clock.advance(5.1)
        self.assertEqual(self.out("r")[-1], "timeout")
        self.send("fetch-next", json.dumps({"channel": "r"}))
        self.assertEqual(self.out("r")[-1], "timeout")
        self.assertNotIn(self.service.streams.get("r"), MACHINE.models)

    def test_busy_channel_refused_and_first_stream_ends(self):
        self.send("fetch", fetch_body("r"))
        self.send("fetch", fetch_body("r"))
        self.assertEqual(self.out("r")[1:], ["error", "end"])
        self.assertEqual(self.service.streams, {})
        self.send("persist", persist_body("r2", doc()))
        self.send("fetch", fetch_body("r2"))
        self.send("persist", persist_body("r2", doc()))
        self.assertEqual(self.out("r2")[-2:], ["error", "end"])
        self.assertEqual(len(self.store.events), 4)  # the second persist was refused

    def test_window_extension(self):
        self.send("fetch", fetch_body("r", window=2))
        self.assertEqual(len(self.out("r")), 2)
        self.send("fetch-next", json.dumps({"channel": "r", "accepted": 2}))
        self.assertEqual(self.out("r")[-1], "end")
        self.assertEqual(len(self.out("r")), 4)

    def test_window_is_capped(self):
        self.make(max_window=2)
        for _ in range(5):
            self.store.add()
        self.send("fetch", fetch_body("r", window=1000))
        self.assertEqual(len(self.out("r")), 2)

    def test_max_streams(self):
        self.make(max_streams=2)
        self.store.add()
        for channel in ("a", "b", "c"):
            self.send("fetch", fetch_body(channel))
        self.assertEqual(self.out("c"), ["error", "end"])
        self.assertEqual(set(self.service.streams), {"a", "b"})

    def test_first_row_waits_for_subscription(self):
        self.make(hold_bus=True)
        self.store.add()
        self.send("fetch", fetch_body("r"))
        self.assertEqual(self.out("r"), [])
        self.bus.release()
        self.assertEqual(len(self.out("r")), 1)

    def test_database_failure_mid_stream(self):
        self.make(page_size=1)
        self.store.add()
        self.store.add()
        self.send("fetch", fetch_body("r"))
        self.store.fail_next = RuntimeError("gone")
        self.send("r", '"accepted"')
        self.assertEqual(self.out("r")[1:], ["error", "end"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.service.streams, {})


class PagingTests(ServiceTestCase):
    def test_pages_grow_and_hold_no_more_than_one_page(self):
        self.make(page_size=64, hold_store=True)
        for i in range(200):
            self.store.add(pid=f"p{i}")
        self.send("fetch", fetch_body("r", window=1000))
        while self.store.release():
            pass
        self.assertEqual([size for _, size in self.store.reads], [32, 64, 64, 64])
        self.assertEqual(len(self.out("r")), 201)

    def test_open_stream_waiting_for_client_holds_no_pending_read(self):
        self.make(hold_store=True)
        self.store.add()
        self.store.add()
        self.send("fetch", fetch_body("r"))
        self.store.release()
        self.assertEqual(self.store.pending, [])
        self.clock.advance(1)
        self.assertEqual(self.store.pending, [])


class ShutdownTests(ServiceTestCase):
    def test_stop_waits_for_persists_and_ends_streams(self):
        self.make(hold_store=True)
        self.store.add()
        self.send("fetch", fetch_body("s"))
        self.store.release()
        self.send("persist", persist_body("p", doc()))
        d = self.service.stopService()
        self.assertNoResult(d)
        self.send("persist", persist_body("late", doc()))
        self.assertEqual(self.out("late"), ["error", "end"])
        self.store.release()
        self.successResultOf(d)
        self.assertEqual(self.out("p"), [dict(OK, insertId=2), "end"])
        self.assertEqual(self.out("s")[1:], ["error", "end"])
        self.assertFalse(self.bus.started)
        self.assertFalse(self.store.started)


class StartupHintTests(ServiceTestCase):
    def test_the_first_event_hint_is_a_valid_request_on_the_prefixed_channel(self):
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.make(channel_prefix="staging:")
        (hint,) = [e["hint"] for e in events if "hint" in e]
        command = hint.splitlines()[-1]
        self.assertTrue(command.startswith("redis-cli PUBLISH staging:persist '"))
        body = command.split("'", 1)[1].rstrip("'")
        self.send("staging:persist", body)
        self.assertEqual(self.out("reply-1"), [OK, "end"])


class EncodingTests(SynchronousTestCase):
    def test_mysql_datetime_text_in_wire_form(self):
        from eventsource.wire import format_mysql_datetime, format_timestamp
        import datetime

        for text in ("2020-04-06 11:35:18.414999", "2020-04-06 11:35:18", "1999-12-31 23:59:59.500000"):
            parsed = datetime.datetime.fromisoformat(text)
            self.assertEqual(format_mysql_datetime(text), format_timestamp(parsed))
            self.assertEqual(format_mysql_datetime(text.encode()), format_timestamp(parsed))
        self.assertEqual(format_mysql_datetime("1999-12-31 23:59:59.5"), "1999-12-31T23:59:59.500Z")


class BoundedShutdownTests(ServiceTestCase):
    def test_a_stuck_persist_does_not_hold_shutdown_forever(self):
        self.make(hold_store=True, shutdown_timeout=3)
        self.send("persist", persist_body("p", doc()))
        d = self.service.stopService()
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.successResultOf(d)
        self.assertFalse(self.store.started)
        self.store.release()  # the late answer finds its request and breaks nothing
        self.assertEqual(self.out("p")[-1], "end")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_mysql_timeouts_reach_pymysql(self):
        from eventsource.store import Store

        kwargs = Store(Config(mysql_timeout=7.5), None)._connect_kwargs()
        self.assertEqual((kwargs["read_timeout"], kwargs["write_timeout"], kwargs["connect_timeout"]),
                         (7.5, 7.5, 7.5))


class WindowedStreamTests(ServiceTestCase):
    """A windowed stream is never listened to: it accepts and ends on fetch-next."""

    def setUp(self):
        self.make()
        for i in range(5):
            self.store.add(pid=f"p{i}")

    def test_windowed_stream_is_not_subscribed(self):
        self.send("fetch", fetch_body("w", window=2))
        self.assertNotIn("w", self.bus.subscribed)
        self.assertEqual(len(self.out("w")), 2)
        # (were it delivered) "accepted" on its reply channel is not an acceptance
        self.send("w", '"accepted"')
        self.assertEqual(len(self.out("w")), 2)
        self.send("fetch-next", json.dumps({"channel": "w", "accepted": 2}))
        self.assertEqual(len(self.out("w")), 4)

    def test_end_on_fetch_next(self):
        self.send("fetch", fetch_body("w", window=2))
        self.send("w", '"end"')  # not listened to
        self.assertIn("w", self.service.streams)
        self.send("fetch-next", json.dumps({"channel": "w", "end": True}))
        self.assertEqual(self.service.streams, {})
        self.assertEqual(len(self.out("w")), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.send("fetch-next", json.dumps({"channel": "w", "end": True}))  # late: ignored
        self.assertEqual(len(self.out("w")), 2)

    def test_end_on_fetch_next_also_ends_a_version_1_stream(self):
        self.send("fetch", fetch_body("r"))
        self.assertIn("r", self.bus.subscribed)
        self.send("fetch-next", json.dumps({"channel": "r", "end": True}))
        self.assertEqual(self.service.streams, {})
        self.assertNotIn("r", self.bus.subscribed)
        self.assertEqual(len(self.out("r")), 1)

    def test_only_end_true_ends(self):
        self.send("fetch", fetch_body("w", window=2))
        for other in (False, "yes", 1, None):  # ignored, as unknown fields are: an acceptance
            self.send("fetch-next", json.dumps({"channel": "w", "end": other}))
        # 2 rows, then one more per acceptance: all 5 and "end" after the third
        self.assertEqual([m["pid"] for m in self.out("w")[:-1]], [f"p{i}" for i in range(5)])
        self.assertEqual(self.out("w")[-1], "end")
        self.send("fetch-next", json.dumps({"channel": "x", "end": True}))  # no stream: silence
        self.assertEqual(self.out("x"), [])

    def test_window_bytes_bound_what_is_in_flight(self):
        self.make(max_window_bytes=250)
        for i in range(5):
            self.store.add(pid=f"p{i}", data="x" * 100)  # rows of ~190 bytes
        self.send("fetch", fetch_body("w", window=1000))
        self.assertEqual(len(self.out("w")), 1)
        self.send("fetch-next", json.dumps({"channel": "w", "accepted": 1}))
        self.assertEqual(len(self.out("w")), 2)


class EchoBudgetServiceTests(ServiceTestCase):
    """Version 1 streams share the echo budget; windowed streams do not use it."""

    def test_version_1_streams_wait_for_the_budget(self):
        self.make(max_echo_bytes=450)  # rows of ~190 bytes: two fit
        for i in range(4):
            self.store.add(pid=f"p{i}", data="x" * 100)
        for channel in ("a", "b", "c"):
            self.send("fetch", fetch_body(channel))
        self.assertEqual([len(self.out(c)) for c in "abc"], [1, 1, 0])
        self.send("w", "")  # noise
        self.send("fetch", fetch_body("w", window=10))
        self.assertEqual(len(self.out("w")), 5)  # not held back: its rows never echo
        self.send("a", '"accepted"')
        self.clock.advance(0)
        self.assertEqual([len(self.out(c)) for c in "abc"], [1, 1, 1])
        self.assertEqual(self.service.echo_budget.used,
                         sum(len(body) for name, body in self.bus.published
                             if name in "bc" and body.startswith("{")))


class BytePagingTests(ServiceTestCase):
    """Pages are bounded in bytes (plus one row), and their LIMIT follows the rows' sizes."""

    def test_pages_hold_at_most_their_bytes_plus_one_row(self):
        self.make(page_bytes=1000, hold_store=True)
        for i in range(40):
            self.store.add(pid=f"p{i}", data="x" * (300 if 10 <= i < 20 else 10))
        self.send("fetch", fetch_body("w", window=1000))
        while self.store.pending:
            self.store.release(1)
            self.send("fetch-next", json.dumps({"channel": "w", "accepted": 1000}))
        rows = [m for m in self.out("w") if isinstance(m, dict)]
        self.assertEqual([m["pid"] for m in rows], [f"p{i}" for i in range(40)])
        self.assertEqual(self.out("w")[-1], "end")
        sizes = [size for _, size in self.store.reads]
        # 32 rows asked first: the byte budget cut the page; the LIMIT then
        # shrinks to what 1000 bytes fit of the largest row seen
        self.assertEqual(sizes[0], 32)
        self.assertLess(max(sizes[1:]), 32)

    def test_a_page_never_exceeds_its_budget_plus_one_row(self):
        from eventsource.store import Pager

        class Plan:
            keyset, limit, offset, keyset_start, encodings = True, None, 0, 0, ()

        store = MemoryStore(page_size=1000)
        for i in range(50):
            store.add(pid=f"p{i}", data="x" * (50 + 37 * (i % 7)))
        pager = Pager(store, Plan(), 1000, 1000)
        seen = []
        while True:
            bodies, exhausted = self.successResultOf(pager.next_page())
            if bodies:
                self.assertLess(sum(map(len, bodies)) - len(bodies[-1]), 1000)
            seen += bodies
            if exhausted:
                break
        self.assertEqual(len(seen), 50)

    def test_first_page_sized_from_the_rows_read_last(self):
        from eventsource.store import Pager, RowSizeHint

        class Plan:
            keyset, limit, offset, keyset_start, encodings = True, None, 0, 0, ()

        store = MemoryStore(page_size=1000)
        for i in range(10):
            store.add(pid=f"p{i}", data="x" * 3000)
        hint = RowSizeHint()
        first = Pager(store, Plan(), 1000, 10000, hint)
        self.successResultOf(first.next_page())
        second = Pager(store, Plan(), 1000, 10000, hint)
        self.successResultOf(second.next_page())
        # 32 rows asked of a table of 3 KB rows, 4 kept; then 3 (10 KB // 3 KB)
        self.assertEqual(store.reads, [(0, 32), (0, 3)])
