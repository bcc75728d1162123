"""
The counts (:mod:`eventsource.stats`) and the Prometheus collector
(:mod:`eventsource.metrics`), on the service with in-memory doubles and a
Clock: every metric moves when its event happens, labels stay in their fixed
sets whatever a client sends, and two servers' registries stay apart.
"""

import json

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from eventsource import metrics, stats
from eventsource.store import StatementTimeLimit, StoreStopping
from tests.test_service import ServiceTestCase, doc, fetch_body, persist_body


def value(registry, name, **labels):
    """The sample's value (0 when the registry has no such sample)."""
    found = registry.get_sample_value(name, labels)
    return 0 if found is None else found


class HistogramTests(SynchronousTestCase):
    def test_buckets_are_cumulative_and_le_inclusive(self):
        histogram = stats.Histogram([1, 2, 5])
        for observed in (0.5, 1, 1.5, 2, 7):
            histogram.observe(observed)
        self.assertEqual(histogram.cumulative(),
                         [(1, 2), (2, 4), (5, 4), (float("inf"), 5)])
        self.assertEqual(histogram.count, 5)
        self.assertEqual(histogram.sum, 12.0)


class RequestCountTests(ServiceTestCase):
    """eventsource_requests_total{kind, result}: every request counted once, by outcome."""

    def setUp(self):
        self.make(hold_store=False)
        self.registry, _ = metrics.make_registry(self.service, process=False)

    def requests(self, kind, result):
        return value(self.registry, "eventsource_requests_total", kind=kind, result=result)

    def test_persist_ok_and_events_written(self):
        self.send("persist", persist_body("r1", [doc(), doc()]))
        self.send("persist", persist_body("r2", doc()))
        self.assertEqual(self.requests("persist", "ok"), 2)
        self.assertEqual(value(self.registry, "eventsource_events_written_total"), 3)
        self.assertEqual(value(self.registry, "eventsource_append_latency_seconds_count"), 2)

    def test_persist_the_database_refused_is_failed(self):
        self.store.fail_next = RuntimeError("no")
        self.send("persist", persist_body("r", doc()))
        self.assertEqual(self.out("r"), ["error", "end"])
        self.assertEqual(self.requests("persist", "failed"), 1)
        self.assertEqual(value(self.registry, "eventsource_events_written_total"), 0)
        self.assertEqual(value(self.registry, "eventsource_append_latency_seconds_count"), 0)
        self.flushLoggedErrors(RuntimeError)

    def test_refused_unanswerable_and_ignored(self):
        self.send("persist", persist_body("r", {"pid": 1}))          # invalid document
        self.send("fetch", fetch_body("f", {"$where": {"nope": 1}}))   # unknown column
        self.send("fetch", "{not json")                                 # no reply channel
        self.send("persist", json.dumps({"query": {}}))                 # no reply channel
        self.send("fetch-next", json.dumps({"channel": "gone"}))        # no stream there
        self.send("fetch-next", "[]")                                   # bad, and no stream
        self.assertEqual(self.requests("persist", "refused"), 1)
        self.assertEqual(self.requests("fetch", "refused"), 1)
        self.assertEqual(self.requests("fetch", "unanswerable"), 1)
        self.assertEqual(self.requests("persist", "unanswerable"), 1)
        self.assertEqual(self.requests("fetch-next", "ignored"), 2)

    def test_busy_channel_read_only_and_too_many_streams(self):
        self.store.add()
        self.send("fetch", fetch_body("f"))
        self.send("fetch", fetch_body("f"))          # busy: ends the stream too
        self.send("persist", persist_body("f2", doc()))
        self.send("fetch", fetch_body("f2"))
        self.send("persist", persist_body("f2", doc()))  # busy
        self.assertEqual(self.requests("fetch", "ok"), 2)
        self.assertEqual(self.requests("fetch", "refused"), 1)
        self.assertEqual(self.requests("persist", "refused"), 1)
        self.make(read_only=True, max_streams=1)
        self.registry, _ = metrics.make_registry(self.service, process=False)
        self.store.add()
        self.send("persist", persist_body("r", doc()))
        self.send("fetch", fetch_body("a"))
        self.send("fetch", fetch_body("b"))
        self.assertEqual(self.requests("persist", "refused"), 1)
        self.assertEqual(self.requests("fetch", "refused"), 1)
        self.assertEqual(self.requests("fetch", "ok"), 1)

    def test_version_2_conflicts_and_repeats(self):
        """A refused expected version or event id is a conflict; a repeat writes no event."""
        event_id = "0192f7b0-8c4e-7cc1-9f0e-2b6a3c1d5e4f"

        def persist2(channel, documents, **fields):
            return json.dumps(dict(fields, v=2, channel=channel,
                                   query={"$insert": {"$documents": documents}}))

        self.send("persist", persist2("a", [doc(eventId=event_id)], expectedVersion="noStream"))
        self.send("persist", persist2("b", [doc(eventId=event_id)], expectedVersion="noStream"))
        self.send("persist", persist2("c", [doc()], expectedVersion="noStream"))
        self.send("persist", persist2("d", [doc("other", eventId=event_id)]))
        self.assertEqual(self.out("b")[0]["duplicate"], True)
        self.assertEqual(self.out("c")[0]["error"]["code"], "wrongExpectedVersion")
        self.assertEqual(self.out("d")[0]["error"]["code"], "idempotencyConflict")
        self.assertEqual(self.requests("persist", "ok"), 2)
        self.assertEqual(self.requests("persist", "conflict"), 2)
        self.assertEqual(self.requests("persist", "failed"), 0)
        self.assertEqual(value(self.registry, "eventsource_events_written_total"), 1)

    def test_fetch_next_on_a_live_stream_is_ok(self):
        self.store.add()
        self.store.add()
        self.send("fetch", fetch_body("f", window=1))
        self.send("fetch-next", json.dumps({"channel": "f"}))
        self.assertEqual(self.requests("fetch-next", "ok"), 1)

    def test_while_stopping_requests_are_refused_and_acks_ignored(self):
        self.service.stopService()
        self.send("persist", persist_body("r", doc()))
        self.send("fetch-next", json.dumps({"channel": "x"}))
        self.assertEqual(self.requests("persist", "refused"), 1)
        self.assertEqual(self.requests("fetch-next", "ignored"), 1)

    def test_only_known_label_values(self):
        """A tenant's request channel counts under its kind; no channel becomes a label."""
        counts = self.service.stats
        counts.request("es:tenant-a:fetch-next", "ignored")
        counts.request("es:tenant-b:persist", "unanswerable")
        counts.request("whatever:channel", "refused")
        counts.request("fetch", "nonsense")
        self.assertEqual(self.requests("fetch-next", "ignored"), 1)
        self.assertEqual(self.requests("persist", "unanswerable"), 1)
        self.assertEqual(self.requests("other", "refused"), 1)
        self.assertEqual(self.requests("fetch", "other"), 1)
        families = {f.name: f for f in text_string_to_metric_families(
            generate_latest(self.registry).decode())}
        kinds = {s.labels["kind"] for s in families["eventsource_requests"].samples}
        results = {s.labels["result"] for s in families["eventsource_requests"].samples}
        self.assertEqual(kinds, {"persist", "fetch", "fetch-next", "subscribe", "other"})
        self.assertLessEqual(results, set(stats.RESULTS) | {"other"})


