"""
Subscriptions with in-memory Redis and MySQL doubles and a Clock: the
machine (markers, window, timeout, heartbeat, a client gone), the seam
between history and live events (the buffer, its overflow, a client that
falls behind), the tailer (one read per poll, joins during a read, the
index, the SQL matcher path) and the service's refusals.
"""

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from eventsource import subscription as subscription_module
from eventsource.config import Config
from eventsource.matcher import Matcher
from eventsource.service import EventSourceService
from eventsource.subscription import MACHINE, SubscriptionState
from eventsource.testing import MemoryBus, MemoryStore


def subscribe_body(channel, where=None, start="start", window=None, **extra):
    select = {} if where is None else {"$where": where}
    body = {"v": 2, "channel": channel, "query": {"$select": select}, "from": start}
    if window is not None:
        body["window"] = window
    body.update(extra)
    return json.dumps(body)


def persist_body(channel, *pids):
    documents = [{"pid": pid, "domain": "d", "name": "n", "data": {"pid": pid}} for pid in pids]
    return json.dumps({"v": 2, "channel": channel,
                       "query": {"$insert": {"$documents": documents}}})


class SubscriptionTestCase(SynchronousTestCase):
    def make(self, hold_store=False, **config):
        config.setdefault("tail_interval", 0.1)
        self.clock = Clock()
        self.bus = MemoryBus()
        self.config = Config(**config)
        self.store = MemoryStore(hold=hold_store, page_size=self.config.page_size)
        self.service = EventSourceService(self.config, self.clock, bus=self.bus.attach,
                                          store=self.store)
        self.service.startService()
        self.assertTrue(self.successResultOf(self.service.ready))
        self.addCleanup(self.stop)
        return self.service

    def stop(self):
        if self.service.running:
            self.service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def send(self, kind, body):
        self.service.message_received(kind, body)

    def subscribe(self, channel="s", where=None, start="start", window=None, **extra):
        self.send("subscribe", subscribe_body(channel, where, start, window, **extra))
        self.clock.advance(0)  # (the tailer reads on the next turn)

    def persist(self, *pids, channel="w"):
        self.send("persist", persist_body(channel, *pids))
        self.clock.advance(0)

    def accept(self, channel="s", count=1):
        self.send("fetch-next", json.dumps({"channel": channel, "accepted": count}))

    def out(self, channel="s"):
        """What the client got: rows as their positions, markers as dicts, words as words."""
        shown = []
        for message in self.bus.messages(channel):
            if isinstance(message, dict) and "position" in message:
                shown.append(message["position"])
            else:
                shown.append(message)
        return shown

    def release(self, index=0):
        """Answer the held store request at ``index`` (0: the oldest)."""
        d, compute = self.store.pending.pop(index)
        d.callback(compute())
        self.clock.advance(0)


