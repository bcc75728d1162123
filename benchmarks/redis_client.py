"""
The benchmark's own Redis client: plain txredisapi (with hiredis, as the
server uses), one subscriber and one publisher connection.

It is independent of :mod:`eventsource.client` on purpose: the benchmark
measures the server with a client that is not ours, so that neither a
slowness nor a shortcut of our client shows up in the server's figures.
"""

import functools
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.python.failure import Failure

#: what a subscribed channel's messages go to
Handler = Callable[[str], object]


@functools.cache
def _protocols() -> tuple[type, type]:
    """
    The subscriber and publisher protocols, made on first use: importing
    txredisapi installs the global reactor, which only ``react()`` may choose.
    """
    import txredisapi

    class Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]
        def connectionMade(self) -> Any:
            d = super().connectionMade()
            self.factory.made.append(self)
            return d

        def messageReceived(self, pattern: str | None, channel: str, message: str) -> None:
            handler = self.factory.handlers.get(channel)
            if handler is not None:
                handler(message)

    class Publisher(txredisapi.RedisProtocol):  # type: ignore[misc]
        def connectionMade(self) -> Any:
            d = super().connectionMade()
            self.factory.made.append(self)
            return d

    return Subscriber, Publisher


def ignore(failure: Failure | object) -> None:
    """An errback (or a handler) that drops what it is given."""
    return None


class RedisClient:
    """
    One subscriber and one publisher connection, numbers never converted.

    ``handlers`` maps a subscribed channel to ``handler(body)``; publishing
    goes straight to the protocol (no ``ConnectionHandler`` in between) and
    is not waited for, so publishes pipeline.
    """

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    @defer.inlineCallbacks
    def connect(self, reactor: IReactorTCP | IReactorTime, host: str, port: int
                ) -> Generator["defer.Deferred[Any]", Any, "RedisClient"]:
        import txredisapi

        subscriber, publisher = _protocols()
        self._factories = []
        protocols = []
        for protocol, factory in ((subscriber, txredisapi.SubscriberFactory()),
                                  (publisher, txredisapi.RedisFactory(None, None, 1))):
            factory.protocol = protocol
            factory.convertNumbers = False
            factory.continueTrying = False
            factory.handlers = self.handlers
            factory.made = []
            factory.startConnecting(HostnameEndpoint(reactor, host, port, timeout=5))
            yield factory.deferred
            self._factories.append(factory)
            protocols.append(factory.made[-1])
        self.subscriber, self.publisher = protocols
        return self

    def disconnect(self) -> "defer.Deferred[Any]":
        return defer.gatherResults([f.disconnect() for f in self._factories], consumeErrors=True)

    def listen(self, channel: str, handler: Handler) -> "defer.Deferred[Any]":
        self.handlers[channel] = handler
        d: defer.Deferred[Any] = self.subscriber.subscribe(channel)
        return d

    def listen_all(self, handlers: dict[str, Handler]) -> "defer.Deferred[Any]":
        return defer.gatherResults([self.listen(c, h) for c, h in handlers.items()],
                                   consumeErrors=True)

    def unlisten_all(self, channels: list[str]) -> "defer.Deferred[Any]":
        for channel in channels:
            self.handlers.pop(channel, None)
        return defer.gatherResults([self.subscriber.unsubscribe(c) for c in channels],
                                   consumeErrors=True)

    def publish(self, channel: str, body: str) -> "defer.Deferred[Any]":
        d: defer.Deferred[Any] = self.publisher.execute_command("PUBLISH", channel, body)
        d.addErrback(ignore)
        return d

    def command(self, *args: str) -> "defer.Deferred[Any]":
        d: defer.Deferred[Any] = self.publisher.execute_command(*args)
        return d
