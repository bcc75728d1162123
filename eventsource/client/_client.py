"""
:class:`EventSourceClient`, :class:`RowStream`, :class:`EventStream` and
:func:`connect`: the requests a Twisted application makes, over one
:class:`PubSub`.
"""

import uuid
import weakref
from inspect import isawaitable
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Set,
    Tuple,
    Union,
    overload,
)

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from eventsource.client._errors import (
    EventSourceError,
    NoServerError,
    RedisConnectionError,
    ReplyTimeout,
    ServerError,
    ServerTooOld,
    StreamTimeout,
    Unavailable,
)
from eventsource.client._events import (
    ANY,
    DEFAULT_RETRY,
    PROBE_QUERY,
    VERSION_2,
    AppendResult,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
    RetryPolicy,
    check_expected,
    check_unique_ids,
    stream_documents,
)
from eventsource.client._redis import DEFAULT_CONNECT_TIMEOUT, PubSub, RedisPubSub
from eventsource.client._requests import END_OF_ROWS, AppendRequest, FetchRequest, PersistRequest
from eventsource.client._subscription import (
    DEFAULT_HEARTBEAT,
    DEFAULT_SUBSCRIPTION_WINDOW,
    FROM_START,
    Start,
    Subscription,
)
from eventsource.wire import FETCH_NEXT, PERSIST, decode_body, encode_body, valid_tenant

log = Logger()

#: the reply channels of a client are this prefix and a UUID (hex)
DEFAULT_REPLY_PREFIX = "eventsource:reply:"
#: ... and with a tenant, the tenant's namespace, this and a UUID
TENANT_REPLY_PREFIX = "reply:"
#: seconds to wait for the server before a request fails with ReplyTimeout
DEFAULT_TIMEOUT = 10.0


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

    def __init__(self, request: FetchRequest):
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

    async def __anext__(self) -> Any:
        row = await self._request.next_row()
        if row is END_OF_ROWS:
            self._finalizer.detach()
            raise StopAsyncIteration
        return row

    def next_row(self) -> Deferred:
        """
        Callback style: a Deferred firing with the next row, or with ``None``
        after the last one.  Asking for the next row accepts the previous one.
        """
        d = self._request.next_row()
        return d.addCallback(lambda row: None if row is END_OF_ROWS else row)

    def aclose(self) -> Deferred:
        """Stop now, sending ``"end"`` if the server is still streaming."""
        self._finalizer.detach()
        return self._request.close()

    async def __aenter__(self) -> "RowStream":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class EventStream(RowStream):
    """
    The events of a version 2 read (:meth:`EventSourceClient.read_stream`),
    as :class:`RecordedEvent` values; a :class:`RowStream` otherwise.  Before
    its request is sent, the client makes sure the server speaks version 2
    (:meth:`EventSourceClient.require_version_2`), so the loop may raise
    :class:`ServerTooOld` first.
    """

    def __init__(self, request: FetchRequest, ready: Callable[[], Deferred]):
        super().__init__(request)
        self._ready: Optional[Callable[[], Deferred]] = ready

    def _check(self) -> Deferred:
        if self._ready is None:
            return defer.succeed(None)
        ready, self._ready = self._ready, None
        return ready()

    async def __anext__(self) -> Any:
        await self._check()
        return await super().__anext__()

    def next_row(self) -> Deferred:
        return self._check().addCallback(lambda _: RowStream.next_row(self))


# -- the client -----------------------------------------------------------------