class HistoryThenLiveTests(SubscriptionTestCase):
    def test_history_then_caught_up_then_live_events_in_order(self):
        self.make()
        for pid in ("a", "b", "c"):
            self.store.add(pid)
        self.subscribe()
        self.assertEqual(self.out(), [1, 2, 3, {"caughtUp": 3}])
        self.persist("d", "e")
        self.assertEqual(self.out(), [1, 2, 3, {"caughtUp": 3}, 4, 5])
        (first,) = [m for m in self.bus.messages("s")[:1]]
        self.assertEqual(list(first), ["position", "eventId", "pid", "version", "domain",
                                       "name", "timestamp", "data"])

    def test_live_rows_are_the_history_rows(self):
        """An event read live and the same event read as history are the same body."""
        self.make()
        self.subscribe("live")
        self.persist("a")
        self.subscribe("history")
        live = [body for channel, body in self.bus.published if channel == "live"]
        history = [body for channel, body in self.bus.published if channel == "history"]
        self.assertEqual(live[1], history[0])

    def test_from_end_skips_history(self):
        self.make()
        self.store.add("a")
        self.store.add("b")
        self.subscribe(start="end")
        self.assertEqual(self.out(), [{"caughtUp": 2}])
        self.persist("c")
        self.assertEqual(self.out(), [{"caughtUp": 2}, 3])

    def test_from_a_position_is_exclusive(self):
        self.make()
        for pid in "abcd":
            self.store.add(pid)
        self.subscribe(start=2)
        self.assertEqual(self.out(), [3, 4, {"caughtUp": 4}])

    def test_from_beyond_the_end_skips_the_events_up_to_it(self):
        self.make()
        self.store.add("a")
        self.subscribe(start=3)
        self.assertEqual(self.out(), [{"caughtUp": 3}])
        self.persist("b", "c", "d")
        self.assertEqual(self.out(), [{"caughtUp": 3}, 4])

    def test_window_bounds_rows_not_markers(self):
        self.make()
        for pid in "abc":
            self.store.add(pid)
        self.subscribe(window=2)
        # the marker waits behind the row the window holds back
        self.assertEqual(self.out(), [1, 2])
        self.accept(count=1)
        self.assertEqual(self.out(), [1, 2, 3, {"caughtUp": 3}])
        self.persist("d")
        self.assertEqual(self.out(), [1, 2, 3, {"caughtUp": 3}])
        self.accept(count=2)
        self.assertEqual(self.out(), [1, 2, 3, {"caughtUp": 3}, 4])

    def test_window_is_bounded_in_bytes_one_row_always_going(self):
        self.make(max_window_bytes=460)
        for pid in "abcde":
            self.store.add(pid, data={"pad": "x" * 60})
        self.subscribe(window=100)
        size = len(self.bus.published[0][1])
        self.assertGreater(size, 200)
        self.assertEqual(self.out(), [1, 2])           # 2 rows fit in 460 bytes, not 3
        self.accept(count=1)
        self.assertEqual(self.out(), [1, 2, 3])
        self.accept(count=2)
        self.assertEqual(self.out(), [1, 2, 3, 4, 5, {"caughtUp": 5}])
        self.store.add("f", data={"pad": "y" * 1000})   # larger than the budget: alone
        self.clock.advance(0.1)
        self.assertEqual(self.out()[-1], {"caughtUp": 5})
        self.accept(count=2)
        self.assertEqual(self.out()[-1], 6)

    def test_window_is_capped_by_max_window(self):
        self.make(max_window=2)
        for pid in "abc":
            self.store.add(pid)
        self.subscribe(window=100)
        self.assertEqual(self.out(), [1, 2])

    def test_history_is_read_a_page_at_a_time_as_the_client_accepts(self):
        self.make(page_size=4)
        for i in range(10):
            self.store.add(f"p{i}")
        self.subscribe(window=3)
        self.assertEqual(self.out(), [1, 2, 3])
        for _ in range(7):
            self.accept()
        self.assertEqual(self.out(), list(range(1, 11)) + [{"caughtUp": 10}])
        # (high_water, then pages of 4, 4 and 2 rows after positions 0, 4 and 8)
        self.assertEqual([position for position, _ in self.store.reads], [0, 4, 8])

    def test_the_next_page_is_read_while_the_client_takes_the_last(self):
        """
        Read ahead: the next page of history is asked for once no more than
        half the last page (or a window) is left to send, not once the
        outbox is empty, and never more than one read at a time.
        """
        self.make(hold_store=True, page_size=8)
        for i in range(40):
            self.store.add(f"p{i}")
        self.subscribe(window=2)
        self.release()                              # (the tail's first read)
        while self.store.pending:
            self.release()                          # (high water, first page)
            if len(self.store.reads) == 1:
                break
        self.assertEqual(self.out(), [1, 2])
        # the first pages double from the store's first size; find one of 8
        subscription = self.service.subscriptions["s"]
        reads = len(self.store.reads)
        accepted = 0
        while len(self.store.reads) == reads:
            self.accept()
            accepted += 1
            self.assertLess(accepted, 40, "no read ahead")
        # (asked for while rows it has already read wait to go out)
        self.assertGreater(subscription.waiting_events, 0)
        self.assertEqual(len(self.store.pending), 1)
        for _ in range(3):
            self.accept()
        self.assertEqual(len(self.store.pending), 1, "a second read before the first came back")
        self.release()
        for _ in range(60):
            self.accept()
            if self.store.pending:
                self.release()
        self.assertEqual(self.out(), list(range(1, 41)) + [{"caughtUp": 40}])

    def test_client_end_stops_it_and_frees_it(self):
        self.make()
        self.subscribe()
        self.send("fetch-next", json.dumps({"channel": "s", "end": True}))
        self.persist("a")
        self.assertEqual(self.out(), [{"caughtUp": 0}])
        self.assertEqual(self.service.subscriptions, {})
        self.assertEqual(len(self.service.tailer), 0)


