"""
The Redis boundary: one subscriber connection and one publisher connection.

Each connection runs the same handshake every time it is made, at start and
after every reconnect: ``AUTH`` (with the ACL user when one is configured),
then, on the subscriber, ``SUBSCRIBE`` to each request channel (in tenant
mode ``PSUBSCRIBE`` to each request pattern, ``<prefix>*:<kind>``).
txredisapi does neither of these for us in a way a server can live with: it
does not re-subscribe after a reconnect, and when ``AUTH`` fails it stops
reconnecting for good, silently.  Here a refused handshake at start fails
the start with a sentence naming the cause (wrong password, missing ACL
permission, TLS verification); after the server has served, the same
refusal (a restarted Redis still loading, an ACL being changed) is logged
and retried with the usual backoff.

One ``SUBSCRIBE`` (or ``PSUBSCRIBE``) per channel: several in one call put
txredisapi's replies out of step.  Numbers are never converted
(``convertNumbers`` off): ``"007"`` must arrive as the text it was.

Reconnecting backs off from :data:`INITIAL_DELAY` up to the configured
``redis_max_delay``, so a server notices a returning Redis within about
``redis_max_delay`` seconds however long the outage was.

Publishing goes straight to the live publisher protocol without waiting for
replies, so many publishes pipeline on one connection.  While Redis is away
publishing fails at once instead of queueing without bound.
"""

import math
import random
import re
from collections import OrderedDict, deque

import txredisapi
from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from eventsource.interfaces import IEventBus

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


class ReplyChannelRefused(Exception):
    """Redis refused the server's user a reply channel (an ACL ``NOPERM``)."""


#: seconds the start-up check of Redis's limits may take before it is skipped
CONFIG_TIMEOUT = 5

_MB = 1024 * 1024


def _mb(size):
    """A size in whole megabytes, rounded up, as redis.conf writes it."""
    return f"{max(1, -(-size // _MB))}mb"


def redis_limit_warnings(config, output_buffer_limit, proto_max_bulk_len):
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


class RedisUnavailable(ConnectionError):
    """There is no live connection to Redis right now."""


class RedisRefused(ConnectionError):
    """Redis (or its TLS layer) refused the connection's handshake."""


def _is_no_permission(error):
    return str(error).startswith("NOPERM")


def _describe(error):
    """A one-line description of a handshake failure, safe to log (no secrets)."""
    if isinstance(error, Failure):
        error = error.value
    text = str(error) or type(error).__name__
    return re.sub(r"\s+", " ", text)[:300]


class _Handshaking:
    """What both of our protocols add to txredisapi's: the handshake and its reporting."""

    #: true once AUTH (and, on the subscriber, SUBSCRIBE) succeeded
    handshaken = False

    def connectionMade(self):
        # The factory passes no password to txredisapi, so its own
        # connectionMade is done at once and never calls stopTrying().
        d = super().connectionMade()
        d.addCallback(lambda _: self.factory.bus._connection_made(self) if self.connected else None)
        return d

    def connectionLost(self, why):
        super().connectionLost(why)
        self.factory.bus._connection_lost(self, why)


class _Subscriber(_Handshaking, txredisapi.SubscriberProtocol):
    role = "subscriber"

    def dataReceived(self, data, unpause=False):
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
        requests = self.factory.bus._request_channels
        deliver = self.factory.bus._deliver
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

    def messageReceived(self, pattern, channel, message):
        self.factory.bus._deliver(channel, message)


#: what a client may say on a reply channel, as it arrives and as it is delivered
_CONTROL_WORDS = {b'"accepted"': '"accepted"', b'"end"': '"end"'}


class _Publisher(_Handshaking, txredisapi.RedisProtocol):
    role = "publisher"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: the channel of each publish whose reply is still to come
        self._unanswered = deque()

    def publish_nowait(self, channel, body):
        """
        ``PUBLISH`` without a Deferred: the command is written as it is and
        its reply (the number of receivers, which the server never needs)
        is dropped when it arrives; a refusal is reported with its channel.
        Only used once the handshake is over, so every reply from then on
        belongs to one of these.
        """
        self._unanswered.append(channel)
        channel = channel.encode("utf-8")
        body = body.encode("utf-8")
        self.transport.write(b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                             % (len(channel), channel, len(body), body))

    def replyReceived(self, reply):
        if self._unanswered:
            channel = self._unanswered.popleft()
            if isinstance(reply, Exception):
                self.factory.bus._publish_refused(channel, reply)
            return
        super().replyReceived(reply)


