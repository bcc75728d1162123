"""
The Redis boundary: one subscriber connection and one publisher connection.

Each connection is kept up by its own ``ClientService``, whose
``prepareConnection`` hook runs the handshake every time the connection is
made: ``AUTH`` (with the ACL user when one is configured), then on the
publisher a ``PING`` and the check of Redis's limits, on the subscriber one
``SUBSCRIBE`` per request channel (in tenant mode one ``PSUBSCRIBE`` per
request pattern, ``<prefix>*:<kind>``).  A refused handshake is an ordinary
failed attempt: the ``ClientService`` closes nothing and counts it, so the
next attempt waits the usual backoff.  txredisapi re-subscribes nothing after
a reconnect and gives up for good when ``AUTH`` fails, hence our own handshake.

The life of the two connections together is one small machine
(:data:`TRANSITIONS`): the subscriber's service runs only while the
publisher is ready, so the server never takes a request it could not answer.
A refusal before the bus first served fails :meth:`RedisBus.start` with a
sentence naming the cause (wrong password, missing ACL permission, TLS
verification); once it has served, the same refusal (a restarted Redis still
loading, an ACL being changed) is logged and retried.

One ``SUBSCRIBE`` (or ``PSUBSCRIBE``) per channel: several in one call put
txredisapi's replies out of step.  Numbers are never converted
(``convertNumbers`` off): ``"007"`` must arrive as the text it was.

Reconnecting backs off from :data:`INITIAL_DELAY` up to the configured
``redis_max_delay``, so a server notices a returning Redis within about
``redis_max_delay`` seconds however long the outage was.

Publishing goes straight to the live publisher protocol without waiting for
replies, so many publishes pipeline on one connection.  While Redis is away
publishing fails at once instead of queueing without bound.

A connection can also die in silence (a network partition drops packets and
says nothing; a hung Redis accepts them and answers nothing): TCP would keep
it open for many minutes.  So while it is ready the publisher sends ``PING``
every third of ``Config.redis_timeout``, pipelined with the rest; a ``PING``
unanswered for ``redis_timeout`` aborts the publisher connection, which drops
the subscriber too (see the machine below), and both are made again.
"""

from __future__ import annotations

import enum
import math
import random
import re
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterable, Optional, Union, cast

import txredisapi
from transitions import Machine
from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from eventsource.config import Config
from eventsource.interfaces import IEventBus

if TYPE_CHECKING:
    from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
    from twisted.internet.ssl import Certificate

log = Logger()

#: seconds before the first reconnection attempt after a connection is lost;
#: the delay then grows by a factor of e per failed attempt, up to
#: ``Config.redis_max_delay``
INITIAL_DELAY = 0.1

#: the random spread of each delay (a fraction of it, as txredisapi's), so
#: that many servers do not reconnect in step
JITTER = 0.12

#: seconds a TCP connection attempt may take
CONNECT_TIMEOUT = 5

#: how many refused reply channels are remembered, so that each is logged once
REFUSED_REMEMBERED = 1000

#: seconds the start-up check of Redis's limits may take before it is skipped
CONFIG_TIMEOUT = 5

#: checks of the publisher's ``PING`` per ``Config.redis_timeout``: a ``PING``
#: is sent every ``redis_timeout / PING_TICKS`` seconds while none is
#: unanswered, and one still unanswered this many checks later is overdue
PING_TICKS = 3

_MB = 1024 * 1024


class ReplyChannelRefused(Exception):
    """Redis refused the server's user a reply channel (an ACL ``NOPERM``)."""


class RedisUnavailable(ConnectionError):
    """There is no live connection to Redis right now."""


class RedisRefused(ConnectionError):
    """Redis (or its TLS layer) refused the connection's handshake."""


def _mb(size: int) -> str:
    """A size in whole megabytes, rounded up, as redis.conf writes it."""
    return f"{max(1, -(-size // _MB))}mb"


