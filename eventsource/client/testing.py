"""
In-memory doubles for testing code that uses :mod:`eventsource.client`, as
``treq.testing`` is for treq: no Redis, no server, no reactor.

:class:`MemoryPubSub` stands in for Redis (the client's :class:`PubSub`)
and :class:`FakeServer` plays a scripted eventsource server on it; drive
time with a :class:`twisted.internet.task.Clock`::

    from twisted.internet.task import Clock
    from eventsource.client import EventSourceClient
    from eventsource.client.testing import FakeServer, MemoryPubSub

    pubsub = MemoryPubSub()
    server = FakeServer(pubsub, rows=[{"pid": "p1", "name": "created", "data": "{}"}])
    client = EventSourceClient(pubsub, Clock())
    rows = self.successResultOf(client.fetch_all({"$select": {}}))

Everything happens synchronously, so ``successResultOf`` sees the outcome
at once.  The server answers with the protocol's own bodies (from
:mod:`eventsource.wire`).
"""

from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Set, Tuple

from twisted.internet import defer
from twisted.internet.defer import Deferred

from eventsource.wire import (
    ACCEPTED,
    END,
    FETCH,
    FETCH_NEXT,
    PERSIST,
    decode_json,
    encode_body,
    encode_ok_packet,
)

__all__ = ["MemoryPubSub", "FakeServer"]

Handler = Callable[[str, str], Any]


class MemoryPubSub:
    """
    An in-memory Redis pub/sub for one client, recording every call.

    Messages published on a channel the client subscribed to come back to it
    (as Redis echoes them); ``handlers`` (channel to ``handler(channel,
    body)``) play other subscribers, such as a server.  ``calls`` lists every
    call as ``("subscribe", channel)``, ``("unsubscribe", channel)`` or
    ``("publish", channel, body)``.  ``hold_subscribes`` / ``hold_publishes``
    make those calls wait until the test fires them from ``held`` (a Redis
    that is slow, or away).
    """

    def __init__(self) -> None:
        self.receiver: Any = None
        self.calls: List[Tuple[str, ...]] = []
        self.subscribed: Set[str] = set()
        self.handlers: Dict[str, Handler] = {}
        self.hold_subscribes = False
        self.hold_publishes = False
        self.held: Deque[Deferred] = deque()
        self.disconnected = False

    def subscribe(self, channel: str) -> Deferred:
        self.calls.append(("subscribe", channel))
        if self.hold_subscribes:
            d: Deferred = Deferred()
            self.held.append(d)
            return d.addCallback(lambda _: self._confirm(channel))
        return defer.succeed(self._confirm(channel))

    def _confirm(self, channel: str) -> List[Any]:
        self.subscribed.add(channel)
        return ["subscribe", channel, len(self.subscribed)]

    def unsubscribe(self, channel: str) -> Deferred:
        self.calls.append(("unsubscribe", channel))
        self.subscribed.discard(channel)
        return defer.succeed(["unsubscribe", channel, len(self.subscribed)])

    def publish(self, channel: str, body: str) -> Deferred:
        self.calls.append(("publish", channel, body))
        receivers = 0
        handler = self.handlers.get(channel)
        if handler is not None:
            receivers += 1
            handler(channel, body)
        if channel in self.subscribed:
            receivers += 1
            self.receiver.message_received(channel, body)
        if self.hold_publishes:
            d: Deferred = Deferred()
            self.held.append(d)
            return d.addCallback(lambda _: receivers)
        return defer.succeed(receivers)

    def deliver(self, channel: str, body: str) -> None:
        """A message from someone else: only a subscribed channel hears it."""
        if channel in self.subscribed:
            self.receiver.message_received(channel, body)

    def disconnect(self) -> Deferred:
        self.disconnected = True
        return defer.succeed(None)

    def published(self, channel: Optional[str] = None) -> List[Any]:
        """Bodies published (on ``channel``), decoded."""
        return [decode_json(call[2]) for call in self.calls
                if call[0] == "publish" and (channel is None or call[1] == channel)]


