"""
The stream of one fetch on its reply channel, as a state machine (:class:`Stream`).

A :class:`Stream` is a plain model driven by one shared ``transitions``
:data:`MACHINE`.  It knows nothing of Redis or MySQL: it is handed a
``publish(channel, body)`` function, a ``fetch_more(stream)`` function that asks
for the next page of rows (answered later through :meth:`Stream.receive` or
:meth:`Stream.fail`), a clock for its row timer, and a ``closed(stream)``
function called once when it reaches a terminal state.

States (:class:`StreamState`)
    ``awaiting-row``: the window has room; the stream waits for rows from
    the database (or, with rows buffered, for the echo budget).  ``awaiting-accept``: the window is full (or the last row
    of a version 1 stream is out): the stream waits for the client.
    ``ended``, ``errored``, ``timed-out``: terminal; late messages are ignored.

Inputs (triggers, each fired from exactly one method)
    ``row_ready`` (:meth:`Stream.receive`), ``accepted`` (:meth:`Stream.accept`),
    ``client_end`` (:meth:`Stream.client_end`), ``deadline_passed`` (the row
    timer), ``failed`` (:meth:`Stream.fail`), ``room_made``
    (:meth:`Stream.budget_freed`).

The window is what is published and not yet accepted, bounded in rows
(``window``) and in bytes (``window_bytes``; a row larger than that still
goes out alone).  Version 1 of the protocol is a window of 1: one row, wait
for its acceptance, the next row, and ``"end"`` only after the last row was
accepted.  With a larger window the stream publishes ``"end"`` right after
the last row.  The row timeout always measures the oldest unaccepted row.

Version 1 streams may also share an :class:`EchoBudget`: the server listens
on their reply channels, so Redis sends it back every row it publishes
there; the budget bounds those rows' bytes over all streams together.  A
stream the budget holds back waits in ``awaiting-row`` with its rows
buffered, and the ``room_made`` input (:meth:`Stream.budget_freed`) wakes it.

Sizes are the rows' lengths as text (``len``), the UTF-8 length for the rare
row that is not ASCII, computed once per page.
"""

import enum
from collections import deque
from itertools import islice, repeat
from typing import Any, Callable, Deque, List, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from transitions import Machine

from eventsource.wire import END_BODY, ERROR_BODY, TIMEOUT_BODY, encode_error


class StreamState(enum.Enum):
    """The states of a stream, named as the protocol documentation does."""

    AWAITING_ROW = "awaiting-row"
    AWAITING_ACCEPT = "awaiting-accept"
    ENDED = "ended"
    ERRORED = "errored"
    TIMED_OUT = "timed-out"


_ROW = StreamState.AWAITING_ROW
_ACCEPT = StreamState.AWAITING_ACCEPT
LIVE = (_ROW, _ACCEPT)
TERMINAL = (StreamState.ENDED, StreamState.ERRORED, StreamState.TIMED_OUT)

INPUTS = ("row_ready", "accepted", "client_end", "deadline_passed", "failed", "room_made")

# The whole transition table.  Rows and acceptances are "settling" inputs:
# the stream publishes what its window allows (``send_rows``) and the
# conditions, which look ahead at the result of that, pick where it lands.
# Transitions are tried in order; the first whose conditions hold wins.
TRANSITIONS: List[dict[str, Any]] = [
    {"trigger": "row_ready", "source": LIVE, "dest": StreamState.ENDED,
     "conditions": "will_finish", "before": ["send_rows", "send_end"]},
    {"trigger": "row_ready", "source": _ROW, "dest": _ACCEPT,
     "conditions": "will_wait", "before": "send_rows"},
    # (a windowed stream's page read ahead, arriving while it waits for
    # acceptances: held, or sent as far as the window has room)
    {"trigger": "row_ready", "source": _ACCEPT, "dest": None,
     "conditions": "will_wait", "before": "send_rows"},
    {"trigger": "row_ready", "source": LIVE, "dest": _ROW, "before": "send_rows"},

    # (the echo budget had room again for a stream it held back, which
    # waits in awaiting-row with its rows buffered and none unaccepted)
    {"trigger": "room_made", "source": _ROW, "dest": StreamState.ENDED,
     "conditions": "will_finish", "before": ["send_rows", "send_end"]},
    {"trigger": "room_made", "source": _ROW, "dest": _ACCEPT,
     "conditions": "will_wait", "before": "send_rows"},
    {"trigger": "room_made", "source": _ROW, "dest": None, "before": "send_rows"},

    {"trigger": "accepted", "source": LIVE, "dest": StreamState.ENDED,
     "conditions": "will_finish", "before": ["send_rows", "send_end"]},
    # (the commonest of all: a row accepted, the next one sent; internal, so
    # no exit/enter work for a state that does not change)
    {"trigger": "accepted", "source": _ACCEPT, "dest": None,
     "conditions": "will_wait", "before": "send_rows"},
    {"trigger": "accepted", "source": _ROW, "dest": _ACCEPT,
     "conditions": "will_wait", "before": "send_rows"},
    {"trigger": "accepted", "source": LIVE, "dest": _ROW, "before": "send_rows"},

    {"trigger": "client_end", "source": LIVE, "dest": StreamState.ENDED},
    {"trigger": "deadline_passed", "source": LIVE, "dest": StreamState.TIMED_OUT},
    {"trigger": "failed", "source": LIVE, "dest": StreamState.ERRORED},
]
# Terminal states swallow every late input.
TRANSITIONS += [{"trigger": name, "source": list(TERMINAL), "dest": None} for name in INPUTS]