def redis_limit_warnings(config: Config, output_buffer_limit: str,
                         proto_max_bulk_len: Union[str, int]) -> list[str]:
    """
    What is wrong, for this server's limits, with Redis's settings (the
    values of ``CONFIG GET client-output-buffer-limit`` and ``CONFIG GET
    proto-max-bulk-len``): a list of sentences, each ending with the
    ``CONFIG SET`` and redis.conf line that fix it; empty when all is well.

    The server's subscriber connection is a pubsub client: Redis drops it,
    ending every stream, when its unread output passes the pubsub limit.
    What it must take at once is one request as large as Redis lets a
    client publish, plus the rows it hears back on version 1 reply
    channels (``max_echo_bytes``); a client's own connection must take a
    window (``max_window_bytes``) plus a row.
    """
    words = output_buffer_limit.split()
    hard = soft = 0
    for i, word in enumerate(words[:-3]):
        if word == "pubsub":
            hard, soft = int(words[i + 1]), int(words[i + 2])
    bulk = int(proto_max_bulk_len)
    wanted_bulk = max(_MB, config.max_body_bytes)
    extra = max(config.max_echo_bytes, config.max_window_bytes)
    need = -(-(wanted_bulk + extra) // _MB) * _MB
    warnings = []
    if bulk < config.max_body_bytes:
        warnings.append(
            f"Redis's proto-max-bulk-len ({bulk} bytes) is below --max-body-bytes "
            f"({config.max_body_bytes}): Redis refuses requests (and rows) the server would "
            f"take. Fix: CONFIG SET proto-max-bulk-len {_mb(wanted_bulk)} "
            f"(redis.conf: proto-max-bulk-len {_mb(wanted_bulk)})")
    elif hard and bulk + extra > hard:
        warnings.append(
            f"Redis's proto-max-bulk-len ({bulk} bytes) lets one publish on a request channel "
            f"overflow the server's pubsub output buffer (hard limit {hard} bytes): Redis would "
            f"drop the server's connection and end every stream. Fix: CONFIG SET "
            f"proto-max-bulk-len {_mb(wanted_bulk)} "
            f"(redis.conf: proto-max-bulk-len {_mb(wanted_bulk)})")
    if (hard and hard < need) or (soft and soft < need):
        setting = f"pubsub {_mb(2 * need)} {_mb(need)} 60"
        warnings.append(
            f"Redis's pubsub output buffer limit (hard {hard}, soft {soft} bytes) is below "
            f"the {need} bytes the server's limits need (--max-body-bytes plus the larger of "
            f"--max-echo-bytes and --max-window-bytes): Redis may drop the server's or a "
            f"client's connection mid-stream. Fix: CONFIG SET client-output-buffer-limit "
            f"\"{setting}\" (redis.conf: client-output-buffer-limit {setting})")
    return warnings


def retry_delay(attempt: int, max_delay: float) -> float:
    """
    The ``ClientService`` retry policy: seconds to wait after ``attempt``
    failed attempts in a row (a refused handshake counts as one), from
    :data:`INITIAL_DELAY` growing by e up to ``max_delay``, with
    :data:`JITTER`.
    """
    initial = min(INITIAL_DELAY, max_delay)
    delay = min(initial * math.e ** min(attempt - 1, 100), max_delay)
    return max(0.0, random.normalvariate(delay, delay * JITTER))


def _is_no_permission(error: object) -> bool:
    return str(error).startswith("NOPERM")


def _describe(error: Union[BaseException, Failure]) -> str:
    """A one-line description of a handshake failure, safe to log (no secrets)."""
    value = error.value if isinstance(error, Failure) else error
    text = str(value) or type(value).__name__
    return re.sub(r"\s+", " ", text)[:300]


def _is_tls_failure(why: Optional[Failure]) -> bool:
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover
        return False
    return why is not None and isinstance(why.value, SSL.Error)


class RefusedChannels:
    """
    Reply channels the server's Redis user may not use (the client named a
    channel the ACL does not give us): that request cannot be answered,
    nothing else is wrong.  One warning per channel, the latest remembered.
    """

    def __init__(self) -> None:
        self._channels: OrderedDict[str, None] = OrderedDict()

    def report(self, channel: str, action: str, error: BaseException) -> None:
        channels = self._channels
        if channel in channels:
            channels.move_to_end(channel)
            return
        channels[channel] = None
        if len(channels) > REFUSED_REMEMBERED:
            channels.popitem(last=False)
        log.warn("Redis refused to let the server {action} reply channel {channel}: "
                 "{reason}", action=action, channel=channel, reason=_describe(error))

    def publish_refused(self, channel: str, error: BaseException) -> None:
        """A ``PUBLISH`` on ``channel`` was refused."""
        if _is_no_permission(error):
            self.report(channel, "publish on", error)
        else:
            log.error("Redis refused a PUBLISH on {channel}: {error}", channel=channel,
                      error=_describe(error))


def _safe_delivery(on_message: Callable[[str, Any], object]) -> Callable[[str, Any], None]:
    """``on_message``, made unable to take the subscriber connection down with a bug."""
    def deliver(channel: str, body: Any) -> None:
        try:
            on_message(channel, body)
        except Exception:
            log.failure("unhandled error handling a message on {channel}", channel=channel)
    return deliver


class _Factory(txredisapi.RedisFactory):  # type: ignore[misc]
    """
    Builds one kind of our protocols and hands them what they report to:
    ``deliver`` (messages, on the subscriber), ``request_channels``, and
    ``publish_refused`` (on the publisher).  Never connects by itself: the
    bus's ``ClientService`` does.
    """

    def __init__(self, protocol: type, deliver: Callable[[str, Any], None],
                 request_channels: frozenset[str],
                 publish_refused: Callable[[str, BaseException], None]) -> None:
        super().__init__(None, None, 1, isLazy=True, convertNumbers=False)
        self.protocol = protocol
        self.deliver = deliver
        self.request_channels = request_channels
        self.publish_refused = publish_refused


class _Remembering:
    """What both protocols add: why the connection was lost (a TLS failure says only that)."""

    lost_reason: Optional[Failure] = None

    @property
    def itself(self) -> Any:
        """This protocol, also when reached through ``ClientService``'s proxy (kept for publishing)."""
        return self

    def connectionLost(self, why: Failure) -> None:
        self.lost_reason = why
        super().connectionLost(why)  # type: ignore[misc]


#: what a client may say on a reply channel, as it arrives and as it is delivered
_CONTROL_WORDS = {b'"accepted"': '"accepted"', b'"end"': '"end"'}


class _Subscriber(_Remembering, txredisapi.SubscriberProtocol):  # type: ignore[misc]
    role = "subscriber"

    def dataReceived(self, data: bytes, unpause: bool = False) -> Any:
        """
        The hot path of every message: published messages are handled here,
        straight from hiredis' reader, without txredisapi's per-element
        conversions.  On a reply channel only ``"accepted"`` and ``"end"``
        matter to the server, so the echoes of the rows it publishes there
        are dropped before any decoding.  Everything else (subscription
        confirmations, errors) takes txredisapi's path.
        """
        reader = getattr(self, "_reader", None)
        if reader is None:  # pure-Python parser: no hiredis
            return super().dataReceived(data, unpause)
        if data:
            reader.feed(data)
        requests = self.factory.request_channels
        deliver = self.factory.deliver
        reply = reader.gets()
        while reply is not False:
            if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
                channel = reply[1].decode("utf-8", "replace")
                body = reply[2]
                if channel in requests:
                    try:
                        body = body.decode("utf-8")
                    except UnicodeDecodeError:
                        pass  # refused as "not text" by the wire protocol
                    deliver(channel, body)
                elif body in _CONTROL_WORDS:
                    deliver(channel, _CONTROL_WORDS[body])
            elif type(reply) is list and len(reply) == 4 and reply[0] == b"pmessage":
                # tenant mode: a request on a channel one of our patterns matched
                body = reply[3]
                try:
                    body = body.decode("utf-8")
                except UnicodeDecodeError:
                    pass  # refused as "not text" by the wire protocol
                deliver(reply[2].decode("utf-8", "replace"), body)
            else:
                self.replyReceived(self.tryConvertData(reply))
            reply = reader.gets()
        return None

    def messageReceived(self, pattern: Optional[str], channel: str, message: Any) -> None:
        self.factory.deliver(channel, message)


class _Reply:
    """The pending reply of a command (a claim, a lease's) on the publisher connection."""

    __slots__ = ("answer",)

    def __init__(self) -> None:
        self.answer: defer.Deferred[Any] = defer.Deferred()


def _was_set(reply: Any) -> bool:
    """``SET ... NX``'s reply: OK when it set the key, nil when the key was there."""
    return reply is not None


class _Ping:
    """The place of a heartbeat ``PING`` among the publisher's pending replies."""


_PING = _Ping()


class _Publisher(_Remembering, txredisapi.RedisProtocol):  # type: ignore[misc]
    role = "publisher"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: the channel of each publish whose reply is still to come (with
        #: the Deferred of a counted publish), the pending claims and pings
        self._unanswered: deque[
            Union[str, tuple[str, defer.Deferred[int]], _Reply, _Ping]] = deque()
        #: when the heartbeat PING still unanswered was sent (None: none is)
        self.ping_sent: Optional[float] = None
        #: the heartbeat's checks since that PING was sent
        self.ping_checks = 0

    def send_ping(self, now: float) -> None:
        """A heartbeat ``PING``, pipelined: :attr:`ping_sent` is ``now`` until Redis answers."""
        self.ping_sent, self.ping_checks = now, 0
        self._unanswered.append(_PING)
        self.transport.write(b"*1\r\n$4\r\nPING\r\n")

    def claim(self, key: str, owner: str, ttl_ms: int) -> defer.Deferred[bool]:
        """
        ``SET key owner NX PX ttl_ms``, pipelined with the publishes: fires
        True when it set the key, False when the key was there already.
        """
        d = self.command(b"SET", key.encode("utf-8"), owner.encode("utf-8"), b"NX", b"PX",
                         b"%d" % ttl_ms)
        return d.addCallback(_was_set)

    def command(self, *parts: bytes) -> defer.Deferred[Any]:
        """
        Any other command, pipelined with the publishes: fires with its
        reply (bytes, an integer, None...), or fails with Redis' error.
        """
        reply = _Reply()
        self._unanswered.append(reply)
        self._write_command(*parts)
        return reply.answer

    def _write_command(self, *parts: bytes) -> None:
        self.transport.write(b"*%d\r\n" % len(parts) + b"".join(
            b"$%d\r\n%s\r\n" % (len(part), part) for part in parts))

    def connectionLost(self, why: Failure) -> None:
        # (a claim whose reply never came is a request nobody serves here:
        # its Deferred, like any command's, must not wait forever)
        waiting = [entry for entry in self._unanswered if isinstance(entry, _Reply)]
        self._unanswered = deque(entry for entry in self._unanswered
                                 if not isinstance(entry, _Reply))
        super().connectionLost(why)
        for entry in waiting:
            entry.answer.errback(RedisUnavailable("the Redis connection was lost"))

    def publish_nowait(self, channel: str, body: str) -> None:
        """
        ``PUBLISH`` without a Deferred: the command is written as it is and
        its reply (the number of receivers, which the server never needs)
        is dropped when it arrives; a refusal is reported with its channel.
        Only used once the handshake is over, so every reply from then on
        belongs to one of these.
        """
        self._unanswered.append(channel)
        self._write_publish(channel, body)

    def publish_counted(self, channel: str, body: str) -> defer.Deferred[int]:
        """``PUBLISH``, pipelined like the others; fires with the number of receivers."""
        d: defer.Deferred[int] = defer.Deferred()
        self._unanswered.append((channel, d))
        self._write_publish(channel, body)
        return d

    def _write_publish(self, channel: str, body: str) -> None:
        name = channel.encode("utf-8")
        data = body.encode("utf-8")
        self.transport.write(b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                             % (len(name), name, len(data), data))

    def replyReceived(self, reply: Any) -> None:
        if self._unanswered:
            entry = self._unanswered.popleft()
            if isinstance(entry, _Ping):
                self.ping_sent = None
                return
            if isinstance(entry, _Reply):
                if isinstance(reply, Exception):
                    entry.answer.errback(reply)
                else:
                    entry.answer.callback(reply)
                return
            if isinstance(entry, str):
                if isinstance(reply, Exception):
                    self.factory.publish_refused(entry, reply)
                return
            channel, d = entry
            if isinstance(reply, Exception):
                self.factory.publish_refused(channel, reply)
                d.errback(reply)
            else:
                d.callback(int(reply))
            return
        super().replyReceived(reply)


def _abandon(protocol: Any) -> None:
    """
    Close a connection whose handshake failed, without telling its
    ``ClientService`` when it is gone.  The service counted the failed
    ``prepareConnection`` as a failed attempt already, but leaves the
    connection open, and a loss reported after that has no transition in its
    machine (Twisted 26.10 raises ``NoTransition`` from ``connectionLost``):
    so the report of this one loss is cut off at the service's proxy.
    """
    protocol._lostNotification = _ignore_loss
    if protocol.lost_reason is None:
        protocol.transport.loseConnection()


def _ignore_loss(reason: Failure) -> None:
    pass


def _load_certificates(path: str) -> list[Certificate]:
    """Every certificate of a PEM file (a CA bundle may hold several)."""
    from twisted.internet import ssl

    with open(path, "rb") as f:
        pem = f.read()
    blocks = re.findall(
        rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.DOTALL)
    if not blocks:
        raise ValueError(f"{path} holds no PEM certificate")
    return [ssl.Certificate.loadPEM(block) for block in blocks]


def tls_options(config: Config, host: Optional[str] = None) -> IOpenSSLClientConnectionCreator:
    """
    The client TLS options for Redis: the server's certificate is checked
    against ``redis_tls_ca`` (the system's trust store when none is given)
    and must name ``host`` (``redis_host`` by default; behind Sentinel, the
    master's address as the Sentinels gave it); ``redis_tls_cert``/``redis_tls_key`` are
    presented when Redis asks for a client certificate.
    """
    from twisted.internet import ssl

    trust = None
    if config.redis_tls_ca:
        trust = ssl.trustRootFromCertificates(  # type: ignore[no-untyped-call]
            _load_certificates(config.redis_tls_ca))
    client_cert = None
    if config.redis_tls_cert:
        with open(config.redis_tls_cert, "rb") as cert:
            pem = cert.read()
        if config.redis_tls_key:
            with open(config.redis_tls_key, "rb") as key:
                pem += b"\n" + key.read()
        client_cert = ssl.PrivateCertificate.loadPEM(pem)  # type: ignore[no-untyped-call]
    return ssl.optionsForClientTLS(host or config.redis_host, trustRoot=trust,
                                   clientCertificate=client_cert)


def redis_endpoint(reactor: Any, config: Config) -> IStreamClientEndpoint:
    """
    The client endpoint for the configured Redis, with TLS when asked for;
    behind Sentinel, a :class:`eventsource.sentinel.SentinelEndpoint` that
    asks the Sentinels where the master is before every connection.
    """
    def endpoint_to(host: str, port: int) -> IStreamClientEndpoint:
        # (casts: mypy does not see zope's @implementer without the mypy-zope plugin)
        endpoint = cast(IStreamClientEndpoint, HostnameEndpoint(
            reactor, host, port, timeout=CONNECT_TIMEOUT))
        if not config.redis_tls:
            return endpoint
        return wrapClientTLS(tls_options(config, host), endpoint)

    if config.redis_sentinels:
        from eventsource.sentinel import SentinelEndpoint, SentinelResolver

        resolver = SentinelResolver(reactor, config.redis_sentinels,
                                    config.redis_master_name or "")
        return cast(IStreamClientEndpoint, SentinelEndpoint(resolver, endpoint_to))
    return endpoint_to(config.redis_host, config.redis_port)


class BusState(enum.Enum):
    """The states of the bus's two connections taken together."""

    #: not started, or stopped
    IDLE = "idle"
    #: started, never served yet: the publisher connects (a refusal fails the start)
    STARTING = "starting"
    #: started, never served yet: the publisher is ready, the subscriber connects
    STARTING_SUBSCRIBER = "starting-subscriber"
    #: both connections ready: requests are taken and answered
    SERVING = "serving"
    #: a connection was lost after serving: the publisher reconnects
    AWAY = "away"
    #: a connection was lost after serving: the publisher is ready, the subscriber reconnects
    RESUBSCRIBING = "resubscribing"
    #: both services stopping
    STOPPING = "stopping"


_S = BusState

#: every input, each fired from one place: ``start_asked``/``stop_asked``
#: (:meth:`RedisBus.start`/:meth:`RedisBus.stop`), ``publisher_ready``/
#: ``subscriber_ready``/``refused`` (the handshake, in ``prepareConnection``;
#: a success on the next turn),
#: ``publisher_lost``/``subscriber_lost`` (a ready connection dropped),
#: ``stopped`` (both services stopped)
INPUTS = ("start_asked", "stop_asked", "publisher_ready", "subscriber_ready", "refused",
          "publisher_lost", "subscriber_lost", "stopped")

# The whole transition table.  The subscriber's service runs only in the
# states where the publisher is ready; leaving them stops it.
TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": "start_asked", "source": _S.IDLE, "dest": _S.STARTING,
     "after": "start_publisher"},

    {"trigger": "publisher_ready", "source": _S.STARTING, "dest": _S.STARTING_SUBSCRIBER,
     "before": "keep_publisher", "after": "start_subscriber"},
    {"trigger": "publisher_ready", "source": _S.AWAY, "dest": _S.RESUBSCRIBING,
     "before": "keep_publisher", "after": "start_subscriber"},

    {"trigger": "subscriber_ready", "source": _S.STARTING_SUBSCRIBER, "dest": _S.SERVING,
     "before": "keep_subscriber", "after": "report_started"},
    {"trigger": "subscriber_ready", "source": _S.RESUBSCRIBING, "dest": _S.SERVING,
     "before": "keep_subscriber", "after": "report_back"},

    # a refused handshake: the start fails; once served, it is retried
    {"trigger": "refused", "source": [_S.STARTING, _S.STARTING_SUBSCRIBER],
     "dest": _S.STOPPING, "after": "fail_start"},
    {"trigger": "refused", "source": [_S.AWAY, _S.RESUBSCRIBING], "dest": None,
     "before": "report_refusal"},

    # requests taken without a publisher could not be answered: no subscriber without one
    {"trigger": "publisher_lost", "source": _S.SERVING, "dest": _S.AWAY,
     "after": "report_lost"},
    {"trigger": "publisher_lost", "source": _S.RESUBSCRIBING, "dest": _S.AWAY},
    {"trigger": "publisher_lost", "source": _S.STARTING_SUBSCRIBER, "dest": _S.STARTING},
    {"trigger": "subscriber_lost", "source": _S.SERVING, "dest": _S.RESUBSCRIBING,
     "after": "report_lost"},

    {"trigger": "stop_asked", "source": [_S.STARTING, _S.STARTING_SUBSCRIBER, _S.SERVING,
                                         _S.AWAY, _S.RESUBSCRIBING], "dest": _S.STOPPING},
    {"trigger": "stopped", "source": _S.STOPPING, "dest": _S.IDLE},

    # Late reports, ignored: a subscriber dropped because its publisher was
    # (its loss may come once the publisher is back), handshakes done as the
    # bus stopped or dropped them, and the connections of a bus that stops
    # or stopped.
    {"trigger": "publisher_ready", "source": [_S.STOPPING, _S.IDLE], "dest": None},
    {"trigger": "subscriber_ready", "source": [_S.STARTING, _S.AWAY, _S.STOPPING, _S.IDLE],
     "dest": None},
    {"trigger": "subscriber_lost", "source": [_S.STARTING, _S.STARTING_SUBSCRIBER, _S.AWAY,
                                              _S.RESUBSCRIBING, _S.STOPPING, _S.IDLE],
     "dest": None},
    {"trigger": "publisher_lost", "source": [_S.STOPPING, _S.IDLE], "dest": None},
    {"trigger": "refused", "source": [_S.STOPPING, _S.IDLE], "dest": None},
]

