"""
The server's own counts, kept as plain numbers where the work happens.

The service (:class:`ServerStats`) and the store (:class:`StoreStats`) each
own one, always, whether or not anything reads them: a count is an integer
added to, a latency one ``bisect`` into a :class:`Histogram`, so keeping them
costs the hot paths next to nothing (no lock, no label lookup, nothing per
row).  :mod:`eventsource.metrics` reads them, with what the service already
knows (its open streams, the store's queues), only when Prometheus scrapes.

Every label a count is kept under comes from a fixed set (request kinds and
results, stream states, MySQL error codes): never a channel, a pid or a
tenant, whatever a client sends.
"""

from bisect import bisect_left
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

#: the request kinds, as the channels name them
KINDS = ("persist", "fetch", "fetch-next", "subscribe")

#: what became of a request: ``ok`` (done: written, stream opened, rows
#: accepted), ``refused`` (answered ``"error"`` without doing it: a bad
#: request, a limit, read-only, a busy reply channel, shutting down),
#: ``unanswerable`` (bad, and naming no usable reply channel: only logged),
#: ``ignored`` (an acknowledgement for no live stream: never answered),
#: ``conflict`` (a version 2 persist refused for its expected version or its
#: event ids: ``wrongExpectedVersion``, ``idempotencyConflict``), ``failed``
#: (a persist the database did not write: answered ``"error"``); in replica
#: mode, ``elsewhere`` (another replica claimed it, or this one is stopping:
#: not served here) and ``unclaimed`` (claiming it in Redis failed: not served)
RESULTS = ("ok", "refused", "unanswerable", "ignored", "conflict", "failed",
           "elsewhere", "unclaimed")

#: the results each kind can have (the counts start at 0 for these)
KIND_RESULTS = {
    "persist": ("ok", "refused", "unanswerable", "conflict", "failed", "elsewhere", "unclaimed"),
    "fetch": ("ok", "refused", "unanswerable", "elsewhere", "unclaimed"),
    "fetch-next": ("ok", "refused", "unanswerable", "ignored"),
    "subscribe": ("ok", "refused", "unanswerable", "elsewhere", "unclaimed"),
}

#: how a stream ended (:class:`eventsource.stream.StreamState`'s terminal states)
CLOSED_STATES = ("ended", "errored", "timed-out")

#: seconds: append and first-row latency, group commit duration
SECONDS_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                  1.0, 2.5, 5.0, 10.0)

#: persists written by one group commit (the writer takes at most 2,000 rows)
BATCH_BOUNDS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)

#: the label of a kind or a code outside the known ones
OTHER = "other"


class Histogram:
    """Counts of observations per bucket (upper bounds, then +Inf) and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # (bisect_left: a value equal to a bound falls in that bound's bucket, as le means)
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> List[Tuple[float, int]]:
        """``(upper bound, observations at most that)`` for each bound, then +Inf."""
        total = 0
        result = []
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            result.append((bound, total))
        return result


class ServerStats:
    """
    What the service counts: requests by kind and result, events written,
    append and first-row latency, streams closed by state and the rows they
    sent and had accepted (open streams' rows are read from them at scrape).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.requests: Dict[Tuple[str, str], int] = {
            (kind, result): 0 for kind in KINDS for result in KIND_RESULTS[kind]}
        self.events_written = 0
        #: seconds from a persist taken to its answer (written)
        self.append_latency = Histogram(SECONDS_BOUNDS)
        #: seconds from a fetch taken to its first row published
        self.first_row_latency = Histogram(SECONDS_BOUNDS)
        self.streams_closed: Dict[str, int] = {state: 0 for state in CLOSED_STATES}
        #: rows sent, and accepted, by the streams that have closed
        self.closed_rows_sent = 0
        self.closed_rows_accepted = 0

    def request(self, kind: str, result: str) -> None:
        """One request of ``kind`` (or on a tenant's channel of that kind) ended as ``result``."""
        key = (kind, result)
        if key in self.requests:
            self.requests[key] += 1
            return
        # a tenant's request channel, <prefix>T:<kind>: only the kind is a label
        kind = kind.rpartition(":")[2]
        key = (kind if kind in KINDS else OTHER, result if result in RESULTS else OTHER)
        self.requests[key] = self.requests.get(key, 0) + 1

    def persist_answered(self, started: float, events: int, duplicate: bool = False) -> None:
        """
        A persist of ``events``, taken at ``started`` (the clock's seconds),
        was written: counted and timed (the events of a version 2 repeat,
        stored before, are not written again).
        """
        self.requests["persist", "ok"] += 1
        if not duplicate:
            self.events_written += events
        self.append_latency.observe(self._clock.seconds() - started)

    def persist_failed(self, failure: Failure) -> None:
        """A persist was not written: refused (an expected version, an event id) or failed."""
        conflict = failure.check("eventsource.appends.AppendRefused")  # type: ignore[no-untyped-call]
        self.requests["persist", "conflict" if conflict else "failed"] += 1

    def first_row_timer(self) -> Callable[[], None]:
        """A fetch was taken: call the result when its first row goes out."""
        started = self._clock.seconds()

        def first_row() -> None:
            self.first_row_latency.observe(self._clock.seconds() - started)

        return first_row

    def stream_closed(self, stream: Any) -> None:
        """A stream reached a terminal state (an :class:`eventsource.stream.Stream`)."""
        state = stream.state.value
        self.streams_closed[state] = self.streams_closed.get(state, 0) + 1
        self.closed_rows_sent += stream.rows_sent
        self.closed_rows_accepted += stream.rows_accepted


