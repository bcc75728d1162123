"""
:class:`EventSourceClient`, :class:`RowStream` and :func:`connect`: the
requests a Twisted application makes, over one :class:`PubSub`.
"""

import uuid
import weakref
from inspect import isawaitable
from typing import Any, Callable, Dict, List, Optional, Set, Union

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from eventsource.client._errors import RedisConnectionError
from eventsource.client._redis import DEFAULT_CONNECT_TIMEOUT, PubSub, RedisPubSub
from eventsource.client._requests import END_OF_ROWS, FetchRequest, PersistRequest
from eventsource.wire import FETCH_NEXT, decode_body, encode_body, valid_tenant

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

    def __init__(self, pubsub: PubSub, clock: Any, *, timeout: float = DEFAULT_TIMEOUT,
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
        self._requests: Dict[str, Any] = {}
        self._listeners: Dict[str, List[Callable[[Any], Any]]] = {}
        self._sticky: Set[str] = set()
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
            self._pubsub_call("subscribe", channel).addErrback(_warn_resubscribe, channel)

    def disconnect(self) -> Deferred:
        """
        End every open request (open fetches are told ``"end"``; waiting
        persists fail with :class:`RedisConnectionError`), then close both
        Redis connections.
        """
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