class StreamCountTests(ServiceTestCase):
    """Open streams by state, closed streams by state, rows sent and accepted, first row."""

    def test_streams_and_rows(self):
        self.make(hold_store=True, row_timeout=5)
        registry, _ = metrics.make_registry(self.service, process=False)
        for _ in range(3):
            self.store.add()
        self.send("fetch", fetch_body("a", window=2))
        self.send("fetch", fetch_body("b"))
        self.send("fetch", fetch_body("c"))
        self.assertEqual(value(registry, "eventsource_open_streams", state="awaiting-row"), 3)
        self.clock.advance(0.004)
        self.store.release()
        self.assertEqual(value(registry, "eventsource_first_row_latency_seconds_count"), 3)
        self.assertEqual(value(registry, "eventsource_first_row_latency_seconds_bucket",
                               le="0.0025"), 0)
        self.assertEqual(value(registry, "eventsource_first_row_latency_seconds_bucket",
                               le="0.005"), 3)
        # a: 2 rows out (window 2), b and c: one row each, all waiting for their clients
        self.assertEqual(value(registry, "eventsource_open_streams", state="awaiting-accept"), 3)
        self.assertEqual(value(registry, "eventsource_rows_sent_total"), 4)
        self.assertEqual(value(registry, "eventsource_rows_accepted_total"), 0)
        self.send("fetch-next", json.dumps({"channel": "a", "accepted": 2}))  # a: last row, end
        self.send("b", '"accepted"')  # b: its second row
        self.assertEqual(value(registry, "eventsource_rows_accepted_total"), 3)
        self.assertEqual(value(registry, "eventsource_streams_closed_total", state="ended"), 1)
        self.send("c", '"end"')
        self.clock.advance(5.1)  # b's second row is never accepted
        self.store.release()
        self.assertEqual(value(registry, "eventsource_streams_closed_total", state="ended"), 2)
        self.assertEqual(value(registry, "eventsource_streams_closed_total",
                               state="timed-out"), 1)
        self.assertEqual(value(registry, "eventsource_open_streams", state="awaiting-row"), 0)
        self.assertEqual(value(registry, "eventsource_open_streams", state="awaiting-accept"), 0)
        # the counts stay once their streams are gone
        self.assertEqual(value(registry, "eventsource_rows_sent_total"), 6)
        self.assertEqual(value(registry, "eventsource_rows_accepted_total"), 3)

    def test_errored_streams(self):
        self.make()
        registry, _ = metrics.make_registry(self.service, process=False)
        self.store.add()
        self.send("fetch", fetch_body("a"))
        self.bus.lose_connection()
        self.assertEqual(value(registry, "eventsource_streams_closed_total", state="errored"), 1)
        self.assertEqual(value(registry, "eventsource_redis_connected"), 0)
        self.assertEqual(value(registry, "eventsource_serving"), 0)


