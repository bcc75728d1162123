"""
One subscription on its reply channel, as a state machine (:class:`Subscription`).

A subscription sends the events after its start position that match its
``$where``: first from the table (its *history*, read a page at a time like a
fetch), then, once it has caught up, every new one as the server's tailer
(:mod:`eventsource.tailer`) hands it over, for as long as its client keeps
accepting.  Like :class:`eventsource.stream.Stream` it is a plain model of one
shared ``transitions`` machine and knows nothing of Redis or MySQL: it is
handed ``publish``, ``publish_counted`` (a publish that tells how many
received it), ``read_history`` (asks for the next page of history, answered
later through :meth:`Subscription.receive` or :meth:`Subscription.fail`),
``position`` (the tailer's position now), a clock and ``closed``.

States (:class:`SubscriptionState`)
    ``catching-up``: reading history up to a high water (and holding the new
    events the tailer hands over meanwhile); ``live``: sending new events as
    they come; ``ended``, ``errored``, ``timed-out``: terminal.

Inputs (triggers, each fired from exactly one method)
    ``joined`` (:meth:`join`), ``page_ready`` (:meth:`receive`),
    ``events_arrived`` (:meth:`deliver`), ``accepted`` (:meth:`accept`),
    ``heartbeat_due`` (the heartbeat timer), ``client_gone`` (a heartbeat
    nobody received), ``client_end`` (:meth:`end`), ``deadline_passed`` (the
    row timer), ``failed`` (:meth:`fail`).

The seam between history and live events, without gap or duplicate:
``covered`` is the position up to which every matching event has been put
in the outbox.  The tailer registers the subscription at its own position
``H`` (:meth:`join`): from then on it hands over every matching event after
``H``.  History is read from ``covered`` up to ``H``; the events handed over
meanwhile wait in a buffer and are sent after it, each only if it lies
after ``covered``.  A buffer that passes ``buffer_bytes`` is dropped and
history read once more, up to the tailer's position then.  A live
subscription whose unsent events pass ``buffer_bytes`` (its client is
behind) drops them the same way and catches up from the table again.

Markers (``{"caughtUp": p}`` once, ``{"heartbeat": p}`` while live and idle)
are not rows: they take no room in the window and need no acceptance, but
wait in the outbox behind the rows before them.  Their ``p`` says that every
matching event up to ``p`` has been sent before them.
"""

import enum
import json
from collections import deque
from itertools import repeat
from typing import Any, Callable, Deque, List, Optional, Tuple

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from eventsource.schema import V2_DEFAULT_COLUMNS
from eventsource.stream import RowTimer, bind_inputs, shared_machine, row_size
from eventsource.wire import END_BODY, FROM_END, TIMEOUT_BODY, encode_error


class SubscriptionState(enum.Enum):
    """The states of a subscription, named as the protocol documentation does."""

    CATCHING_UP = "catching-up"
    LIVE = "live"
    ENDED = "ended"
    ERRORED = "errored"
    TIMED_OUT = "timed-out"


_UP = SubscriptionState.CATCHING_UP
_LIVE = SubscriptionState.LIVE
LIVE = (_UP, _LIVE)
TERMINAL = (SubscriptionState.ENDED, SubscriptionState.ERRORED, SubscriptionState.TIMED_OUT)

INPUTS = ("joined", "page_ready", "events_arrived", "accepted", "heartbeat_due",
          "client_gone", "client_end", "deadline_passed", "failed")