STATES: list[dict[str, Any]] = [
    {"name": _S.IDLE},
    {"name": _S.STARTING, "on_enter": ["forget_publisher", "stop_subscriber"]},
    {"name": _S.STARTING_SUBSCRIBER},
    {"name": _S.SERVING, "on_exit": "forget_subscriber"},
    {"name": _S.AWAY, "on_enter": ["forget_publisher", "stop_subscriber"]},
    {"name": _S.RESUBSCRIBING},
    {"name": _S.STOPPING, "on_enter": ["forget_publisher", "stop_services"]},
]


@implementer(IEventBus)
class RedisBus:
    """
    Pub/sub with the outside world.

    The bus serves (subscribes to the request channels) only while both of
    its connections are up: the subscriber connects once the publisher is
    ready, and is dropped when the publisher is lost, so no request is
    taken that could not be answered.

    :param on_message: ``on_message(channel, body)`` for every message on a
        subscribed channel.
    :param on_connection_lost: called when the bus stops serving because a
        connection dropped (reply channels are not re-subscribed: their
        streams must end).
    :param on_ready: called each time the request channels are subscribed
        (at start and after every reconnect).
    :param endpoint: where Redis is (:func:`redis_endpoint` of the config
        when omitted; tests pass a memory reactor's).
    """

    state: BusState

    def __init__(self, config: Config, reactor: Any,
                 on_message: Callable[[str, Any], object],
                 on_connection_lost: Optional[Callable[[], object]] = None,
                 on_ready: Optional[Callable[[], object]] = None,
                 endpoint: Optional[IStreamClientEndpoint] = None) -> None:
        self._config = config
        self._reactor = reactor
        self._on_connection_lost = on_connection_lost
        self._on_ready = on_ready
        self._endpoint = endpoint
        self._refused_channels = RefusedChannels()
        deliver = _safe_delivery(on_message)
        requests = frozenset(() if config.tenants else config.request_channels.values())
        self._factories = {
            protocol.role: _Factory(protocol, deliver, requests,
                                    self._refused_channels.publish_refused)
            for protocol in (_Subscriber, _Publisher)}
        self._services: dict[str, ClientService] = {}
        # The machine's state data: the ready protocols (the publisher in
        # PUBLISHING, the subscriber in SERVING), the pending start, the
        # pending stop, and since when Redis was away (for the log).
        self._publisher: Any = None
        self._subscriber: Any = None
        self._started: Optional[defer.Deferred[None]] = None
        self._stopping: Optional[defer.Deferred[Any]] = None
        self._away_since: Optional[float] = None
        #: the heartbeat's next check of the publisher (while it is ready)
        self._heartbeat: Any = None
        #: behind Sentinel: the endpoint that resolves the master, and the
        #: master's address each ready connection was made to
        self._sentinel_endpoint: Any = None
        self._masters: dict[str, Any] = {}
        #: times the bus served again after losing a connection (eventsource.metrics)
        self.reconnects = 0
        self._machine = Machine(model=self, states=STATES, transitions=TRANSITIONS,
                                initial=_S.IDLE, auto_transitions=False,
                                ignore_invalid_triggers=False, queued=True)

    def _input(self, name: str, *args: Any) -> None:
        self._machine.events[name].trigger(self, *args)

    # -- life cycle -----------------------------------------------------

    def start(self) -> defer.Deferred[None]:
        """
        Connect; fires once the request channels are subscribed and publishing
        works.  Fails (and stops reconnecting) if Redis refuses the
        credentials, the permissions or the TLS handshake; while Redis cannot
        be reached at all it keeps trying.
        """
        self._started = defer.Deferred()
        started = self._started
        endpoint = self._endpoint or redis_endpoint(self._reactor, self._config)
        add_listener = getattr(endpoint, "add_listener", None)
        if add_listener is not None:  # behind Sentinel
            self._sentinel_endpoint = endpoint
            add_listener(self._master_moved)
        self._services = {
            role: ClientService(endpoint, factory,
                                retryPolicy=self._retry_delay,
                                clock=self._reactor,
                                prepareConnection=self._preparer(role))
            for role, factory in self._factories.items()}
        self._input("start_asked")
        return started

    def stop(self) -> defer.Deferred[None]:
        """Disconnect both connections and stop reconnecting."""
        if self.state is not _S.IDLE and self.state is not _S.STOPPING:
            self._input("stop_asked")
        if self._stopping is None or self.state is _S.IDLE:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()

        def stopped(result: object) -> object:
            done.callback(None)
            return result

        self._stopping.addBoth(stopped)
        return done

    @property
    def connected(self) -> bool:
        """Serving: subscribed to the request channels, and able to publish."""
        return bool(self.state is _S.SERVING)

    def _retry_delay(self, attempt: int) -> float:
        return retry_delay(attempt, self._config.redis_max_delay)

    def _requests_listened(self) -> Iterable[str]:
        """The request channels, or in tenant mode the request patterns (one per kind)."""
        config = self._config
        return (config.request_patterns if config.tenants else config.request_channels).values()

    def _where(self) -> str:
        endpoint = self._sentinel_endpoint
        if endpoint is not None and endpoint.master is not None:
            host, port = endpoint.master
            return f"{self._config.redis_where} at {host}:{port}"
        return self._config.redis_where

    def _master_moved(self, address: Any) -> None:
        """
        Behind Sentinel, a connection attempt found the master elsewhere:
        a ready connection still open to the old one (which a partition may
        keep alive, and which no longer hears the clients) is dropped, and
        made again to the new master by the usual reconnection.
        """
        for role, protocol in (("publisher", self._publisher), ("subscriber", self._subscriber)):
            if protocol is not None and self._masters.get(role) != address:
                log.warn("the Redis {role} connection is on the old master {old}; "
                         "reconnecting to the new one", role=role,
                         old=":".join(map(str, self._masters.get(role) or ())))
                protocol.transport.loseConnection()

    # -- the machine's actions ------------------------------------------

    def start_publisher(self, *_: Any) -> None:
        self._services["publisher"].startService()

    def start_subscriber(self, *_: Any) -> None:
        self._services["subscriber"].startService()

    def stop_subscriber(self, *_: Any) -> None:
        subscriber = self._services["subscriber"]
        if subscriber.running:
            subscriber.stopService()

    def stop_services(self, *_: Any) -> None:
        # (the subscriber first: it takes no request it could not answer)
        stopping = [service.stopService() for role, service in sorted(self._services.items(),
                                                                      reverse=True)
                    if service.running]
        self._stopping = stopped = defer.gatherResults(stopping, consumeErrors=True)
        stopped.addBoth(lambda _: self._input("stopped"))

    def keep_publisher(self, protocol: Any) -> None:
        self._publisher = protocol
        self._next_heartbeat()

    def keep_subscriber(self, protocol: Any) -> None:
        self._subscriber = protocol

    def forget_publisher(self, *_: Any) -> None:
        self._publisher = None
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None and heartbeat.active():
            heartbeat.cancel()

    # -- the heartbeat ----------------------------------------------------

    def _next_heartbeat(self) -> None:
        self._heartbeat = self._reactor.callLater(self._config.redis_timeout / PING_TICKS,
                                                  self._check_publisher)

    def _check_publisher(self) -> None:
        """Send a ``PING`` if none is unanswered; notice one that is overdue."""
        self._heartbeat = None
        publisher = self._publisher
        if publisher is None:
            return
        if publisher.ping_sent is None:
            publisher.send_ping(self._reactor.seconds())
        else:
            publisher.ping_checks += 1
            if publisher.ping_checks >= PING_TICKS:
                # Confirmed on the next turn: a reactor that was too busy to
                # read the answer reads what is waiting on the socket first.
                self._heartbeat = self._reactor.callLater(0, self._ping_overdue, publisher)
                return
        self._next_heartbeat()

    def _ping_overdue(self, publisher: Any) -> None:
        self._heartbeat = None
        if publisher is not self._publisher:
            return
        if publisher.ping_sent is None:  # (answered after all)
            self._next_heartbeat()
            return
        log.warn("Redis {where} did not answer a PING within {seconds:.1f} s (a network "
                 "partition, or a Redis that hangs); dropping the connections and "
                 "reconnecting", where=self._where(),
                 seconds=self._reactor.seconds() - publisher.ping_sent)
        publisher.transport.abortConnection()

    def forget_subscriber(self, *_: Any) -> None:
        self._subscriber = None

    def report_started(self, *_: Any) -> None:
        log.info("subscribed to {channels} on Redis {where}",
                 channels=",".join(self._requests_listened()), where=self._where())
        if self._on_ready is not None:
            self._on_ready()
        started, self._started = self._started, None
        if started is not None:
            started.callback(None)

    def report_back(self, *_: Any) -> None:
        log.info("Redis {where} is back: subscribed again to {channels} after {seconds:.2f} s",
                 where=self._where(), channels=",".join(self._requests_listened()),
                 seconds=self._reactor.seconds() - (self._away_since or 0.0))
        self._away_since = None
        self.reconnects += 1
        if self._on_ready is not None:
            self._on_ready()

    def report_lost(self, role: str) -> None:
        self._away_since = self._reactor.seconds()
        log.warn("lost the Redis {role} connection to {where}; reconnecting", role=role,
                 where=self._where())
        if self._on_connection_lost is not None:
            self._on_connection_lost()

    def report_refusal(self, refusal: RedisRefused) -> None:
        log.error("{refusal}; retrying", refusal=str(refusal), where=self._where())

    def fail_start(self, refusal: RedisRefused) -> None:
        started, self._started = self._started, None
        if started is not None and self._stopping is not None:
            self._stopping.addBoth(lambda _: started.errback(refusal))

    # -- the handshake --------------------------------------------------

    def _preparer(self, role: str) -> Callable[[IProtocol], defer.Deferred[None]]:
        """The ``prepareConnection`` of ``role``'s service: the handshake, as machine inputs."""
        def prepare(protocol: Any) -> defer.Deferred[None]:
            handshake = self._handshake(role, protocol)
            handshake.addCallbacks(self._handshaken, self._handshake_failed,
                                   callbackArgs=(role, protocol),
                                   errbackArgs=(role, protocol))
            return handshake
        return prepare

    @defer.inlineCallbacks
    def _handshake(self, role: str, protocol: Any) -> Generator[Any, Any, None]:
        config = self._config
        if config.redis_password is not None:
            if config.redis_user:
                yield _command(protocol, "AUTH", config.redis_user, config.redis_password)
            else:
                yield _command(protocol, "AUTH", config.redis_password)
        if config.redis_sentinels:
            # a Sentinel may still name a node that was just demoted
            from eventsource.sentinel import check_role

            check_role((yield _command(protocol, "ROLE")), self._where())
        if role == "publisher":
            # proves the connection speaks Redis (not, say, a TLS port)
            yield _command(protocol, "PING")
            # (before anything is published: publish_nowait's replies
            # would be taken for this command's)
            yield self._check_limits(protocol)
        else:
            for channel in self._requests_listened():
                if config.tenants:
                    yield protocol.psubscribe(channel)
                else:
                    yield protocol.subscribe(channel)

    def _handshaken(self, _: object, role: str, protocol: Any) -> None:
        # The service takes the connection only once this returns: the
        # machine hears of it on the next turn, so that what the input sets
        # off (a start's caller stopping the bus at once) finds the service
        # connected, not half-way (a stop then would leave the connection open).
        self._reactor.callLater(0, self._ready, role, protocol)

    def _ready(self, role: str, protocol: Any) -> None:
        if protocol.lost_reason is not None:
            return  # lost meanwhile: the service saw it, and retries
        protocol.whenDisconnected().addCallback(lambda _: self._input(f"{role}_lost", role))
        if self._sentinel_endpoint is not None:
            self._masters[role] = self._sentinel_endpoint.master
        self._input(f"{role}_ready", protocol.itself)

    def _handshake_failed(self, failure: Failure, role: str, protocol: Any) -> Failure:
        """Close the connection; a refusal is a machine input (and the attempt's failure)."""
        _abandon(protocol)
        if isinstance(failure.value, defer.CancelledError):  # stopped while connecting
            return failure
        from eventsource.sentinel import NotMaster

        if isinstance(failure.value, NotMaster):  # an ordinary failed attempt: retried
            log.warn("{problem}; asking the Sentinels again", problem=str(failure.value))
            return failure
        lost = protocol.lost_reason
        user = self._config.redis_user or "default"
        if lost is not None and _is_tls_failure(lost):
            # TLS verification failures surface only as a lost connection.
            refusal = RedisRefused(f"Redis {self._where()} refused the {role} connection: "
                                   f"TLS handshake failed: {_describe(lost)}")
        elif lost is not None:
            log.warn("Redis {where} closed the {role} connection during the handshake "
                     "(a TLS port without --redis-tls, or not Redis at all?); retrying",
                     where=self._where(), role=role)
            return failure
        else:
            refusal = RedisRefused(f"Redis {self._where()} refused the {role} connection "
                                   f"(user {user}): {_describe(failure)}")
        self._input("refused", refusal)
        raise refusal

    @defer.inlineCallbacks
    def _check_limits(self, protocol: Any) -> Generator[Any, Any, None]:
        """Warn, with the fix, when Redis's buffer limits are below what the server needs."""
        try:
            values: list[Optional[str]] = []
            for name in ("client-output-buffer-limit", "proto-max-bulk-len"):
                d = protocol.execute_command("CONFIG", "GET", name)
                d.addTimeout(CONFIG_TIMEOUT, self._reactor)
                reply = yield d
                values.append(reply[1] if isinstance(reply, list) and len(reply) == 2 else None)
            limit, bulk = values
            if limit is None or bulk is None:
                raise ValueError(f"unexpected CONFIG GET replies {values!r}")
            warnings = redis_limit_warnings(self._config, limit, bulk)
        except Exception as error:
            if protocol.lost_reason is not None or isinstance(error, defer.CancelledError):
                raise  # the connection went, or the service stopped: no handshake to finish
            log.warn("could not check Redis {where}'s client-output-buffer-limit and "
                     "proto-max-bulk-len ({error}); make sure they fit the server's limits "
                     "(see docs/OPERATIONS.md)", where=self._where(), error=_describe(error))
            return
        for warning in warnings:
            log.warn("Redis {where}: {problem}", where=self._where(), problem=warning)

    # -- pub/sub --------------------------------------------------------

    def publish(self, channel: str, body: str) -> None:
        """
        Publish and do not wait (many publishes pipeline on the connection).
        While Redis is away the message is dropped with a log line: the
        streams it belonged to are ended by the connection-lost handling.
        """
        publisher = self._publisher
        if publisher is None:
            log.debug("Redis is away: dropped a message for {channel}", channel=channel)
            return
        try:
            publisher.publish_nowait(channel, body)
        except Exception:
            log.failure("could not publish on {channel}", channel=channel)

    def publish_counted(self, channel: str, body: str) -> defer.Deferred[int]:
        """
        Publish, pipelined like :meth:`publish`; fires with the number of
        clients that received the message (0: nobody listens on ``channel``).
        """
        publisher = self._publisher
        if publisher is None:
            return defer.fail(RedisUnavailable("Redis is not connected"))
        try:
            return cast("defer.Deferred[int]", publisher.publish_counted(channel, body))
        except Exception as error:
            return defer.fail(error)

    def subscribe(self, channel: str) -> defer.Deferred[Any]:
        """
        Subscribe to a reply channel; fires when Redis confirmed it, or fails
        with :class:`ReplyChannelRefused` (already logged) when the server's
        Redis user may not use it.
        """
        subscriber = self._subscriber
        if subscriber is None:
            return defer.fail(RedisUnavailable("Redis is not connected"))
        try:
            d: defer.Deferred[Any] = subscriber.subscribe(channel)
        except Exception as error:
            return defer.fail(error)
        d.addErrback(self._subscribe_failed, channel)
        return d

    def _subscribe_failed(self, failure: Failure, channel: str) -> Failure:
        error = failure.value
        if isinstance(error, txredisapi.ResponseError) and _is_no_permission(error):
            self._refused_channels.report(channel, "subscribe to", error)
            raise ReplyChannelRefused(
                f"Redis refused the reply channel {channel}: {_describe(failure)}")
        return failure

    def unsubscribe(self, channel: str) -> defer.Deferred[Any]:
        """Leave a reply channel (nothing to do when the connection is gone)."""
        subscriber = self._subscriber
        if subscriber is None:
            return defer.succeed(None)
        try:
            d: defer.Deferred[Any] = subscriber.unsubscribe(channel)
            return d
        except Exception as error:
            return defer.fail(error)


    def claim(self, key: str, owner: str, ttl: float) -> defer.Deferred[bool]:
        """
        Take ``key`` unless it exists (``SET key owner NX PX``, on the
        publisher connection, pipelined with the publishes): True when this
        call set it, False when another replica holds it; fails with
        :class:`RedisUnavailable` while Redis is away, or with Redis' error
        (a user whose ACL lacks ``+set`` or the key pattern).
        """
        publisher = self._publisher
        if publisher is None:
            return defer.fail(RedisUnavailable("Redis is not connected"))
        try:
            return publisher.claim(key, owner, max(1, round(ttl * 1000)))  # type: ignore[no-any-return]
        except Exception as error:
            return defer.fail(error)


    def lease(self, key: str, owner: str, ttl: float) -> defer.Deferred[Optional[str]]:
        """
        Take or keep the lease ``key`` for ``owner`` for ``ttl`` seconds
        (:class:`eventsource.lease.WriterLease`): ``SET key owner NX PX``
        and ``GET key``, pipelined; when the key was ``owner``'s already, a
        ``PEXPIRE`` renews it.  Fires with the holder after the attempt
        (``owner`` when this call took or renewed it; None when nobody
        holds it), or fails as :meth:`claim` does.
        """
        publisher = self._publisher
        if publisher is None:
            return defer.fail(RedisUnavailable("Redis is not connected"))
        ttl_ms = max(1, round(ttl * 1000))
        name = key.encode("utf-8")
        try:
            took = publisher.claim(key, owner, ttl_ms)
            holder = publisher.command(b"GET", name)
        except Exception as error:
            return defer.fail(error)

        def answered(results: list[Any]) -> Any:
            (took_ok, taken), (holder_ok, held_by) = results
            if not took_ok:
                return taken
            if not holder_ok:
                return held_by
            if taken:
                return owner
            holder_name = _text(held_by)
            if holder_name != owner:
                return holder_name
            renewed: defer.Deferred[Any] = publisher.command(b"PEXPIRE", name, b"%d" % ttl_ms)
            # (0: the key expired between the GET and the PEXPIRE: nobody holds it)
            renewed.addCallback(lambda done: owner if done else None)
            return renewed

        both = defer.DeferredList([took, holder], consumeErrors=True)
        return both.addCallback(answered)

    def release_lease(self, key: str, owner: str) -> defer.Deferred[None]:
        """
        Give up the lease ``key`` if ``owner`` holds it (``GET``, then
        ``PEXPIRE key 1``): the other replicas take it at their next attempt.
        """
        publisher = self._publisher
        if publisher is None:
            return defer.succeed(None)
        name = key.encode("utf-8")

        def held(holder: Any) -> Any:
            if _text(holder) == owner:
                return publisher.command(b"PEXPIRE", name, b"1")
            return None
        try:
            d: defer.Deferred[Any] = publisher.command(b"GET", name)
        except Exception as error:
            return defer.fail(error)
        return d.addCallback(held).addCallback(lambda _: None)


def _text(value: Any) -> Optional[str]:
    """A reply as text (None stays None)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


def _command(protocol: Any, *args: str) -> defer.Deferred[Any]:
    """A command of the handshake: an error reply fails it, whichever way txredisapi gives it."""
    def check(reply: Any) -> Any:
        if isinstance(reply, Exception):
            raise reply
        return reply
    d: defer.Deferred[Any] = protocol.execute_command(*args)
    return d.addCallback(check)
