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

:class:`FakeServer` speaks version 2 too (``append``, ``read_stream``): it
keeps the events appended in version 2 in memory (``events``), numbers them,
checks expected versions and event ids, and serves version 2 reads of them::

    server = FakeServer(pubsub)
    client = EventSourceClient(pubsub, Clock())
    self.successResultOf(client.append("order-1", [{"domain": "order", "name": "created"}],
                                       expected_version=NO_STREAM))
    self.failureResultOf(client.append("order-1", [{"domain": "order", "name": "created"}],
                                       expected_version=NO_STREAM), WrongExpectedVersion)

and subscriptions (``client.subscribe``): the stored events after ``from``,
``{"caughtUp": p}``, then every event appended meanwhile (by the client, or
by the test with :meth:`FakeServer.add_event`) as it is stored; the test
plays the server's heartbeat, row timeout and shutdown with
:meth:`FakeServer.heartbeat`, :meth:`FakeServer.time_out` and
:meth:`FakeServer.shut_down`::

    subscription = client.subscribe({"pid": "order-1"})
    d = subscription.next_event()
    server.add_event("order-1", "order", "paid", {"amount": 12})
    self.assertEqual(self.successResultOf(d).name, "paid")
    self.successResultOf(subscription.aclose())
"""

import datetime
import json
import re
import uuid
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Set, Tuple

from twisted.internet import defer
from twisted.internet.defer import Deferred

from eventsource.client._events import ANY, NO_STREAM, STREAM_EXISTS
from eventsource.ids import UUID7
from eventsource.wire import (
    ACCEPTED,
    END,
    ERROR,
    FETCH,
    FETCH_NEXT,
    FROM_END,
    FROM_START,
    PERSIST,
    SUBSCRIBE,
    TIMEOUT,
    decode_json,
    encode_appended,
    encode_body,
    encode_error,
    encode_ok_packet,
    format_timestamp,
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


class _Marker:
    def __init__(self, name: str):
        self._name = name

    def __repr__(self) -> str:
        return f"FakeServer.{self._name}"


#: the columns of a version 2 row, in the order of a row without ``$columns``
V2_COLUMNS = ("position", "eventId", "pid", "version", "domain", "name", "timestamp", "data")
_BODY_FIELDS = {PERSIST: {"v", "channel", "query", "expectedVersion", "expectedVersions"},
                FETCH: {"v", "channel", "query", "window"},
                SUBSCRIBE: {"v", "channel", "query", "from", "window"}}
_DOCUMENT_FIELDS = {"pid", "domain", "name", "data", "eventId"}
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_COMPARISONS: Dict[str, Callable[[Any, Any], bool]] = {
    "$eq": lambda a, b: a == b, "$ne": lambda a, b: a != b,
    "$gt": lambda a, b: a is not None and a > b, "$gte": lambda a, b: a is not None and a >= b,
    "$lt": lambda a, b: a is not None and a < b, "$lte": lambda a, b: a is not None and a <= b,
    "$in": lambda a, b: a in b, "$nin": lambda a, b: a not in b}


class _Refusal(Exception):
    """A version 2 request the fake server answers with an error object."""

    def __init__(self, code: str, message: str, **fields: Any):
        super().__init__(message)
        self.code, self.message, self.fields = code, message, fields

    def body(self) -> str:
        """The error object, as the server writes it."""
        return encode_error(self.code, self.message, **self.fields)


class FakeServer:
    """
    A scripted eventsource server on a :class:`MemoryPubSub`.

    Version 1: ``persist`` answers the OkPacket (or the messages of
    ``persist_answer``) and ``"end"``; ``fetch`` streams ``rows`` (or the
    messages of ``fetch_answer`` and ``"end"``) with the protocol's window
    rules, capped at ``max_window``; acceptances arrive on ``fetch-next`` or
    as ``"accepted"`` on the reply channel (version 1 streams only, as the
    real server).  ``prefix`` is the server's channel prefix (with a tenant:
    ``<prefix><tenant>:``).  ``requests`` records the request bodies,
    ``acceptances`` every ``(channel, count)`` accepted; take a handler out
    of ``pubsub.handlers`` to leave requests unanswered.

    Version 2 (``"v": 2``; ``version=1`` makes the server one that ignores
    it, as an old server does): persists are appended to ``events`` (each a
    version 2 row: position, eventId, pid, version, domain, name, timestamp,
    data), with expected versions, idempotency by event id and the error
    objects of docs/PROTOCOL.md (``read_only`` and ``max_documents`` as the
    server's options); fetches read ``events`` with a ``$where`` of
    equalities and ``$eq``, ``$ne``, ``$gt``, ``$gte``, ``$lt``, ``$lte``,
    ``$in``, ``$nin`` on the version 2 columns, ``$columns`` and ``$limit``.
    ``persist_answers`` scripts the next persists one at a time (before
    ``persist_answer``): a list of messages (sent, then ``"end"``),
    :attr:`LOSE_REPLY` (the persist is done, its answer lost) or
    :attr:`IGNORE` (nothing happens).

    Subscriptions (``subscribe``, version 2; ``version=1`` does not listen
    there, as an old server): the matching ``events`` after ``from``
    (``"start"``, ``"end"`` or a position) with the ``$where`` of a fetch,
    then ``{"caughtUp": p}``, then every matching event as it is stored (by
    a version 2 persist or :meth:`add_event`), paced by the window (default
    100, capped at ``max_window``), accepted and ended on ``fetch-next``.
    ``subscriptions`` holds the open ones by reply channel.  The test plays
    the server's timers and ends: :meth:`heartbeat`, :meth:`time_out` (the
    row timeout), :meth:`shut_down` (``unavailable``, then ``"end"``).

    What it does not do: other query operators, ``$orderBy`` and
    ``$groupBy`` (they raise ``NotImplementedError`` in the test), other
    tables (``$table``/``$from`` are ignored: one table), pids equal but for
    trailing spaces (the real server takes them for one stream), the size
    limits of a document, and reading version 1 persists back (those are
    answered, and not stored).
    """

    #: a :attr:`persist_answers` entry: do the persist, send no answer
    LOSE_REPLY = _Marker("LOSE_REPLY")
    #: a :attr:`persist_answers` entry: do nothing, send nothing
    IGNORE = _Marker("IGNORE")

    def __init__(self, pubsub: MemoryPubSub, rows: Iterable[Dict[str, Any]] = (),
                 max_window: int = 1000, prefix: str = "", *, version: int = 2,
                 read_only: bool = False, max_documents: int = 10000):
        self.pubsub = pubsub
        self.rows = list(rows)
        self.max_window = max_window
        self.version = version
        self.read_only = read_only
        self.max_documents = max_documents
        self.persist_answer: Optional[List[Any]] = None
        self.persist_answers: Deque[Any] = deque()
        self.fetch_answer: Optional[List[Any]] = None
        #: the events appended in version 2, in position order
        self.events: List[Dict[str, Any]] = []
        self._by_id: Dict[str, Dict[str, Any]] = {}
        self._last_versions: Dict[str, int] = {}
        self._new_ids = UUID7()
        self.requests: List[Dict[str, Any]] = []
        self.streams: Dict[str, Dict[str, Any]] = {}
        self.acceptances: List[Tuple[str, int]] = []
        #: the open subscriptions, by reply channel
        self.subscriptions: Dict[str, _FakeSubscription] = {}
        pubsub.handlers.update({prefix + PERSIST: self.on_persist,
                                prefix + FETCH: self.on_fetch,
                                prefix + FETCH_NEXT: self.on_fetch_next})
        if version == 2:
            pubsub.handlers[prefix + SUBSCRIBE] = self.on_subscribe

    def send(self, channel: str, message: Any) -> None:
        """Publish ``message`` (a row, a result or a control word) on ``channel``."""
        self.pubsub.deliver(channel, encode_body(message))

    def speaks_v2(self, request: Dict[str, Any]) -> bool:
        """Whether ``request`` is served as version 2."""
        return self.version == 2 and request.get("v") == 2

    def on_persist(self, channel: str, body: str) -> None:
        self._on_persist(channel, body)
        # (the events it stored, to the subscriptions, once it is answered)
        self._pump_subscriptions()

    def _on_persist(self, _: str, body: str) -> None:
        request = decode_json(body)
        self.requests.append(request)
        channel = request["channel"]
        if self.persist_answers:
            answer = self.persist_answers.popleft()
            if answer is self.LOSE_REPLY:
                if self.speaks_v2(request):
                    self.persist_v2(request)
                return
            if answer is self.IGNORE:
                return
            for message in answer:
                self.send(channel, message)
            self.send(channel, END)
            return
        if self.speaks_v2(request) and self.persist_answer is None:
            self.pubsub.deliver(channel, self.persist_v2(request))
        elif self.persist_answer is None:
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
        if self.fetch_answer is not None:
            for message in self.fetch_answer:
                self.send(channel, message)
            self.send(channel, END)
            return
        rows = self.rows
        if self.speaks_v2(request):
            try:
                rows = self.read_v2(request)
            except _Refusal as refusal:
                self.pubsub.deliver(channel, refusal.body())
                self.send(channel, END)
                return
        elif _names_v2_columns(request.get("query")):
            # as this project's version 1 server: an unknown column is refused
            self.send(channel, ERROR)
            self.send(channel, END)
            return
        window = min(request.get("window", 1), self.max_window)
        self.streams[channel] = {"rows": deque(rows), "window": window, "out": 0}
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
            self.subscriptions.pop(message["channel"], None)
        else:
            self.accept(message["channel"], message.get("accepted", 1))
            subscription = self.subscriptions.get(message["channel"])
            if subscription is not None:
                subscription.accept(message.get("accepted", 1))

    def on_reply(self, channel: str, body: str) -> None:
        message = decode_json(body)
        if message == ACCEPTED:
            self.accept(channel, 1)
        elif message == END:
            self.close(channel)

    # -- version 2 -------------------------------------------------------------

    def persist_v2(self, request: Dict[str, Any]) -> str:
        """Do a version 2 persist; the body of its answer (a result or an error object)."""
        try:
            events, duplicate = self._persist_v2(request)
        except _Refusal as refusal:
            return refusal.body()
        return encode_appended([(e["eventId"], e["pid"], e["version"], e["position"])
                                for e in events], duplicate)

    def _persist_v2(self, request: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], bool]:
        _check_fields(request, _BODY_FIELDS[PERSIST], "a persist")
        if "expectedVersion" in request and "expectedVersions" in request:
            raise _Refusal("badRequest", "give expectedVersion or expectedVersions, not both")
        query = request.get("query")
        insert = query.get("$insert") if isinstance(query, dict) else None
        if not isinstance(insert, dict) or set(insert) - {"$table", "$documents"}:
            raise _Refusal("badRequest", "a persist's query is {\"$insert\": {\"$documents\": "
                                         "[...]}}")
        documents = insert.get("$documents")
        if isinstance(documents, dict):
            documents = [documents]
        if not isinstance(documents, list) or not documents:
            raise _Refusal("badRequest", "$documents must be a document or a non-empty list")
        if len(documents) > self.max_documents:
            raise _Refusal("tooLarge", f"at most {self.max_documents} documents in one persist")
        for document in documents:
            _check_document(document)
        ids = [d.get("eventId") for d in documents]
        if any(ids) and not all(ids):
            raise _Refusal("badRequest", "either every document has an eventId or none has")
        ids = [i.lower() for i in ids if i]
        if len(set(ids)) != len(ids):
            raise _Refusal("badRequest", "two documents have the same eventId")
        if self.read_only:
            raise _Refusal("readOnly", "this server is read-only: it takes no persists")
        if ids:
            repeat = self._repeat(documents, ids)
            if repeat is not None:
                return repeat, True
        pids = list(dict.fromkeys(d["pid"] for d in documents))
        expected: Dict[str, Any] = {}
        if "expectedVersion" in request:
            if len(pids) > 1:
                raise _Refusal("badRequest", "expectedVersion needs documents of one pid; "
                                             "use expectedVersions")
            expected = {pids[0]: request["expectedVersion"]}
        elif "expectedVersions" in request:
            expected = request["expectedVersions"]
            if not isinstance(expected, dict):
                raise _Refusal("badRequest", "expectedVersions must be an object")
            for pid in expected:
                if pid not in pids:
                    raise _Refusal("badRequest", f"expectedVersions names {pid!r}, which no "
                                                 "document appends to")
        for pid, spec in expected.items():
            self._check_expected(pid, spec)
        return [self._store(document) for document in documents], False

    def _repeat(self, documents: List[Dict[str, Any]],
                ids: List[str]) -> Optional[List[Dict[str, Any]]]:
        stored = [self._by_id.get(i) for i in ids]
        known = [event for event in stored if event is not None]
        if not known:
            return None
        same = len(known) == len(ids) and all(
            event["pid"] == document["pid"] for event, document in zip(known, documents))
        last: Dict[str, int] = {}
        for before, event in zip([None, *known], known):
            if event["pid"] in last and event["version"] != last[event["pid"]] + 1 \
                    or before is not None and event["position"] < before["position"]:
                same = False
            last[event["pid"]] = event["version"]
        if not same:
            raise _Refusal("idempotencyConflict",
                           f"event id {known[0]['eventId']} is stored already, but not as "
                           "this request would store it", eventId=known[0]["eventId"])
        return known

    def _check_expected(self, pid: str, spec: Any) -> None:
        actual = self._last_versions.get(pid)
        if spec == ANY:
            return
        if spec == NO_STREAM:
            holds = actual is None
        elif spec == STREAM_EXISTS:
            holds = actual is not None
        elif type(spec) is int and spec >= 0:
            holds = actual == spec
        else:
            raise _Refusal("badRequest", f"an expected version is an integer >= 0, "
                                         f"\"noStream\", \"streamExists\" or \"any\", not "
                                         f"{spec!r}")
        if not holds:
            # (the server's sentence)
            state = "has no events" if actual is None else f"is at version {actual}"
            wanted = {NO_STREAM: "no events", STREAM_EXISTS: "at least one event"}.get(
                spec, f"version {spec}")
            raise _Refusal("wrongExpectedVersion",
                           f"stream {json.dumps(pid, ensure_ascii=False)} {state}, not {wanted}",
                           pid=pid, expected=spec, actual=actual)

    def _store(self, document: Dict[str, Any]) -> Dict[str, Any]:
        pid = document["pid"]
        version = self._last_versions.get(pid, -1) + 1
        self._last_versions[pid] = version
        event_id = document.get("eventId")
        event = {"position": len(self.events) + 1,
                 "eventId": (event_id.lower() if event_id
                             else str(uuid.UUID(bytes=self._new_ids()))),
                 "pid": pid, "version": version, "domain": document["domain"],
                 "name": document["name"],
                 "timestamp": format_timestamp(datetime.datetime.now(datetime.timezone.utc)),
                 "data": document.get("data")}
        self.events.append(event)
        self._by_id[event["eventId"]] = event
        for subscription in list(self.subscriptions.values()):
            subscription.offer(event)
        return event

    @property
    def position(self) -> int:
        """The position of the last stored event (0: none)."""
        return len(self.events)

    def add_event(self, pid: str, domain: str, name: str, data: Any = None) -> Dict[str, Any]:
        """
        Store an event as another writer would (the next version of its
        stream, a new event id); open subscriptions it matches get it.
        Returns it, as a version 2 row.
        """
        event = self._store({"pid": pid, "domain": domain, "name": name, "data": data})
        self._pump_subscriptions()
        return event

    def _pump_subscriptions(self) -> None:
        for subscription in list(self.subscriptions.values()):
            subscription.pump()

    # -- subscriptions ---------------------------------------------------------------

    def on_subscribe(self, _: str, body: str) -> None:
        request = decode_json(body)
        self.requests.append(request)
        channel = request["channel"]
        try:
            subscription = self._subscription(request)
        except _Refusal as refusal:
            self.pubsub.deliver(channel, refusal.body())
            self.send(channel, END)
            return
        self.subscriptions[channel] = subscription
        subscription.pump()

    def _subscription(self, request: Dict[str, Any]) -> "_FakeSubscription":
        if request.get("v") != 2:
            raise _Refusal("badRequest", "subscribe is a version 2 request: the body needs "
                                         "\"v\": 2")
        _check_fields(request, _BODY_FIELDS[SUBSCRIBE], "a subscribe request")
        query = request.get("query")
        select = query.get("$select") if isinstance(query, dict) else None
        if not isinstance(query, dict) or not isinstance(select, dict) or set(query) != {"$select"}:
            raise _Refusal("badRequest", "a subscription's query is {\"$select\": {...}}")
        extra = sorted(set(select) - {"$where", "$from"})
        if extra:
            raise _Refusal("badRequest", f"a subscription's $select takes $where and $from "
                                         f"only, not {extra[0]!r}")
        where = select.get("$where", {})
        start = request.get("from", FROM_START)
        if start == FROM_START:
            start = 0
        elif start == FROM_END:
            start = self.position
        elif type(start) is not int or start < 0:
            raise _Refusal("badRequest", "\"from\" must be \"start\", \"end\" or a position "
                                         "(an integer of at least 0)")
        window = request.get("window", 100)
        if type(window) is not int or window < 1:
            raise _Refusal("badRequest", "\"window\" must be an integer of at least 1")
        history = [event for event in self.events[start:] if _matches(event, where)]
        return _FakeSubscription(self, request["channel"], where, min(window, self.max_window),
                                 history, max(start, self.position))

    def heartbeat(self) -> None:
        """Every open subscription gets ``{"heartbeat": p}`` (behind the events it holds)."""
        for subscription in list(self.subscriptions.values()):
            subscription.queue.append(_marker("heartbeat", max(subscription.start,
                                                               self.position)))
            subscription.pump()

    def time_out(self, channel: Optional[str] = None) -> None:
        """The row timeout: ``"timeout"`` on ``channel`` (every open subscription
        when ``None``), which is then forgotten."""
        for name in [channel] if channel is not None else list(self.subscriptions):
            if self.subscriptions.pop(name, None) is not None:
                self.send(name, TIMEOUT)

    def shut_down(self) -> None:
        """As the server stopping: each subscription gets ``unavailable``, then ``"end"``."""
        for name in list(self.subscriptions):
            del self.subscriptions[name]
            self.pubsub.deliver(name, encode_error(
                "unavailable", "the server is shutting down; subscribe again from the last "
                               "position you processed"))
            self.send(name, END)

    def read_v2(self, request: Dict[str, Any]) -> List[Dict[str, Any]]:
        """The rows of a version 2 fetch (``_Refusal`` for a refused one)."""
        _check_fields(request, _BODY_FIELDS[FETCH], "a fetch")
        query = request.get("query")
        select = query.get("$select") if isinstance(query, dict) else None
        if not isinstance(select, dict):
            raise _Refusal("badRequest", "a fetch's query is {\"$select\": {...}}")
        unsupported = set(select) - {"$where", "$columns", "$limit", "$from"}
        if unsupported:
            raise NotImplementedError(f"FakeServer does not do {', '.join(sorted(unsupported))}")
        columns = select.get("$columns", list(V2_COLUMNS))
        for column in columns:
            if column not in V2_COLUMNS:
                raise _Refusal("refused", f"there is no column {column!r}")
        where = select.get("$where", {})
        rows = [{column: event[column] for column in columns}
                for event in self.events if _matches(event, where)]
        limit = select.get("$limit")
        return rows if limit is None else rows[:limit]


class _FakeSubscription:
    """One subscription of :class:`FakeServer`: its queue (rows, and markers
    that take no room in the window), window and rows out."""

    def __init__(self, server: FakeServer, channel: str, where: Any, window: int,
                 history: List[Dict[str, Any]], caught_up: int):
        self.server = server
        self.channel = channel
        self.where = where
        self.window = window
        self.start = caught_up
        #: what is still to be sent: rows (dicts) and markers (bodies)
        self.queue: Deque[Any] = deque(history)
        self.queue.append(_marker("caughtUp", caught_up))
        self.out = 0

    def __repr__(self) -> str:
        return f"<_FakeSubscription {self.channel!r} {len(self.queue)} queued, {self.out} out>"

    def offer(self, event: Dict[str, Any]) -> None:
        if _matches(event, self.where):
            self.queue.append(event)

    def accept(self, count: int) -> None:
        self.out = max(0, self.out - count)
        self.pump()

    def pump(self) -> None:
        """Send what the window allows; markers go as soon as the rows before them did."""
        while self.queue and self.server.subscriptions.get(self.channel) is self:
            head = self.queue[0]
            if isinstance(head, str):
                self.queue.popleft()
                self.server.pubsub.deliver(self.channel, head)
            elif self.out < self.window:
                self.queue.popleft()
                self.out += 1
                self.server.send(self.channel, head)
            else:
                break


def _marker(kind: str, position: int) -> str:
    return encode_body({kind: position})


def _check_fields(message: Dict[str, Any], allowed: Set[str], what: str) -> None:
    unknown = sorted(set(message) - allowed)
    if unknown:
        raise _Refusal("badRequest", f"{what} has no field {unknown[0]!r} in version 2")


def _check_document(document: Any) -> None:
    if not isinstance(document, dict):
        raise _Refusal("badRequest", "a document is an object")
    _check_fields(document, _DOCUMENT_FIELDS, "a document")
    for key in ("pid", "domain", "name"):
        value = document.get(key)
        if not isinstance(value, str) or not value or len(value) > 255:
            raise _Refusal("badRequest", f"a document's {key} is a string of 1 to 255 "
                                         "characters")
    event_id = document.get("eventId")
    if event_id is not None and not (isinstance(event_id, str) and _UUID.fullmatch(event_id)):
        raise _Refusal("badRequest", f"an eventId is a UUID, not {event_id!r}")


def _matches(event: Dict[str, Any], where: Any) -> bool:
    if not isinstance(where, dict):
        raise _Refusal("badRequest", "$where is an object")
    for column, condition in where.items():
        if column not in V2_COLUMNS:
            if column.startswith("$"):
                raise NotImplementedError(f"FakeServer does not do {column} in $where")
            raise _Refusal("refused", f"there is no column {column!r}")
        value = event[column]
        if not isinstance(condition, dict):
            condition = {"$eq": condition}
        for operator, operand in condition.items():
            compare = _COMPARISONS.get(operator)
            if compare is None:
                raise NotImplementedError(f"FakeServer does not do {operator}")
            if not compare(value, operand):
                return False
    return True


def _names_v2_columns(query: Any) -> bool:
    """Whether a fetch's query names a column only version 2 has."""
    select = query.get("$select") if isinstance(query, dict) else None
    if not isinstance(select, dict):
        return False
    named = list(select.get("$columns") or [])
    where = select.get("$where")
    if isinstance(where, dict):
        named += list(where)
    return any(name in ("position", "version", "eventId") for name in named)
