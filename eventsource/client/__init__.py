"""
The Python client of the eventsource server, for Twisted applications.

The server is only reachable through Redis pub/sub: a request is published on
``persist`` or ``fetch`` naming a reply channel, and the answer comes back on
that channel.  This package hides that dance::

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

Version 2 of the protocol (docs/PROTOCOL.md) makes it an event store:
``append`` (with an expected version, exactly once), ``append_many`` (several
streams, atomically) and ``read_stream`` (one stream from a version)::

    result = await client.append("order-1", [{"domain": "order", "name": "paid",
                                              "data": {"amount": 12}}],
                                 expected_version=3)
    async for event in client.read_stream("order-1", from_version=4):
        print(event.version, event.name, event.data)

``subscribe`` (version 2) follows the log: the events matching a filter from
a position on, then every new one as it is committed, forever, each once and
in order, across server restarts and Redis outages::

    async for event in client.subscribe({"domain": "order"}, start=checkpoint):
        apply(event)
        checkpoint = event.position

Layout: ``_client`` (:class:`EventSourceClient`, :class:`RowStream`,
:class:`EventStream`, :func:`connect`), ``_requests`` (each request as a
state machine, like the server's reply channel), ``_subscription``
(:class:`Subscription`: the series of subscribe requests), ``_events`` (version 2's
values: expected versions, events, results, the retry policy), ``_redis``
(the Redis boundary: the small :class:`PubSub` interface and
:class:`RedisPubSub`, the real one), ``_errors``; :mod:`eventsource.client.testing` has in-memory doubles for
testing code that uses the client.  The protocol's words and its codec are
the server's own, from :mod:`eventsource.wire`.
"""

from eventsource.client._client import (
    DEFAULT_REPLY_PREFIX,
    DEFAULT_TIMEOUT,
    TENANT_REPLY_PREFIX,
    EventSourceClient,
    EventStream,
    RowStream,
    connect,
)
from eventsource.client._client import _as_json_text as _as_json_text
from eventsource.client._errors import (
    BadReply,
    BadRequest,
    Busy,
    EventSourceError,
    IdempotencyConflict,
    InternalError,
    NoServerError,
    ReadOnly,
    RedisConnectionError,
    Refused,
    ReplyTimeout,
    ServerError,
    ServerTooOld,
    StreamTimeout,
    TooLarge,
    Unavailable,
    WrongExpectedVersion,
)
from eventsource.client._errors import ERROR_CLASSES as ERROR_CLASSES
from eventsource.client._events import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendedEvent,
    AppendResult,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
    RetryPolicy,
)
from eventsource.client._redis import DEFAULT_CONNECT_TIMEOUT as DEFAULT_CONNECT_TIMEOUT
from eventsource.client._redis import PubSub, RedisPubSub
from eventsource.client._requests import ACCEPT_BYTES as ACCEPT_BYTES
from eventsource.client._requests import IDLE_ACCEPT_DELAY as IDLE_ACCEPT_DELAY
from eventsource.client._requests import PersistResult, Row
from eventsource.client._subscription import Subscription

# the protocol's words and codec, as the single module this package replaced had them
from eventsource.wire import ACCEPTED as ACCEPTED
from eventsource.wire import END as END
from eventsource.wire import ERROR as ERROR
from eventsource.wire import FETCH as FETCH
from eventsource.wire import FETCH_NEXT as FETCH_NEXT
from eventsource.wire import PERSIST as PERSIST
from eventsource.wire import TIMEOUT as TIMEOUT
from eventsource.wire import decode_body, encode_body

__all__ = [
    "connect",
    "EventSourceClient",
    "RowStream",
    "EventStream",
    "Subscription",
    "Row",
    "PersistResult",
    "NewEvent",
    "AppendResult",
    "AppendedEvent",
    "RecordedEvent",
    "RetryPolicy",
    "ExpectedVersion",
    "NO_STREAM",
    "STREAM_EXISTS",
    "ANY",
    "PubSub",
    "RedisPubSub",
    "EventSourceError",
    "ServerError",
    "BadRequest",
    "Refused",
    "WrongExpectedVersion",
    "IdempotencyConflict",
    "TooLarge",
    "ReadOnly",
    "Unavailable",
    "Busy",
    "InternalError",
    "ServerTooOld",
    "StreamTimeout",
    "NoServerError",
    "ReplyTimeout",
    "RedisConnectionError",
    "BadReply",
    "DEFAULT_REPLY_PREFIX",
    "TENANT_REPLY_PREFIX",
    "DEFAULT_TIMEOUT",
]

#: a message body as the client reads it, and writes it
decode = decode_body
encode = encode_body