class SeamTests(SubscriptionTestCase):
    def test_events_appended_while_history_is_read_come_after_it_once(self):
        self.make(hold_store=True)
        for pid in "abc":
            self.store.add(pid)
        self.subscribe()
        self.release()          # the tailer's position: 3
        self.assertEqual(len(self.store.pending), 1)   # the history page, held
        self.store.add("d")     # (another process's appends)
        self.store.add("e")
        self.clock.advance(0.1)  # the tailer's next read
        self.release(1)          # the tail read answers before the history page
        self.assertEqual(self.out(), [])
        self.assertEqual(self.service.subscriptions["s"].held_bytes > 0, True)
        self.release()           # the history page: 1..3
        self.assertEqual(self.out(), [1, 2, 3, 4, 5, {"caughtUp": 5}])

    def test_an_overflowing_buffer_is_read_from_the_table_again(self):
        self.make(hold_store=True, max_subscription_bytes=1)
        for pid in "abc":
            self.store.add(pid)
        self.subscribe()
        self.release()
        self.store.add("d")
        self.store.add("e")
        self.clock.advance(0.1)
        self.release(1)          # 4 and 5 handed over: too many bytes, dropped
        self.assertEqual(self.service.subscriptions["s"].held_bytes, 0)
        self.release()           # history 1..3; a new round up to 5
        self.assertEqual(self.out(), [1, 2, 3])
        self.release()           # history 4..5
        self.assertEqual(self.out(), [1, 2, 3, 4, 5, {"caughtUp": 5}])
        self.assertEqual([position for position, _ in self.store.reads], [0, 3])

    def test_a_client_behind_falls_back_to_the_table_and_misses_nothing(self):
        self.make(max_subscription_bytes=1000)
        self.subscribe(window=1)
        self.assertEqual(self.out(), [{"caughtUp": 0}])
        for i in range(20):
            self.persist(f"p{i}")
        subscription = self.service.subscriptions["s"]
        self.assertGreater(subscription.refills, 0)
        for _ in range(20):
            self.accept()
        self.assertEqual(self.out(), [{"caughtUp": 0}] + list(range(1, 21)))
        self.assertEqual(subscription.state, SubscriptionState.LIVE)

    def test_a_join_during_a_tail_read_starts_after_that_read(self):
        self.make(hold_store=True)
        self.subscribe("first", start="end")
        self.release()  # high water 0
        self.store.add("a")
        self.clock.advance(0.1)   # a tail read, held
        self.subscribe("second", start="end")
        self.release()            # the read: event 1, for "first" only
        # "second" joined at the position after that read: 1 is not after its start
        self.assertEqual(self.out("first"), [{"caughtUp": 0}, 1])
        self.assertEqual(self.out("second"), [{"caughtUp": 1}])
        self.persist("b")
        self.store.release()
        self.assertEqual(self.out("second"), [{"caughtUp": 1}, 2])


