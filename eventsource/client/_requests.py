"""
The client's requests, as state machines mirroring the server's reply
channel (:mod:`eventsource.stream`).

A request is a plain model driven by the one shared :data:`MACHINE` (never
a ``Machine`` per request; models are not registered with it either, so
nothing is left behind by a request that is dropped unfinished).  It knows
its client only through :class:`RequestOwner`: ``_pubsub_call`` (the Redis
boundary), ``_clock``, ``_requests`` (where messages are routed by reply
channel) and ``request_channel``.

States (:class:`RequestState`)
    ``new``: a fetch made but not started (nothing is sent before its first
    row is asked for).  ``subscribing``: SUBSCRIBE to the reply channel is
    sent; the request is published only once Redis confirms it.  ``open``:
    the request is published and the server's messages come.  ``ended``,
    ``failed``, ``closed``: terminal; late inputs are ignored.

Inputs (triggers)
    From the client: ``opened``, ``client_closed`` (``close`` or a cancelled
    persist), ``deadline_passed`` (the request's own timer).  From Redis:
    ``subscribed``, ``request_published`` and ``accept_published`` (with
    PUBLISH's count of receivers), ``redis_failed``, ``connection_lost``.
    From the server, exactly one per message on the reply channel
    (:meth:`_Request.message_received`): ``result_received`` (a persist's
    object), ``row_received`` (a fetch's object), ``end_received``,
    ``error_received`` (``"error"``, or a version 2 request's error object
    ``{"error": {...}}``), ``timeout_received``, ``accepted_received`` (the
    echo of our own acceptance) and ``unexpected_received``.

A version 2 persist (:class:`AppendRequest`, one attempt of
:meth:`EventSourceClient.append`) is a persist whose result must be a
version 2 result: a version 1 OkPacket (a server that ignored ``"v": 2``)
or another object fails it (``result_unusable``).

A subscription (:class:`SubscribeRequest`, one attempt of
:class:`eventsource.client.Subscription`) is a windowed fetch on the
``subscribe`` channel whose rows never end on their own: its markers are
handed out in line with its rows, as :class:`Marker` values, and count for
no acceptance.
"""

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Tuple, Union

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from eventsource.stream import shared_machine
from eventsource.client._errors import (
    BadReply,
    EventSourceError,
    NoServerError,
    RedisConnectionError,
    ReplyTimeout,
    ServerError,
    ServerTooOld,
    StreamTimeout,
    error_from_object,
)
from eventsource.client._events import VERSION_2, AppendResult, RecordedEvent
from eventsource.wire import (
    ACCEPTED,
    ACCEPTED_BODY,
    END,
    END_BODY,
    ERROR,
    FETCH,
    FETCH_NEXT,
    PERSIST,
    SUBSCRIBE,
    TIMEOUT,
    NextRequest,
    decode_body,
    encode_body,
    encode_next,
)



class RequestOwner(Protocol):
    """
    What a request needs of the client that made it (the client implements
    it; declared here so requests depend on this, not on the client class).
    """

    _requests: Dict[str, Any]
    _clock: IReactorTime

    def request_channel(self, kind: str) -> str:
        """The channel requests of ``kind`` are published on."""

    def _new_channel(self) -> str:
        """A fresh reply channel."""

    def _pubsub_call(self, method: str, *args: Any) -> Deferred:
        """Call the client's Redis pub/sub (failing at once when disconnected)."""

    def describe_server(self) -> str:
        """The server, in words for an error message (where it listens)."""

log = Logger()

#: seconds a consumer waits for a row, with rows unaccepted, before those
#: are accepted anyway (see :class:`FetchRequest`)
IDLE_ACCEPT_DELAY = 0.02
#: bytes of consumed rows after which a windowed fetch accepts them, even
#: before ``window // 2`` rows: the server bounds a window in bytes too
#: (``--max-window-bytes``, 2 MiB by default), so with large rows a batch of
#: rows would wait for rows the server does not send
ACCEPT_BYTES = 512 * 1024


# -- values -------------------------------------------------------------------