class SubscriptionCountTests(ServiceTestCase):
    def test_subscriptions_reads_and_deliveries(self):
        self.make(max_subscriptions=9)
        registry, _ = metrics.make_registry(self.service, process=False)
        self.assertEqual(value(registry, "eventsource_max_subscriptions"), 9)
        for channel in ("a", "b"):
            self.send("subscribe", json.dumps({"v": 2, "channel": channel, "from": "end",
                                               "query": {"$select": {}}}))
        self.clock.advance(0)
        self.send("subscribe", json.dumps({"v": 2, "channel": "a", "query": {"$select": {}}}))
        self.send("subscribe", json.dumps({"channel": "c", "query": {"$select": {}}}))
        self.assertEqual(value(registry, "eventsource_requests_total", kind="subscribe",
                               result="ok"), 2)
        # a busy channel (which ends the subscription there) and a version 1 body
        self.assertEqual(value(registry, "eventsource_requests_total", kind="subscribe",
                               result="refused"), 2)
        self.assertEqual(value(registry, "eventsource_open_subscriptions", state="live"), 1)
        reads = value(registry, "eventsource_tail_reads_total")
        self.send("persist", persist_body("r", [doc(), doc()]))
        self.assertEqual(value(registry, "eventsource_tail_reads_total"), reads + 1)
        self.assertEqual(value(registry, "eventsource_subscription_events_delivered_total"), 2)


    def test_lag_and_delivery_latency(self):
        self.make(row_timeout=60)
        registry, _ = metrics.make_registry(self.service, process=False)
        self.send("subscribe", json.dumps({"v": 2, "channel": "a", "from": "end", "window": 1,
                                           "query": {"$select": {}}}))
        self.clock.advance(0)
        self.send("persist", persist_body("r", [doc(), doc(), doc()]))
        self.assertEqual(len(self.out("a")), 2)   # caughtUp, then the one row the window lets out
        self.assertEqual(value(registry, "eventsource_subscription_lag_events", state="live"), 2)
        self.assertEqual(value(registry, "eventsource_subscription_lag_events_max"), 2)
        self.clock.advance(5)
        self.assertEqual(value(registry, "eventsource_subscription_lag_seconds_max"), 5)
        self.assertEqual(value(registry, "eventsource_subscription_delivery_latency_seconds_count"), 3)
        self.send("fetch-next", json.dumps({"channel": "a"}))
        self.assertEqual(value(registry, "eventsource_subscription_lag_events_max"), 1)
        self.assertEqual(value(registry, "eventsource_subscription_lag_seconds_max"), 0)
        self.clock.advance(2)
        self.assertEqual(value(registry, "eventsource_subscription_lag_seconds_max"), 2)
        self.send("fetch-next", json.dumps({"channel": "a"}))
        self.assertEqual(value(registry, "eventsource_subscription_lag_events_max"), 0)
        self.assertEqual(value(registry, "eventsource_subscription_lag_seconds_max"), 0)