class TimerTests(SubscriptionTestCase):
    def test_unaccepted_row_times_out(self):
        self.make(row_timeout=5)
        self.store.add("a")
        self.subscribe()
        self.clock.advance(4.9)
        self.assertEqual(self.out(), [1, {"caughtUp": 1}])
        self.clock.advance(0.1)
        self.assertEqual(self.out(), [1, {"caughtUp": 1}, "timeout"])
        self.persist("b")
        self.assertEqual(self.out()[-1], "timeout")
        self.assertEqual(len(self.service.tailer), 0)

    def test_heartbeat_while_live_and_idle(self):
        self.make(heartbeat=15)
        self.subscribe()
        self.clock.advance(14.9)
        self.assertEqual(self.out(), [{"caughtUp": 0}])
        self.clock.advance(0.1)
        self.assertEqual(self.out(), [{"caughtUp": 0}, {"heartbeat": 0}])
        self.clock.advance(10)
        self.persist("a")         # activity postpones the next one
        self.accept()
        self.clock.advance(14.9)
        self.assertEqual(self.out(), [{"caughtUp": 0}, {"heartbeat": 0}, 1])
        self.clock.advance(0.1)
        self.assertEqual(self.out(), [{"caughtUp": 0}, {"heartbeat": 0}, 1, {"heartbeat": 1}])

    def test_heartbeat_tells_the_tail_position_for_a_quiet_filter(self):
        self.make(heartbeat=15)
        self.subscribe(where={"pid": "mine"})
        self.persist("other", "other")
        self.clock.advance(15)
        self.assertEqual(self.out(), [{"caughtUp": 0}, {"heartbeat": 2}])

    def test_no_heartbeat_overtakes_rows_held_by_the_window(self):
        self.make(heartbeat=15, row_timeout=100)
        self.subscribe(window=1)
        self.persist("a", "b")
        self.clock.advance(30)
        self.assertEqual(self.out(), [{"caughtUp": 0}, 1])
        self.accept()
        self.assertEqual(self.out(), [{"caughtUp": 0}, 1, 2])

    def test_a_client_gone_is_noticed_at_the_heartbeat(self):
        self.make(heartbeat=15)
        self.subscribe()
        self.bus.unheard.add("s")
        self.clock.advance(15)
        self.assertEqual(self.service.subscriptions, {})
        self.assertEqual(len(self.service.tailer), 0)
        self.persist("a")
        # the heartbeat nobody heard was the last message
        self.assertEqual(self.out(), [{"caughtUp": 0}, {"heartbeat": 0}])


class ServiceTests(SubscriptionTestCase):
    def assertError(self, channel, code):
        messages = self.bus.messages(channel)
        self.assertEqual(len(messages), 2, messages)
        self.assertEqual(messages[1], "end")
        self.assertEqual(messages[0]["error"]["code"], code, messages[0])
        return messages[0]["error"]["message"]

    def test_version_2_only(self):
        self.make()
        self.send("subscribe", json.dumps({"channel": "s", "query": {"$select": {}}}))
        self.assertIn('"v": 2', self.assertError("s", "badRequest"))

    def test_only_where_and_from_in_the_select(self):
        self.make()
        for key, value in (("$orderBy", "position"), ("$limit", 1), ("$columns", ["pid"]),
                           ("$groupBy", "pid"), ("$offset", 1)):
            channel = f"s{key}"
            self.send("subscribe", json.dumps({"v": 2, "channel": channel,
                                               "query": {"$select": {key: value}}}))
            self.assertIn(key, self.assertError(channel, "badRequest"))

    def test_other_table_and_unknown_column_are_refused(self):
        self.make()
        self.subscribe("t", where=None, **{})
        self.send("subscribe", json.dumps({"v": 2, "channel": "x",
                                           "query": {"$select": {"$from": "other"}}}))
        self.assertError("x", "refused")
        self.subscribe("y", where={"id": 1})
        self.assertError("y", "refused")

    def test_bad_fields(self):
        self.make()
        for channel, extra in (("a", {"from": -1}), ("b", {"from": "later"}),
                               ("c", {"window": 0}), ("d", {"other": 1}),
                               ("e", {"from": True})):
            body = {"v": 2, "channel": channel, "query": {"$select": {}}}
            body.update(extra)
            self.send("subscribe", json.dumps(body))
            self.assertError(channel, "badRequest")
        self.assertEqual(self.service.subscriptions, {})

    def test_busy_channel_ends_the_subscription_there(self):
        self.make()
        self.subscribe()
        self.subscribe()
        self.assertEqual(self.out()[0], {"caughtUp": 0})
        self.assertEqual(self.bus.messages("s")[1]["error"]["code"], "busy")
        self.assertEqual(self.out()[2:], ["end"])
        self.assertEqual(self.service.subscriptions, {})

    def test_too_many_subscriptions(self):
        self.make(max_subscriptions=2, max_streams=1)
        self.subscribe("a")
        self.subscribe("b")
        self.subscribe("c")
        self.assertError("c", "busy")
        # (beside the streams: a fetch still has its own limit)
        self.send("fetch", json.dumps({"v": 2, "channel": "f", "query": {"$select": {}}}))
        self.assertEqual(self.bus.messages("f"), ["end"])

    def test_shutdown_ends_subscriptions_unavailable(self):
        self.make()
        self.subscribe()
        self.service.stopService()
        messages = self.bus.messages("s")
        self.assertEqual(messages[1]["error"]["code"], "unavailable")
        self.assertEqual(messages[2:], ["end"])

    def test_redis_lost_ends_subscriptions(self):
        self.make()
        self.subscribe()
        self.bus.lose_connection()
        self.assertEqual(self.bus.messages("s")[1]["error"]["code"], "unavailable")
        self.assertEqual(self.service.subscriptions, {})

    def test_a_failed_tail_read_ends_every_subscription(self):
        import pymysql

        self.make()
        self.subscribe("a")
        self.subscribe("b", start="end")
        self.store.add("x")   # (another process's)
        self.store.fail_next = pymysql.err.OperationalError(2013, "Lost connection")
        self.clock.advance(0.1)
        for channel in "ab":
            self.assertEqual(self.bus.messages(channel)[1]["error"]["code"], "unavailable")
        self.assertEqual(self.service.subscriptions, {})

    def test_a_failed_history_read_ends_it(self):
        import pymysql

        self.make(hold_store=True)
        self.store.add("a")
        self.subscribe()
        self.release()   # the high water
        d, _ = self.store.pending.pop()  # the history page fails
        d.errback(pymysql.err.OperationalError(2003, "Can't connect"))
        self.assertEqual(len(self.flushLoggedErrors(pymysql.err.OperationalError)), 1)
        self.assertEqual(self.bus.messages("s")[0]["error"]["code"], "unavailable")
        self.assertEqual(self.bus.messages("s")[1:], ["end"])
        self.assertEqual(self.service.subscriptions, {})

    def test_nothing_keeps_an_ended_subscription(self):
        """Neither the service, nor the tailer, nor the shared machine (never registered with)."""
        import gc
        import weakref

        self.make()
        refs = []
        for i in range(5):
            self.subscribe(f"s{i}")
            refs.append(weakref.ref(self.service.subscriptions[f"s{i}"]))
            self.send("fetch-next", json.dumps({"channel": f"s{i}", "end": True}))
        self.assertEqual(self.service.subscriptions, {})
        self.assertEqual(MACHINE.models, [])
        gc.collect()
        self.assertEqual([ref() for ref in refs], [None] * 5)