@dataclass(frozen=True)
class PersistResult:
    """
    What a persist did.

    ``raw`` is the result object exactly as the server sent it (the Node
    ``mysql`` driver's OkPacket: ``affectedRows``, ``insertId``, ...).
    """

    affected_rows: int
    insert_id: int
    raw: Dict[str, Any] = field(repr=False)

    @classmethod
    def from_message(cls, raw: Dict[str, Any]) -> "PersistResult":
        return cls(raw.get("affectedRows", 0), raw.get("insertId", 0), raw)


class Row(dict):
    """
    One fetched row: a ``dict`` of column to value, with ``data`` decoded from
    the JSON text the server sends into Python values.

    ``raw`` is the row exactly as it came over the wire (``data`` as text).
    """

    __slots__ = ("raw",)

    def __init__(self, raw: Dict[str, Any]):
        super().__init__(raw)
        self.raw = raw
        data = raw.get("data")
        if isinstance(data, str):
            # (text that is not JSON after all, an alias?, is left as it came)
            self["data"] = decode_body(data)


class _EndOfRows:
    """The marker a fetch hands out after its last row."""

    def __repr__(self) -> str:
        return "<end of rows>"


END_OF_ROWS = _EndOfRows()

#: the markers of a subscription (docs/PROTOCOL.md, "Subscriptions")
CAUGHT_UP = "caughtUp"
HEARTBEAT = "heartbeat"
#: the longest message that can be a marker (``{"heartbeat": 2**64 - 1}`` is 36)
MARKER_BYTES = 64


@dataclass(frozen=True)
class Marker:
    """
    A subscription's ``{"caughtUp": p}`` or ``{"heartbeat": p}``, handed out
    in line with its rows: every matching event up to ``position`` was sent
    before it (so ``position`` is a safe place to resume from, once the
    events before the marker are processed).
    """

    kind: str
    position: int

    @classmethod
    def from_message(cls, message: Any) -> Optional["Marker"]:
        """The marker ``message`` is, or ``None`` (a row, an error object...)."""
        if isinstance(message, dict) and len(message) == 1:
            ((kind, position),) = message.items()
            if kind in (CAUGHT_UP, HEARTBEAT) and type(position) is int and position >= 0:
                return cls(kind, position)
        return None


# -- the machine ------------------------------------------------------------------


class RequestState(enum.Enum):
    """The states of a request, seen from the client."""

    NEW = "new"
    SUBSCRIBING = "subscribing"
    OPEN = "open"
    ENDED = "ended"
    FAILED = "failed"
    CLOSED = "closed"


_NEW = RequestState.NEW
_SUBSCRIBING = RequestState.SUBSCRIBING
_OPEN = RequestState.OPEN
_ENDED = RequestState.ENDED
_FAILED = RequestState.FAILED
_CLOSED = RequestState.CLOSED
LIVE = [_SUBSCRIBING, _OPEN]
TERMINAL = [_ENDED, _FAILED, _CLOSED]

INPUTS = ("opened", "subscribed", "request_published", "accept_published", "result_received",
          "row_received", "end_received", "error_received", "timeout_received",
          "accepted_received", "marker_received", "unexpected_received", "deadline_passed",
          "redis_failed", "connection_lost", "client_closed")

