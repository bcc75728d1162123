"""
The Python client of the eventsource server, for Twisted applications.

The server is only reachable through Redis pub/sub: a request is published on
``persist`` or ``fetch`` naming a reply channel, and the answer comes back on
that channel.  This module hides that dance::

    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react
    from eventsource.client import connect

    async def main(reactor):
        client = await connect(reactor=reactor)
        try:
            await client.persist({"pid": "p1", "domain": "user", "name": "created",
                                  "data": {"foo": "bar"}})
            async for event in client.fetch_by_pid("p1"):
                print(event["name"], event["data"])
        finally:
            await client.disconnect()

    react(lambda reactor: ensureDeferred(main(reactor)))

Every request uses a fresh reply channel (``reply_prefix`` + a random
UUID), subscribed to and confirmed by Redis *before* the request is
published.  One subscriber connection and one publisher connection carry every
request of a client, however many run at once.

The Redis boundary is the small :class:`PubSub` interface: :class:`RedisPubSub`
is the real one (two txredisapi connections); tests pass an in-memory one to
:class:`EventSourceClient` directly.
"""

import json
import uuid
import weakref
from collections import deque
from dataclasses import dataclass, field
from inspect import isawaitable
from typing import Any, Callable, Dict, List, Optional, Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from eventsource.wire import valid_tenant

log = Logger()

__all__ = [
    "connect",
    "EventSourceClient",
    "RowStream",
    "Row",
    "PersistResult",
    "PubSub",
    "RedisPubSub",
    "EventSourceError",
    "ServerError",
    "StreamTimeout",
    "NoServerError",
    "ReplyTimeout",
    "RedisConnectionError",
    "BadReply",
    "DEFAULT_REPLY_PREFIX",
    "TENANT_REPLY_PREFIX",
    "DEFAULT_TIMEOUT",
]

#: the reply channels of a client are this prefix and a UUID (hex)
DEFAULT_REPLY_PREFIX = "eventsource:reply:"
#: ... and with a tenant, the tenant's namespace, this and a UUID
TENANT_REPLY_PREFIX = "reply:"
#: seconds to wait for the server before a request fails with ReplyTimeout
DEFAULT_TIMEOUT = 10.0
#: seconds to wait for both Redis connections in :func:`connect`
DEFAULT_CONNECT_TIMEOUT = 10.0
#: seconds a consumer waits for a row, with rows unaccepted, before those
#: are accepted anyway (see :class:`_FetchRequest`)
IDLE_ACCEPT_DELAY = 0.02
#: bytes of consumed rows after which a windowed fetch accepts them, even
#: before ``window // 2`` rows: the server bounds a window in bytes too
#: (``--max-window-bytes``, 2 MiB by default), so with large rows a batch of
#: rows would wait for rows the server does not send
ACCEPT_BYTES = 512 * 1024

PERSIST = "persist"
FETCH = "fetch"
FETCH_NEXT = "fetch-next"

END = "end"
ERROR = "error"
TIMEOUT = "timeout"
ACCEPTED = "accepted"
_CONTROL_WORDS = (END, ERROR, TIMEOUT, ACCEPTED)


# -- exceptions ---------------------------------------------------------------


class EventSourceError(Exception):
    """
    Base of every failure of a request made through this module.

    ``channel`` is the reply channel of the request (``None`` when the failure
    is not about one request), handy when reading the server's log.
    """

    def __init__(self, message: str, channel: Optional[str] = None):
        super().__init__(message)
        self.channel = channel


class ServerError(EventSourceError):
    """The server answered ``"error"``: a bad query, a refused table or
    column, or a database failure.  The server logs the reason."""


class StreamTimeout(EventSourceError):
    """The server answered ``"timeout"``: a row was not accepted within its
    row timeout (the consumer was too slow), and the stream is over."""


class NoServerError(EventSourceError):
    """No eventsource server listens: the request reached 0 subscribers."""


class ReplyTimeout(EventSourceError):
    """The server did not answer within the client's timeout."""


class RedisConnectionError(EventSourceError):
    """Redis cannot be reached, or the connection dropped while the request
    was open (a persist may or may not have been applied)."""


class BadReply(EventSourceError):
    """The server sent something the protocol does not allow here."""


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
            try:
                self["data"] = json.loads(data)
            except ValueError:
                pass  # not JSON text after all (an alias?): left as it came