class _Link:
    """
    One of the bus's two connections: a txredisapi factory (which builds the
    protocol) kept connected by our own ``ClientService``, so the bus can
    cut a backoff short when the other connection shows Redis is back.
    """

    def __init__(self, bus, protocol, endpoint, config, clock):
        self.role = protocol.role
        self.factory = txredisapi.RedisFactory(None, None, 1, isLazy=True, convertNumbers=False)
        self.factory.protocol = protocol
        self.factory.bus = bus
        self.initial_delay = min(INITIAL_DELAY, config.redis_max_delay)
        self.max_delay = config.redis_max_delay
        #: consecutive refused handshakes: a connection that is made and then
        #: refused must not reset the backoff and hammer Redis
        self.refusals = 0
        #: the connected protocol (handshaken or not), if any
        self.protocol = None
        #: the protocol once its handshake succeeded
        self.ready = None
        self.service = ClientService(endpoint, self.factory, retryPolicy=self._delay, clock=clock)

    def _delay(self, attempt):
        attempt = max(attempt, self.refusals)
        delay = min(self.initial_delay * math.e ** min(attempt - 1, 100), self.max_delay)
        return max(0.0, random.normalvariate(delay, delay * JITTER))

    def start(self):
        self.service.startService()

    def stop(self):
        return self.service.stopService()

    def hurry(self):
        """Redis is back (the other connection got through): try now, not after the backoff."""
        if self.protocol is None and self.service.running:
            self.service.stopService()
            self.service.startService()


def _load_certificates(path):
    """Every certificate of a PEM file (a CA bundle may hold several)."""
    from twisted.internet import ssl

    with open(path, "rb") as f:
        pem = f.read()
    blocks = re.findall(
        rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.DOTALL)
    if not blocks:
        raise ValueError(f"{path} holds no PEM certificate")
    return [ssl.Certificate.loadPEM(block) for block in blocks]


def tls_options(config):
    """
    The client TLS options for Redis: the server's certificate is checked
    against ``redis_tls_ca`` (the system's trust store when none is given)
    and must name ``redis_host``; ``redis_tls_cert``/``redis_tls_key`` are
    presented when Redis asks for a client certificate.
    """
    from twisted.internet import ssl

    trust = None
    if config.redis_tls_ca:
        trust = ssl.trustRootFromCertificates(_load_certificates(config.redis_tls_ca))
    client_cert = None
    if config.redis_tls_cert:
        with open(config.redis_tls_cert, "rb") as cert:
            pem = cert.read()
        if config.redis_tls_key:
            with open(config.redis_tls_key, "rb") as key:
                pem += b"\n" + key.read()
        client_cert = ssl.PrivateCertificate.loadPEM(pem)
    return ssl.optionsForClientTLS(config.redis_host, trustRoot=trust,
                                   clientCertificate=client_cert)


def redis_endpoint(reactor, config):
    """The client endpoint for the configured Redis, with TLS when asked for."""
    endpoint = HostnameEndpoint(reactor, config.redis_host, config.redis_port,
                                timeout=CONNECT_TIMEOUT)
    if not config.redis_tls:
        return endpoint
    return wrapClientTLS(tls_options(config), endpoint)


def _is_tls_failure(why):
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover
        return False
    return why is not None and why.check(SSL.Error) is not None