# The whole transition table, persist and fetch together: where they differ,
# the fetch's row comes first with the condition ``streams_rows``.  Work that
# may answer at once (a subscribe, a publish: an in-memory pub/sub answers
# synchronously) is done in ``after`` callbacks, once the state has changed.
TRANSITIONS: List[Dict[str, Any]] = [
    {"trigger": "opened", "source": _NEW, "dest": _SUBSCRIBING, "after": "send_subscribe"},
    {"trigger": "subscribed", "source": _SUBSCRIBING, "dest": _OPEN, "after": "send_request"},
    {"trigger": "request_published", "source": _OPEN, "dest": _FAILED,
     "conditions": "request_reached_nobody", "before": "blame_no_server"},
    {"trigger": "request_published", "source": _OPEN, "dest": None},
    {"trigger": "accept_published", "source": LIVE, "dest": _FAILED,
     "conditions": "accept_reached_nobody", "before": "blame_server_gone"},
    {"trigger": "accept_published", "source": LIVE, "dest": None},

    # the server's messages (a fetch may see rows before PUBLISH's own reply)
    {"trigger": "result_received", "source": LIVE, "dest": _FAILED,
     "conditions": "result_unusable", "before": "blame_unusable_result"},
    {"trigger": "result_received", "source": LIVE, "dest": _ENDED, "before": "take_result"},
    {"trigger": "row_received", "source": LIVE, "dest": None, "before": "take_row"},
    {"trigger": "end_received", "source": LIVE, "dest": _ENDED, "conditions": "streams_rows"},
    {"trigger": "end_received", "source": LIVE, "dest": _FAILED, "before": "blame_no_result"},
    {"trigger": "error_received", "source": LIVE, "dest": _FAILED, "before": "blame_server_error"},
    {"trigger": "timeout_received", "source": LIVE, "dest": _FAILED,
     "before": "blame_stream_timeout"},
    {"trigger": "accepted_received", "source": LIVE, "dest": None, "conditions": "streams_rows"},
    {"trigger": "accepted_received", "source": LIVE, "dest": None, "before": "warn_accepted"},
    # (only a subscription reads markers: see SubscribeRequest.message_received)
    {"trigger": "marker_received", "source": LIVE, "dest": None, "before": "take_marker"},
    {"trigger": "unexpected_received", "source": LIVE, "dest": None, "before": "warn_unexpected"},

    # the request's timer: Redis never confirmed, or the server never answered
    {"trigger": "deadline_passed", "source": _SUBSCRIBING, "dest": _FAILED,
     "before": "blame_redis_away"},
    {"trigger": "deadline_passed", "source": _OPEN, "dest": _FAILED,
     "conditions": "streams_rows", "before": "blame_no_answer", "after": "tell_server_end"},
    {"trigger": "deadline_passed", "source": _OPEN, "dest": _FAILED, "before": "blame_no_answer"},

    {"trigger": "redis_failed", "source": LIVE, "dest": _FAILED, "before": "take_error"},
    {"trigger": "connection_lost", "source": LIVE, "dest": _FAILED,
     "before": ["subscription_gone", "take_error"]},

    # (the server is told "end" only once it has the request)
    {"trigger": "client_closed", "source": [_NEW, _SUBSCRIBING], "dest": _CLOSED,
     "before": "take_error"},
    {"trigger": "client_closed", "source": _OPEN, "dest": _CLOSED, "conditions": "streams_rows",
     "before": "take_error", "after": "tell_server_end"},
    {"trigger": "client_closed", "source": _OPEN, "dest": _CLOSED, "before": "take_error"},

    # a subscription confirmed only after the connection it was asked on
    # dropped (it waited for a reconnect): leave the channel again
    {"trigger": "subscribed", "source": TERMINAL, "dest": None,
     "conditions": "subscription_was_lost", "after": "leave"},
]
# Terminal states swallow every late input.
TRANSITIONS += [{"trigger": name, "source": TERMINAL, "dest": None} for name in INPUTS]

STATES: List[Dict[str, Any]] = [
    {"name": _NEW},
    {"name": _SUBSCRIBING},
    {"name": _OPEN},
    {"name": _ENDED, "on_enter": ["finish", "report_end"]},
    {"name": _FAILED, "on_enter": ["finish", "report_failure"]},
    {"name": _CLOSED, "on_enter": ["finish", "report_closed"]},
]

#: The one machine every request shares.
MACHINE = shared_machine(STATES, TRANSITIONS, _NEW)


def _direct_callbacks(state: RequestState, name: str) -> Optional[Tuple[str, ...]]:
    """
    The callbacks of input ``name`` in ``state`` when the table makes it an
    unconditional internal transition (no state change, nothing to decide),
    else ``None``.
    """
    candidates = MACHINE.events[name].transitions.get(state.name, [])
    if not candidates:
        return None
    first = candidates[0]
    if first.dest is not None or first.conditions or first.prepare:
        return None
    return tuple(str(name) for name in first.before + first.after)  # (all names here)