class FakeServer:
    """
    A scripted eventsource server on a :class:`MemoryPubSub`.

    ``persist`` answers the OkPacket (or the messages of ``persist_answer``)
    and ``"end"``; ``fetch`` streams ``rows`` with the protocol's window
    rules, capped at ``max_window``; acceptances arrive on ``fetch-next`` or
    as ``"accepted"`` on the reply channel (version 1 streams only, as the
    real server).  ``prefix`` is the server's channel prefix (with a tenant:
    ``<prefix><tenant>:``).  ``requests`` records the request bodies,
    ``acceptances`` every ``(channel, count)`` accepted; take a handler out
    of ``pubsub.handlers`` to leave requests unanswered.
    """

    def __init__(self, pubsub: MemoryPubSub, rows: Iterable[Dict[str, Any]] = (),
                 max_window: int = 1000, prefix: str = ""):
        self.pubsub = pubsub
        self.rows = list(rows)
        self.max_window = max_window
        self.persist_answer: Optional[List[Any]] = None
        self.requests: List[Dict[str, Any]] = []
        self.streams: Dict[str, Dict[str, Any]] = {}
        self.acceptances: List[Tuple[str, int]] = []
        pubsub.handlers.update({prefix + PERSIST: self.on_persist,
                                prefix + FETCH: self.on_fetch,
                                prefix + FETCH_NEXT: self.on_fetch_next})

    def send(self, channel: str, message: Any) -> None:
        """Publish ``message`` (a row, a result or a control word) on ``channel``."""
        self.pubsub.deliver(channel, encode_body(message))

    def on_persist(self, _: str, body: str) -> None:
        request = decode_json(body)
        self.requests.append(request)
        channel = request["channel"]
        if self.persist_answer is None:
            documents = request["query"]["$insert"]["$documents"]
            count = len(documents) if isinstance(documents, list) else 1
            self.pubsub.deliver(channel, encode_ok_packet(count, 1))
        else:
            for message in self.persist_answer:
                self.send(channel, message)
        self.send(channel, END)

    def on_fetch(self, _: str, body: str) -> None:
        request = decode_json(body)
        self.requests.append(request)
        channel = request["channel"]
        window = min(request.get("window", 1), self.max_window)
        self.streams[channel] = {"rows": deque(self.rows), "window": window, "out": 0}
        if request.get("window", 1) == 1:
            # as the real server: only a version 1 stream is listened to
            self.pubsub.handlers[channel] = self.on_reply
        self.pump(channel)

    def pump(self, channel: str) -> None:
        """Send what the window of the stream on ``channel`` allows."""
        stream = self.streams.get(channel)
        if stream is None:
            return
        while stream["rows"] and stream["out"] < stream["window"]:
            stream["out"] += 1
            self.send(channel, stream["rows"].popleft())
        if not stream["rows"] and (stream["window"] > 1 or stream["out"] == 0):
            self.close(channel)
            self.send(channel, END)

    def close(self, channel: str) -> None:
        """Forget the stream on ``channel`` (it ended)."""
        self.streams.pop(channel, None)
        self.pubsub.handlers.pop(channel, None)

    def accept(self, channel: str, count: int) -> None:
        self.acceptances.append((channel, count))
        stream = self.streams.get(channel)
        if stream is not None:
            stream["out"] = max(0, stream["out"] - count)
            self.pump(channel)

    def on_fetch_next(self, _: str, body: str) -> None:
        message = decode_json(body)
        if message.get("end") is True:
            self.close(message["channel"])
        else:
            self.accept(message["channel"], message.get("accepted", 1))

    def on_reply(self, channel: str, body: str) -> None:
        message = decode_json(body)
        if message == ACCEPTED:
            self.accept(channel, 1)
        elif message == END:
            self.close(channel)
