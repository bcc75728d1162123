"""
The subscriptions' figures (docs/PROTOCOL.md, "Subscriptions"):

catch-up
    one subscription from the start of the table (window 100, accepted 50
    rows at a time, as the windowed fetch is): rows/s until its
    ``caughtUp`` marker, compared with the windowed fetch of the same run.
live latency
    1, 100 and 1,000 live subscriptions, each on a ``pid`` of its own,
    while the client appends about 1,000 events/s (10 single-event version 2
    persists every 10 ms, their pids going round the subscriptions' pids, so
    every event matches exactly one subscription): p50 and p99 of commit to
    delivery at the client.  "Commit" is the event's ``timestamp`` (the
    server's ``NOW(6)`` at its insert, written to the millisecond), so each
    latency is an upper bound (the insert comes before its commit, and the
    millisecond is truncated); the client and MariaDB share the machine's
    clock.
server CPU per delivered event
    the server's CPU time during that append load with the subscriptions,
    less its CPU time during the same load without any (measured just
    before), per delivered event.
RSS per idle subscription
    the server's RSS grown by opening idle subscriptions (each on a pid of
    its own, live, nothing to send), per subscription, on a fresh server.
"""

import datetime
import json
import time
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer, task

from benchmarks.common import BenchError, percentile
from benchmarks.processes import proc_cpu_seconds, proc_status
from benchmarks.redis_client import Handler

#: events appended per second during the live scenarios, and per tick (every 10 ms)
APPEND_RATE = 1000
APPENDS_PER_TICK = 10

#: subscription counts of the live latency figures
LIVE_COUNTS = (1, 100, 1000)


def _epoch(timestamp: str) -> float:
    """Seconds since the epoch of a row's ``timestamp`` (``...Z``, UTC)."""
    return datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


class _SubscriptionLane:
    """One subscription's client: accepts its rows in batches, records latencies."""

    def __init__(self, channel: str, publish: Callable[[str, str], object], next_channel: str,
                 accept_batch: int, latencies: list[float] | None) -> None:
        self.channel = channel
        self.rows = 0
        self.unaccepted = 0
        self.last_position = 0
        self.caught_up: defer.Deferred[float] = defer.Deferred()
        self.failed: list[str] = []
        accept_head = '{"channel":%s,"accepted":' % json.dumps(channel)
        clock = time.perf_counter
        wall = time.time

        def on_message(body: str) -> None:
            if body.startswith('{"position"'):
                self.rows += 1
                if latencies is not None:
                    row = json.loads(body)
                    latencies.append(wall() - _epoch(row["timestamp"]))
                    self.last_position = row["position"]
                self.unaccepted += 1
                if self.unaccepted >= accept_batch:
                    publish(next_channel, accept_head + "%d}" % self.unaccepted)
                    self.unaccepted = 0
            elif body.startswith('{"caughtUp"'):
                if self.unaccepted:
                    publish(next_channel, accept_head + "%d}" % self.unaccepted)
                    self.unaccepted = 0
                if not self.caught_up.called:
                    self.caught_up.callback(clock())
            elif body.startswith('{"heartbeat"'):
                pass
            else:
                self.failed.append(body[:300])
                if not self.caught_up.called:
                    self.caught_up.errback(BenchError(f"{channel}: the server sent {body[:300]}"))

        self.on_message: Handler = on_message


class _AppendState:
    """The append load's persists: sent, answered, refused."""

    def __init__(self) -> None:
        self.sent = 0
        self.answered = 0
        self.errors: list[str] = []
        self.finished = False
        self.done: defer.Deferred[None] = defer.Deferred()

    def on_reply(self, body: str) -> None:
        if body == '"end"':
            self.answered += 1
            self._check()
        elif not body.startswith('{"events"'):
            self.errors.append(body[:300])

    def finish(self) -> None:
        self.finished = True
        self._check()

    def _check(self) -> None:
        if self.finished and self.answered == self.sent and not self.done.called:
            self.done.callback(None)