# The whole transition table.  The input methods prepare what the conditions
# read (history_done, fell_behind); "send" publishes what the window lets out.
TRANSITIONS: List[dict[str, Any]] = [
    {"trigger": "joined", "source": _UP, "dest": _LIVE, "conditions": "history_done"},
    {"trigger": "joined", "source": _UP, "dest": None, "after": "send"},
    {"trigger": "page_ready", "source": _UP, "dest": _LIVE, "conditions": "history_done"},
    {"trigger": "page_ready", "source": _UP, "dest": None, "after": "send"},
    # (catching up, new events wait in the buffer: deliver put them there)
    {"trigger": "events_arrived", "source": _UP, "dest": None},
    {"trigger": "events_arrived", "source": _LIVE, "dest": _UP, "conditions": "fell_behind",
     "before": "drop_unsent", "after": "send"},
    {"trigger": "events_arrived", "source": _LIVE, "dest": None, "after": "send"},
    {"trigger": "accepted", "source": LIVE, "dest": None, "after": "send"},
    {"trigger": "heartbeat_due", "source": _LIVE, "dest": None, "after": "beat"},
    {"trigger": "heartbeat_due", "source": _UP, "dest": None},
    {"trigger": "client_gone", "source": LIVE, "dest": SubscriptionState.ENDED},
    {"trigger": "client_end", "source": LIVE, "dest": SubscriptionState.ENDED},
    {"trigger": "deadline_passed", "source": LIVE, "dest": SubscriptionState.TIMED_OUT},
    {"trigger": "failed", "source": LIVE, "dest": SubscriptionState.ERRORED},
]
# Terminal states swallow every late input.
TRANSITIONS += [{"trigger": name, "source": list(TERMINAL), "dest": None} for name in INPUTS]

STATES: List[dict[str, Any]] = [
    {"name": _UP},
    {"name": _LIVE, "on_enter": "go_live"},
    {"name": SubscriptionState.ENDED, "on_enter": "close"},
    {"name": SubscriptionState.ERRORED, "on_enter": ["send_error", "close"]},
    {"name": SubscriptionState.TIMED_OUT, "on_enter": ["send_timeout", "close"]},
]

#: The one machine every subscription shares.
MACHINE = shared_machine(STATES, TRANSITIONS, _UP)

#: a row of history starts with its position (the first of the default columns)
assert V2_DEFAULT_COLUMNS[0] == "position"
_POSITION_AT = len('{"position":')

#: a marker waiting in the outbox: ``(rows before it, body, is caughtUp)``, the
#: rows counted from the subscription's first
Marker = Tuple[int, str, bool]
#: an event the tailer hands over: ``(position, body, size)``
LiveEvent = Tuple[int, str, int]


def position_of(body: str) -> int:
    """The position of a version 2 row of the default columns (its first field)."""
    return int(body[_POSITION_AT:body.index(",", _POSITION_AT)])


def marker(name: str, position: int) -> str:
    """``{"caughtUp": p}`` or ``{"heartbeat": p}``."""
    return json.dumps({name: position}, separators=(",", ":"))


