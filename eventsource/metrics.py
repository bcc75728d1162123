"""
The server's Prometheus metrics, collected when Prometheus scrapes.

Nothing here runs on the hot paths: the service and the store keep plain
counts (:mod:`eventsource.stats`), and :class:`ServerCollector` turns them,
with what the server knows anyway (its open streams, the store's pool and
queues, the bus's state), into metric families only when ``/metrics`` is
read.  Each server has a registry of its own (:func:`make_registry`), never
prometheus_client's global one, so several servers in one process (the
tests) do not collide.

Names follow Prometheus' naming guide: ``eventsource_`` first, base units in
the name (``_seconds``), ``_total`` on counters, and only label values from
fixed sets.  docs/OPERATIONS.md ("Metrics") lists every metric with its
meaning and an alert worth setting.

A new part of the server adds its metrics by giving
:meth:`ServerCollector.add_source` a function that yields metric families
(subscriptions will: their count by state, their lag).
"""

from typing import Any, Callable, Dict, Iterable, Iterator, List, Tuple

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

import eventsource
from eventsource.stats import Histogram

#: a part of the collector: yields the families of one part of the server
Source = Callable[[], Iterable[Metric]]

#: the live states of a stream (:class:`eventsource.stream.StreamState`)
OPEN_STATES = ("awaiting-row", "awaiting-accept")


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets = [("+Inf" if bound == float("inf") else repr(float(bound)), count)
               for bound, count in histogram.cumulative()]
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=histogram.sum)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class ServerCollector:
    """
    A prometheus_client custom collector over one
    :class:`eventsource.service.EventSourceService`: everything is read from
    the server when :meth:`collect` runs (in the reactor thread, see
    :mod:`eventsource.http`).
    """

    def __init__(self, server: Any) -> None:
        self._server = server
        self._sources: List[Source] = [
            self._info, self._requests, self._streams, self._subscriptions, self._store,
            self._redis]

    def add_source(self, source: Source) -> None:
        """Collect ``source``'s families too, after the server's own."""
        self._sources.append(source)

    def collect(self) -> Iterator[Metric]:
        for source in self._sources:
            yield from source()

    # -- the sources ----------------------------------------------------

    def _info(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("eventsource_build_info",
                                 "Always 1; the server's version as a label.", labels=["version"])
        info.add_metric([eventsource.__version__], 1)
        yield info
        server = self._server
        serving = server.accepting and getattr(server.bus, "connected", False)
        yield _gauge("eventsource_serving",
                     "1 while the server takes requests (started, subscribed to Redis, not "
                     "stopping), else 0.", 1 if serving else 0)

    def _requests(self) -> Iterator[Metric]:
        stats = self._server.stats
        requests = CounterMetricFamily(
            "eventsource_requests", "Requests received, by kind (the request channel: "
            "persist, fetch, fetch-next, subscribe) and result (ok, refused, unanswerable, ignored, "
            "conflict, failed, elsewhere, unclaimed).", labels=["kind", "result"])
        for (kind, result), count in sorted(stats.requests.items()):
            requests.add_metric([kind, result], count)
        yield requests
        yield CounterMetricFamily("eventsource_events_written",
                                  "Events appended to the table by persists.",
                                  value=stats.events_written)
        yield _gauge("eventsource_persists_in_flight",
                     "Persists taken and not yet answered.", self._server.persists_in_flight)
        yield _histogram("eventsource_append_latency_seconds",
                         "Seconds from a persist taken to its success answer "
                         "(queueing and the group commit).", stats.append_latency)

    def _streams(self) -> Iterator[Metric]:
        server = self._server
        stats = server.stats
        by_state: Dict[str, int] = {state: 0 for state in OPEN_STATES}
        sent, accepted = stats.closed_rows_sent, stats.closed_rows_accepted
        for stream in list(server.streams.values()):
            state = stream.state.value
            by_state[state] = by_state.get(state, 0) + 1
            sent += stream.rows_sent
            accepted += stream.rows_accepted
        open_streams = GaugeMetricFamily(
            "eventsource_open_streams", "Fetch streams open now, by state (awaiting-row: "
            "waiting for the database or the echo budget; awaiting-accept: waiting for the "
            "client).", labels=["state"])
        for state, count in sorted(by_state.items()):
            open_streams.add_metric([state], count)
        yield open_streams
        yield _gauge("eventsource_max_streams", "The most streams served at once "
                     "(--max-streams).", server.config.max_streams)
        closed = CounterMetricFamily(
            "eventsource_streams_closed", "Fetch streams closed, by final state (ended; "
            "errored; timed-out: the client did not accept a row within --row-timeout).",
            labels=["state"])
        for state, count in sorted(stats.streams_closed.items()):
            closed.add_metric([state], count)
        yield closed
        yield CounterMetricFamily("eventsource_rows_sent", "Rows published to fetch streams.",
                                  value=sent)
        yield CounterMetricFamily("eventsource_rows_accepted",
                                  "Rows the clients of fetch streams accepted.", value=accepted)
        yield _histogram("eventsource_first_row_latency_seconds",
                         "Seconds from a fetch taken to its first row published (fetches "
                         "with rows only).", stats.first_row_latency)

    def _subscriptions(self) -> Iterator[Metric]:
        server = self._server
        by_state: Dict[str, int] = {"catching-up": 0, "live": 0}
        for subscription in list(server.subscriptions.values()):
            state = subscription.state.value
            by_state[state] = by_state.get(state, 0) + 1
        open_subscriptions = GaugeMetricFamily(
            "eventsource_open_subscriptions", "Subscriptions open now, by state (catching-up: "
            "reading history; live: sending new events).", labels=["state"])
        for state, count in sorted(by_state.items()):
            open_subscriptions.add_metric([state], count)
        yield open_subscriptions
        yield _gauge("eventsource_max_subscriptions", "The most subscriptions served at once "
                     "(--max-subscriptions).", server.config.max_subscriptions)
        tailer = server.tailer
        yield CounterMetricFamily("eventsource_tail_reads", "Reads of new events for "
                                  "subscriptions and the page's live tails (one query each, "
                                  "for all of them).", value=tailer.reads)
        yield CounterMetricFamily("eventsource_subscription_events_delivered",
                                  "New events handed to subscriptions and the page's live "
                                  "tails (one per subscription or tail an event matched).",
                                  value=tailer.deliveries)
        yield _histogram("eventsource_subscription_delivery_latency_seconds",
                         "Seconds from a new event's append (its timestamp) to its hand-over "
                         "to the subscriptions and live tails it matched, once per event.",
                         tailer.delivery_latency)
        now = server.seconds()
        waiting = {"catching-up": 0, "live": 0}
        live_events = live_seconds = 0.0
        for subscription in list(server.subscriptions.values()):
            state = subscription.state.value
            count = subscription.waiting_events
            waiting[state] = waiting.get(state, 0) + count
            if state == "live":
                live_events = max(live_events, count)
                live_seconds = max(live_seconds, subscription.waiting_seconds(now))
        lag = GaugeMetricFamily(
            "eventsource_subscription_lag_events", "Events matched and not yet sent, over all "
            "subscriptions, by state (catching-up ones also read history).", labels=["state"])
        for state, count in sorted(waiting.items()):
            lag.add_metric([state], count)
        yield lag
        yield _gauge("eventsource_subscription_lag_events_max", "The most events any live "
                     "subscription has matched and not yet sent.", live_events)
        yield _gauge("eventsource_subscription_lag_seconds_max", "The longest any live "
                     "subscription with events waiting has waited for its client to accept "
                     "its oldest row (0 when none waits).", live_seconds)

    def _store(self) -> Iterator[Metric]:
        store = self._server.store
        stats = getattr(store, "stats", None)
        if stats is not None:
            yield _histogram("eventsource_group_commit_persists",
                             "Persists written together by one group commit (one transaction).",
                             stats.group_commit_persists)
            yield _histogram("eventsource_group_commit_duration_seconds",
                             "Seconds from a group commit handed to the database pool to its "
                             "commit.", stats.group_commit_seconds)
            position = stats.last_position
            yield _gauge("eventsource_last_position",
                         "The position (id) of the last event this server committed (0: none "
                         "since it started).", 0 if position is None else position)
            errors = CounterMetricFamily(
                "eventsource_mysql_errors", "Database work that failed, by MariaDB/MySQL "
                "error code (other: not a database error).", labels=["code"])
            for code, count in sorted(stats.mysql_errors.items()):
                errors.add_metric([code], count)
            yield errors
        load = getattr(store, "pool_load", None)
        if load is not None:
            in_use, writes, reads = load()
            yield _gauge("eventsource_mysql_pool_threads_in_use",
                         "Database pool threads running work now.", in_use)
            yield _gauge("eventsource_mysql_pool_threads",
                         "Database pool threads (and connections) at most (--pool-size).",
                         self._server.config.pool_size)
            queued = GaugeMetricFamily("eventsource_mysql_queued_work",
                                       "Work waiting for a pool thread, by kind (write: group "
                                       "commits; read: pages of streams).", labels=["kind"])
            queued.add_metric(["read"], reads)
            queued.add_metric(["write"], writes)
            yield queued

    def _redis(self) -> Iterator[Metric]:
        lease = getattr(self._server, "writer_lease", None)
        if lease is not None:
            yield _gauge("eventsource_writer_lease_held", "Replica mode with --writer-lease: "
                         "1 while this replica holds the writer lease (it writes the "
                         "persists), else 0.", 1 if lease.held else 0)
        bus = self._server.bus
        yield _gauge("eventsource_redis_connected",
                     "1 while subscribed to the request channels and able to publish, else 0.",
                     1 if getattr(bus, "connected", False) else 0)
        yield CounterMetricFamily("eventsource_redis_reconnects",
                                  "Times the server was serving again after losing a Redis "
                                  "connection.", value=getattr(bus, "reconnects", 0))


def make_registry(server: Any, process: bool = True) -> Tuple[CollectorRegistry, ServerCollector]:
    """
    A registry of the server's own with its :class:`ServerCollector` and,
    with ``process``, prometheus_client's process (CPU, memory, file
    descriptors), Python and garbage-collector collectors.
    """
    registry = CollectorRegistry(auto_describe=False)
    collector = ServerCollector(server)
    registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry, collector
