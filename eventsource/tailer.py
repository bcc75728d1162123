"""
The tailer: one reader of the table's new events for every subscription of
the server (:class:`Tailer`).

It reads the events after its position with one query
(:meth:`eventsource.interfaces.IEventStore.read_tail`) at once after each
commit of the server's own writer, and every ``interval`` seconds for the
appends of other processes, and hands each event to the subscriptions it
matches, in position order.  The subscriptions an event may match are found
through a :class:`eventsource.matcher.MatcherIndex` (by ``pid``, ``name``,
``domain``), so a commit costs nothing for the subscriptions that its events
cannot match by those keys; the candidates' ``$where`` is decided in Python
(:mod:`eventsource.matcher`) or, for the few conditions Python does not
decide exactly, by one more statement per read for all such candidates
(:meth:`eventsource.interfaces.IEventStore.match_rows`).

Positions commit in position order (every writer takes the append lock,
docs/OPERATIONS.md), so an event the tailer has read past never appears
later: a position missing from what it reads is an append that was rolled
back, and is never waited for.

**Joining.**  :meth:`join` registers a subscription at the tailer's position
``P`` once no read is under way (a read's events are decided for the
subscriptions registered when it began), and calls its ``join(P)``: from
then on every matching event after ``P`` is handed to its ``deliver``.
With no subscription at all the tailer reads nothing; the first to join
finds the position at the table's end (nobody can miss the events skipped).
"""

from datetime import timezone
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from eventsource.interfaces import IEventStore
from eventsource.stats import SECONDS_BOUNDS, Histogram
from eventsource.matcher import Matcher, MatcherIndex
from eventsource.stream import row_size

log = Logger()

#: a compiled ``$where`` for MariaDB to decide: ``(sql, params)``
Condition = Tuple[str, Tuple[Any, ...]]