def _as_json_text(document: Dict[str, Any]) -> Dict[str, Any]:
    """
    A document whose ``data`` is a ``str`` as the server reads it: in
    version 1 a string ``data`` is JSON text, so a Python string is sent as
    the JSON text of that string, and stored as the string it is.
    """
    if isinstance(document.get("data"), str):
        return dict(document, data=encode_body(document["data"]))
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
        request channels ``persist``, ``fetch``, ``fetch-next`` and ``subscribe``.
    :param tenant: for a server in tenant mode (``--tenants``): requests go
        to ``<channel_prefix><tenant>:persist`` (and ``:fetch``,
        ``:fetch-next``) and every reply channel lies in the tenant's
        namespace ``<channel_prefix><tenant>:``, the channels a Redis ACL of
        ``&<channel_prefix><tenant>:*`` allows.
    :param accept_via: ``"fetch-next"`` (publish ``{"channel": c}`` on
        ``fetch-next``: the default, and no echo comes back) or ``"reply"``
        (publish ``"accepted"`` on the reply channel, as the original client;
        version 1 fetches only: windowed ones always use ``fetch-next``).
    :param retry: how :meth:`append` repeats an attempt whose outcome is
        unknown (see :class:`RetryPolicy`).
    :param address: where the server is, in words for error messages (such
        as ``"127.0.0.1:6379"``; :func:`connect` gives it).
    """

    def __init__(self, pubsub: PubSub, clock: Any, *, timeout: float = DEFAULT_TIMEOUT,
                 reply_prefix: Optional[str] = None, accept_via: str = FETCH_NEXT,
                 channel_prefix: str = "", tenant: Optional[str] = None,
                 retry: RetryPolicy = DEFAULT_RETRY, address: Optional[str] = None):
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
        self._requests: Dict[str, Any] = {}
        self._listeners: Dict[str, List[Callable[[Any], Any]]] = {}
        self._sticky: Set[str] = set()
        self._disconnected = False
        self._disconnecting = False
        self.retry = retry
        self.address = address
        #: True once this connection's server answered the version 2 probe
        self._speaks_version_2 = False
        #: the error of this connection's server answering it as version 1 does
        self._too_old_error: Optional[ServerTooOld] = None
        #: the callers waiting for the probe in flight (None: no probe running)
        self._probe_waiters: Optional[List[Deferred]] = None
        #: changes with every subscriber connection made or lost: a probe's
        #: verdict is kept only for the connection it was made on
        self._connection_number = 0
        #: appends waiting to retry
        self._backoffs: Set[Deferred] = set()
        pubsub.receiver = self

    # -- plumbing ----------------------------------------------------------

    def request_channel(self, kind: str) -> str:
        """The channel requests of ``kind`` (``"persist"``...) are published on."""
        return self.namespace + kind

    def _new_channel(self) -> str:
        if self.tenant is None:
            return f"{self.reply_prefix}{uuid.uuid4().hex}"
        return f"{self.namespace}{self.reply_prefix}{uuid.uuid4().hex}"

    def _pubsub_call(self, method: str, *args: Any) -> Deferred:
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
            message = decode_body(body)
            for callback in list(listeners):
                try:
                    callback(message)
                except Exception:
                    log.failure("a listener on {channel} failed", channel=channel)

    def describe_server(self) -> str:
        """The server, in words for an error message: where it listens."""
        where = f" on Redis {self.address}" if self.address else ""
        return (f"the eventsource server{where} (requests on "
                f"{self.request_channel(PERSIST)!r})")

    def _forget_server(self) -> None:
        self._speaks_version_2 = False
        self._too_old_error = None
        self._connection_number += 1

    def connection_lost(self, reason: Any = None) -> None:
        """Called by the pub/sub when the subscriber connection dropped."""
        self._forget_server()
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
        self._forget_server()
        for channel in sorted(self._sticky):
            self._pubsub_call("subscribe", channel).addErrback(_warn_resubscribe, channel)

    def disconnect(self) -> Deferred:
        """
        End every open request (open fetches are told ``"end"``; waiting
        persists fail with :class:`RedisConnectionError`), then close both
        Redis connections.
        """
        self._disconnecting = True
        for backoff in list(self._backoffs):
            backoff.cancel()
        closing = []
        for request in list(self._requests.values()):
            if isinstance(request, FetchRequest):
                closing.append(request.close(RedisConnectionError(
                    "the client was disconnected", request.channel)))
            else:
                request.fail(RedisConnectionError("the client was disconnected",
                                                  request.channel))
        d = defer.gatherResults(closing, consumeErrors=True) if closing else defer.succeed(None)

        def close(_: object) -> Deferred:
            self._disconnected = True
            return self._pubsub.disconnect()

        return d.addBoth(close)

    # -- persist -------------------------------------------------------------

    def persist(self, documents: Union[Dict[str, Any], List[Dict[str, Any]]], table: Optional[str] = None,
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
        insert: Dict[str, Any] = {"$documents": documents}
        if table is not None:
            insert = {"$table": table, "$documents": documents}
        body = {"query": {"$insert": insert}}
        encode_body(body)  # TypeError now, not inside the request
        request = PersistRequest(self, body, self.timeout if timeout is None else timeout)
        request.start()
        return request.result

    def persist_event(self, pid: str, domain: str, name: str, data: Any = None,
                      table: Optional[str] = None, timeout: Optional[float] = None) -> Deferred:
        """Append one event; a shortcut for :meth:`persist`."""
        return self.persist({"pid": pid, "domain": domain, "name": name, "data": data},
                            table=table, timeout=timeout)

    # -- version 2: append ----------------------------------------------------

    def append(self, pid: str, events: Iterable[Union[NewEvent, Mapping[str, Any]]],
               expected_version: ExpectedVersion = ANY, *, table: Optional[str] = None,
               timeout: Optional[float] = None,
               retry: Optional[RetryPolicy] = None) -> Deferred:
        """
        Append events to one stream, atomically, exactly once (version 2 of
        the protocol).

        :param pid: the stream.
        :param events: a non-empty list of :class:`NewEvent` or dicts with
            ``domain``, ``name``, optional ``data`` (any JSON value; a
            ``str`` is that string) and optional ``eventId`` (a UUID).  An
            event without an id gets a new UUIDv7 *before* the first attempt.
        :param expected_version: the stream's last version before the append
            (an int ≥ 0), :data:`NO_STREAM`, :data:`STREAM_EXISTS` or
            :data:`ANY` (no check, the default).
        :param table: ``database.table``; the server's events table when ``None``.
        :param timeout: seconds each attempt waits for the server.
        :param retry: this append's :class:`RetryPolicy` instead of the client's.
        :return: a Deferred firing with an :class:`AppendResult`, or failing
            with :class:`WrongExpectedVersion` (``.actual``: the stream's
            version), another :class:`ServerError` of the server's code,
            :class:`ServerTooOld`, or, once the retries are used up,
            the last attempt's :class:`Unavailable`, :class:`ReplyTimeout`
            or :class:`RedisConnectionError`.

        An attempt whose outcome is unknown (``unavailable``, no answer, the
        Redis connection lost) is repeated with the same body and event ids,
        so the events are stored once however many attempts reach the
        server; a repeat of a stored append is answered as it was, with
        ``duplicate`` true.
        """
        documents = stream_documents(pid, events)
        check_unique_ids(documents)
        body = self._persist_body(documents, table)
        expected = check_expected(expected_version)
        if expected != ANY:
            body["expectedVersion"] = expected
        encode_body(body)  # TypeError now, not inside the request
        return self._append(body, timeout, retry)

    def append_many(self, streams: Mapping[str, Iterable[Union[NewEvent, Mapping[str, Any]]]],
                    expected_versions: Optional[Mapping[str, ExpectedVersion]] = None, *,
                    table: Optional[str] = None, timeout: Optional[float] = None,
                    retry: Optional[RetryPolicy] = None) -> Deferred:
        """
        Append events to several streams in one transaction: every expected
        version holds and all the events are stored, or none is.

        :param streams: ``{pid: events, ...}``; the events are sent stream by
            stream, in the mapping's order.
        :param expected_versions: ``{pid: expected version, ...}`` for some or
            all of the streams (a stream without one is :data:`ANY`).
        :return: as :meth:`append`; the result lists the events in the order
            sent.  :class:`WrongExpectedVersion` names the first stream (in
            the order of ``expected_versions``) whose check failed.
        """
        if not isinstance(streams, Mapping) or not streams:
            raise ValueError("streams must be a non-empty mapping of pid to events")
        documents = []
        for pid, events in streams.items():
            documents += stream_documents(pid, events)
        check_unique_ids(documents)
        body = self._persist_body(documents, table)
        if expected_versions:
            unknown = [pid for pid in expected_versions if pid not in streams]
            if unknown:
                raise ValueError(f"expected versions for streams not appended to: "
                                 f"{', '.join(map(repr, unknown))}")
            body["expectedVersions"] = {pid: check_expected(expected)
                                        for pid, expected in expected_versions.items()}
        encode_body(body)
        return self._append(body, timeout, retry)

    @staticmethod
    def _persist_body(documents: List[Dict[str, Any]], table: Optional[str]) -> Dict[str, Any]:
        insert: Dict[str, Any] = {"$documents": documents}
        if table is not None:
            insert = {"$table": table, "$documents": documents}
        return {"v": VERSION_2, "query": {"$insert": insert}}

    def _append(self, body: Dict[str, Any], timeout: Optional[float],
                retry: Optional[RetryPolicy]) -> Deferred:
        return Deferred.fromCoroutine(self._attempts(
            body, self.timeout if timeout is None else timeout,
            self.retry if retry is None else retry))

    async def _attempts(self, body: Dict[str, Any], timeout: float,
                        policy: RetryPolicy) -> AppendResult:
        """Send ``body`` until an attempt has an outcome, or the retries are used up."""
        await self.require_version_2(timeout)
        retries = 0
        # whether an earlier attempt may have reached the server
        sent = False
        while True:
            request = AppendRequest(self, body, timeout)
            request.start()
            try:
                result: AppendResult = await request.result
                return result
            except EventSourceError as error:
                unknown = isinstance(error, (Unavailable, ReplyTimeout, RedisConnectionError))
                # no server now, after an attempt that may have reached one:
                # it is restarting, and the retry must find out what happened
                restarting = sent and isinstance(error, NoServerError)
                if not (unknown or restarting) or retries >= policy.retries \
                        or self._disconnecting:
                    raise
                sent = sent or unknown
                delay = policy.delay(retries)
                retries += 1
                log.info("append on {channel}: {error}; attempt {attempt} of {attempts} in "
                         "{delay:.3f} s, with the same event ids", channel=request.channel,
                         error=str(error), attempt=retries + 1, attempts=policy.retries + 1,
                         delay=delay)
            await self._back_off(delay)

    async def _back_off(self, delay: float) -> None:
        sleeping = deferLater(self._clock, delay, lambda: None)
        self._backoffs.add(sleeping)
        try:
            await sleeping
        except defer.CancelledError:
            if self._disconnecting:
                raise RedisConnectionError("the client was disconnected while an append "
                                           "waited to retry; it may have been applied") from None
            raise
        finally:
            self._backoffs.discard(sleeping)

    # -- version 2: is the server one? ----------------------------------------

    def require_version_2(self, timeout: Optional[float] = None) -> Deferred:
        """
        Make sure the server speaks version 2 of the protocol, asking it
        once per connection (:meth:`append` and :meth:`read_stream` do this
        before their first request).  Fires with ``None``, or fails with
        :class:`ServerTooOld` (or :class:`NoServerError`,
        :class:`RedisConnectionError` when the question did not reach a
        server; those are not remembered).

        The question is a version 2 fetch that only a version 2 server
        answers with a bare ``"end"`` (docs/PROTOCOL.md, "Telling a version 1
        server"); a version 1 server answers ``"error"``, a row, or nothing
        within ``timeout``.  The answer is remembered until the subscriber
        connection to Redis is lost or made again, except a silence: the next
        request asks again.
        """
        if self._speaks_version_2:
            return defer.succeed(None)
        if self._too_old_error is not None:
            return defer.fail(self._too_old_error)

        def cancel(d: Deferred) -> None:
            if self._probe_waiters is not None and d in self._probe_waiters:
                self._probe_waiters.remove(d)

        waiter: Deferred = Deferred(cancel)
        if self._probe_waiters is not None:
            self._probe_waiters.append(waiter)
            return waiter
        self._probe_waiters = [waiter]
        number = self._connection_number
        request = FetchRequest(self, {"v": VERSION_2, "query": PROBE_QUERY},
                               self.timeout if timeout is None else timeout, 1, True,
                               self.accept_via)
        request.next_row().addBoth(self._probe_answered, request, number)
        return waiter

    def _probe_answered(self, outcome: Any, request: FetchRequest, number: int) -> None:
        verdict: Optional[EventSourceError] = None
        remember = True
        error = outcome.value if isinstance(outcome, Failure) else None
        if error is None and outcome is not END_OF_ROWS:
            request.close()
            verdict = self._too_old("a row", request)
        elif isinstance(error, ServerError):
            if error.code is None:
                verdict = self._too_old('"error"', request)
            # else: an error object, which only a version 2 server sends
        elif isinstance(error, StreamTimeout):
            verdict = self._too_old('"timeout"', request)
        elif isinstance(error, ReplyTimeout):
            verdict = self._too_old(f"nothing within {request._timeout:g} s", request)
            remember = False
        elif error is not None:
            verdict = error if isinstance(error, EventSourceError) else \
                RedisConnectionError(f"the version 2 probe failed: {error}")
            remember = False
        if remember and number == self._connection_number:
            if verdict is None:
                self._speaks_version_2 = True
            else:
                assert isinstance(verdict, ServerTooOld)
                self._too_old_error = verdict
        waiters, self._probe_waiters = self._probe_waiters or [], None
        for waiter in waiters:
            if verdict is None:
                waiter.callback(None)
            else:
                waiter.errback(verdict)

    def _too_old(self, answer: str, request: FetchRequest) -> ServerTooOld:
        return ServerTooOld(
            f"{self.describe_server()} speaks only version 1 of the protocol: it answered "
            f"the version 2 probe (on {request.channel}) with {answer}, not a bare end; "
            "append and read_stream need a server that speaks version 2", request.channel)

    # -- version 2: read ---------------------------------------------------------

    def read_stream(self, pid: str, from_version: int = 0, *, window: int = 100,
                    table: Optional[str] = None,
                    timeout: Optional[float] = None) -> EventStream:
        """
        The events of one stream in version order, from ``from_version``
        (version 2 of the protocol), as an async iterator of
        :class:`RecordedEvent` (an :class:`EventStream`, which works as
        :meth:`fetch`'s :class:`RowStream`: acceptance, ``break``, ``aclose``).

        :param window: rows the server may send ahead of acceptances (the
            server caps it).
        :param table: ``database.table``; the server's events table when ``None``.
        :param timeout: seconds to wait for each message of the server.
        """
        if not isinstance(pid, str) or not pid:
            raise ValueError(f"a pid is a non-empty string, not {pid!r:.60}")
        if type(from_version) is not int or from_version < 0:
            raise ValueError("from_version must be an int >= 0")
        if type(window) is not int or window < 1:
            raise ValueError("window must be an integer of at least 1")
        select: Dict[str, Any] = {"$where": {"pid": pid, "version": {"$gte": from_version}}}
        if table is not None:
            select["$from"] = table
        body: Dict[str, Any] = {"v": VERSION_2, "query": {"$select": select}}
        if window > 1:
            body["window"] = window
        timeout = self.timeout if timeout is None else timeout
        request = FetchRequest(self, body, timeout, window, False, self.accept_via,
                               RecordedEvent.from_row)
        return EventStream(request, lambda: self.require_version_2(timeout))

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
        body: Dict[str, Any] = {"query": query}
        if window > 1:
            body["window"] = window
        encode_body(body)
        request = FetchRequest(self, body, self.timeout if timeout is None else timeout,
                                window, raw, self.accept_via)
        return RowStream(request)

    def fetch_by_pid(self, pid: str, table: Optional[str] = None, **kwargs: Any) -> RowStream:
        """All events of one process (aggregate) id, in the order they were appended."""
        return self.fetch(_select({"pid": pid}, table), **kwargs)

    def fetch_by_name(self, domain: str, name: Optional[str] = None,
                      table: Optional[str] = None, **kwargs: Any) -> RowStream:
        """The events of a domain (of one name in it, if given), in append order."""
        where = {"domain": domain}
        if name is not None:
            where["name"] = name
        return self.fetch(_select(where, table), **kwargs)

    def fetch_each(self, query: Dict[str, Any], on_row: Callable[[Any], Any],
                   **kwargs: Any) -> Deferred:
        """
        Callback style: call ``on_row(row)`` for every row.

        A row is accepted once ``on_row`` returns (or once the Deferred or
        coroutine it returns completes).  Fires with the number of rows when
        the stream ended.  If ``on_row`` raises, the stream is ended and the
        Deferred fails with that error; cancelling the Deferred ends the
        stream too.
        """
        stream = self.fetch(query, **kwargs)

        async def run() -> int:
            count = 0
            async with stream:
                async for row in stream:
                    result = on_row(row)
                    if isawaitable(result):
                        await result
                    count += 1
            return count

        return Deferred.fromCoroutine(run())

    def fetch_all(self, query: Dict[str, Any], **kwargs: Any) -> Deferred:
        """Every row of a query in one list (for small results)."""
        rows: List[Any] = []
        d = self.fetch_each(query, rows.append, **kwargs)
        return d.addCallback(lambda _: rows)

    # -- version 2: subscribe -------------------------------------------------------

    @overload
    def subscribe(self, where: str) -> Deferred: ...

    @overload
    def subscribe(self, where: Optional[Mapping[str, Any]] = None, start: Start = FROM_START,
                  *, window: int = DEFAULT_SUBSCRIPTION_WINDOW, table: Optional[str] = None,
                  heartbeat: float = DEFAULT_HEARTBEAT,
                  on_caught_up: Optional[Callable[[int], Any]] = None,
                  until_caught_up: bool = False, retry: Optional[RetryPolicy] = None,
                  timeout: Optional[float] = None) -> Subscription: ...

    def subscribe(self, where: Union[None, str, Mapping[str, Any]] = None,
                  start: Start = FROM_START, **options: Any) -> Union[Deferred, Subscription]:
        """
        The events matching ``where`` after ``start``, then every new one as it
        is committed (version 2 of the protocol), as a :class:`Subscription`:
        an async iterator of :class:`RecordedEvent` that never ends on its own
        and subscribes again, from the last position it handed out, after a
        timeout, a server restart or a Redis outage.

        :param where: a ``$where`` object of the query language (its version 2
            columns: ``position``, ``eventId``, ``pid``, ``version``,
            ``domain``, ``name``, ``timestamp``, ``data``); ``None``: every
            event.  (A ``str`` is the original client's :meth:`subscribe` to
            a channel, below.)
        :param start: ``"start"`` (every matching event), ``"end"`` (only
            those committed after the server took the subscription) or a
            position: the events after it.
        :param window: events the server may send ahead of acceptances.
        :param table: ``database.table``; the server's events table when ``None``.
        :param heartbeat: the server's ``--heartbeat`` (seconds): a consumer
            waiting ``2 × heartbeat`` seconds without a message subscribes again.
        :param on_caught_up: called with the position of every ``caughtUp``
            marker: once the history is sent (and again after each
            resubscription), in line with the events.
        :param until_caught_up: stop at the first ``caughtUp``: the events
            committed so far, then the end of the loop.
        :param retry: the pauses between attempts that heard nothing (its
            ``retries`` is ignored: it never gives up).
        :param timeout: seconds to wait for the version 2 probe.

        The original client's ``subscribe(channel)`` (a ``str``) subscribes to
        a Redis channel: kept across reconnects until :meth:`unsubscribe`;
        fires once Redis confirmed it; messages go to the callbacks of :meth:`on`.
        """
        if isinstance(where, str):
            if start != FROM_START or options:
                raise TypeError("subscribe(channel) takes a channel name only")
            self._sticky.add(where)
            return self._pubsub_call("subscribe", where).addCallback(lambda _: None)
        return Subscription(self, where, start, **options)

    # -- the original's low-level style ------------------------------------------

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
        return self._pubsub_call("publish", channel, encode_body(message))


def _warn_resubscribe(failure: Failure, channel: str) -> None:
    log.warn("could not re-subscribe to {channel}: {error}", channel=channel,
             error=failure.getErrorMessage())


def _select(where: Dict[str, Any], table: Optional[str]) -> Dict[str, Any]:
    select: Dict[str, Any] = {"$where": where}
    if table is not None:
        select["$from"] = table
    return {"$select": select}



def connect(host: str = "127.0.0.1", port: int = 6379, *, password: Optional[str] = None,
            username: Optional[str] = None, endpoint: Optional[str] = None, reactor: Any = None,
            timeout: float = DEFAULT_TIMEOUT, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
            reply_prefix: Optional[str] = None, accept_via: str = FETCH_NEXT,
            channel_prefix: str = "", max_delay: float = 2.0,
            tenant: Optional[str] = None, retry: RetryPolicy = DEFAULT_RETRY,
            sentinels: Optional[Iterable[Union[str, Tuple[str, int]]]] = None,
            master_name: Optional[str] = None) -> Deferred:
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
    :param retry: how :meth:`EventSourceClient.append` retries (a
        :class:`RetryPolicy`).
    :param sentinels: Redis behind Sentinel: the Sentinels, as ``(host,
        port)`` or ``"host:port"``, asked where the master ``master_name`` is
        before every connection (``host``, ``port`` and ``endpoint`` are then
        not used); after a failover the client reconnects to the new master.
    :param master_name: the name the Sentinels know the master by.
    :return: a Deferred firing with an :class:`EventSourceClient`, or failing
        with :class:`RedisConnectionError`.
    """
    if reactor is None:
        from twisted.internet import reactor
    if bool(sentinels) != bool(master_name):
        raise ValueError("sentinels and master_name go together: give both or neither")
    if sentinels:
        from twisted.internet.endpoints import HostnameEndpoint

        from eventsource.sentinel import (
            SentinelEndpoint,
            SentinelResolver,
            format_addresses,
            parse_address,
        )

        addresses = [parse_address(s) if isinstance(s, str) else (str(s[0]), int(s[1]))
                     for s in sentinels]
        resolver = SentinelResolver(reactor, addresses, str(master_name))
        sentinel_endpoint = SentinelEndpoint(
            resolver, lambda h, p: HostnameEndpoint(reactor, h, p, timeout=connect_timeout))
        pubsub = RedisPubSub(sentinel_endpoint, password=password, username=username,
                             max_delay=max_delay, master_only=True)
        client = EventSourceClient(
            pubsub, reactor, timeout=timeout, reply_prefix=reply_prefix,
            accept_via=accept_via, channel_prefix=channel_prefix, tenant=tenant, retry=retry,
            address=f"master {master_name} (Sentinels {format_addresses(addresses)})")
        return pubsub.start(reactor, connect_timeout).addCallback(lambda _: client)
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
                               tenant=tenant, retry=retry,
                               address=endpoint if endpoint is not None else f"{host}:{port}")
    d = pubsub.start(reactor, connect_timeout)
    return d.addCallback(lambda _: client)