class Subscriptions:
    """The subscription scenarios of one repetition, on a :class:`benchmarks.scenarios.Run`."""

    def __init__(self, run: Any) -> None:
        self.run = run

    @property
    def _subscribe_channel(self) -> str:
        return str(self.run.request_channels["subscribe"])

    @defer.inlineCallbacks
    def open(self, wheres: list[dict[str, Any] | None], start: Any = "end", window: int = 100,
             accept_batch: int = 1, latencies: list[float] | None = None,
             timeout: float = 120) -> Generator["defer.Deferred[Any]", Any,
                                                list[_SubscriptionLane]]:
        """Subscribe once per ``where``; fires once every one has caught up."""
        run = self.run
        lanes = [_SubscriptionLane(run.channel("sub"), run.client.publish,
                                   run.request_channels["fetch-next"], accept_batch, latencies)
                 for _ in wheres]
        yield run.client.listen_all({lane.channel: lane.on_message for lane in lanes})
        for lane, where in zip(lanes, wheres):
            select = {} if where is None else {"$where": where}
            run.client.publish(self._subscribe_channel, json.dumps(
                {"v": 2, "channel": lane.channel, "from": start, "window": window,
                 "query": {"$select": select}}))
        d = defer.gatherResults([lane.caught_up for lane in lanes], consumeErrors=True)
        d.addTimeout(timeout, run.reactor)
        yield d
        return lanes

    @defer.inlineCallbacks
    def close(self, lanes: list[_SubscriptionLane]) -> Generator["defer.Deferred[Any]", Any, None]:
        run = self.run
        for lane in lanes:
            run.client.publish(run.request_channels["fetch-next"],
                               json.dumps({"channel": lane.channel, "end": True}))
        yield run.client.unlisten_all([lane.channel for lane in lanes])

    # -- catch-up ---------------------------------------------------------

    @defer.inlineCallbacks
    def catch_up(self, rows: int, window: int, after: Any = "start"
                 ) -> Generator["defer.Deferred[Any]", Any, dict[str, float]]:
        """One subscription from ``after`` (the table's start): rows/s to its ``caughtUp``."""
        run = self.run
        server_cpu = proc_cpu_seconds(run.server_pid)
        start = time.perf_counter()
        (lane,) = yield self.open([None], start=after, window=window,
                                  accept_batch=max(1, window // 2), timeout=300)
        elapsed = (yield lane.caught_up) - start
        server_cpu = proc_cpu_seconds(run.server_pid) - server_cpu
        yield self.close([lane])
        if lane.rows < rows:
            raise BenchError(f"catch-up: {lane.rows} rows before caughtUp, not {rows}")
        return {"rows_per_s": lane.rows / elapsed,
                "server_cpu_us_per_row": server_cpu / lane.rows * 1e6}

    # -- live -------------------------------------------------------------

    @defer.inlineCallbacks
    def append_load(self, pids: list[str], duration: float
                    ) -> Generator["defer.Deferred[Any]", Any, int]:
        """
        About :data:`APPEND_RATE` single-event persists/s for ``duration``
        seconds, their pids going round ``pids``; fires with the events
        appended, once every persist is answered.
        """
        run = self.run
        client = run.client
        persist = run.request_channels["persist"]
        channels = [run.channel("append") for _ in range(APPENDS_PER_TICK)]
        state = _AppendState()

        yield client.listen_all({channel: state.on_reply for channel in channels})
        ticks = max(1, round(duration * APPEND_RATE / APPENDS_PER_TICK))
        interval = APPENDS_PER_TICK / APPEND_RATE
        started = time.perf_counter()
        for tick in range(ticks):
            for k, channel in enumerate(channels):
                pid = pids[state.sent % len(pids)]
                client.publish(persist, json.dumps({
                    "v": 2, "channel": channel, "query": {"$insert": {"$documents": [
                        {"pid": pid, "domain": "bench", "name": "live",
                         "data": {"tick": tick, "k": k}}]}}}))
                state.sent += 1
            # (paced against the clock, not by sleeping a tick after each)
            delay = started + (tick + 1) * interval - time.perf_counter()
            yield task.deferLater(run.reactor, max(0.0, delay), lambda: None)
        state.finish()
        state.done.addTimeout(60, run.reactor)
        try:
            yield state.done
        finally:
            yield client.unlisten_all(channels)
        if state.errors:
            raise BenchError(f"append load: {len(state.errors)} persists failed: "
                             f"{state.errors[0]}")
        return state.sent

    @defer.inlineCallbacks
    def live(self, count: int, duration: float
             ) -> Generator["defer.Deferred[Any]", Any, dict[str, float]]:
        """``count`` live subscriptions under the append load: latencies and CPU per event."""
        run = self.run
        pids = [f"live{count}-{i}" for i in range(count)]
        # the same load with no subscription first: the server's CPU for the appends alone
        cpu = proc_cpu_seconds(run.server_pid)
        started = time.perf_counter()
        baseline_events = yield self.append_load([f"base{count}-{i}" for i in range(count)],
                                                 duration)
        baseline_cpu = (proc_cpu_seconds(run.server_pid) - cpu) / baseline_events
        baseline_rate = baseline_events / (time.perf_counter() - started)
        latencies: list[float] = []
        lanes = yield self.open([{"pid": pid} for pid in pids], latencies=latencies)
        cpu = proc_cpu_seconds(run.server_pid)
        appended = yield self.append_load(pids, duration)
        deadline = time.monotonic() + 30
        while sum(lane.rows for lane in lanes) < appended and time.monotonic() < deadline:
            yield task.deferLater(run.reactor, 0.02, lambda: None)
        cpu = proc_cpu_seconds(run.server_pid) - cpu
        delivered = sum(lane.rows for lane in lanes)
        failures = [f for lane in lanes for f in lane.failed]
        yield self.close(lanes)
        if failures:
            raise BenchError(f"live, {count} subscriptions: the server sent {failures[0]}")
        if delivered != appended:
            raise BenchError(f"live, {count} subscriptions: {delivered} events delivered of "
                             f"{appended} appended")
        return {
            "p50_ms": percentile(latencies, 0.5) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000,
            "append_per_s": baseline_rate,
            "server_cpu_us_per_event": max(0.0, cpu / delivered - baseline_cpu) * 1e6,
        }

    # -- idle -------------------------------------------------------------

    @defer.inlineCallbacks
    def idle(self, count: int) -> Generator["defer.Deferred[Any]", Any, float]:
        """KB of server RSS per idle live subscription."""
        run = self.run
        yield task.deferLater(run.reactor, 0.3, lambda: None)
        rss_before, _ = proc_status(run.server_pid)
        lanes = yield self.open([{"pid": f"idle-{i}"} for i in range(count)])
        yield task.deferLater(run.reactor, 0.5, lambda: None)
        rss_open, _ = proc_status(run.server_pid)
        yield self.close(lanes)
        return (rss_open - rss_before) / count


@defer.inlineCallbacks
def subscription_figures(run: Any, log: Callable[[str], None]
                         ) -> Generator["defer.Deferred[Any]", Any, dict[str, float]]:
    """Every subscription figure of one repetition."""
    sizes = run.sizes
    scenarios = Subscriptions(run)
    figures: dict[str, float] = {}
    # (the catch-up is measured beside the windowed fetch: benchmarks.scenarios)
    for count in LIVE_COUNTS:
        log(f"live subscriptions: {count}, appending ~{APPEND_RATE} events/s")
        result = yield scenarios.live(count, sizes.live_duration)
        for key, value in result.items():
            figures[f"live_{count}_{key}"] = value
    log(f"idle subscriptions: {sizes.idle_subscriptions}, on a fresh server")
    # (as the idle streams: memory the scenarios before freed would hide theirs)
    yield run.stop_server()
    yield run.start_server()
    figures["idle_subscription_rss_kb"] = yield scenarios.idle(sizes.idle_subscriptions)
    return figures