# Such inputs (a row on an open fetch, any late input) run their callbacks
# without a trigger: the table stays their one definition, and a row costs a
# method call instead of a trigger, which took a third of a windowed
# stream's rows per second.  (The machine has no callbacks of its own.)
assert not (MACHINE.prepare_event or MACHINE.finalize_event or MACHINE.before_state_change
            or MACHINE.after_state_change)
DIRECT: Dict[Tuple[RequestState, str], Tuple[str, ...]] = {
    (state, name): callbacks for state in RequestState for name in INPUTS
    if (callbacks := _direct_callbacks(state, name)) is not None}

#: the input each control word of the server is
_CONTROL_INPUTS = {END: "end_received", ERROR: "error_received", TIMEOUT: "timeout_received",
                   ACCEPTED: "accepted_received"}


def redis_error(failure: Failure, channel: Optional[str]) -> EventSourceError:
    """A failed Redis call as the error a request reports."""
    if isinstance(failure.value, EventSourceError):
        return failure.value
    return RedisConnectionError(f"Redis failed: {failure.getErrorMessage()}", channel)


class _Request:
    """
    The life of one request on its reply channel.

    Subscribe to the reply channel, wait for the confirmation, publish the
    request, then turn every message on the reply channel into one input
    until a terminal state.  A timer (armed by the subclass while it waits
    for the server) turns silence into :class:`ReplyTimeout`.
    """

    #: the kind of request: the request channel's name without the prefix
    kind = ""
    #: the input a JSON object from the server is
    object_input = ""

    def __init__(self, client: RequestOwner, body: Dict[str, Any], timeout: float):
        self._client = client
        self.channel = client._new_channel()
        self._body = dict(body, channel=self.channel)
        self._timeout = timeout
        self._timer: Any = None
        self.state = _NEW
        self._error: Optional[EventSourceError] = None
        #: None before SUBSCRIBE, then "held", "lost" (with the connection) or "left"
        self._subscription: Optional[str] = None
        self._heard = False
        #: the request is version 2: error objects are its refusals
        self.version = 2 if body.get("v") == VERSION_2 else 1

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.channel!r} {self.state.value}>"

    def _fire(self, name: str, *args: Any) -> None:
        callbacks = DIRECT.get((self.state, name))
        if callbacks is None:
            MACHINE.events[name].trigger(self, *args)
        else:
            for callback in callbacks:
                getattr(self, callback)(*args)

    # -- inputs --------------------------------------------------------------

    def message_received(self, body: Any) -> None:
        """A message on the reply channel, as exactly one input."""
        if self.state in TERMINAL:
            return
        self._heard = True
        message = decode_body(body)
        if isinstance(message, dict):
            if self.version == 2 and isinstance(message.get("error"), dict):
                self._fire("error_received", message)
            else:
                self._fire(self.object_input, message)
        elif isinstance(message, str) and message in _CONTROL_INPUTS:
            self._fire(_CONTROL_INPUTS[message])
        else:
            self._fire("unexpected_received", message)

    def connection_lost(self, error: EventSourceError) -> None:
        """The subscriber connection dropped: nothing more can arrive."""
        self._fire("connection_lost", error)

    def fail(self, error: EventSourceError) -> None:
        """End the request with ``error`` (a Redis failure, a disconnect)."""
        self._fire("redis_failed", error)

    def _redis_failed(self, failure: Failure) -> None:
        self._fire("redis_failed", redis_error(failure, self.channel))

    # -- conditions ------------------------------------------------------------

    def streams_rows(self, *_: Any) -> bool:
        return False

    def result_unusable(self, message: Dict[str, Any]) -> bool:
        return False

    def request_reached_nobody(self, receivers: Any) -> bool:
        return receivers == 0 and not self._heard

    def accept_reached_nobody(self, receivers: Any) -> bool:
        return receivers == 0

    def subscription_was_lost(self, *_: Any) -> bool:
        return self._subscription == "lost"

    # -- actions ------------------------------------------------------------------

    def send_subscribe(self, *_: Any) -> None:
        self._client._requests[self.channel] = self
        self._subscription = "held"
        log.debug("{kind} on {channel}: subscribing", kind=self.kind, channel=self.channel)
        d = self._client._pubsub_call("subscribe", self.channel)
        d.addCallbacks(lambda _: self._fire("subscribed"), self._redis_failed)

    def send_request(self, *_: Any) -> None:
        d = self._client._pubsub_call("publish", self._client.request_channel(self.kind),
                                      encode_body(self._body))
        d.addCallbacks(lambda receivers: self._fire("request_published", receivers),
                       self._redis_failed)

    def take_error(self, error: Optional[EventSourceError] = None) -> None:
        self._error = error

    def subscription_gone(self, *_: Any) -> None:
        self._subscription = "lost"

    def blame_no_server(self, *_: Any) -> None:
        self._error = NoServerError(
            "no eventsource server is listening on "
            f"{self._client.request_channel(self.kind)!r} "
            "(the request reached 0 subscribers)", self.channel)

    def blame_server_gone(self, *_: Any) -> None:
        self._error = NoServerError(
            f"the eventsource server went away during the fetch on {self.channel} "
            f"(an acceptance reached 0 subscribers)", self.channel)

    def blame_server_error(self, message: Optional[Dict[str, Any]] = None) -> None:
        if message is not None:  # a version 2 error object
            self._error = error_from_object(message.get("error"), self.channel)
            return
        self._error = ServerError(
            f"the server answered \"error\" to {self.kind} on {self.channel} "
            "(see the server's log for the reason)", self.channel)

    def blame_unusable_result(self, message: Dict[str, Any]) -> None:
        self._error = BadReply(f"the server answered {self.kind} on {self.channel} with "
                               f"an object that is not its result: {message!r:.200}",
                               self.channel)

    def blame_stream_timeout(self) -> None:
        self._error = StreamTimeout(f"the server timed out {self.kind} on {self.channel}",
                                    self.channel)

    def blame_no_result(self) -> None:
        self._error = BadReply(f"the server ended {self.kind} on {self.channel} "
                               "without a result", self.channel)

    def blame_redis_away(self) -> None:
        # Redis itself is away (txredisapi waits for it to come back)
        self._error = RedisConnectionError(
            f"Redis did not confirm the subscription to {self.channel} within "
            f"{self._timeout:g} s (is it reachable?)", self.channel)

    def blame_no_answer(self) -> None:
        self._error = ReplyTimeout(
            f"no answer from the eventsource server within {self._timeout:g} s "
            f"({self.kind} on {self.channel})", self.channel)

    def warn_unexpected(self, message: Any) -> None:
        log.warn("ignored an unexpected message on {channel}: {message!r}",
                 channel=self.channel, message=message)

    def warn_accepted(self) -> None:
        self.warn_unexpected(ACCEPTED)

    def finish(self, *_: Any) -> None:
        """Stop listening: no timer, no routing, and leave the channel."""
        self._cancel_timer()
        if self._client._requests.get(self.channel) is self:
            del self._client._requests[self.channel]
        if self._subscription == "held":
            self.leave()

    def leave(self, *_: Any) -> None:
        self._subscription = "left"
        d = self._client._pubsub_call("unsubscribe", self.channel)
        d.addErrback(lambda f: log.debug("unsubscribe {channel} failed: {f}",
                                         channel=self.channel, f=f.getErrorMessage()))

    # -- timer ------------------------------------------------------------------

    def _arm_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._client._clock.callLater(self._timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._fire("deadline_passed")


class PersistRequest(_Request):
    """A persist: one result object (or ``"error"``) and ``"end"``."""

    kind = PERSIST
    object_input = "result_received"

    def __init__(self, client: RequestOwner, body: Dict[str, Any], timeout: float):
        super().__init__(client, body, timeout)
        self._result: Optional[PersistResult] = None
        self.result: Deferred = Deferred(self._cancelled)

    def start(self) -> None:
        self._arm_timer()
        self._fire("opened")

    def take_result(self, message: Dict[str, Any]) -> None:
        self._result = PersistResult.from_message(message)

    def report_end(self, *_: Any) -> None:
        self.result.callback(self._result)

    def report_failure(self, *_: Any) -> None:
        self.result.errback(self._error)

    def report_closed(self, *_: Any) -> None:
        pass  # cancelled: the Deferred fails with CancelledError

    def _cancelled(self, _: Deferred) -> None:
        self._fire("client_closed")


class AppendRequest(PersistRequest):
    """
    One attempt of a version 2 persist: a result object
    ``{"events": [...], "duplicate": ...}`` (fired as an
    :class:`AppendResult`) or an error object, then ``"end"``.  A version 1
    OkPacket means the server ignored ``"v": 2``: it appended the events
    without checking the expected version, and says nothing of event ids;
    that fails with :class:`ServerTooOld`, never retried.
    """

    def __init__(self, client: RequestOwner, body: Dict[str, Any], timeout: float):
        super().__init__(client, body, timeout)
        self._append_result: Optional[AppendResult] = None

    def result_unusable(self, message: Dict[str, Any]) -> bool:
        try:
            self._append_result = AppendResult.from_message(message)
        except ValueError:
            return True
        return False

    def blame_unusable_result(self, message: Dict[str, Any]) -> None:
        if "affectedRows" not in message:
            super().blame_unusable_result(message)
            return
        self._error = ServerTooOld(
            f"{self._client.describe_server()} answered a version 2 persist (on "
            f"{self.channel}) with a version 1 result: it speaks only version 1 of the "
            "protocol, so it ignored the expected version and the event ids and appended "
            f"the events without those checks ({message.get('affectedRows')!r} events from "
            f"position {message.get('insertId')!r})", self.channel)

    def take_result(self, message: Dict[str, Any]) -> None:
        pass  # (read by result_unusable)

    def report_end(self, *_: Any) -> None:
        self.result.callback(self._append_result)


class FetchRequest(_Request):
    """
    A fetch: rows, then ``"end"`` (or ``"error"``, or ``"timeout"``).

    The consumer pulls rows with :meth:`next_row`.  A row handed out counts as
    consumed when the next one is asked for; consumed rows are accepted in
    batches of ``batch`` (``window // 2``; one for a version 1 stream).  When
    the consumer waits with rows unaccepted and no row comes within
    :data:`IDLE_ACCEPT_DELAY`, those are accepted anyway, so a server that
    grants a smaller window than asked for cannot deadlock the stream.
    """

    kind = FETCH
    object_input = "row_received"

    def __init__(self, client: RequestOwner, body: Dict[str, Any], timeout: float,
                 window: int, raw: bool, accept_via: str,
                 row_type: Optional[Callable[[Dict[str, Any]], Any]] = None):
        super().__init__(client, body, timeout)
        self.window = window
        self.batch = max(1, window // 2)
        # what a row is handed out as: the dict as sent (raw), a Row, or row_type's
        self._row_type: Optional[Callable[[Dict[str, Any]], Any]] = (
            row_type if row_type is not None else None if raw else Row)
        self._accept_via = accept_via
        self._buffer: Deque[Tuple[Any, int]] = deque()
        # None while streaming, then END_OF_ROWS or an EventSourceError
        self._outcome: Union[None, _EndOfRows, EventSourceError] = None
        self._outcome_delivered = False
        self._waiting: Optional[Deferred] = None
        self._handed_out = False
        self._unaccepted = 0
        self._unaccepted_bytes = 0
        self._incoming_size = 0
        self._handed_size = 0
        self._idle_timer: Any = None
        self._closing: Deferred = defer.succeed(None)
        self.rows = 0

    @property
    def windowed(self) -> bool:
        """A windowed stream (extension 1) accepts and ends on ``fetch-next``
        only: the server does not listen on its reply channel."""
        return self.window > 1

    @property
    def buffered(self) -> int:
        """Messages received and not handed out yet (the next one needs no wait)."""
        return len(self._buffer)

    def streams_rows(self, *_: Any) -> bool:
        return True

    # -- consumer side -----------------------------------------------------

    def next_row(self) -> Deferred:
        """A Deferred firing with the next row, or :data:`END_OF_ROWS`."""
        if self._waiting is not None:
            raise RuntimeError("next_row() called again before the previous row arrived")
        if self.state is _NEW:
            self._fire("opened")
        if self._handed_out:
            self._handed_out = False
            if self._outcome is None:
                self._unaccepted += 1
                self._unaccepted_bytes += self._handed_size
        if self._outcome is None and (self._unaccepted >= self.batch
                                      or self._unaccepted_bytes >= ACCEPT_BYTES):
            self._accept()
        if self._buffer:
            return defer.succeed(self._hand_out(*self._buffer.popleft()))
        if self._outcome is not None:
            return self._deliver_outcome()
        self._waiting = Deferred(self._cancel_wait)
        self._arm_timer()
        if self._unaccepted:
            # Rows are still unaccepted and none is here: if the server granted
            # a smaller window than asked for, it waits for us.  Accept them
            # unless a row comes right away (a row in flight is the usual case).
            self._idle_timer = self._client._clock.callLater(IDLE_ACCEPT_DELAY,
                                                             self._idle_accept)
        return self._waiting

    def close(self, error: Optional[EventSourceError] = None) -> Deferred:
        """
        Stop the stream: tell the server ``"end"`` unless it has already
        ended, and stop listening.  A consumer waiting for a row sees the end
        of the rows (or ``error``, when given).  Fires once Redis took the
        ``"end"``.
        """
        if self.state in TERMINAL:
            return defer.succeed(None)
        self._fire("client_closed", error)
        log.debug("fetch on {channel} closed by the client after {rows} rows",
                  channel=self.channel, rows=self.rows)
        # Only now, with "end" on its way: a consumer woken up inside the
        # transition could go on to disconnect the client before it is sent.
        self._fire_waiting()
        return self._closing

    def abandon(self) -> None:
        """The consumer dropped its stream object without finishing it."""
        if self.state in LIVE:
            log.debug("fetch on {channel} abandoned; sending end", channel=self.channel)
        self.close()

    def _idle_accept(self) -> None:
        self._idle_timer = None
        if self._outcome is None and self._unaccepted:
            self._accept()

    def _cancel_wait(self, d: Deferred) -> None:
        # the consumer gave up waiting (its Deferred was cancelled); the
        # stream itself stays as it is until it is closed or dropped
        if self._waiting is d:
            self._waiting = None
            self._cancel_timer()

    def _cancel_timer(self) -> None:
        super()._cancel_timer()
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None

    def _hand_out(self, row: Any, size: int = 0) -> Any:
        self._handed_out = True
        self._handed_size = size
        self.rows += 1
        return row

    def _deliver_outcome(self) -> Deferred:
        if self._outcome is END_OF_ROWS or self._outcome_delivered:
            return defer.succeed(END_OF_ROWS)
        self._outcome_delivered = True
        assert isinstance(self._outcome, EventSourceError)
        return defer.fail(self._outcome)

    def _accept(self) -> None:
        count, self._unaccepted = self._unaccepted, 0
        self._unaccepted_bytes = 0
        if self._accept_via == "reply" and not self.windowed:
            d = defer.gatherResults(
                [self._client._pubsub_call("publish", self.channel, ACCEPTED_BODY)
                 for _ in range(count)], consumeErrors=True)
            d.addCallback(lambda _: None)
        else:
            d = self._client._pubsub_call("publish", self._client.request_channel(FETCH_NEXT),
                                          encode_next(NextRequest(self.channel, count)))
        d.addCallbacks(lambda receivers: self._fire("accept_published", receivers),
                       self._redis_failed)

    # -- server side -------------------------------------------------------

    def message_received(self, body: Any) -> None:
        self._incoming_size = len(body)
        super().message_received(body)

    def take_row(self, message: Dict[str, Any]) -> None:
        row = message if self._row_type is None else self._row_type(message)
        if self._waiting is not None:
            self._cancel_timer()
            d, self._waiting = self._waiting, None
            d.callback(self._hand_out(row, self._incoming_size))
        else:
            self._buffer.append((row, self._incoming_size))

    def blame_stream_timeout(self) -> None:
        self._error = StreamTimeout(
            f"the server ended the fetch on {self.channel}: a row was not accepted "
            "within its row timeout", self.channel)

    def tell_server_end(self, *_: Any) -> None:
        """Tell the server to stop: ``"end"`` on the reply channel (version 1), or
        ``{"channel": c, "end": true}`` on ``fetch-next`` for a windowed stream."""
        if self.windowed:
            d = self._client._pubsub_call(
                "publish", self._client.request_channel(FETCH_NEXT),
                encode_next(NextRequest(self.channel, end=True)))
        else:
            d = self._client._pubsub_call("publish", self.channel, END_BODY)
        d.addCallback(lambda _: None)
        d.addErrback(lambda f: log.debug("could not send end on {channel}: {f}",
                                         channel=self.channel, f=f.getErrorMessage()))
        self._closing = d

    def report_end(self, *_: Any) -> None:
        self._outcome = END_OF_ROWS
        self._fire_waiting()

    def report_failure(self, *_: Any) -> None:
        self._outcome = self._error
        self._fire_waiting()

    def report_closed(self, *_: Any) -> None:
        self._outcome = END_OF_ROWS if self._error is None else self._error
        self._buffer.clear()
        # (a waiting consumer is woken up by close(), after the transition)

    def _fire_waiting(self) -> None:
        if self._waiting is None:
            return
        d, self._waiting = self._waiting, None
        if self._buffer:
            d.callback(self._hand_out(*self._buffer.popleft()))
        else:
            self._deliver_outcome().chainDeferred(d)



class SubscribeRequest(FetchRequest):
    """
    One subscription on its reply channel (docs/PROTOCOL.md, "Subscriptions"):
    version 2 rows, handed out as :class:`RecordedEvent` values, with the
    server's markers in line with them as :class:`Marker` values (which take
    no acceptance), until ``"timeout"``, an error object (then ``"end"``) or
    the client's end.  Acceptance and end go on ``fetch-next`` whatever the
    window: the server never listens on a subscription's reply channel.

    ``timeout`` is how long the consumer may wait for a message (a row or a
    marker) before the subscription counts as dead (:class:`ReplyTimeout`,
    and ``end`` is sent): a live subscription hears a heartbeat at least
    every ``--heartbeat`` seconds.
    """

    kind = SUBSCRIBE

    def __init__(self, client: RequestOwner, body: Dict[str, Any], timeout: float,
                 window: int):
        super().__init__(client, body, timeout, window, False, FETCH_NEXT,
                         RecordedEvent.from_row)
        #: markers handed out so far
        self.markers = 0

    @property
    def windowed(self) -> bool:
        return True

    def message_received(self, body: Any) -> None:
        if self.state in TERMINAL:
            return
        # (a marker is a few bytes; a row or an error object is longer)
        if isinstance(body, str) and len(body) <= MARKER_BYTES and body.lstrip().startswith("{"):
            marker = Marker.from_message(decode_body(body))
            if marker is not None:
                self._heard = True
                self._fire("marker_received", marker)
                return
        super().message_received(body)

    def take_marker(self, marker: Marker) -> None:
        self.markers += 1
        if self._waiting is not None:
            self._cancel_timer()
            d, self._waiting = self._waiting, None
            d.callback(marker)
        else:
            self._buffer.append((marker, 0))

    def _hand_out(self, row: Any, size: int = 0) -> Any:
        if isinstance(row, Marker):
            return row  # (not a row: nothing to accept)
        return super()._hand_out(row, size)

    def blame_stream_timeout(self) -> None:
        self._error = StreamTimeout(
            f"the server ended the subscription on {self.channel}: an event was not "
            "accepted within its row timeout", self.channel)

    def blame_no_answer(self) -> None:
        self._error = ReplyTimeout(
            f"nothing from the eventsource server for {self._timeout:g} s on the "
            f"subscription on {self.channel} (not even a heartbeat)", self.channel)
