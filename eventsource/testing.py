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
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from eventsource import appends, ids, schema, wire
from eventsource.interfaces import IEventBus, IEventStore, Page
from eventsource.query import InsertPlan, SelectPlan
from eventsource.store import Pager

T = TypeVar("T")

#: a stored event: the values of :data:`eventsource.schema.COLUMN_NAMES`
Event = Tuple[Any, ...]

_ID = schema.COLUMN_NAMES.index("id")
_PID = schema.COLUMN_NAMES.index("pid")
_VERSION = schema.COLUMN_NAMES.index("version")
_EVENT_ID = schema.COLUMN_NAMES.index("event_id")


def _v2_timestamp(value: Any) -> Any:
    return wire.format_timestamp(value) if isinstance(value, datetime.datetime) else value


_V2_ROW = wire.row_encoder(
    schema.V2_DEFAULT_COLUMNS,
    [{"eventId": wire.UUID_VALUE, "data": wire.JSON_VALUE}.get(c, wire.PLAIN_VALUE)
     for c in schema.V2_DEFAULT_COLUMNS])


def _V2_ENCODE(values: List[Any]) -> str:
    """A version 2 row of the default columns (the table's values, in TAIL_COLUMNS order)."""
    return _V2_ROW([_v2_timestamp(value) for value in values])


