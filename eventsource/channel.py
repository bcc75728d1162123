"""
The reply channel of one fetch, as a state machine.

A :class:`Stream` is a plain model driven by one shared ``transitions``
:data:`MACHINE`.  It knows nothing of Redis or MySQL: it is handed a
``publish(channel, body)`` function, a ``fetch_more(stream)`` function that asks
for the next page of rows (answered later through :meth:`Stream.receive` or
:meth:`Stream.fail`), a clock for its row timer, and a ``closed(stream)``
function called once when it reaches a terminal state.

States (:class:`ChannelState`)
    ``awaiting-row``: the window has room; the stream waits for rows from
    the database.  ``awaiting-accept``: the window is full (or the last row
    of a version 1 stream is out): the stream waits for the client.
    ``ended``, ``errored``, ``timed-out``: terminal; late messages are ignored.

Inputs (triggers, each fired from exactly one method)
    ``row_ready`` (:meth:`Stream.receive`), ``accepted`` (:meth:`Stream.accept`),
    ``client_end`` (:meth:`Stream.client_end`), ``deadline_passed`` (the row
    timer), ``failed`` (:meth:`Stream.fail`).

The window is the number of rows published and not yet accepted.  Version 1
of the protocol is a window of 1: one row, wait for its acceptance, the next
row, and ``"end"`` only after the last row was accepted.  With a larger
window the stream publishes ``"end"`` right after the last row.  The row
timeout always measures the oldest unaccepted row.
"""

import enum
from collections import deque

from transitions import Machine

from eventsource.wire import END_BODY, ERROR_BODY, TIMEOUT_BODY


class ChannelState(enum.Enum):
    """The states of a reply channel, named as the protocol documentation does."""

    AWAITING_ROW = "awaiting-row"
    AWAITING_ACCEPT = "awaiting-accept"
    ENDED = "ended"
    ERRORED = "errored"
    TIMED_OUT = "timed-out"


_ROW = ChannelState.AWAITING_ROW
_ACCEPT = ChannelState.AWAITING_ACCEPT
LIVE = (_ROW, _ACCEPT)
TERMINAL = (ChannelState.ENDED, ChannelState.ERRORED, ChannelState.TIMED_OUT)

INPUTS = ("row_ready", "accepted", "client_end", "deadline_passed", "failed")

# The whole transition table.  Rows and acceptances are "settling" inputs:
# the stream publishes what its window allows (``send_rows``) and the
# conditions, which look ahead at the result of that, pick where it lands.
# Transitions are tried in order; the first whose conditions hold wins.
TRANSITIONS = [
    {"trigger": "row_ready", "source": _ROW, "dest": ChannelState.ENDED,
     "conditions": "will_finish", "before": ["send_rows", "send_end"]},
    {"trigger": "row_ready", "source": _ROW, "dest": _ACCEPT,
     "conditions": "will_wait", "before": "send_rows"},
    {"trigger": "row_ready", "source": _ROW, "dest": _ROW, "before": "send_rows"},

    {"trigger": "accepted", "source": LIVE, "dest": ChannelState.ENDED,
     "conditions": "will_finish", "before": ["send_rows", "send_end"]},
    # (the commonest of all: a row accepted, the next one sent; internal, so
    # no exit/enter work for a state that does not change)
    {"trigger": "accepted", "source": _ACCEPT, "dest": None,
     "conditions": "will_wait", "before": "send_rows"},
    {"trigger": "accepted", "source": _ROW, "dest": _ACCEPT,
     "conditions": "will_wait", "before": "send_rows"},
    {"trigger": "accepted", "source": LIVE, "dest": _ROW, "before": "send_rows"},

    {"trigger": "client_end", "source": LIVE, "dest": ChannelState.ENDED},
    {"trigger": "deadline_passed", "source": LIVE, "dest": ChannelState.TIMED_OUT},
    {"trigger": "failed", "source": LIVE, "dest": ChannelState.ERRORED},
]
# Terminal states swallow every late input.
TRANSITIONS += [{"trigger": name, "source": list(TERMINAL), "dest": None} for name in INPUTS]

STATES = [
    {"name": _ROW, "on_enter": "want_rows"},
    {"name": _ACCEPT},
    {"name": ChannelState.ENDED, "on_enter": "close"},
    {"name": ChannelState.ERRORED, "on_enter": ["send_error", "close"]},
    {"name": ChannelState.TIMED_OUT, "on_enter": ["send_timeout", "close"]},
]