def encode(message: Any) -> str:
    """A message body: compact JSON text (control words become JSON strings)."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def decode(body: Any) -> Any:
    """
    A message body as a Python value.

    A bare control word (``end`` without quotes) counts as the word, for
    servers that do not quote them; any other text that is not JSON is
    returned unchanged.
    """
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            return body
    if not isinstance(body, str):
        return body
    try:
        return json.loads(body)
    except ValueError:
        return body


# -- the Redis boundary ---------------------------------------------------------


class PubSub(Protocol):
    """
    What the client needs from Redis.

    The client sets :attr:`receiver` before using it; the implementation
    calls ``receiver.message_received(channel, body)`` for every message on a
    subscribed channel, ``receiver.connection_lost(reason)`` when the
    subscriber connection drops (its subscriptions are gone with it) and
    ``receiver.connection_made()`` each time a subscriber connection becomes
    usable again.
    """

    receiver: Any

    def subscribe(self, channel: str) -> Deferred:
        """Subscribe; fires once Redis has confirmed the subscription."""

    def unsubscribe(self, channel: str) -> Deferred:
        """Unsubscribe."""

    def publish(self, channel: str, body: str) -> Deferred:
        """Publish; fires with the number of subscribers that received it."""

    def disconnect(self) -> Deferred:
        """Close every connection for good."""


# -- requests -----------------------------------------------------------------

_END_OF_ROWS = object()


class _Request:
    """
    The life of one request on its reply channel.

    Subscribe to the reply channel, wait for the confirmation, publish the
    request, then hand every message on the reply channel to
    :meth:`message_received` until :meth:`_finish`.  A timer (started by the
    subclass while it waits for the server) turns silence into
    :class:`ReplyTimeout`.
    """

    #: the kind of request: the request channel's name without the prefix
    kind = ""

    def __init__(self, client: "EventSourceClient", body: Dict[str, Any], timeout: float):
        self._client = client
        self.channel = client._new_channel()
        self._body = dict(body, channel=self.channel)
        self._timeout = timeout
        self._timer = None
        self.started = False
        self.finished = False
        self._confirmed = False
        self._left = False
        self._published = False
        self._heard = False

    # -- driving ---------------------------------------------------------

    def start(self) -> None:
        self.started = True
        self._client._requests[self.channel] = self
        log.debug("{kind} on {channel}: subscribing", kind=self.kind,
                  channel=self.channel)
        d = self._client._pubsub_call("subscribe", self.channel)
        d.addCallbacks(self._subscribed, self._redis_failed)

    def _subscribed(self, _) -> None:
        if self.finished:
            if not self._left:
                # confirmed only after the request was over (a subscribe that
                # waited for a reconnect): leave the channel again
                self._leave()
            return
        self._confirmed = True
        body = encode(self._body)
        self._published = True
        d = self._client._pubsub_call("publish", self._client.request_channel(self.kind),
                                      body)
        d.addCallbacks(self._request_published, self._redis_failed)

    def _request_published(self, receivers) -> None:
        if self.finished:
            return
        if receivers == 0 and not self._heard:
            self._failed(NoServerError(
                "no eventsource server is listening on "
                f"{self._client.request_channel(self.kind)!r} "
                "(the request reached 0 subscribers)", self.channel))

    def _redis_failed(self, failure: Failure) -> None:
        if self.finished:
            return
        self._failed(_redis_error(failure, self.channel))

    def message_received(self, body: Any) -> None:
        if self.finished:
            return
        self._heard = True
        self._message(decode(body))

    def connection_lost(self, error: EventSourceError) -> None:
        """The subscriber connection dropped: nothing more can arrive."""
        if not self.finished:
            self._failed(error, subscribed=False)

    # -- timer -----------------------------------------------------------

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
        if self.finished:
            return
        if not self._confirmed:
            # Redis itself is away (txredisapi waits for it to come back)
            self._failed(RedisConnectionError(
                f"Redis did not confirm the subscription to {self.channel} within "
                f"{self._timeout:g} s (is it reachable?)", self.channel))
        else:
            self._failed(ReplyTimeout(
                f"no answer from the eventsource server within {self._timeout:g} s "
                f"({self.kind} on {self.channel})", self.channel))

    # -- ending ----------------------------------------------------------

    def _finish(self, subscribed: bool = True) -> None:
        """Stop listening: forget the channel and leave it."""
        if self.finished:
            return
        self.finished = True
        self._cancel_timer()
        if self._client._requests.get(self.channel) is self:
            del self._client._requests[self.channel]
        if subscribed:
            self._leave()

    def _leave(self) -> None:
        self._left = True
        d = self._client._pubsub_call("unsubscribe", self.channel)
        d.addErrback(lambda f: log.debug("unsubscribe {channel} failed: {f}",
                                         channel=self.channel, f=f.getErrorMessage()))

    def _message(self, message: Any) -> None:
        raise NotImplementedError

    def _failed(self, error: EventSourceError, subscribed: bool = True) -> None:
        raise NotImplementedError


class _PersistRequest(_Request):
    """A persist: one result object (or ``"error"``) and ``"end"``."""

    kind = PERSIST

    def __init__(self, client, body, timeout):
        super().__init__(client, body, timeout)
        self.result = Deferred(self._cancelled)

    def start(self) -> None:
        self._arm_timer()
        super().start()

    def _message(self, message: Any) -> None:
        if isinstance(message, dict):
            self._finish()
            self.result.callback(PersistResult.from_message(message))
        elif message == ERROR:
            self._failed(ServerError(
                f"the server answered \"error\" to persist on {self.channel} "
                "(see the server's log for the reason)", self.channel))
        elif message == TIMEOUT:
            self._failed(StreamTimeout(f"the server timed out persist on {self.channel}",
                                       self.channel))
        elif message == END:
            self._failed(BadReply(f"the server ended persist on {self.channel} "
                                  "without a result", self.channel))
        else:
            log.warn("ignored an unexpected message on {channel}: {message!r}",
                     channel=self.channel, message=message)

    def _failed(self, error: EventSourceError, subscribed: bool = True) -> None:
        self._finish(subscribed)
        self.result.errback(error)

    def _cancelled(self, _) -> None:
        self._finish(subscribed=self.started)


class _FetchRequest(_Request):
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

    def __init__(self, client, body, timeout, window, raw, accept_via):
        super().__init__(client, body, timeout)
        self.window = window
        self.batch = max(1, window // 2)
        self._raw = raw
        self._accept_via = accept_via
        self._buffer = deque()
        # None while streaming, then _END_OF_ROWS or an EventSourceError
        self._outcome = None
        self._outcome_delivered = False
        self._waiting = None
        self._handed_out = False
        self._unaccepted = 0
        self._unaccepted_bytes = 0
        self._incoming_size = 0
        self._handed_size = 0
        self._idle_timer = None
        self.rows = 0

    # -- consumer side -----------------------------------------------------

    def next_row(self) -> Deferred:
        """A Deferred firing with the next row, or :data:`_END_OF_ROWS`."""
        if self._waiting is not None:
            raise RuntimeError("next_row() called again before the previous row arrived")
        if not self.started and self._outcome is None:
            self.start()
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

    def _idle_accept(self) -> None:
        self._idle_timer = None
        if self._outcome is None and self._unaccepted and not self.finished:
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

    def _hand_out(self, row, size=0):
        self._handed_out = True
        self._handed_size = size
        self.rows += 1
        return row

    def _deliver_outcome(self) -> Deferred:
        if self._outcome is _END_OF_ROWS or self._outcome_delivered:
            return defer.succeed(_END_OF_ROWS)
        self._outcome_delivered = True
        return defer.fail(self._outcome)

    @property
    def windowed(self) -> bool:
        """A windowed stream (extension 1) accepts and ends on ``fetch-next``
        only: the server does not listen on its reply channel."""
        return self.window > 1

    def _accept(self) -> None:
        count, self._unaccepted = self._unaccepted, 0
        self._unaccepted_bytes = 0
        if self._accept_via == "reply" and not self.windowed:
            d = defer.gatherResults(
                [self._client._pubsub_call("publish", self.channel, encode(ACCEPTED))
                 for _ in range(count)], consumeErrors=True)
            d.addCallback(lambda _: None)
        else:
            message = {"channel": self.channel}
            if count > 1:
                message["accepted"] = count
            d = self._client._pubsub_call("publish", self._client.request_channel(FETCH_NEXT),
                                          encode(message))
        d.addCallbacks(self._accept_published, self._redis_failed)

    def _accept_published(self, receivers) -> None:
        if receivers == 0 and not self.finished:
            self._failed(NoServerError(
                f"the eventsource server went away during the fetch on {self.channel} "
                f"(an acceptance reached 0 subscribers)", self.channel))

    def close(self, error: Optional[EventSourceError] = None) -> Deferred:
        """
        Stop the stream: tell the server ``"end"`` unless it has already
        ended, and stop listening.  A consumer waiting for a row sees the end
        of the rows (or ``error``, when given).  Fires once Redis took the
        ``"end"``.
        """
        if self._outcome is not None or self.finished:
            if self._outcome is None:
                self._outcome = _END_OF_ROWS
            return defer.succeed(None)
        self._outcome = _END_OF_ROWS if error is None else error
        self._buffer.clear()
        d = defer.succeed(None)
        if self.started:
            if self._published:
                d = self._send_end()
                d.addCallback(lambda _: None)
                d.addErrback(lambda f: log.debug("could not send end on {channel}: {f}",
                                                 channel=self.channel, f=f.getErrorMessage()))
            self._finish()
        log.debug("fetch on {channel} closed by the client after {rows} rows",
                  channel=self.channel, rows=self.rows)
        self._fire_waiting()
        return d

    def abandon(self) -> None:
        """The consumer dropped its stream object without finishing it."""
        if self._outcome is None and self.started:
            log.debug("fetch on {channel} abandoned; sending end", channel=self.channel)
        self.close()

    # -- server side -------------------------------------------------------

    def message_received(self, body: Any) -> None:
        self._incoming_size = len(body)
        super().message_received(body)

    def _message(self, message: Any) -> None:
        if self._outcome is not None:
            return
        if isinstance(message, dict):
            self._row(message)
        elif message == END:
            self._ended(_END_OF_ROWS)
        elif message == ERROR:
            self._ended(ServerError(
                f"the server answered \"error\" to fetch on {self.channel} "
                "(see the server's log for the reason)", self.channel))
        elif message == TIMEOUT:
            self._ended(StreamTimeout(
                f"the server ended the fetch on {self.channel}: a row was not accepted "
                "within its row timeout", self.channel))
        elif message == ACCEPTED:
            pass  # the echo of our own acceptance
        else:
            log.warn("ignored an unexpected message on {channel}: {message!r}",
                     channel=self.channel, message=message)

    def _row(self, message: Dict[str, Any]) -> None:
        row = message if self._raw else Row(message)
        if self._waiting is not None:
            self._cancel_timer()
            d, self._waiting = self._waiting, None
            d.callback(self._hand_out(row, self._incoming_size))
        else:
            self._buffer.append((row, self._incoming_size))

    def _ended(self, outcome, subscribed: bool = True) -> None:
        self._outcome = outcome
        self._finish(subscribed)
        self._fire_waiting()

    def _failed(self, error: EventSourceError, subscribed: bool = True) -> None:
        if self._outcome is not None:
            return
        self._ended(error, subscribed)
        if isinstance(error, ReplyTimeout) and self._published:
            # the server may still be streaming: tell it to stop
            self._send_end().addErrback(lambda f: None)

    def _send_end(self) -> Deferred:
        """Tell the server to stop: ``"end"`` on the reply channel (version 1), or
        ``{"channel": c, "end": true}`` on ``fetch-next`` for a windowed stream."""
        if self.windowed:
            return self._client._pubsub_call(
                "publish", self._client.request_channel(FETCH_NEXT),
                encode({"channel": self.channel, "end": True}))
        return self._client._pubsub_call("publish", self.channel, encode(END))

    def _fire_waiting(self) -> None:
        if self._waiting is None:
            return
        d, self._waiting = self._waiting, None
        if self._buffer:
            d.callback(self._hand_out(*self._buffer.popleft()))
        else:
            self._deliver_outcome().chainDeferred(d)


class RowStream:
    """
    The rows of one fetch, as an async iterator::

        async for row in client.fetch(query):
            ...

    The request starts when the first row is asked for.  Each row is accepted
    when the next one is asked for.  Leaving the loop early (``break``, an
    exception, or dropping the stream) sends ``"end"`` so the server stops;
    ``async with client.fetch(query) as rows:`` or :meth:`aclose` make that
    explicit and immediate.

    Raises :class:`ServerError`, :class:`StreamTimeout`,
    :class:`NoServerError`, :class:`ReplyTimeout` or
    :class:`RedisConnectionError` from the loop, after every row the server
    sent before it.
    """

    def __init__(self, request: _FetchRequest):
        self._request = request
        # Runs when the stream object is dropped: a loop left with ``break``
        # drops it at once (CPython), and the server must hear "end".
        self._finalizer = weakref.finalize(self, request.abandon)
        self._finalizer.atexit = False

    @property
    def channel(self) -> str:
        """The reply channel of this fetch."""
        return self._request.channel

    @property
    def rows(self) -> int:
        """How many rows were handed out so far."""
        return self._request.rows

    @property
    def window(self) -> int:
        """The window asked of the server."""
        return self._request.window

    def __aiter__(self) -> "RowStream":
        return self

    async def __anext__(self):
        row = await self._request.next_row()
        if row is _END_OF_ROWS:
            self._finalizer.detach()
            raise StopAsyncIteration
        return row

    def next_row(self) -> Deferred:
        """
        Callback style: a Deferred firing with the next row, or with ``None``
        after the last one.  Asking for the next row accepts the previous one.
        """
        d = self._request.next_row()
        return d.addCallback(lambda row: None if row is _END_OF_ROWS else row)

    def aclose(self) -> Deferred:
        """Stop now, sending ``"end"`` if the server is still streaming."""
        self._finalizer.detach()
        return self._request.close()

    async def __aenter__(self) -> "RowStream":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()


# -- the client -----------------------------------------------------------------


def _as_json_text(document: dict) -> dict:
    """
    A document whose ``data`` is a ``str`` as the server reads it: in
    version 1 a string ``data`` is JSON text, so a Python string is sent as
    the JSON text of that string, and stored as the string it is.
    """
    if isinstance(document.get("data"), str):
        return dict(document, data=json.dumps(document["data"], ensure_ascii=False))
    return document


class EventSourceClient:
    """
    A client of the eventsource server over one :class:`PubSub`.

    Usually made by :func:`connect`.  Build one directly to use another
    pub/sub implementation (an in-memory one in tests).

    :param pubsub: the Redis boundary.
    :param clock: an ``IReactorTime`` for the client timeouts.
    :param timeout: seconds to wait for the server (per persist; per row of a
        fetch) before failing with :class:`ReplyTimeout`.
    :param reply_prefix: the start of every reply channel name (after the
        tenant's namespace, with ``tenant``); ``None``:
        :data:`DEFAULT_REPLY_PREFIX`, or ``"reply:"`` with a tenant.
    :param channel_prefix: the server's ``--channel-prefix``: prepended to the
        request channels ``persist``, ``fetch`` and ``fetch-next``.
    :param tenant: for a server in tenant mode (``--tenants``): requests go
        to ``<channel_prefix><tenant>:persist`` (and ``:fetch``,
        ``:fetch-next``) and every reply channel lies in the tenant's
        namespace ``<channel_prefix><tenant>:``, the channels a Redis ACL of
        ``&<channel_prefix><tenant>:*`` allows.
    :param accept_via: ``"fetch-next"`` (publish ``{"channel": c}`` on
        ``fetch-next``: the default, and no echo comes back) or ``"reply"``
        (publish ``"accepted"`` on the reply channel, as the original client;
        version 1 fetches only: windowed ones always use ``fetch-next``).
    """

    def __init__(self, pubsub: PubSub, clock, *, timeout: float = DEFAULT_TIMEOUT,
                 reply_prefix: Optional[str] = None, accept_via: str = FETCH_NEXT,
                 channel_prefix: str = "", tenant: Optional[str] = None):
        if accept_via not in (FETCH_NEXT, "reply"):
            raise ValueError("accept_via must be 'fetch-next' or 'reply'")
        if tenant is not None and not valid_tenant(tenant):
            raise ValueError(f"a tenant is 1 to 64 letters, digits, '_', '.' or '-', "
                             f"not {tenant!r}")
        self._pubsub = pubsub
        self._clock = clock
        self.timeout = timeout
        self.tenant = tenant
        #: where this client's requests and replies live: the tenant's
        #: namespace, or the channel prefix without a tenant
        self.namespace = channel_prefix if tenant is None else f"{channel_prefix}{tenant}:"
        if reply_prefix is None:
            reply_prefix = DEFAULT_REPLY_PREFIX if tenant is None else TENANT_REPLY_PREFIX
        self.reply_prefix = reply_prefix
        self.accept_via = accept_via
        self.channel_prefix = channel_prefix
        self._requests: Dict[str, _Request] = {}
        self._listeners: Dict[str, List[Callable[[Any], Any]]] = {}
        self._sticky = set()
        self._disconnected = False
        pubsub.receiver = self

    # -- plumbing ----------------------------------------------------------

    def request_channel(self, kind: str) -> str:
        """The channel requests of ``kind`` (``"persist"``...) are published on."""
        return self.namespace + kind

    def _new_channel(self) -> str:
        if self.tenant is None:
            return f"{self.reply_prefix}{uuid.uuid4().hex}"
        return f"{self.namespace}{self.reply_prefix}{uuid.uuid4().hex}"

    def _pubsub_call(self, method: str, *args) -> Deferred:
        if self._disconnected:
            return defer.fail(RedisConnectionError("the client is disconnected"))
        return defer.maybeDeferred(getattr(self._pubsub, method), *args)

    @property
    def open_requests(self) -> int:
        """How many requests are waiting for the server right now."""
        return len(self._requests)

    def message_received(self, channel: str, body: Any) -> None:
        """Called by the pub/sub for every message on a subscribed channel."""
        request = self._requests.get(channel)
        if request is not None:
            request.message_received(body)
        listeners = self._listeners.get(channel)
        if listeners:
            message = decode(body)
            for callback in list(listeners):
                try:
                    callback(message)
                except Exception:
                    log.failure("a listener on {channel} failed", channel=channel)

    def connection_lost(self, reason: Any = None) -> None:
        """Called by the pub/sub when the subscriber connection dropped."""
        if not self._requests:
            return
        log.warn("lost the Redis subscriber connection: failing {count} open requests",
                 count=len(self._requests))
        error = RedisConnectionError(
            "lost the connection to Redis while waiting for the eventsource server")
        for request in list(self._requests.values()):
            request.connection_lost(error)

    def connection_made(self) -> None:
        """Called by the pub/sub when a (new) subscriber connection is usable."""
        for channel in sorted(self._sticky):
            self._pubsub_call("subscribe", channel).addErrback(
                lambda f, channel=channel: log.warn(
                    "could not re-subscribe to {channel}: {error}", channel=channel,
                    error=f.getErrorMessage()))

    def disconnect(self) -> Deferred:
        """
        End every open request (open fetches are told ``"end"``; waiting
        persists fail with :class:`RedisConnectionError`), then close both
        Redis connections.
        """
        closing = []
        for request in list(self._requests.values()):
            if isinstance(request, _FetchRequest):
                closing.append(request.close(RedisConnectionError(
                    "the client was disconnected", request.channel)))
            else:
                request._failed(RedisConnectionError("the client was disconnected",
                                                     request.channel))
        d = defer.gatherResults(closing, consumeErrors=True) if closing else defer.succeed(None)

        def close(_):
            self._disconnected = True
            return self._pubsub.disconnect()

        return d.addBoth(close)

    # -- persist -------------------------------------------------------------

    def persist(self, documents, table: Optional[str] = None,
                timeout: Optional[float] = None) -> Deferred:
        """
        Append events, atomically.

        :param documents: one event (a dict with ``pid``, ``domain``, ``name``
            and optional ``data``, any JSON value: a ``str`` is stored as that
            string) or a non-empty list of them.
        :param table: ``database.table``; the server's events table when
            ``None``.
        :return: a Deferred firing with a :class:`PersistResult`, or failing
            with :class:`ServerError`, :class:`NoServerError` (at once),
            :class:`ReplyTimeout` or :class:`RedisConnectionError`.
        """
        if isinstance(documents, dict):
            documents = _as_json_text(documents)
        elif isinstance(documents, (list, tuple)) and documents and all(
                isinstance(d, dict) for d in documents):
            documents = [_as_json_text(d) for d in documents]
        else:
            raise ValueError("documents must be a dict or a non-empty list of dicts")
        insert = {"$documents": documents}
        if table is not None:
            insert = {"$table": table, "$documents": documents}
        body = {"query": {"$insert": insert}}
        encode(body)  # TypeError now, not inside the request
        request = _PersistRequest(self, body, self.timeout if timeout is None else timeout)
        request.start()
        return request.result

    def persist_event(self, pid: str, domain: str, name: str, data: Any = None,
                      table: Optional[str] = None, timeout: Optional[float] = None) -> Deferred:
        """Append one event; a shortcut for :meth:`persist`."""
        return self.persist({"pid": pid, "domain": domain, "name": name, "data": data},
                            table=table, timeout=timeout)

    # -- fetch ---------------------------------------------------------------

    def fetch(self, query: Dict[str, Any], *, window: int = 1, raw: bool = False,
              timeout: Optional[float] = None) -> RowStream:
        """
        Stream the rows of a query.

        :param query: ``{"$select": {...}}`` in the server's JSON query
            language (``$where``, ``$orderBy``, ``$limit``...).
        :param window: rows the server may send ahead of acceptances; 1 is
            version 1 of the protocol (one row per round trip).  A larger
            window streams faster; the server caps it.  A windowed fetch
            always accepts and ends on ``fetch-next`` (whatever
            ``accept_via`` says): the server does not listen on its reply
            channel.
        :param raw: yield rows exactly as sent (``data`` as JSON text) instead
            of :class:`Row` objects with ``data`` decoded.
        :param timeout: seconds to wait for each message of the server.
        :return: a :class:`RowStream` (an async iterator).
        """
        if not isinstance(query, dict):
            raise ValueError("query must be a dict such as {\"$select\": {...}}")
        if type(window) is not int or window < 1:
            raise ValueError("window must be an integer of at least 1")
        body = {"query": query}
        if window > 1:
            body["window"] = window
        encode(body)
        request = _FetchRequest(self, body, self.timeout if timeout is None else timeout,
                                window, raw, self.accept_via)
        return RowStream(request)

    def fetch_by_pid(self, pid: str, table: Optional[str] = None, **kwargs) -> RowStream:
        """All events of one process (aggregate) id, in the order they were appended."""
        return self.fetch(_select({"pid": pid}, table), **kwargs)

    def fetch_by_name(self, domain: str, name: Optional[str] = None,
                      table: Optional[str] = None, **kwargs) -> RowStream:
        """The events of a domain (of one name in it, if given), in append order."""
        where = {"domain": domain}
        if name is not None:
            where["name"] = name
        return self.fetch(_select(where, table), **kwargs)

    def fetch_each(self, query: Dict[str, Any], on_row: Callable[[Any], Any],
                   **kwargs) -> Deferred:
        """
        Callback style: call ``on_row(row)`` for every row.

        A row is accepted once ``on_row`` returns (or once the Deferred or
        coroutine it returns completes).  Fires with the number of rows when
        the stream ended.  If ``on_row`` raises, the stream is ended and the
        Deferred fails with that error; cancelling the Deferred ends the
        stream too.
        """
        stream = self.fetch(query, **kwargs)

        async def run():
            count = 0
            async with stream:
                async for row in stream:
                    result = on_row(row)
                    if isawaitable(result):
                        await result
                    count += 1
            return count

        return Deferred.fromCoroutine(run())

    def fetch_all(self, query: Dict[str, Any], **kwargs) -> Deferred:
        """Every row of a query in one list (for small results)."""
        rows = []
        d = self.fetch_each(query, rows.append, **kwargs)
        return d.addCallback(lambda _: rows)

    # -- the original's low-level style ------------------------------------------

    def subscribe(self, channel: str) -> Deferred:
        """
        Subscribe to a channel (kept across reconnects until
        :meth:`unsubscribe`); fires once Redis confirmed it.  Messages go to
        the callbacks registered with :meth:`on`.
        """
        self._sticky.add(channel)
        return self._pubsub_call("subscribe", channel).addCallback(lambda _: None)

    def unsubscribe(self, channel: str) -> Deferred:
        """Leave a channel subscribed with :meth:`subscribe`."""
        self._sticky.discard(channel)
        return self._pubsub_call("unsubscribe", channel).addCallback(lambda _: None)

    def on(self, channel: str, callback: Callable[[Any], Any]) -> None:
        """Call ``callback(message)`` with every message on ``channel``, JSON-decoded."""
        self._listeners.setdefault(channel, []).append(callback)

    def off(self, channel: str, callback: Optional[Callable[[Any], Any]] = None) -> None:
        """Remove one callback of ``channel``, or all of them."""
        listeners = self._listeners.get(channel, [])
        if callback is None:
            listeners.clear()
        elif callback in listeners:
            listeners.remove(callback)
        if not listeners:
            self._listeners.pop(channel, None)

    def publish(self, channel: str, message: Any) -> Deferred:
        """Publish ``message`` encoded as JSON; fires with the number of receivers."""
        return self._pubsub_call("publish", channel, encode(message))


def _select(where: Dict[str, Any], table: Optional[str]) -> Dict[str, Any]:
    select: Dict[str, Any] = {"$where": where}
    if table is not None:
        select["$from"] = table
    return {"$select": select}


def _redis_error(failure: Failure, channel: Optional[str]) -> EventSourceError:
    if isinstance(failure.value, EventSourceError):
        return failure.value
    return RedisConnectionError(f"Redis failed: {failure.getErrorMessage()}", channel)


# -- the real Redis boundary -------------------------------------------------------


def _txredisapi():
    import txredisapi

    return txredisapi


class RedisPubSub:
    """
    :class:`PubSub` over two txredisapi connections: a subscriber and a
    publisher.  Both reconnect on their own (backing off up to ``max_delay``
    seconds); the subscriber tells its receiver every time it connects and
    disconnects.  Numbers are never converted (``"007"`` stays text).
    """

    def __init__(self, endpoint, *, password: Optional[str] = None,
                 username: Optional[str] = None, max_delay: float = 2.0):
        txredisapi = _txredisapi()
        self.receiver = None
        self._endpoint = endpoint
        pubsub = self

        class Subscriber(txredisapi.SubscriberProtocol):
            def connectionMade(self):
                d = super().connectionMade()
                d.addCallback(lambda _: pubsub._subscriber_made(self) if self.connected
                              else None)
                return d

            def connectionLost(self, why):
                super().connectionLost(why)
                pubsub._subscriber_lost(why)

            def messageReceived(self, pattern, channel, message):
                pubsub._deliver(channel, message)

        self._subscriber_factory = txredisapi.RedisFactory(
            None, None, 1, isLazy=False, password=password, username=username,
            convertNumbers=False)
        self._subscriber_factory.protocol = Subscriber
        self._publisher_factory = txredisapi.RedisFactory(
            None, None, 1, isLazy=False, password=password, username=username,
            convertNumbers=False)
        for factory in (self._subscriber_factory, self._publisher_factory):
            factory.maxDelay = max_delay
            factory.initialDelay = min(factory.initialDelay, max_delay)
        self._was_connected = False

    def start(self, clock, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> Deferred:
        """
        Connect both; fires with ``self`` once both are usable.  Fails with
        :class:`RedisConnectionError` on the first refused attempt, a refused
        password, or after ``timeout`` seconds.
        """
        factories = (self._subscriber_factory, self._publisher_factory)
        for factory in factories:
            factory.startConnecting(self._endpoint)
        ready = defer.gatherResults([f.deferred for f in factories], consumeErrors=True)
        result = Deferred()

        def succeeded(_):
            if not result.called:
                result.callback(self)

        def failed(failure):
            if isinstance(failure.value, defer.FirstError):
                failure = failure.value.subFailure
            if not result.called:
                result.errback(RedisConnectionError(
                    f"cannot connect to Redis: {failure.getErrorMessage()}"))

        ready.addCallbacks(succeeded, failed)
        # the first failed attempt is final here (later ones are retried)
        for factory in factories:
            for slot in getattr(factory, "slots", ()):
                service = getattr(slot, "service", None)
                if service is not None:
                    service.whenConnected(failAfterFailures=1).addErrback(failed)

        def timed_out():
            if not result.called:
                result.errback(RedisConnectionError(
                    f"cannot connect to Redis: no connection within {timeout:g} s"))

        timer = clock.callLater(timeout, timed_out)

        def done(outcome):
            if timer.active():
                timer.cancel()
            if isinstance(outcome, Failure):
                # not from inside the connection attempt's own state change:
                # ClientService cannot be stopped reentrantly
                d = deferLater(clock, 0, self.disconnect)
                d.addBoth(lambda _: outcome)
                return d
            return outcome

        return result.addBoth(done)

    def _subscriber_made(self, protocol) -> None:
        if self._was_connected:
            log.info("reconnected to Redis")
        self._was_connected = True
        if self.receiver is not None:
            self.receiver.connection_made()

    def _subscriber_lost(self, why) -> None:
        if self.receiver is not None:
            self.receiver.connection_lost(why)

    def _deliver(self, channel, message) -> None:
        if self.receiver is None:
            return
        try:
            self.receiver.message_received(channel, message)
        except Exception:
            log.failure("unhandled error handling a message on {channel}", channel=channel)

    def subscribe(self, channel: str) -> Deferred:
        return self._subscriber_factory.handler.subscribe(channel)

    def unsubscribe(self, channel: str) -> Deferred:
        return self._subscriber_factory.handler.unsubscribe(channel)

    def publish(self, channel: str, body: str) -> Deferred:
        return self._publisher_factory.handler.publish(channel, body)

    def disconnect(self) -> Deferred:
        return defer.gatherResults(
            [self._subscriber_factory.disconnect(), self._publisher_factory.disconnect()],
            consumeErrors=True).addCallback(lambda _: None)


def connect(host: str = "127.0.0.1", port: int = 6379, *, password: Optional[str] = None,
            username: Optional[str] = None, endpoint: Optional[str] = None, reactor=None,
            timeout: float = DEFAULT_TIMEOUT, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
            reply_prefix: Optional[str] = None, accept_via: str = FETCH_NEXT,
            channel_prefix: str = "", max_delay: float = 2.0,
            tenant: Optional[str] = None) -> Deferred:
    """
    Connect to the Redis the eventsource server listens on.

    :param host: Redis host (default as the server's: 127.0.0.1).
    :param port: Redis port (6379).
    :param password: Redis password (``AUTH``); ``username`` for an ACL user.
    :param endpoint: a Twisted client endpoint string instead of host and
        port, such as ``"unix:path=/run/redis.sock"`` or
        ``"tls:redis.example:6380"``.
    :param timeout: seconds each request waits for the server
        (:class:`ReplyTimeout` after that).
    :param connect_timeout: seconds to wait for Redis now.
    :param reply_prefix: start of every reply channel name (for Redis ACLs
        that restrict clients to a channel prefix), see :class:`EventSourceClient`.
    :param accept_via: how rows are accepted, see :class:`EventSourceClient`.
    :param channel_prefix: the server's ``--channel-prefix``, if it has one.
    :param tenant: this client's tenant, for a server in tenant mode
        (``--tenants``), see :class:`EventSourceClient`.
    :return: a Deferred firing with an :class:`EventSourceClient`, or failing
        with :class:`RedisConnectionError`.
    """
    if reactor is None:
        from twisted.internet import reactor
    if endpoint is not None:
        from twisted.internet.endpoints import clientFromString

        client_endpoint = clientFromString(reactor, endpoint)
    else:
        from twisted.internet.endpoints import HostnameEndpoint

        client_endpoint = HostnameEndpoint(reactor, host, port, timeout=connect_timeout)
    pubsub = RedisPubSub(client_endpoint, password=password, username=username,
                         max_delay=max_delay)
    client = EventSourceClient(pubsub, reactor, timeout=timeout, reply_prefix=reply_prefix,
                               accept_via=accept_via, channel_prefix=channel_prefix,
                               tenant=tenant)
    d = pubsub.start(reactor, connect_timeout)
    return d.addCallback(lambda _: client)