@implementer(IEventBus)
class MemoryBus:
    """
    Records what is published and subscribed; messages are injected by the test.

    :param claims: the claims of :meth:`claim`, key to owner: pass one dict
        to several buses to play replicas sharing one Redis (claims never
        expire here).
    """

    def __init__(self, hold: bool = False, claims: Optional[Dict[str, str]] = None,
                 leases: Optional[Dict[str, Tuple[str, float]]] = None,
                 clock: Optional[IReactorTime] = None) -> None:
        self.hold = hold
        self.claims: Dict[str, str] = {} if claims is None else claims
        #: the leases of :meth:`lease`, key to ``(owner, expiry)`` on :attr:`clock`:
        #: pass one dict to several buses, with their services' clock
        self.leases: Dict[str, Tuple[str, float]] = {} if leases is None else leases
        self.clock = clock
        #: when set, lease attempts fail with it (Redis unreachable)
        self.lease_error: Optional[BaseException] = None
        #: every claim asked for: ``(key, owner, ttl)``
        self.claims_asked: List[Tuple[str, str, float]] = []
        #: when set, the next claims fail with it (Redis unreachable)
        self.claim_error: Optional[BaseException] = None
        #: claims held unanswered while True (released by :meth:`release_claims`)
        self.hold_claims = False
        self.pending_claims: List[Tuple["defer.Deferred[bool]", str, str]] = []
        self.published: List[Tuple[str, str]] = []
        self.subscribed: Set[str] = set()
        #: channels nobody listens on: a counted publish there answers 0 (else 1)
        self.unheard: Set[str] = set()
        self.pending: List[Tuple["defer.Deferred[None]", None]] = []
        self.started = False
        #: serving: subscribed to the request channels (RedisBus.connected)
        self.connected = False
        self._on_message: Optional[Callable[[str, str], None]] = None
        self._on_connection_lost: Optional[Callable[[], None]] = None

    def attach(self, on_message: Callable[[str, str], None],
               on_connection_lost: Callable[[], None]) -> "MemoryBus":
        """
        The bus factory of :class:`eventsource.service.EventSourceService`
        (``bus=memory_bus.attach``): this bus, delivering to the service.
        """
        self._on_message = on_message
        self._on_connection_lost = on_connection_lost
        return self

    def deliver(self, channel: str, body: str) -> None:
        """A message arrives on ``channel``, as Redis would deliver it."""
        assert self._on_message is not None, "attach the bus to a service first"
        self._on_message(channel, body)

    def lose_connection(self) -> None:
        """The subscriber connection drops, as a Redis restart would drop it."""
        assert self._on_connection_lost is not None, "attach the bus to a service first"
        self.connected = False
        self._on_connection_lost()

    def _answer(self, value: None) -> "defer.Deferred[None]":
        if not self.hold:
            return defer.succeed(value)
        d: "defer.Deferred[None]" = defer.Deferred()
        self.pending.append((d, value))
        return d

    def release(self) -> None:
        """Fire every held Deferred, oldest first."""
        while self.pending:
            d, value = self.pending.pop(0)
            d.callback(value)

    def start(self) -> "defer.Deferred[None]":
        self.started = self.connected = True
        return defer.succeed(None)

    def stop(self) -> "defer.Deferred[None]":
        self.started = self.connected = False
        return defer.succeed(None)

    def publish(self, channel: str, body: str) -> None:
        """Like :meth:`eventsource.bus.RedisBus.publish`: nothing to wait for."""
        self.published.append((channel, body))

    def publish_counted(self, channel: str, body: str) -> "defer.Deferred[int]":
        """Like :meth:`eventsource.bus.RedisBus.publish_counted`: 0 receivers on :attr:`unheard` channels."""
        self.published.append((channel, body))
        return defer.succeed(0 if channel in self.unheard else 1)

    def subscribe(self, channel: str) -> "defer.Deferred[None]":
        self.subscribed.add(channel)
        return self._answer(None)

    def unsubscribe(self, channel: str) -> "defer.Deferred[None]":
        self.subscribed.discard(channel)
        return defer.succeed(None)

    def claim(self, key: str, owner: str, ttl: float) -> "defer.Deferred[bool]":
        """Like :meth:`eventsource.bus.RedisBus.claim`, on the shared :attr:`claims`."""
        self.claims_asked.append((key, owner, ttl))
        if self.claim_error is not None:
            return defer.fail(self.claim_error)
        if self.hold_claims:
            d: "defer.Deferred[bool]" = defer.Deferred()
            self.pending_claims.append((d, key, owner))
            return d
        return defer.succeed(self._take(key, owner))

    def _take(self, key: str, owner: str) -> bool:
        if key in self.claims:
            return False
        self.claims[key] = owner
        return True

    def lease(self, key: str, owner: str, ttl: float) -> "defer.Deferred[Optional[str]]":
        """Like :meth:`eventsource.bus.RedisBus.lease`, on the shared :attr:`leases`."""
        if self.lease_error is not None:
            return defer.fail(self.lease_error)
        now = self.clock.seconds() if self.clock is not None else 0.0
        held = self.leases.get(key)
        if held is None or held[1] <= now or held[0] == owner:
            self.leases[key] = (owner, now + ttl)
            return defer.succeed(owner)
        return defer.succeed(held[0])

    def release_lease(self, key: str, owner: str) -> "defer.Deferred[None]":
        """Like :meth:`eventsource.bus.RedisBus.release_lease`."""
        held = self.leases.get(key)
        if held is not None and held[0] == owner:
            del self.leases[key]
        return defer.succeed(None)

    def release_claims(self) -> None:
        """Answer the held claims, in the order they were asked (as Redis would)."""
        while self.pending_claims:
            d, key, owner = self.pending_claims.pop(0)
            d.callback(self._take(key, owner))

    def messages(self, channel: str) -> List[Any]:
        """Everything published on ``channel``, JSON-decoded, in order."""
        return [json.loads(body) for name, body in self.published if name == channel]


