"""
In-memory doubles of the Redis and MySQL boundaries, for fast, deterministic
tests of the service and its streams with a ``twisted.internet.task.Clock``.

``MemoryBus`` stands in for :class:`eventsource.bus.RedisBus` and
``MemoryStore`` for :class:`eventsource.store.Store`.  Both answer at once by
default; set ``hold=True`` to keep their Deferreds pending until a test
releases them, which is how slow databases and slow subscriptions are played.
"""

import datetime
import json

from twisted.internet import defer

from eventsource import wire
from eventsource.store import Pager


class MemoryBus:
    """Records what is published and subscribed; messages are injected by the test."""

    def __init__(self, hold=False):
        self.hold = hold
        self.published = []
        self.subscribed = set()
        self.pending = []
        self.started = False

    def _answer(self, value):
        if not self.hold:
            return defer.succeed(value)
        d = defer.Deferred()
        self.pending.append((d, value))
        return d

    def release(self):
        """Fire every held Deferred, oldest first."""
        while self.pending:
            d, value = self.pending.pop(0)
            d.callback(value)

    def start(self):
        self.started = True
        return defer.succeed(None)

    def stop(self):
        self.started = False
        return defer.succeed(None)

    def publish(self, channel, body):
        """Like :meth:`eventsource.bus.RedisBus.publish`: nothing to wait for."""
        self.published.append((channel, body))

    def subscribe(self, channel):
        self.subscribed.add(channel)
        return self._answer(None)

    def unsubscribe(self, channel):
        self.subscribed.discard(channel)
        return defer.succeed(None)

    def messages(self, channel):
        """Everything published on ``channel``, JSON-decoded, in order."""
        return [json.loads(body) for name, body in self.published if name == channel]


class MemoryStore:
    """
    An append-only list of events behind the :class:`eventsource.store.Store`
    interface.  Queries are not evaluated: every page holds the stored events
    in ``id`` order (filters are the real database's job, tested for real).
    """

    columns = ("timestamp", "pid", "domain", "name", "data")

    def __init__(self, hold=False, page_size=1000, page_bytes=None):
        self.hold = hold
        self.page_size = page_size
        self.page_bytes = page_bytes
        self.events = []
        self.pending = []
        self.fail_next = None
        self.reads = []
        self.reads_dropped = False
        self.started = False

    def _answer(self, compute):
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            return defer.fail(error)
        if not self.hold:
            return defer.succeed(compute())
        d = defer.Deferred()
        self.pending.append((d, compute))
        return d

    def release(self, count=None):
        """Answer held requests (all of them, or the first ``count``)."""
        released = 0
        while self.pending and (count is None or released < count):
            d, compute = self.pending.pop(0)
            d.callback(compute())
            released += 1
        return released

    def start(self):
        self.started = True
        return defer.succeed(["created table"])

    def stop(self):
        self.started = False
        return defer.succeed(None)

    def drop_reads(self):
        """Shutdown began: reads not started are dropped (held ones stay held here)."""
        self.reads_dropped = True

    def add(self, pid="p1", domain="d", name="n", data=None, timestamp=None):
        """Append one event directly (test set-up); returns its id."""
        return self._append(pid, domain, name, wire.json_stringify(data), timestamp)

    def _append(self, pid, domain, name, data_text, timestamp=None):
        event_id = len(self.events) + 1
        stamp = timestamp or datetime.datetime(2020, 4, 6, 11, 35, 18, 414000)
        self.events.append((event_id, stamp, pid, domain, name, data_text))
        return event_id

    def insert(self, plan):
        def compute():
            first = len(self.events) + 1
            for pid, domain, name, data_text in plan.rows:
                self._append(pid, domain, name, data_text)
            return len(plan.rows), first

        return self._answer(compute)

    def pager(self, plan):
        return Pager(self, plan, self.page_size, self.page_bytes)

    def read_page(self, plan, high_water, position, size, max_bytes=None):
        self.reads.append((position, size))

        def compute():
            top = len(self.events) if high_water is None else high_water
            if plan.keyset:
                chosen = [e for e in self.events if position < e[0] <= top][:size]
            else:
                chosen = [e for e in self.events if e[0] <= top][position:position + size]
            bodies, total, cut = [], 0, False
            for event in chosen:
                bodies.append(wire.encode_row(self.columns, event[1:]))
                total += len(bodies[-1])
                if max_bytes is not None and total >= max_bytes:
                    cut = len(bodies) < len(chosen)
                    break
            last = None
            if bodies and plan.keyset:
                last = chosen[len(bodies) - 1][0]
            return top, bodies, last, cut

        return self._answer(compute)
