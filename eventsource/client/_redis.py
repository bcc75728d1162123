"""
The client's Redis boundary: the :class:`PubSub` interface the client needs,
and :class:`RedisPubSub`, its real implementation over two txredisapi
connections, built on txredisapi's public API only (its factories, their
``handler`` and ``deferred``, and a protocol subclass of our own).

txredisapi is imported only when a :class:`RedisPubSub` is made: it imports
the global reactor, which code that only tests with the in-memory doubles
should not get.
"""

from typing import Any, Callable, Optional, Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from eventsource.client._errors import RedisConnectionError

log = Logger()

#: seconds to wait for both Redis connections in :func:`connect`
DEFAULT_CONNECT_TIMEOUT = 10.0


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


class _WatchedEndpoint:
    """
    An endpoint (an ``IStreamClientEndpoint``) that tells ``failed`` about every failed connection attempt
    (txredisapi retries them on its own; :meth:`RedisPubSub.start` wants
    the first one to be final).
    """

    def __init__(self, endpoint: Any, failed: Callable[[Failure], None]):
        self._endpoint = endpoint
        self._failed = failed

    def connect(self, factory: Any) -> Deferred:
        d = self._endpoint.connect(factory)
        d.addErrback(self._attempt_failed)
        return d

    def _attempt_failed(self, failure: Failure) -> Failure:
        if not failure.check(defer.CancelledError):  # (an attempt stopped by us)
            self._failed(failure)
        return failure


class RedisPubSub:
    """
    :class:`PubSub` over two txredisapi connections: a subscriber and a
    publisher.  Both reconnect on their own (backing off up to ``max_delay``
    seconds); the subscriber tells its receiver every time it connects and
    disconnects.  Numbers are never converted (``"007"`` stays text).
    """

    def __init__(self, endpoint: Any, *, password: Optional[str] = None,
                 username: Optional[str] = None, max_delay: float = 2.0,
                 master_only: bool = False):
        import txredisapi

        self.receiver: Any = None
        self._endpoint = _WatchedEndpoint(endpoint, self._attempt_failed)
        self._starting: Optional[Callable[[Failure], None]] = None
        pubsub = self
        add_listener = getattr(endpoint, "add_listener", None)
        if add_listener is not None:  # behind Sentinel
            add_listener(self._master_moved)

        def usable(protocol: Any) -> Deferred:
            """
            Behind Sentinel (``master_only``), a connection is used only once
            ``ROLE`` said master: the node a Sentinel named may have just
            been demoted.  Otherwise it is closed, and made again.
            """
            if not master_only:
                return defer.succeed(True)
            if password is not None:  # (txredisapi authenticates again afterwards)
                auth = [username, password] if username else [password]
                protocol.execute_command("AUTH", *auth).addErrback(lambda _: None)
            d = protocol.execute_command("ROLE")

            def judge(reply: Any) -> bool:
                from eventsource.sentinel import check_role

                try:
                    check_role(reply, "the node the Sentinels named")
                except ConnectionError as error:
                    log.warn("{problem}; asking the Sentinels again", problem=str(error))
                    protocol.transport.loseConnection()
                    return False
                return True

            def failed(failure: Failure) -> bool:
                protocol.transport.loseConnection()
                return False

            return d.addCallbacks(judge, failed)

        class Subscriber(txredisapi.SubscriberProtocol):
            def connectionMade(self) -> Deferred:
                def proceed(ok: bool) -> Optional[Deferred]:
                    if not ok:
                        return None
                    made: Deferred = super(Subscriber, self).connectionMade()
                    made.addCallback(
                        lambda _: pubsub._subscriber_made() if self.connected else None)
                    return made
                return usable(self).addCallback(proceed)

            def connectionLost(self, why: Failure) -> None:
                super().connectionLost(why)
                pubsub._subscriber_lost(why)

            def messageReceived(self, pattern: Any, channel: str, message: Any) -> None:
                pubsub._deliver(channel, message)

        self._subscriber_factory = txredisapi.RedisFactory(
            None, None, 1, isLazy=False, password=password, username=username,
            convertNumbers=False)
        self._subscriber_factory.protocol = Subscriber
        class Publisher(txredisapi.RedisProtocol):
            def connectionMade(self) -> Deferred:
                d = usable(self)
                return d.addCallback(
                    lambda ok: super(Publisher, self).connectionMade() if ok else None)

        self._publisher_factory = txredisapi.RedisFactory(
            None, None, 1, isLazy=False, password=password, username=username,
            convertNumbers=False)
        self._publisher_factory.protocol = Publisher
        for factory in (self._subscriber_factory, self._publisher_factory):
            factory.maxDelay = max_delay
            factory.initialDelay = min(factory.initialDelay, max_delay)
        self._was_connected = False

    def start(self, clock: Any, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> Deferred:
        """
        Connect both; fires with ``self`` once both are usable.  Fails with
        :class:`RedisConnectionError` on the first refused attempt, a refused
        password, or after ``timeout`` seconds.
        """
        factories = (self._subscriber_factory, self._publisher_factory)
        result: Deferred = Deferred()

        def failed(failure: Failure) -> None:
            if isinstance(failure.value, defer.FirstError):
                failure = failure.value.subFailure
            if not result.called:
                result.errback(RedisConnectionError(
                    f"cannot connect to Redis: {failure.getErrorMessage()}"))

        # the first failed attempt is final here (later ones are retried);
        # watched before connecting: an endpoint may fail synchronously
        self._starting = failed
        for factory in factories:
            factory.startConnecting(self._endpoint)
        ready = defer.gatherResults([f.deferred for f in factories], consumeErrors=True)
        ready.addCallbacks(lambda _: None if result.called else result.callback(self), failed)

        def timed_out() -> None:
            if not result.called:
                result.errback(RedisConnectionError(
                    f"cannot connect to Redis: no connection within {timeout:g} s"))

        timer = clock.callLater(timeout, timed_out)

        def done(outcome: Any) -> Any:
            self._starting = None
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

    def _master_moved(self, address: Any) -> None:
        """
        Behind Sentinel, a connection attempt found the master elsewhere:
        the connections still open (to the old master) are closed, and made
        again by the usual reconnection.
        """
        for factory in (self._subscriber_factory, self._publisher_factory):
            for connection in list(factory.pool):
                connection.transport.loseConnection()

    def _attempt_failed(self, failure: Failure) -> None:
        if self._starting is not None:
            self._starting(failure)

    def _subscriber_made(self) -> None:
        if self._was_connected:
            log.info("reconnected to Redis")
        self._was_connected = True
        if self.receiver is not None:
            self.receiver.connection_made()

    def _subscriber_lost(self, why: Failure) -> None:
        if self.receiver is not None:
            self.receiver.connection_lost(why)

    def _deliver(self, channel: str, message: Any) -> None:
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