def mysql_error_code(error: BaseException) -> Optional[str]:
    """
    The MariaDB/MySQL error code of ``error`` as a label (``"1969"``), ``"other"``
    for a failure that is not one, None when it is no failure at all (the
    server stopping).
    """
    import pymysql

    if type(error).__name__ == "StoreStopping":
        return None
    cause = error if isinstance(error, pymysql.err.MySQLError) else error.__cause__
    if isinstance(cause, pymysql.err.MySQLError) and cause.args:
        code = cause.args[0]
        if isinstance(code, int) and 0 <= code < 100_000:
            return str(code)
    return OTHER


def _last_position(outcome: Any) -> int:
    """The last position a persist's outcome stored (-1: none)."""
    if isinstance(outcome, tuple):
        affected, first = outcome
        return int(first + affected - 1) if affected else -1
    events = getattr(outcome, "events", None)  # (an appends.Appended; a refusal has none)
    return max((event.position for event in events), default=-1) if events else -1


class StoreStats:
    """
    What the store counts: each group commit's size and duration, the last
    position (``id``) it committed, and the errors MariaDB answered, by code.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        #: persists written per transaction
        self.group_commit_persists = Histogram(BATCH_BOUNDS)
        #: seconds from a batch handed to the pool to its commit
        self.group_commit_seconds = Histogram(SECONDS_BOUNDS)
        #: the ``id`` of the last event this server committed (None: none yet)
        self.last_position: Optional[int] = None
        self.mysql_errors: Dict[str, int] = {}

    def batch_started(self, written: "defer.Deferred[Any]", persists: int) -> None:
        """
        A group commit of ``persists`` persists went to the pool; ``written``
        fires with each persist's outcome: ``(affected_rows, first_id)``, an
        :class:`eventsource.appends.Appended`, or the refusal of a version 2
        append.  Call it before anything else is chained on ``written``: the
        result passes through unchanged.
        """
        written.addCallback(self._batch_written, self._clock.seconds(), persists)

    def _batch_written(self, results: List[Any], started: float, persists: int) -> List[Any]:
        try:
            self.group_commit_seconds.observe(self._clock.seconds() - started)
            self.group_commit_persists.observe(persists)
            last = max((_last_position(outcome) for outcome in results), default=None)
            if last is not None and last >= 0 and (self.last_position is None
                                                   or last > self.last_position):
                self.last_position = last
        except Exception:  # (a count gone wrong must never fail a committed batch)
            log.failure("could not count a group commit")
        return results

    def error(self, error: BaseException) -> None:
        """Work in the pool failed with ``error``."""
        code = mysql_error_code(error)
        if code is not None:
            self.mysql_errors[code] = self.mysql_errors.get(code, 0) + 1