class TailerTests(SubscriptionTestCase):
    def test_no_read_without_subscriptions(self):
        self.make()
        self.persist("a")
        self.clock.advance(10)
        self.assertEqual(self.store.tail_reads, [])

    def test_with_no_subscription_left_the_tailer_starts_again_at_the_end(self):
        """Events appended while nobody subscribes are never read by the tailer."""
        self.make()
        self.subscribe("a", start="end")
        self.send("fetch-next", json.dumps({"channel": "a", "end": True}))
        for _ in range(5):
            self.persist("x")
        self.subscribe("b", start="end")
        self.persist("y")
        self.assertEqual(self.out("b"), [{"caughtUp": 5}, 6])
        self.assertEqual([after for after, _ in self.store.tail_reads], [5])

    def test_one_read_per_commit_for_all_subscriptions(self):
        self.make()
        for i in range(50):
            self.subscribe(f"s{i}", where={"pid": f"p{i}"}, start="end")
        reads = len(self.store.tail_reads)
        self.persist("p7", "p9")
        self.assertEqual(len(self.store.tail_reads), reads + 1)
        self.assertEqual(self.out("s7"), [{"caughtUp": 0}, 1])
        self.assertEqual(self.out("s9"), [{"caughtUp": 0}, 2])
        self.assertEqual(self.out("s8"), [{"caughtUp": 0}])

    def test_other_processes_appends_are_read_every_interval(self):
        self.make(tail_interval=0.5)
        self.subscribe()
        self.store.add("a")
        self.clock.advance(0.4)
        self.assertEqual(self.out(), [{"caughtUp": 0}])
        self.clock.advance(0.1)
        self.assertEqual(self.out(), [{"caughtUp": 0}, 1])

    def test_a_full_read_is_followed_by_another_at_once(self):
        self.make(page_size=3)
        self.subscribe(start="end", window=100)
        for _ in range(7):
            self.store.add("a")
        self.clock.advance(0.1)
        self.assertEqual(self.out(), [{"caughtUp": 0}, 1, 2, 3, 4, 5, 6, 7])
        self.assertEqual([after for after, _ in self.store.tail_reads[-3:]], [0, 3, 6])

    def test_a_commit_during_a_read_is_read_right_after_it(self):
        self.make(hold_store=True)
        self.subscribe(start="end")
        self.release()                      # the high water: 0
        self.persist("a")
        self.release()                      # the append: the tailer reads at once (held)
        self.persist("b")
        self.release(1)                     # the second append, while the read is held
        reads = len(self.store.tail_reads)
        self.release()                      # the first read answers: event 1 ...
        self.assertEqual(len(self.store.tail_reads), reads + 1)   # ... and 2 is read at once
        self.release()
        self.assertEqual(self.out(), [{"caughtUp": 0}, 1, 2])

    def test_tenant_subscriptions_stay_in_their_namespace(self):
        self.make(channel_prefix="es:", tenants=True)
        self.send("es:t1:subscribe", subscribe_body("es:t1:s", start="end"))
        self.send("es:t1:subscribe", subscribe_body("es:t2:s", start="end"))
        self.clock.advance(0)
        self.assertEqual(list(self.service.subscriptions), ["es:t1:s"])
        self.assertEqual(self.bus.messages("es:t2:s"), [])
        self.send("es:t1:fetch-next", json.dumps({"channel": "es:t1:s", "end": True}))
        self.assertEqual(self.service.subscriptions, {})

    def test_events_a_candidate_does_not_match_are_not_sent(self):
        self.make()
        self.subscribe(where={"pid": "a", "version": {"$gte": 1}}, start="end")
        self.persist("a", "b", "a")
        self.assertEqual(self.out(), [{"caughtUp": 0}, 3])

    def test_sql_matchers_are_decided_by_one_statement_for_all(self):
        self.make()
        asked = []

        def answer(conditions, positions):
            asked.append((conditions, positions))
            return {position: tuple(position % 2 == 0 for _ in conditions)
                    for position in positions}

        self.store.match_answer = answer
        self.subscribe("like", where={"name": {"$like": "n%"}}, start="end")
        self.subscribe("data", where={"pid": "a", "data": {"$ne": "x"}}, start="end")
        self.subscribe("plain", where={"pid": "a"}, start="end")
        self.persist("a", "b", "a", "a")
        self.assertEqual(len(asked), 1)
        conditions, positions = asked[0]
        self.assertEqual(len(conditions), 2)
        self.assertEqual(positions, [1, 2, 3, 4])
        self.assertEqual(self.out("like"), [{"caughtUp": 0}, 2, 4])
        self.assertEqual(self.out("data"), [{"caughtUp": 0}, 4])
        self.assertEqual(self.out("plain"), [{"caughtUp": 0}, 1, 3, 4])