@implementer(IEventBus)
class RedisBus:
    """
    Pub/sub with the outside world.

    The bus serves (subscribes to the request channels) only while both of
    its connections are up: the subscriber subscribes once the publisher
    is ready, and drops its connection when the publisher loses its own, so
    no request is taken that could not be answered.

    :param on_message: ``on_message(channel, body)`` for every message on a
        subscribed channel.
    :param on_connection_lost: called when the subscriber connection drops
        (reply channels are not re-subscribed: their streams must end).
    :param on_ready: called each time the request channels are subscribed
        (at start and after every reconnect).
    """

    def __init__(self, config, reactor, on_message, on_connection_lost=None, on_ready=None):
        self._config = config
        self._reactor = reactor
        self._on_message = on_message
        self._on_connection_lost = on_connection_lost
        self._on_ready = on_ready
        self._links = {}
        self._starting = {}
        self._publisher_waiters = []
        self._stopping = False
        self._request_channels = frozenset(
            () if config.tenants else config.request_channels.values())
        #: reply channels Redis refused us lately (logged once each)
        self._refused_channels = OrderedDict()
        #: when the subscriber was last lost (reactor seconds), for the log
        self._lost_at = None

    # -- life cycle -----------------------------------------------------

    def start(self):
        """
        Connect; fires once the request channels are subscribed and publishing
        works.  Fails (and stops reconnecting) if Redis refuses the
        credentials, the permissions or the TLS handshake; while Redis cannot
        be reached at all it keeps trying.
        """
        self._stopping = False
        self._starting = {"subscriber": defer.Deferred(), "publisher": defer.Deferred()}
        done = defer.gatherResults(list(self._starting.values()), consumeErrors=True)
        done.addErrback(self._start_failed)
        endpoint = redis_endpoint(self._reactor, self._config)
        for protocol in (_Subscriber, _Publisher):
            self._links[protocol.role] = _Link(self, protocol, endpoint, self._config,
                                               self._reactor)
        for link in self._links.values():
            link.start()
        return done

    def _start_failed(self, failure):
        if failure.check(defer.FirstError):
            failure = failure.value.subFailure
        d = self.stop()
        d.addBoth(lambda _: failure)
        return d

    def stop(self):
        """Disconnect both connections and stop reconnecting."""
        self._stopping = True
        links, self._links = list(self._links.values()), {}
        return defer.gatherResults([link.stop() for link in links], consumeErrors=True)

    @property
    def _subscriber(self):
        link = self._links.get("subscriber")
        return link.ready if link is not None else None

    @property
    def _publisher(self):
        link = self._links.get("publisher")
        return link.ready if link is not None else None

    @property
    def connected(self):
        """Serving: subscribed to the request channels, and able to publish."""
        return self._subscriber is not None and self._publisher is not None

    def _requests_listened(self):
        """The request channels, or in tenant mode the request patterns (one per kind)."""
        config = self._config
        return (config.request_patterns if config.tenants else config.request_channels).values()

    def _where(self):
        return f"{self._config.redis_host}:{self._config.redis_port}"

    def _link_of(self, protocol):
        link = self._links.get(protocol.role)
        return link if link is not None and protocol.factory is link.factory else None

    # -- connection events ----------------------------------------------

    def _when_publisher_ready(self):
        if self._publisher is not None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._publisher_waiters.append(d)
        return d

    @defer.inlineCallbacks
    def _connection_made(self, protocol):
        link = self._link_of(protocol)
        if link is None:
            protocol.transport.loseConnection()
            return
        link.protocol = protocol
        for other in self._links.values():
            if other is not link:
                other.hurry()
        config = self._config
        try:
            if config.redis_password is not None:
                if config.redis_user:
                    yield protocol.execute_command("AUTH", config.redis_user,
                                                   config.redis_password)
                else:
                    yield protocol.execute_command("AUTH", config.redis_password)
            if protocol.role == "publisher":
                # proves the connection speaks Redis (not, say, a TLS port)
                yield protocol.execute_command("PING")
                # (before anything is published: publish_nowait's replies
                # would be taken for this command's)
                yield self._check_limits(protocol)
            else:
                # Take requests only once their answers can go out.
                yield self._when_publisher_ready()
                for channel in self._requests_listened():
                    if config.tenants:
                        yield protocol.psubscribe(channel)
                    else:
                        yield protocol.subscribe(channel)
        except Exception as error:
            if protocol.connected:
                self._refused(link, protocol, error)
            return
        if not protocol.connected or link.protocol is not protocol:
            return
        protocol.handshaken = True
        link.refusals = 0
        link.ready = protocol
        if protocol.role == "subscriber":
            channels = ",".join(self._requests_listened())
            if self._lost_at is not None:
                log.info("Redis {where} is back: subscribed again to {channels} after "
                         "{seconds:.2f} s", where=self._where(), channels=channels,
                         seconds=self._reactor.seconds() - self._lost_at)
                self._lost_at = None
            else:
                log.info("subscribed to {channels} on Redis {where}",
                         channels=channels, where=self._where())
            if self._on_ready is not None:
                self._on_ready()
        else:
            waiters, self._publisher_waiters = self._publisher_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        starting = self._starting.get(protocol.role)
        if starting is not None and not starting.called:
            starting.callback(None)

    @defer.inlineCallbacks
    def _check_limits(self, protocol):
        """Warn, with the fix, when Redis's buffer limits are below what the server needs."""
        try:
            values = []
            for name in ("client-output-buffer-limit", "proto-max-bulk-len"):
                d = protocol.execute_command("CONFIG", "GET", name)
                d.addTimeout(CONFIG_TIMEOUT, self._reactor)
                reply = yield d
                values.append(reply[1] if isinstance(reply, list) and len(reply) == 2 else None)
            if None in values:
                raise ValueError(f"unexpected CONFIG GET replies {values!r}")
            warnings = redis_limit_warnings(self._config, *values)
        except Exception as error:
            log.warn("could not check Redis {where}'s client-output-buffer-limit and "
                     "proto-max-bulk-len ({error}); make sure they fit the server's limits "
                     "(see docs/OPERATIONS.md)", where=self._where(), error=_describe(error))
            return
        for warning in warnings:
            log.warn("Redis {where}: {problem}", where=self._where(), problem=warning)

    def _refused(self, link, protocol, error):
        """The handshake failed: a start fails; a running server retries with backoff."""
        reason = _describe(error)
        link.refusals += 1
        starting = self._starting.get(protocol.role)
        if starting is not None and not starting.called:
            starting.errback(RedisRefused(
                f"Redis {self._where()} refused the {protocol.role} connection "
                f"(user {self._config.redis_user or 'default'}): {reason}"))
        else:
            log.error("Redis {where} refused the {role} connection (user {user}): {reason}; "
                      "retrying", where=self._where(), role=protocol.role,
                      user=self._config.redis_user or "default", reason=reason)
        protocol.transport.loseConnection()

    def _connection_lost(self, protocol, why):
        link = self._link_of(protocol)
        if link is None or link.protocol is not protocol:
            return
        link.protocol = None
        if not protocol.handshaken and not self._stopping and _is_tls_failure(why):
            # TLS verification failures surface only as a lost connection.
            link.refusals += 1
            reason = f"TLS handshake failed: {_describe(why)}"
            starting = self._starting.get(protocol.role)
            if starting is not None and not starting.called:
                starting.errback(RedisRefused(
                    f"Redis {self._where()} refused the {protocol.role} connection: {reason}"))
            else:
                log.error("Redis {where}: {reason}; retrying", where=self._where(), reason=reason)
        elif not protocol.handshaken and not self._stopping:
            log.warn("Redis {where} closed the {role} connection during the handshake "
                     "(a TLS port without --redis-tls, or not Redis at all?); retrying",
                     where=self._where(), role=protocol.role)
        if link.ready is not protocol:
            return
        link.ready = None
        if protocol.role == "publisher":
            subscriber = self._links.get("subscriber")
            if subscriber is not None and subscriber.protocol is not None and not self._stopping:
                # Requests taken now could not be answered: stop taking them
                # until the publisher is back.
                subscriber.protocol.transport.loseConnection()
            return
        if self._stopping:
            log.info("disconnected from Redis {where}", where=self._where())
        else:
            self._lost_at = self._reactor.seconds()
            log.warn("lost the Redis subscriber connection to {where}; reconnecting",
                     where=self._where())
        if self._on_connection_lost is not None:
            self._on_connection_lost()

    def _deliver(self, channel, body):
        try:
            self._on_message(channel, body)
        except Exception:
            # A bug must never take the subscriber connection down with it.
            log.failure("unhandled error handling a message on {channel}", channel=channel)

    # -- pub/sub --------------------------------------------------------

    def publish(self, channel, body):
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

    def subscribe(self, channel):
        """
        Subscribe to a reply channel; fires when Redis confirmed it, or fails
        with :class:`ReplyChannelRefused` (already logged) when the server's
        Redis user may not use it.
        """
        subscriber = self._subscriber
        if subscriber is None:
            return defer.fail(RedisUnavailable("Redis is not connected"))
        try:
            d = subscriber.subscribe(channel)
        except Exception as error:
            return defer.fail(error)
        d.addErrback(self._subscribe_failed, channel)
        return d

    def _subscribe_failed(self, failure, channel):
        if failure.check(txredisapi.ResponseError) and _is_no_permission(failure.value):
            self._channel_refused(channel, "subscribe to", failure.value)
            raise ReplyChannelRefused(
                f"Redis refused the reply channel {channel}: {_describe(failure)}")
        return failure

    def _publish_refused(self, channel, error):
        if _is_no_permission(error):
            self._channel_refused(channel, "publish on", error)
        else:
            log.error("Redis refused a PUBLISH on {channel}: {error}", channel=channel,
                      error=_describe(error))

    def _channel_refused(self, channel, action, error):
        """
        The server's Redis user may not use ``channel`` (the client named a
        channel the ACL does not give us): that request cannot be answered,
        nothing else is wrong.  One warning per channel.
        """
        refused = self._refused_channels
        if channel in refused:
            refused.move_to_end(channel)
            return
        refused[channel] = None
        if len(refused) > REFUSED_REMEMBERED:
            refused.popitem(last=False)
        log.warn("Redis refused to let the server {action} reply channel {channel}: "
                 "{reason}", action=action, channel=channel, reason=_describe(error))

    def unsubscribe(self, channel):
        """Leave a reply channel (nothing to do when the connection is gone)."""
        subscriber = self._subscriber
        if subscriber is None:
            return defer.succeed(None)
        try:
            return subscriber.unsubscribe(channel)
        except Exception as error:
            return defer.fail(error)