STATES: List[dict[str, Any]] = [
    {"name": _ROW, "on_enter": "want_rows"},
    {"name": _ACCEPT},
    {"name": StreamState.ENDED, "on_enter": "close"},
    {"name": StreamState.ERRORED, "on_enter": ["send_error", "close"]},
    {"name": StreamState.TIMED_OUT, "on_enter": ["send_timeout", "close"]},
]


def shared_machine(states: List[Any], transitions: List[Any], initial: Any) -> Machine:
    """
    A ``transitions`` machine for many plain models at once (a ``Machine``
    per model costs ~0.3 ms): no automatic transitions, an impossible input
    raises (a bug, never ignored), and inputs are handled at once (queued,
    they would wait behind the callbacks of a Deferred another model fires).
    The client's requests use one too.
    """
    return Machine(model=None, states=states, transitions=transitions, initial=initial,
                   auto_transitions=False, ignore_invalid_triggers=False, queued=False)


def bind_inputs(cls: type, machine: Machine, inputs: Any) -> None:
    """
    Make each input a method of ``cls`` that fires it on ``machine`` for
    the instance, which starts in the machine's initial state (its
    ``state``).  Models are never registered with the machine
    (``add_model`` binds about twenty attributes to every instance: ~0.1 ms
    a stream, and a list to leave): the transitions resolve their
    callbacks on the model they are fired for, as the client's requests do.
    """
    for name in inputs:
        setattr(cls, name, _input(machine.events[name]))


def _input(event: Any) -> Callable[[Any], bool]:
    def fire(model: Any) -> bool:
        return bool(event.trigger(model))
    fire.__name__ = event.name
    return fire


#: The one machine every stream shares.
MACHINE = shared_machine(STATES, TRANSITIONS, _ROW)


def row_size(body: str) -> int:
    """A row's size in bytes as Redis carries it (``len`` for ASCII, which is O(1) to know)."""
    return len(body) if body.isascii() else len(body.encode("utf-8", "surrogatepass"))


class EchoBudget:
    """
    The bytes of rows published and not yet accepted on every stream that
    shares it (version 1 streams: the server hears each such row again on
    the reply channel it listens on), so that this echo stays well under
    Redis's pubsub output buffer limit.

    Streams over budget queue up and are woken in order (``room_made``)
    as acceptances free bytes; with nothing out, one row always goes, so a
    single large row still flows.
    """

    def __init__(self, limit: int, clock: IReactorTime):
        self.limit = limit
        self.used = 0
        self.waiting: Deque["Stream"] = deque()
        self._clock = clock
        self._wake_call: Optional[IDelayedCall] = None

    def fits(self, size: int, stream: "Stream") -> bool:
        """Whether ``stream`` may publish a row of ``size`` bytes now (first come, first served)."""
        if self.waiting and self.waiting[0] is not stream:
            return False
        return self.used == 0 or self.used + size <= self.limit

    def wait(self, stream: "Stream") -> None:
        if stream not in self.waiting:
            self.waiting.append(stream)

    def take(self, size: int, stream: "Stream") -> None:
        self.used += size
        if self.waiting and self.waiting[0] is stream:
            self.waiting.popleft()

    def release(self, size: int) -> None:
        self.used -= size
        if self.waiting and self._wake_call is None:
            # a follow-up, not a trigger inside the trigger that freed the bytes
            self._wake_call = self._clock.callLater(0, self._wake)

    def leave(self, stream: "Stream") -> None:
        """A stream ended: it waits no more."""
        try:
            self.waiting.remove(stream)
        except ValueError:
            pass

    def _wake(self) -> None:
        self._wake_call = None
        while self.waiting:
            stream = self.waiting[0]
            stream.budget_freed()
            if self.waiting and self.waiting[0] is stream:
                break  # still no room for it: the next release wakes it

    def cancel(self) -> None:
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()
        self._wake_call = None