class MarkerTests(SynchronousTestCase):
    def test_position_of_a_row(self):
        body = '{"position":1017,"eventId":"x","pid":"a"}'
        self.assertEqual(subscription_module.position_of(body), 1017)

    def test_matcher_default_matches_all(self):
        self.assertTrue(Matcher().matches((1,)))


class ReadAheadBoundTests(SynchronousTestCase):
    def test_rows_held_by_the_byte_window_are_never_read_past(self):
        """
        However many rows the window allows, a subscription whose history
        waits for room in the byte window reads no more pages: it holds at
        most one and a half pages' bytes.
        """
        from eventsource.subscription import Subscription

        clock = Clock()
        asked = []
        published = []
        position = [0]

        def read_history(subscription, after, high_water, new_round):
            asked.append(after)

        subscription = Subscription.open(
            "s", start=0, window=1000, window_bytes=1000, buffer_bytes=1 << 20,
            row_timeout=30, heartbeat=15, clock=clock,
            publish=lambda channel, body: published.append(body),
            publish_counted=lambda channel, body: None, read_history=read_history,
            position=lambda: 10_000, closed=lambda s: None)
        self.addCleanup(subscription.end)
        subscription.join(10_000)
        answered = 0
        while answered < len(asked) and answered < 20:  # (every page asked for, answered)
            page = []
            for _ in range(2):
                position[0] += 1
                page.append('{"position":%d,"data":"%s"}' % (position[0], "x" * 580))
            subscription.receive(page, False)
            answered += 1
        self.assertEqual(answered, 2)  # (the first page, and one read ahead)
        self.assertEqual(len(published), 1)
        self.assertEqual(subscription.held_bytes, 3 * len(page[0]))  # (1.5 pages)