class Tailer:
    """
    Reads new events and hands them to the subscriptions that match.

    :param store: the :class:`IEventStore`.
    :param clock: the clock of the poll timer.
    :param interval: seconds between reads while subscriptions exist.
    :param page_size: most events per read (a full read is followed by
        another at once).
    :param failed: called with the failure when a read fails (the service
        ends its subscriptions: they cannot know what they missed).
    """

    def __init__(self, store: IEventStore, clock: IReactorTime, *, interval: float,
                 page_size: int, failed: Callable[[Failure], object]) -> None:
        self._store = store
        self._clock = clock
        self.interval = interval
        self.page_size = page_size
        self._failed = failed
        #: every event up to here has been handed over (None: not known yet)
        self.position: Optional[int] = None
        self.index = MatcherIndex()
        self._conditions: Dict[Any, Condition] = {}
        self._joining: List[Tuple[Any, Matcher, Optional[Condition]]] = []
        self._polling = False
        self._again = False
        self._running = False
        self._timer: Optional[IDelayedCall] = None
        #: counters, for the benchmark and the log
        self.reads = 0
        self.events_read = 0
        self.deliveries = 0
        self.sql_checks = 0
        #: seconds from an event's append (its ``timestamp``) to its hand-over
        #: to the subscriptions it matched, once per event that matched any
        self.delivery_latency = Histogram(SECONDS_BOUNDS)

    def __len__(self) -> int:
        return len(self.index)

    def start(self) -> None:
        self._running = True

    def stop(self) -> None:
        """Read nothing more (an answer still to come is dropped)."""
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._joining = []

    # -- subscriptions --------------------------------------------------

    def join(self, subscription: Any, matcher: Matcher,
             condition: Optional[Condition] = None) -> None:
        """
        Register ``subscription`` (its ``join(position)`` is called once it
        is, then its ``deliver(events)`` with each read's matching events);
        ``condition``: its compiled ``$where``, for a matcher that needs SQL.
        """
        self._joining.append((subscription, matcher, condition))
        self._poll()

    def leave(self, subscription: Any) -> None:
        self.index.remove(subscription)
        self._conditions.pop(subscription, None)
        self._joining = [entry for entry in self._joining if entry[0] is not subscription]

    def poke(self) -> None:
        """This server committed: read the new events now (or after the read under way)."""
        if not self._running or not self.index:
            return
        if self._polling:
            self._again = True
        else:
            self._poll()

    # -- reading --------------------------------------------------------

    def _poll(self) -> None:
        if self._polling or not self._running:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._polling = True
        self._again = False
        d: "defer.Deferred[Any]"
        if not self.index or self.position is None:
            # Nobody to miss anything: start from the table's end.
            d = self._store.high_water()
            d.addCallback(self._positioned)
        else:
            self.reads += 1
            d = self._store.read_tail(self.position, self.page_size)
            d.addCallback(self._decide)
        d.addErrback(self._read_failed)
        d.addBoth(self._done)

    def _positioned(self, high_water: int) -> None:
        if self._running and (self.position is None or not self.index):
            self.position = high_water

    def _decide(self, rows: List[Tuple[int, str, Tuple[Any, ...]]]) -> Any:
        """Which subscriptions each event matches; MariaDB asked about the SQL ones."""
        if not self._running or not rows:
            return None
        self.events_read += len(rows)
        decided: Dict[Any, List[int]] = {}
        asked: Dict[Any, List[int]] = {}
        candidates = self.index.candidates
        for k, (_, _, event) in enumerate(rows):
            for subscription, matcher in candidates(event):
                if matcher.sql:
                    asked.setdefault(subscription, []).append(k)
                elif matcher.predicate is None or matcher.predicate(event):
                    decided.setdefault(subscription, []).append(k)
        if len(rows) >= self.page_size:
            self._again = True
        if not asked:
            self._fan_out(rows, decided)
            return None
        self.sql_checks += 1
        order = list(asked)
        positions = sorted({rows[k][0] for ks in asked.values() for k in ks})
        d = self._store.match_rows([self._conditions[s] for s in order], positions)
        d.addCallback(self._checked, rows, decided, asked, order)
        return d

    def _checked(self, met: Dict[int, Tuple[bool, ...]], rows: List[Tuple[int, str, Any]],
                 decided: Dict[Any, List[int]], asked: Dict[Any, List[int]],
                 order: List[Any]) -> None:
        if not self._running:
            return
        for j, subscription in enumerate(order):
            matched = [k for k in asked[subscription] if met.get(rows[k][0], ())[j:j + 1] == (True,)]
            if matched:
                decided[subscription] = matched
        self._fan_out(rows, decided)

    def _fan_out(self, rows: List[Tuple[int, str, Any]], decided: Dict[Any, List[int]]) -> None:
        # (the position first: a subscription's markers read it while it takes its events)
        self.position = rows[-1][0]
        sizes: Dict[int, int] = {}
        index = self.index
        if decided:
            now = self._clock.seconds()
            observe = self.delivery_latency.observe
            for k in sorted({k for matched in decided.values() for k in matched}):
                appended = rows[k][2][6]
                observe(max(0.0, now - appended.replace(tzinfo=timezone.utc).timestamp()))
        for subscription, matched in decided.items():
            if subscription not in index:
                continue  # (it ended meanwhile)
            events = []
            for k in matched:
                position, body, _ = rows[k]
                size = sizes.get(k)
                if size is None:
                    size = sizes[k] = row_size(body)
                events.append((position, body, size))
            self.deliveries += len(events)
            subscription.deliver(events)

    def _read_failed(self, failure: Failure) -> None:
        if not self._running:
            return
        if failure.check("eventsource.store.StoreStopping"):  # type: ignore[no-untyped-call]
            return
        log.warn("reading new events for subscriptions failed: {error}", error=failure.value)
        # (the failure ends every subscription, those still joining too)
        self._joining = []
        self._failed(failure)

    def _done(self, _: object) -> None:
        self._polling = False
        if not self._running:
            return
        if self.position is not None and self._joining:
            joining, self._joining = self._joining, []
            for subscription, matcher, condition in joining:
                if getattr(subscription, "is_live", True):
                    self.index.add(subscription, matcher)
                    if condition is not None:
                        self._conditions[subscription] = condition
                    subscription.join(self.position)
        if (self._again and self.index) or self._joining:
            self._clock.callLater(0, self._poll)
        elif self.index:
            self._timer = self._clock.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._poll()