#: The one machine every stream shares (a ``Machine`` per channel costs ~0.3 ms).
MACHINE = Machine(
    model=None,
    states=STATES,
    transitions=TRANSITIONS,
    initial=_ROW,
    auto_transitions=False,
    ignore_invalid_triggers=False,
    queued=False,
)


class Stream:
    """
    One fetch's reply channel: buffered rows, the window, the row timer.

    Create it with :meth:`open`; it then asks ``fetch_more`` for rows at once.
    """

    def __init__(self, channel, *, window, row_timeout, clock, publish, fetch_more, closed):
        self.channel = channel
        self.window = window
        self.row_timeout = row_timeout
        self.rows_sent = 0
        #: why the stream failed, for the log (None unless it did)
        self.reason = None
        self._clock = clock
        self._publish = publish
        self._fetch_more = fetch_more
        self._closed = closed
        self._buffer = deque()
        self._sent_at = deque()  # send time of every unaccepted row, oldest first
        self._exhausted = False
        self._fetching = False
        self._timer = None

    @classmethod
    def open(cls, channel, **kwargs):
        """Create a stream, add it to :data:`MACHINE` and ask for its first rows."""
        stream = cls(channel, **kwargs)
        MACHINE.add_model(stream)
        stream.want_rows()
        return stream

    def __repr__(self):
        return f"<Stream {self.channel!r} {self.state.value} sent={self.rows_sent}>"

    # -- inputs ---------------------------------------------------------

    def receive(self, rows, exhausted):
        """Rows (encoded message bodies) arrived from the database."""
        if self.state in TERMINAL:
            return
        self._fetching = False
        self._buffer.extend(rows)
        self._exhausted = exhausted
        self.row_ready()

    def accept(self, count=1):
        """The client accepted ``count`` rows; acceptance of rows never sent is ignored."""
        count = min(count, len(self._sent_at))
        if count <= 0 or self.state in TERMINAL:
            return
        for _ in range(count):
            self._sent_at.popleft()
        self.accepted()

    def end(self):
        """The client said ``"end"``: stop, publish nothing more."""
        self.client_end()

    def fail(self, reason=None):
        """Something went wrong: publish ``"error"``, ``"end"`` and stop."""
        self.reason = reason
        self.failed()

    @property
    def is_live(self):
        return self.state in LIVE

    # -- conditions (pure look-ahead at what send_rows will leave) ------

    def _after_send(self):
        sending = min(len(self._buffer), self.window - len(self._sent_at))
        unaccepted = len(self._sent_at) + sending
        done = self._exhausted and sending == len(self._buffer)
        return unaccepted, done

    def will_finish(self):
        unaccepted, done = self._after_send()
        return done and (self.window > 1 or unaccepted == 0)

    def will_wait(self):
        unaccepted, done = self._after_send()
        return unaccepted >= self.window or (done and unaccepted > 0)

    # -- actions --------------------------------------------------------

    def send_rows(self):
        """Publish what the window allows, and keep the row timer on the oldest row."""
        room = self.window - len(self._sent_at)
        now = self._clock.seconds()
        while room > 0 and self._buffer:
            self._publish(self.channel, self._buffer.popleft())
            self._sent_at.append(now)
            self.rows_sent += 1
            room -= 1
        self._arm_timer()

    def send_end(self):
        self._publish(self.channel, END_BODY)

    def send_error(self):
        self._publish(self.channel, ERROR_BODY)
        self._publish(self.channel, END_BODY)

    def send_timeout(self):
        self._publish(self.channel, TIMEOUT_BODY)

    def want_rows(self):
        """On entering awaiting-row: ask for the next page unless one is coming or none is left."""
        if not self._buffer and not self._exhausted and not self._fetching:
            self._fetching = True
            self._fetch_more(self)

    def close(self):
        """On entering any terminal state: drop timer and rows, leave the machine, tell the owner."""
        self._cancel_timer()
        self._buffer.clear()
        self._sent_at.clear()
        MACHINE.remove_model(self)
        self._closed(self)

    # -- the row timer --------------------------------------------------

    def _arm_timer(self):
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

    def _deadline(self):
        self._timer = None
        if self._sent_at:
            self.deadline_passed()

    def _cancel_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