class DocumentedTests(ServiceTestCase):
    def test_every_metric_is_in_operations_md(self):
        """docs/OPERATIONS.md lists every family the server exports (its meaning and an alert)."""
        import os

        self.make(replicas=True, writer_lease=2.0)  # (the lease's gauge too)
        self.addCleanup(self.service.stopService)
        registry, _ = metrics.make_registry(self.service, process=False)
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "docs", "OPERATIONS.md")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        names = {family.name for family in registry.collect()}
        self.assertGreater(len(names), 20)
        missing = sorted(name for name in names
                         if f"`{name}`" not in text and f"`{name}_total`" not in text
                         and f"`{name}_info`" not in text)
        self.assertEqual(missing, [])


class ServingTests(ServiceTestCase):
    def test_serving_and_limits(self):
        self.make(max_streams=7, pool_size=3)
        registry, _ = metrics.make_registry(self.service, process=False)
        self.assertEqual(value(registry, "eventsource_serving"), 1)
        self.assertEqual(value(registry, "eventsource_max_streams"), 7)
        self.assertEqual(value(registry, "eventsource_build_info",
                               version=__import__("eventsource").__version__), 1)
        self.service.stopService()
        self.assertEqual(value(registry, "eventsource_serving"), 0)

    def test_persists_in_flight(self):
        self.make(hold_store=True)
        registry, _ = metrics.make_registry(self.service, process=False)
        self.send("persist", persist_body("r", doc()))
        self.assertEqual(value(registry, "eventsource_persists_in_flight"), 1)
        self.clock.advance(0.02)
        self.store.release()
        self.assertEqual(value(registry, "eventsource_persists_in_flight"), 0)
        self.assertEqual(value(registry, "eventsource_append_latency_seconds_sum"), 0.02)
        self.assertEqual(value(registry, "eventsource_append_latency_seconds_bucket",
                               le="0.025"), 1)


class FakeStore:
    """What the collector reads of the real store: its counts and its pool's load."""

    def __init__(self, clock):
        self.stats = stats.StoreStats(clock)
        self.load = (0, 0, 0)

    def pool_load(self):
        return self.load


class StoreCountTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.store = FakeStore(self.clock)
        self.counts = self.store.stats

    def test_group_commits_and_last_position(self):
        written = defer.Deferred()
        self.counts.batch_started(written, 3)
        self.clock.advance(0.003)
        written.callback([(2, 10), (1, 12), (4, 13)])
        self.assertEqual(self.successResultOf(written), [(2, 10), (1, 12), (4, 13)])
        self.assertEqual(self.counts.last_position, 16)
        self.assertEqual(self.counts.group_commit_persists.count, 1)
        self.assertEqual(self.counts.group_commit_persists.sum, 3)
        self.assertAlmostEqual(self.counts.group_commit_seconds.sum, 0.003)
        # a failed batch passes through, counted by the errors, not here
        failed = defer.Deferred()
        self.counts.batch_started(failed, 2)
        failed.errback(RuntimeError("no"))
        self.failureResultOf(failed, RuntimeError)
        self.assertEqual(self.counts.group_commit_persists.count, 1)
        self.assertEqual(self.counts.last_position, 16)

    def test_a_count_gone_wrong_never_fails_the_batch(self):
        written = defer.Deferred()
        self.counts.batch_started(written, 1)
        written.callback([("not", "numbers")])
        self.assertEqual(self.successResultOf(written), [("not", "numbers")])
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_version_2_outcomes(self):
        """A batch of version 2 appends: positions from its events; refusals store none."""
        from eventsource import appends

        written = defer.Deferred()
        self.counts.batch_started(written, 3)
        event = appends.Event(b"\x01" * 16, "p", 0, 41)
        written.callback([appends.Appended((event,)), (2, 39),
                          appends.WrongExpectedVersion("q", 3, 4)])
        self.assertEqual(self.counts.last_position, 41)
        self.assertEqual(self.counts.group_commit_persists.sum, 3)

    def test_mysql_error_codes(self):
        import pymysql

        for error in (pymysql.err.OperationalError(2013, "Lost connection"),
                      pymysql.err.OperationalError(2013, "Lost connection"),
                      pymysql.err.IntegrityError(1062, "Duplicate"),
                      RuntimeError("inserted 1 rows of 2"),
                      StoreStopping("the server is shutting down")):
            self.counts.error(error)
        try:
            try:
                raise pymysql.err.OperationalError(1969, "Query execution was interrupted")
            except pymysql.err.OperationalError as cause:
                raise StatementTimeLimit("too long") from cause
        except StatementTimeLimit as error:
            self.counts.error(error)
        self.assertEqual(self.counts.mysql_errors,
                         {"2013": 2, "1062": 1, "other": 1, "1969": 1})

    def test_collected(self):
        service = type("Server", (), {})()
        service.store = self.store
        service.config = type("Config", (), {"pool_size": 4})()
        collector = metrics.ServerCollector(service)
        self.store.load = (3, 2, 5)
        self.counts.error(RuntimeError("x"))
        families = {f.name: f for f in collector._store()}
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in families.values() for s in f.samples}
        self.assertEqual(samples[("eventsource_mysql_pool_threads_in_use", ())], 3)
        self.assertEqual(samples[("eventsource_mysql_pool_threads", ())], 4)
        self.assertEqual(samples[("eventsource_mysql_queued_work", (("kind", "write"),))], 2)
        self.assertEqual(samples[("eventsource_mysql_queued_work", (("kind", "read"),))], 5)
        self.assertEqual(samples[("eventsource_mysql_errors_total", (("code", "other"),))], 1)
        self.assertEqual(samples[("eventsource_last_position", ())], 0)


class RegistryTests(ServiceTestCase):
    def test_each_server_has_its_own_registry(self):
        first = self.make()
        first_registry, _ = metrics.make_registry(first)
        second = self.make()
        second_registry, _ = metrics.make_registry(second)
        self.send("persist", persist_body("r", doc()))  # (to the second)
        self.assertEqual(value(second_registry, "eventsource_requests_total",
                               kind="persist", result="ok"), 1)
        self.assertEqual(value(first_registry, "eventsource_requests_total",
                               kind="persist", result="ok"), 0)
        self.assertIsNotNone(first_registry.get_sample_value("process_resident_memory_bytes"))

    def test_more_sources(self):
        """A new part of the server (subscriptions, one day) adds its own families."""
        from prometheus_client.core import GaugeMetricFamily

        self.make()
        registry, collector = metrics.make_registry(self.service, process=False)
        collector.add_source(lambda: [GaugeMetricFamily("eventsource_subscriptions", "x",
                                                        value=2)])
        self.assertEqual(value(registry, "eventsource_subscriptions"), 2)

    def test_names_follow_the_conventions(self):
        self.make()
        registry, _ = metrics.make_registry(self.service, process=False)
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            self.assertTrue(family.name.startswith("eventsource_"), family.name)
            self.assertTrue(family.documentation, family.name)
            if family.type == "counter":
                self.assertTrue(all(s.name.endswith("_total") for s in family.samples))
            if family.type == "histogram":
                self.assertTrue(family.name.endswith(("_seconds", "_persists")), family.name)


class PersistCountTests(SynchronousTestCase):
    def test_answers_and_failures(self):
        """Written (timed; a repeat's events not written again), refused, failed."""
        clock = Clock()
        counts = stats.ServerStats(clock)
        clock.advance(2)
        counts.persist_answered(1.5, 3)
        counts.persist_answered(1.0, 2, duplicate=True)
        counts.persist_failed(Failure(RuntimeError("no")))
        from eventsource.appends import WrongExpectedVersion
        counts.persist_failed(Failure(WrongExpectedVersion("p", 1, 2)))
        self.assertEqual((counts.requests["persist", "ok"], counts.requests["persist", "failed"],
                          counts.requests["persist", "conflict"]), (2, 1, 1))
        self.assertEqual(counts.events_written, 3)
        self.assertEqual(counts.append_latency.count, 2)
        self.assertEqual(counts.append_latency.sum, 1.5)