class RowTimer:
    """
    The row timeout of a :class:`Stream` or a subscription: one DelayedCall
    at the oldest unaccepted row's send time plus ``row_timeout``, calling
    the class's ``_deadline``.
    """

    _timer: Optional[IDelayedCall]
    _sent_at: Deque[float]
    _clock: IReactorTime
    row_timeout: float

    def _deadline(self) -> None:
        raise NotImplementedError

    def _arm_timer(self) -> None:
        # With no row out the timer is left as it is (moving a DelayedCall is
        # ~15x cheaper than cancelling it and making a new one, and this runs
        # for every row); when it fires with nothing unaccepted it does nothing.
        if not self._sent_at:
            return
        deadline = self._sent_at[0] + self.row_timeout
        delay = max(0.0, deadline - self._clock.seconds())
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() != deadline:
                self._timer.reset(delay)
        else:
            self._timer = self._clock.callLater(delay, self._deadline)


class Stream(RowTimer):
    """
    One fetch's reply channel: buffered rows, the window, the row timer.

    Create it with :meth:`open`; it then asks ``fetch_more`` for rows at once.
    ``window_bytes`` bounds the bytes unaccepted (one row always goes);
    ``budget``, an :class:`EchoBudget` shared with other streams, or None.
    """

    # the machine's state and its inputs (bound below: bind_inputs)
    state: StreamState
    row_ready: Callable[[], bool]
    accepted: Callable[[], bool]
    client_end: Callable[[], bool]
    deadline_passed: Callable[[], bool]
    failed: Callable[[], bool]
    room_made: Callable[[], bool]

    def __init__(self, channel: str, *, window: int, row_timeout: float, clock: IReactorTime,
                 publish: Callable[[str, str], object],
                 fetch_more: Callable[["Stream"], object],
                 closed: Callable[["Stream"], object],
                 window_bytes: Optional[int] = None, budget: Optional[EchoBudget] = None,
                 version: int = 1,
                 on_first_row: Optional[Callable[[], object]] = None):
        self.channel = channel
        #: the protocol version of the fetch: how a failure is told
        self.version = version
        #: the version 2 error code of a failure
        self.code = "internal"
        self.window = window
        self.window_bytes = window_bytes
        self.row_timeout = row_timeout
        self.rows_sent = 0
        #: rows the client accepted (for the metrics)
        self.rows_accepted = 0
        #: called once, when the first row is published (the first-row latency)
        self._on_first_row = on_first_row
        #: why the stream failed, for the log (None unless it did)
        self.reason: Optional[str] = None
        self._clock = clock
        self._publish = publish
        self._fetch_more = fetch_more
        self._closed = closed
        self._budget = budget
        # The rows read ahead: one page (a new page is asked for only once
        # the last is all sent), its rows' sizes, and the next row to send.
        self._page: List[str] = []
        self._sizes: List[int] = []
        self._head = 0
        self._buffered_bytes = 0
        self._sent_at: Deque[float] = deque()  # send time of every unaccepted row, oldest first
        # the size of every unaccepted row (with a window of 1, the one
        # row out is all of unaccepted_bytes: no deque, ~760 bytes saved
        # per idle version 1 stream)
        self._sent_sizes: Optional[Deque[int]] = deque() if window > 1 else None
        #: bytes published and not yet accepted
        self.unaccepted_bytes = 0
        self._exhausted = False
        self._fetching = False
        #: a windowed stream asks for its next page once no more than this
        #: many rows are left to send (a window, or half the last page), so
        #: the database reads it while the client takes them; a version 1
        #: stream (window 1) asks once its page is all sent
        self._read_ahead = window if window > 1 else 0
        #: ... and once those rows' bytes are no more than half the last
        #: page's (rows the byte window holds back are never read past)
        self._read_ahead_bytes = 0
        self._timer: Optional[IDelayedCall] = None
        #: how many buffered rows the input being handled lets out (see _plan)
        self._sending = 0
        self._finishing = self._waiting = False
        self.state = _ROW

    @classmethod
    def open(cls, channel: str, **kwargs: Any) -> "Stream":
        """Create a stream (awaiting a row) and ask for its first rows."""
        stream = cls(channel, **kwargs)
        stream.want_rows()
        return stream

    def __repr__(self) -> str:
        return f"<Stream {self.channel!r} {self.state.value} sent={self.rows_sent}>"

    @property
    def buffered_bytes(self) -> int:
        """Bytes of rows read from the database and not yet published."""
        return self._buffered_bytes

    @property
    def buffered_rows(self) -> int:
        """Rows read from the database and not yet published."""
        return len(self._page) - self._head

    # -- inputs ---------------------------------------------------------

    def receive(self, rows: List[str], exhausted: bool) -> None:
        """Rows (encoded message bodies) arrived from the database."""
        if self.state in TERMINAL:
            return
        self._fetching = False
        sizes = [len(body) if body.isascii() else row_size(body) for body in rows]
        if self._read_ahead:
            self._read_ahead = max(self.window, len(rows) // 2)
            self._read_ahead_bytes = sum(sizes) // 2
        if self._head < len(self._page):  # (a page read ahead: after the rows still held)
            rows = self._page[self._head:] + list(rows)
            sizes = self._sizes[self._head:] + sizes
        self._page, self._sizes, self._head = rows, sizes, 0
        self._buffered_bytes = sum(sizes)
        self._exhausted = exhausted
        self._plan()
        self.row_ready()
        if self._read_ahead:
            self._read_on()

    def accept(self, count: int = 1) -> None:
        """The client accepted ``count`` rows; acceptance of rows never sent is ignored."""
        count = min(count, len(self._sent_at))
        if count <= 0 or self.state in TERMINAL:
            return
        sent_at, sent_sizes = self._sent_at, self._sent_sizes
        if sent_sizes is None:
            sent_at.popleft()
            freed = self.unaccepted_bytes
        elif count == 1:
            sent_at.popleft()
            freed = sent_sizes.popleft()
        else:
            freed = 0
            for _ in range(count):
                sent_at.popleft()
                freed += sent_sizes.popleft()
        self.unaccepted_bytes -= freed
        self.rows_accepted += count
        budget = self._budget
        if budget is not None:
            if budget.waiting:
                budget.release(freed)
            else:
                budget.used -= freed  # (EchoBudget.release, inlined: nobody to wake)
        self._plan()
        self.accepted()
        if self._read_ahead:
            self._read_on()

    def _read_on(self) -> None:
        """
        A windowed stream's read ahead (after the input is handled, not
        inside its transition): the next page is asked for once no more
        than ``_read_ahead`` rows, of no more than ``_read_ahead_bytes``,
        are left to send.  So a stream holds at most one and a half pages.
        """
        if (self.state is _ACCEPT and not self._exhausted and not self._fetching
                and len(self._page) - self._head <= self._read_ahead
                and self._buffered_bytes <= self._read_ahead_bytes):
            self._fetching = True
            self._fetch_more(self)

    def end(self) -> None:
        """The client said ``"end"``: stop, publish nothing more."""
        self.client_end()

    def fail(self, reason: Optional[str] = None, code: str = "internal") -> None:
        """
        Something went wrong: publish ``"error"`` (version 2: the error
        object of ``code`` and ``reason``), ``"end"`` and stop.
        """
        self.reason = reason
        self.code = code
        self.failed()

    def budget_freed(self) -> None:
        """The shared echo budget may have room for this stream's next row now."""
        if self.state in TERMINAL:
            return
        self._plan()
        self.room_made()

    @property
    def is_live(self) -> bool:
        return self.state in LIVE

    # -- what the window lets out ---------------------------------------

    def _plan(self) -> None:
        """
        Count the buffered rows the window (rows and bytes) and the echo
        budget let out now, once per input: the conditions look ahead at it
        and ``send_rows`` sends exactly that many.
        """
        sending = min(len(self._page) - self._head, self.window - len(self._sent_at))
        budget = self._budget
        if sending == 1 and budget is not None and not self._sent_at:
            # (a version 1 stream's every row: EchoBudget.fits, inlined)
            if ((budget.waiting and budget.waiting[0] is not self)
                    or (budget.used and budget.used + self._sizes[self._head] > budget.limit)):
                budget.wait(self)
                sending = 0
        elif sending and (self._budget is not None or (
                self.window_bytes is not None
                and self.unaccepted_bytes + self._buffered_bytes > self.window_bytes)):
            out = self.unaccepted_bytes
            count = len(self._sent_at)
            limit = self.window_bytes
            allowed = 0
            for size in islice(self._sizes, self._head, None):
                if allowed == sending:
                    break
                if limit is not None and count and out + size > limit:
                    break
                if self._budget is not None and not self._budget.fits(size, self):
                    break
                out += size
                count += 1
                allowed += 1
            if allowed < sending and self._budget is not None and count == 0:
                self._budget.wait(self)
            sending = allowed
        self._sending = sending
        # what sending them leaves, for the conditions (computed once here,
        # not once per transition tried)
        unaccepted = len(self._sent_at) + sending
        left = len(self._page) - self._head - sending
        done = self._exhausted and left == 0
        self._finishing = done and (self.window > 1 or unaccepted == 0)
        self._waiting = unaccepted > 0 and (unaccepted >= self.window or left > 0 or done)

    # -- conditions (look-ahead at what send_rows will leave, from _plan) --

    def will_finish(self) -> bool:
        return self._finishing

    def will_wait(self) -> bool:
        return self._waiting

    # -- actions --------------------------------------------------------

    def send_rows(self) -> None:
        """Publish what :meth:`_plan` let out, and keep the row timer on the oldest row."""
        count, self._sending = self._sending, 0
        if count:
            if self._on_first_row is not None:
                self._first_row_sent()
            # (the row loop does nothing but publish: the bookkeeping is
            # done in bulk, at C speed)
            head = self._head
            end = head + count
            if count == 1:
                self._publish(self.channel, self._page[head])
                total = self._sizes[head]
                if self._sent_sizes is not None:
                    self._sent_sizes.append(total)
                self._sent_at.append(self._clock.seconds())
            else:
                publish, channel = self._publish, self.channel
                for body in self._page[head:end]:
                    publish(channel, body)
                sizes = self._sizes[head:end]
                total = sum(sizes)
                assert self._sent_sizes is not None   # (a window of 1 sends one row at a time)
                self._sent_sizes.extend(sizes)
                self._sent_at.extend(repeat(self._clock.seconds(), count))
            if end == len(self._page):
                self._page, self._sizes, self._head = [], [], 0
            else:
                self._head = end
            self.rows_sent += count
            self._buffered_bytes -= total
            self.unaccepted_bytes += total
            budget = self._budget
            if budget is not None:
                budget.used += total  # (EchoBudget.take, inlined)
                if budget.waiting and budget.waiting[0] is self:
                    budget.waiting.popleft()
        self._arm_timer()

    def _first_row_sent(self) -> None:
        on_first_row, self._on_first_row = self._on_first_row, None
        if on_first_row is not None:
            on_first_row()

    def send_end(self) -> None:
        self._publish(self.channel, END_BODY)

    def send_error(self) -> None:
        if self.version == 2:
            self._publish(self.channel, encode_error(self.code, self.reason or "the stream failed"))
        else:
            self._publish(self.channel, ERROR_BODY)
        self._publish(self.channel, END_BODY)

    def send_timeout(self) -> None:
        self._publish(self.channel, TIMEOUT_BODY)

    def want_rows(self) -> None:
        """On entering awaiting-row: ask for the next page unless one is coming or none is left."""
        if self._head >= len(self._page) and not self._exhausted and not self._fetching:
            self._fetching = True
            self._fetch_more(self)

    def close(self) -> None:
        """On entering any terminal state: drop timer and rows, leave the machine, tell the owner."""
        self._cancel_timer()
        self._page, self._sizes, self._head = [], [], 0
        self._buffered_bytes = 0
        self._sent_at.clear()
        if self._sent_sizes is not None:
            self._sent_sizes.clear()
        if self._budget is not None:
            self._budget.leave(self)
            if self.unaccepted_bytes:
                self._budget.release(self.unaccepted_bytes)
        self.unaccepted_bytes = 0
        self._closed(self)

    # -- the row timer --------------------------------------------------

    def _deadline(self) -> None:
        self._timer = None
        if self._sent_at:
            self.deadline_passed()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


bind_inputs(Stream, MACHINE, INPUTS)