@implementer(IEventStore)
class MemoryStore:
    """
    An append-only list of events behind the :class:`eventsource.store.Store`
    interface.  Queries are not evaluated: every page holds the stored events
    in ``id`` order (filters are the real database's job, tested for real).
    Events are tuples of the table's columns (:mod:`eventsource.schema`), and
    pages hold its default columns.
    """

    columns = schema.DEFAULT_COLUMNS

    def __init__(self, hold: bool = False, page_size: int = 1000,
                 page_bytes: Optional[int] = None) -> None:
        self.hold = hold
        self.page_size = page_size
        self.page_bytes = page_bytes
        self.events: List[Event] = []
        #: pid -> its last version
        self._versions: Dict[str, int] = {}
        self.pending: List[Tuple["defer.Deferred[Any]", Callable[[], Any]]] = []
        self.fail_next: Optional[BaseException] = None
        self.reads: List[Tuple[int, int]] = []
        self.reads_dropped = False
        self.started = False
        #: what :meth:`match_rows` answers: ``(conditions, positions) -> {position: bools}``
        #: (by default every condition holds)
        self.match_answer: Optional[Callable[..., Dict[int, Tuple[bool, ...]]]] = None
        self.tail_reads: List[Tuple[int, int]] = []
        self._commit_listeners: List[Callable[[], object]] = []

    def _answer(self, compute: Callable[[], T]) -> "defer.Deferred[T]":
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            return defer.fail(error)
        if not self.hold:
            return defer.succeed(compute())
        d: "defer.Deferred[T]" = defer.Deferred()
        self.pending.append((d, compute))
        return d

    def release(self, count: Optional[int] = None) -> int:
        """Answer held requests (all of them, or the first ``count``)."""
        released = 0
        while self.pending and (count is None or released < count):
            d, compute = self.pending.pop(0)
            d.callback(compute())
            released += 1
        return released

    def start(self) -> "defer.Deferred[List[str]]":
        self.started = True
        return defer.succeed(["created table"])

    def stop(self) -> "defer.Deferred[None]":
        self.started = False
        return defer.succeed(None)

    def ping(self) -> "defer.Deferred[None]":
        """Like the real store's: answered at once, held, or failed (``fail_next``)."""
        return self._answer(lambda: None)

    def probe(self) -> "defer.Deferred[None]":
        """Answered at once (the database is always reachable here)."""
        return defer.succeed(None)

    def drop_reads(self) -> None:
        """Shutdown began: reads not started are dropped (held ones stay held here)."""
        self.reads_dropped = True

    def add(self, pid: str = "p1", domain: str = "d", name: str = "n", data: Any = None,
            timestamp: Optional[datetime.datetime] = None) -> int:
        """Append one event directly (test set-up); returns its id."""
        return self._append((pid, domain, name, wire.json_stringify(data)), timestamp)

    def _append(self, written: Tuple[Any, ...],
                timestamp: Optional[datetime.datetime] = None,
                event_id: Optional[bytes] = None) -> int:
        """Store the values of :data:`~eventsource.schema.WRITTEN_COLUMNS`."""
        position = len(self.events) + 1
        values = dict(zip(schema.WRITTEN_COLUMNS, written))
        values["id"] = position
        values["timestamp"] = timestamp or datetime.datetime(2020, 4, 6, 11, 35, 18, 414000)
        # the stream columns, as the real writer assigns them
        stream = appends.stream_of(values["pid"])
        values["version"] = self._versions.get(stream, -1) + 1
        self._versions[stream] = values["version"]
        values["event_id"] = event_id or ids.uuid7()
        self.events.append(tuple(values[column] for column in schema.COLUMN_NAMES))
        return position

    def append(self, plan: InsertPlan) -> "defer.Deferred[appends.Appended]":
        """A version 2 append, decided as the real writer decides (:mod:`eventsource.appends`)."""
        def compute() -> Any:
            request = plan.append(detailed=True)
            if request.event_ids:
                wanted = set(request.event_ids)
                stored = {e[_EVENT_ID]: (e[_PID], e[_VERSION], e[_ID])
                          for e in self.events if e[_EVENT_ID] in wanted}
                repeat = appends.repeated(request, stored)
                if repeat is not None:
                    return repeat
            wrong = appends.check(request.expected, self._versions)
            if wrong is not None:
                return wrong
            events = []
            for k, row in enumerate(request.rows):
                event_id = request.event_ids[k] if request.event_ids else ids.uuid7()
                position = self._append(row, event_id=event_id)
                event = self.events[-1]
                events.append(appends.Event(event_id, row[0], event[_VERSION], position))
            self._committed()
            return appends.Appended(tuple(events))

        def refused(outcome: Any) -> Any:
            if isinstance(outcome, appends.AppendRefused):
                raise outcome
            return outcome

        return self._answer(compute).addCallback(refused)

    def insert(self, plan: InsertPlan) -> "defer.Deferred[Tuple[int, int]]":
        def compute() -> Tuple[int, int]:
            first = len(self.events) + 1
            for row in plan.rows:
                self._append(row)
            self._committed()
            return len(plan.rows), first

        return self._answer(compute)

    def pager(self, plan: SelectPlan, start: Optional[int] = None,
              high_water: Optional[int] = None) -> Pager:
        return Pager(self, plan, self.page_size, self.page_bytes, start=start,
                     high_water=high_water)

    def on_commit(self, listener: Callable[[], object]) -> None:
        """Called after each insert or append (not after :meth:`add`: another process's)."""
        self._commit_listeners.append(listener)

    def _committed(self) -> None:
        for listener in self._commit_listeners:
            listener()

    def high_water(self) -> "defer.Deferred[int]":
        return self._answer(lambda: len(self.events))

    def read_tail(self, after: int, size: int) -> "defer.Deferred[List[Tuple[int, str, Event]]]":
        """The events after ``after``, as the real tail encodes them."""
        self.tail_reads.append((after, size))

        def compute() -> List[Tuple[int, str, Event]]:
            rows = []
            for event in self.events[after:after + size]:
                values = dict(zip(schema.COLUMN_NAMES, event))
                rows.append((values["id"], _V2_ENCODE([values[c] for c in schema.TAIL_COLUMNS]),
                             (values["id"], values["event_id"], values["pid"], values["version"],
                              values["domain"], values["name"], values["timestamp"])))
            return rows

        return self._answer(compute)

    def match_rows(self, conditions: List[Tuple[str, Tuple[Any, ...]]],
                   positions: List[int]) -> "defer.Deferred[Dict[int, Tuple[bool, ...]]]":
        def compute() -> Dict[int, Tuple[bool, ...]]:
            if self.match_answer is not None:
                return self.match_answer(conditions, positions)
            return {position: (True,) * len(conditions) for position in positions}

        return self._answer(compute)

    def read_page(self, plan: SelectPlan, high_water: Optional[int], position: int, size: int,
                  max_bytes: Optional[int] = None) -> "defer.Deferred[Page]":
        self.reads.append((position, size))
        columns = self.columns
        encode = wire.row_encoder(columns)
        if plan.encodings:  # (version 2: its default columns, under its names)
            renamed = {new: old for old, new in schema.V2_NAMES.items()}
            columns = tuple(renamed.get(c, c) for c in schema.V2_DEFAULT_COLUMNS)
            encode = wire.row_encoder(
                schema.V2_DEFAULT_COLUMNS,
                [{"eventId": wire.UUID_VALUE, "data": wire.JSON_VALUE}.get(c, wire.PLAIN_VALUE)
                 for c in schema.V2_DEFAULT_COLUMNS])
        shown = [schema.COLUMN_NAMES.index(column) for column in columns]

        def compute() -> Page:
            top = len(self.events) if high_water is None else high_water
            if plan.keyset:
                chosen = [e for e in self.events if position < e[_ID] <= top][:size]
            else:
                chosen = [e for e in self.events if e[_ID] <= top][position:position + size]
            bodies: List[str] = []
            total, cut = 0, False
            for event in chosen:
                bodies.append(encode([event[i] for i in shown]))
                total += len(bodies[-1])
                if max_bytes is not None and total >= max_bytes:
                    cut = len(bodies) < len(chosen)
                    break
            last = None
            if bodies and plan.keyset:
                last = chosen[len(bodies) - 1][_ID]
            return top, bodies, last, cut

        return self._answer(compute)