class Subscription(RowTimer):
    """
    One subscription: its outbox, window, history rounds, live buffer and timers.

    Create it with :meth:`open`; it starts once the tailer calls :meth:`join`.
    ``start``: the position after which events are sent, or
    :data:`eventsource.wire.FROM_END` (the tailer's position at the join).
    """

    # the machine's state and its inputs (bound below: bind_inputs)
    state: SubscriptionState
    joined: Callable[[], bool]
    page_ready: Callable[[], bool]
    events_arrived: Callable[[], bool]
    accepted: Callable[[], bool]
    heartbeat_due: Callable[[], bool]
    client_gone: Callable[[], bool]
    client_end: Callable[[], bool]
    deadline_passed: Callable[[], bool]
    failed: Callable[[], bool]

    def __init__(self, channel: str, *, start: Any, window: int, window_bytes: int,
                 buffer_bytes: int, row_timeout: float, heartbeat: float, clock: IReactorTime,
                 publish: Callable[[str, str], object],
                 publish_counted: Callable[[str, str], Any],
                 read_history: Callable[["Subscription", int, int, bool], object],
                 position: Callable[[], int],
                 closed: Callable[["Subscription"], object]):
        self.channel = channel
        self.window = window
        self.window_bytes = window_bytes
        self.buffer_bytes = buffer_bytes
        self.row_timeout = row_timeout
        self.heartbeat = heartbeat
        #: the version 2 error code of a failure, and why (for the client and the log)
        self.code = "internal"
        self.reason: Optional[str] = None
        self.rows_sent = 0
        #: times the subscription dropped held events and read them from the table
        self.refills = 0
        self._from_end = start == FROM_END
        #: every matching event up to here is in the outbox (or was sent)
        self.covered: int = 0 if self._from_end else int(start)
        self._clock = clock
        self._publish = publish
        self._publish_counted = publish_counted
        self._read_history = read_history
        self._position = position
        self._closed = closed
        # The outbox: rows to publish (bodies and sizes from _head on; the
        # row at index i is the subscription's row _base + i) and the markers
        # waiting behind some of them.
        self._bodies: List[str] = []
        self._sizes: List[int] = []
        self._head = 0
        self._base = 0
        self._markers: Deque[Marker] = deque()
        self._outbox_bytes = 0   # (rows only)
        self._sent_at: Deque[float] = deque()
        self._sent_sizes: Deque[int] = deque()
        self.unaccepted_bytes = 0
        # history: the high water of the round, and how far the round got
        self._joined = False
        self._round_high = 0
        self._round_done = False
        self._new_round = False
        self._fetching = False
        #: unsent rows below which the next page of history is asked for
        self._read_ahead = window
        #: ... and whose bytes are no more than this (half the last page's)
        self._read_ahead_bytes = 0
        # live events handed over while catching up
        self._buffer: List[LiveEvent] = []
        self._buffered = 0
        self._overflowed = False
        self._caught_up_sent = False
        self._last_publish = clock.seconds()
        self._timer: Optional[IDelayedCall] = None
        self._beat_call: Optional[IDelayedCall] = None
        # what the input being handled leads to (read by the conditions)
        self._history_done = False
        self._behind = False
        self.state = _UP

    @classmethod
    def open(cls, channel: str, **kwargs: Any) -> "Subscription":
        """Create a subscription, catching up (it waits for :meth:`join`)."""
        return cls(channel, **kwargs)

    def __repr__(self) -> str:
        return (f"<Subscription {self.channel!r} {self.state.value} covered={self.covered}"
                f" sent={self.rows_sent}>")

    @property
    def is_live(self) -> bool:
        """Not ended (catching up or live)."""
        return self.state in LIVE

    @property
    def held_bytes(self) -> int:
        """Bytes of events held for the client (the outbox and the live buffer)."""
        return self._outbox_bytes + self._buffered

    @property
    def waiting_events(self) -> int:
        """Events matched and not yet published (the outbox and the live buffer): its lag."""
        return len(self._bodies) - self._head + len(self._buffer)

    def waiting_seconds(self, now: float) -> float:
        """
        How long events have waited for the client: the age of the oldest
        row it has not accepted while others wait behind it (0 when none wait).
        """
        if not self._sent_at or self.waiting_events == 0:
            return 0.0
        return max(0.0, now - self._sent_at[0])

    # -- inputs ---------------------------------------------------------

    def join(self, high_water: int) -> None:
        """The tailer hands over every matching event after ``high_water`` from now on."""
        if self.state in TERMINAL or self._joined:
            return
        self._joined = True
        if self._from_end:
            self.covered = max(self.covered, high_water)
        self._begin_round(high_water)
        self.joined()

    def receive(self, bodies: List[str], exhausted: bool) -> None:
        """A page of history arrived (encoded rows, in position order)."""
        if self.state is not _UP:
            return
        self._fetching = False
        if bodies:
            # (history is read after covered: every row is new)
            sizes = [len(body) if body.isascii() else row_size(body) for body in bodies]
            self._read_ahead = max(self.window, len(bodies) // 2)
            self._read_ahead_bytes = sum(sizes) // 2
            self._bodies.extend(bodies)
            self._sizes.extend(sizes)
            self._outbox_bytes += sum(sizes)
            self.covered = max(self.covered, position_of(bodies[-1]))
        if exhausted:
            self.covered = max(self.covered, self._round_high)
            if self._overflowed:
                # (the held events were dropped: read them from the table)
                self._begin_round(self._position())
            else:
                self._round_done = True
        self._history_done = self._round_done
        self.page_ready()

    def deliver(self, events: List[LiveEvent]) -> None:
        """New matching events, in position order, from the tailer."""
        state = self.state
        if state is _UP:
            if not self._overflowed:
                self._buffer.extend(events)
                self._buffered += sum(event[2] for event in events)
                if self._buffered > self.buffer_bytes:
                    self._buffer, self._buffered, self._overflowed = [], 0, True
            self.events_arrived()
        elif state is _LIVE:
            self._enqueue(events)
            self._behind = self._outbox_bytes > self.buffer_bytes
            self.events_arrived()

    def accept(self, count: int = 1) -> None:
        """The client accepted ``count`` rows; acceptance of rows never sent is ignored."""
        count = min(count, len(self._sent_at))
        if count <= 0 or self.state in TERMINAL:
            return
        freed = 0
        for _ in range(count):
            self._sent_at.popleft()
            freed += self._sent_sizes.popleft()
        self.unaccepted_bytes -= freed
        self.accepted()

    def end(self) -> None:
        """The client said ``"end"``: stop, publish nothing more."""
        self.client_end()

    def fail(self, reason: str, code: str = "internal") -> None:
        """Publish the error object of ``code`` and ``reason``, then ``"end"``, and stop."""
        self.reason = reason
        self.code = code
        self.failed()

    # -- conditions -----------------------------------------------------

    def history_done(self) -> bool:
        return self._history_done

    def fell_behind(self) -> bool:
        return self._behind

    # -- history rounds -------------------------------------------------

    def _begin_round(self, high_water: int) -> None:
        """Read history from ``covered`` to ``high_water``, holding the events after it."""
        self._round_high = high_water
        self._buffer, self._buffered, self._overflowed = [], 0, False
        self._round_done = self.covered >= high_water
        self._new_round = not self._round_done
        self._history_done = self._round_done

    def _want_history(self) -> None:
        # (read ahead: the next page is asked for while the client still has
        # a window's worth of rows, or half the last page, to take, so the
        # database reads it while they go out; rows the byte window holds
        # back are never read past: at most one and a half pages are held)
        if (self.state is _UP and self._joined and not self._round_done and not self._fetching
                and len(self._bodies) - self._head <= self._read_ahead
                and self._outbox_bytes <= self._read_ahead_bytes):
            self._fetching = True
            new, self._new_round = self._new_round, False
            self._read_history(self, self.covered, self._round_high, new)

    # -- actions --------------------------------------------------------

    def _enqueue(self, events: List[LiveEvent]) -> None:
        covered = self.covered
        bodies, sizes = self._bodies, self._sizes
        for position, body, size in events:
            if position > covered:
                bodies.append(body)
                sizes.append(size)
                self._outbox_bytes += size
                covered = position
        self.covered = covered

    def go_live(self) -> None:
        """On entering live: the held events, then ``caughtUp`` (once), then the heartbeat."""
        buffer, self._buffer, self._buffered = self._buffer, [], 0
        self._enqueue(buffer)
        if not self._caught_up_sent:
            self._caught_up_sent = True
            self._markers.append((self._base + len(self._bodies),
                                  marker("caughtUp", self.marker_position()), True))
        self.send()
        if self._beat_call is None:
            self._beat_call = self._clock.callLater(self.heartbeat, self._beat_timer)

    def marker_position(self) -> int:
        """Every matching event up to here has been put in the outbox."""
        return max(self.covered, self._position())

    def drop_unsent(self) -> None:
        """The client is behind: drop the unsent events and read them from the table again."""
        if self._head < len(self._bodies):
            self.covered = min(self.covered, position_of(self._bodies[self._head]) - 1)
        if any(caught_up for _, _, caught_up in self._markers):
            self._caught_up_sent = False  # (not published yet: it goes at the next catch-up)
        self._markers.clear()
        self._base += len(self._bodies)
        self._bodies, self._sizes, self._head = [], [], 0
        self._outbox_bytes = 0
        self.refills += 1
        self._begin_round(self._position())

    def send(self) -> None:
        """Publish what the window lets out (markers always, behind the rows before them)."""
        bodies, markers = self._bodies, self._markers
        if self._head < len(bodies) or markers:
            publish, channel = self._publish, self.channel
            sent_at, sent_sizes, sizes = self._sent_at, self._sent_sizes, self._sizes
            published = False
            while True:
                head = self._head
                while markers and markers[0][0] <= self._base + head:
                    publish(channel, markers.popleft()[1])
                    published = True
                # the rows the window lets out, up to the next marker
                count = min(len(bodies) - head, self.window - len(sent_at))
                if markers:
                    count = min(count, markers[0][0] - self._base - head)
                if count <= 0:
                    break
                end = head + count
                if self.unaccepted_bytes + self._outbox_bytes > self.window_bytes:
                    # (the byte budget may bind: count the rows it fits, one always)
                    out, allowed = self.unaccepted_bytes, 0
                    for size in sizes[head:end]:
                        if (sent_at or allowed) and out + size > self.window_bytes:
                            break
                        out += size
                        allowed += 1
                    if not allowed:
                        break
                    end = head + allowed
                for body in bodies[head:end]:
                    publish(channel, body)
                published = True
                taken = sizes[head:end]
                total = sum(taken)
                sent_sizes.extend(taken)
                sent_at.extend(repeat(self._clock.seconds(), end - head))
                self.unaccepted_bytes += total
                self._outbox_bytes -= total
                self.rows_sent += end - head
                self._head = end
                if end - head < count:
                    break
            if self._head >= len(bodies):
                self._base += len(bodies)
                self._bodies, self._sizes, self._head = [], [], 0
            elif self._head > 4096:
                # (a long outbox sent bit by bit: drop what went out)
                self._base += self._head
                del bodies[:self._head], sizes[:self._head]
                self._head = 0
            if published:
                self._last_publish = self._clock.seconds()
        self._arm_timer()
        self._want_history()

    def beat(self) -> None:
        """Live and idle for a heartbeat's time: say so, and see whether anybody listens."""
        if (self._head < len(self._bodies) or self._markers
                or self._clock.seconds() - self._last_publish < self.heartbeat):
            return
        self._last_publish = self._clock.seconds()
        d = self._publish_counted(self.channel, marker("heartbeat", self.marker_position()))
        if d is not None:
            d.addCallbacks(self._heard_by, lambda _: None)

    def _heard_by(self, receivers: int) -> None:
        if not receivers and self.state in LIVE:
            self.reason = "its reply channel has no subscriber"
            self.client_gone()

    def send_error(self) -> None:
        self._publish(self.channel, encode_error(self.code, self.reason or "the subscription failed"))
        self._publish(self.channel, END_BODY)

    def send_timeout(self) -> None:
        self._publish(self.channel, TIMEOUT_BODY)

    def close(self) -> None:
        """On entering any terminal state: drop timers and events, leave the machine, tell the owner."""
        for call in (self._timer, self._beat_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._beat_call = None
        self._bodies, self._sizes, self._head = [], [], 0
        self._markers.clear()
        self._outbox_bytes = 0
        self._buffer, self._buffered = [], 0
        self._sent_at.clear()
        self._sent_sizes.clear()
        self.unaccepted_bytes = 0
        self._closed(self)

    # -- timers ---------------------------------------------------------

    def _beat_timer(self) -> None:
        self._beat_call = None
        if self.state in TERMINAL:
            return
        self.heartbeat_due()
        if self.state in LIVE:
            # (the next beat a heartbeat after the last message; a full
            # window, which sent nothing, waits a whole heartbeat more)
            delay = self._last_publish + self.heartbeat - self._clock.seconds()
            self._beat_call = self._clock.callLater(
                delay if delay > 0 else self.heartbeat, self._beat_timer)

    def _deadline(self) -> None:
        self._timer = None
        if self._sent_at:
            if self._clock.seconds() >= self._sent_at[0] + self.row_timeout:
                self.deadline_passed()
            else:
                self._arm_timer()


bind_inputs(Subscription, MACHINE, INPUTS)
