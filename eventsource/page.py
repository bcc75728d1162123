"""
The page at ``/`` and the JSON it reads, on the HTTP port (:mod:`eventsource.http`).

The page is three files shipped in the package (``eventsource/static``: one
HTML, one script, one style sheet; no build step) and reads the server
through these routes, all ``GET``:

``/api/events?pid=&domain=&name=&limit=&before=``
    the last events, newest first, filtered by equality on ``pid``,
    ``domain`` and ``name``; ``before`` pages back (positions below it).
``/api/stream/<pid>?from_version=&limit=``
    one stream's events in version order, from ``from_version``.
``/api/state``
    the server's state: open streams (and subscriptions, tails), the pool,
    the last position, and events written and rows sent to fetches per 10 s over the
    last 15 minutes (:class:`Throughput`).
``/api/tail?pid=&domain=&name=``
    new events as they commit, as server-sent events (``text/event-stream``),
    fed by a :class:`TailSource`: one ``ready`` event with the position the
    tail starts after, then one ``event`` per new event (its ``id`` is the
    position), and a comment every :data:`HEARTBEAT` seconds.

Every read goes through the path fetch takes: a ``$select`` built here from
checked parameters, compiled by :func:`eventsource.query.compile_select`
for the version 2 names of the events table, and read by the store's
:class:`eventsource.store.Pager` (pages, each under the statement time
limit).  The page cannot name a table, a column or an operator: it sends
values, which become bound parameters.  Answers are bounded: at most
:data:`MAX_EVENTS_LIMIT` or :data:`MAX_STREAM_LIMIT` rows and about
:data:`MAX_ANSWER_BYTES` bytes, a row larger than :data:`MAX_ROW_BYTES` is
shown without its ``data``, at most :data:`MAX_READS` reads at once and
:data:`MAX_TAILS` tails.

The static files need no token (they hold no data, and a browser cannot
send a header when it opens a page); the ``/api`` routes are behind the
token like ``/metrics``.  The script asks for the token once, keeps it in
the tab's ``sessionStorage`` and sends it as ``Authorization: Bearer``,
the tail included: it reads the event stream with ``fetch()`` rather than
``EventSource`` (which cannot send a header), so the token is never in a
URL, where proxies and browser history would keep it.
"""

import hashlib
import json
import re
import time
from collections import deque
from importlib import resources as importlib_resources
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Protocol, Set, Tuple

from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from zope.interface import implementer

import eventsource
from eventsource import query, wire
from eventsource.http import ReadOnly, plain
from eventsource.stream import row_size

log = Logger()

#: rows of ``/api/events``: by default, and at most (a larger ``limit`` is cut to it)
EVENTS_LIMIT = 50
MAX_EVENTS_LIMIT = 200

#: rows of ``/api/stream/<pid>``: by default, and at most
STREAM_LIMIT = 100
MAX_STREAM_LIMIT = 500

#: an answer stops taking rows once it holds this many bytes of them
MAX_ANSWER_BYTES = 1024 * 1024

#: a row larger than this (as text) is shown without its ``data``
MAX_ROW_BYTES = 64 * 1024

#: reads of the page's routes under way at once (more: 503, try again)
MAX_READS = 4

#: live tails open at once (more: 503)
MAX_TAILS = 16

#: bytes a tail may write while its client reads nothing before it is closed
TAIL_BUFFER_BYTES = 1024 * 1024

#: seconds between the comments that keep a quiet tail's connection alive
HEARTBEAT = 15.0

#: seconds per throughput sample, and samples kept (15 minutes)
THROUGHPUT_PERIOD = 10.0
THROUGHPUT_SAMPLES = 90

#: open streams (and subscriptions) listed one by one in ``/api/state``
MAX_LISTED = 50

#: characters of a ``pid``, ``domain`` or ``name`` parameter (the columns' size)
MAX_TEXT = 255

#: a channel name as ``/api/state`` shows it
MAX_CHANNEL = 120

JSON_TYPE = b"application/json; charset=utf-8"

#: every answer of the page and its routes: the page's own files only, no
#: inline script or style, no framing, no referrer
SECURITY_HEADERS = (
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
     b"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)

_DIGITS = re.compile(r"[0-9]+\Z")

#: where a version 2 row's ``data`` begins: its last key, written by
#: :func:`eventsource.wire.row_encoder` (a quote inside a string is always
#: escaped, so ``,"data":`` cannot occur before it)
_DATA_KEY = ',"data":'


class BadParameter(ValueError):
    """A parameter the route does not take, or a value it cannot use: a sentence for the 400."""


def _secure(request: server.Request) -> None:
    for name, value in SECURITY_HEADERS:
        request.setHeader(name, value)


def json_answer(request: server.Request, code: int, text: str) -> bytes:
    """``text`` (JSON) as the answer, with ``code``; never cached."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", JSON_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    _secure(request)
    return text.encode("utf-8")


def error_answer(request: server.Request, code: int, message: str) -> bytes:
    """``{"error": message}`` with ``code``."""
    return json_answer(request, code, json.dumps({"error": message}))


def parameters(request: server.Request, names: Tuple[str, ...]) -> Dict[str, str]:
    """
    The query string's parameters, each of ``names`` at most once, decoded
    as UTF-8; an empty value counts as absent.  Anything else (an unknown
    name, a repeated one, bytes that are not UTF-8) is a :class:`BadParameter`.
    """
    found: Dict[str, str] = {}
    for raw_name, values in (request.args or {}).items():
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise BadParameter("a parameter's name is not UTF-8") from None
        if name not in names:
            raise BadParameter(f"unknown parameter {wire.truncate(name, 40)!r}: this route "
                               f"takes {', '.join(names)}")
        if len(values) != 1:
            raise BadParameter(f"{name} is given more than once")
        try:
            value = values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise BadParameter(f"{name} is not UTF-8") from None
        if value:
            found[name] = value
    return found


def text_value(given: Dict[str, str], name: str) -> Optional[str]:
    """A ``pid``, ``domain`` or ``name`` value: at most :data:`MAX_TEXT` characters."""
    value = given.get(name)
    if value is not None and len(value) > MAX_TEXT:
        raise BadParameter(f"{name} is longer than {MAX_TEXT} characters")
    return value


def count_value(given: Dict[str, str], name: str, default: Optional[int],
                most: Optional[int] = None, least: int = 0) -> Optional[int]:
    """
    A whole number of decimal digits, at least ``least``; with ``most``,
    a larger one is cut to it (a limit), without, one above 2^63 is refused
    (a position or a version).
    """
    text = given.get(name)
    if text is None:
        return default
    if not _DIGITS.match(text):
        raise BadParameter(f"{name} must be a whole number of decimal digits")
    digits = text.lstrip("0") or "0"
    if len(digits) > 19 or int(digits) >= 2 ** 63:
        if most is None:
            raise BadParameter(f"{name} is too large")
        return most
    value = int(digits)
    if value < least:
        raise BadParameter(f"{name} must be at least {least}")
    return value if most is None else min(value, most)


def filters(given: Dict[str, str]) -> Dict[str, Any]:
    """The ``$where`` of the ``pid``, ``domain`` and ``name`` parameters given (equality)."""
    where: Dict[str, Any] = {}
    for name in ("pid", "domain", "name"):
        value = text_value(given, name)
        if value is not None:
            where[name] = value
    return where


def shown_row(body: str) -> str:
    """
    A version 2 row for the page: as read, or, when it is larger than
    :data:`MAX_ROW_BYTES`, with ``data`` null and ``omittedBytes`` (the
    row's size) in its place, so that no answer carries a huge value.
    """
    size = row_size(body)
    if size <= MAX_ROW_BYTES:
        return body
    cut = body.find(_DATA_KEY)
    if cut < 0:
        return json.dumps({"omittedBytes": size})
    return body[:cut] + ',"data":null,"omittedBytes":' + str(size) + "}"


def _read_failure(failure: Failure) -> Tuple[int, str]:
    """The status and the sentence of a read that failed (the database's words stay in the log)."""
    if failure.check("eventsource.store.StatementTimeLimit"):
        return 503, str(failure.value)
    if failure.check("eventsource.store.StoreStopping"):
        return 503, "the server is shutting down"
    if failure.check("pymysql.err.OperationalError", "pymysql.err.InterfaceError",
                     "eventsource.store.StoreNotRunning"):
        log.warn("a read of the page failed: {error}", error=failure.value)
        return 503, "the database could not be reached"
    log.failure("a read of the page failed", failure)
    return 500, "the server failed to read the events (its log says why)"


class Reader:
    """
    The page's reads, through fetch's path: compile a ``$select`` for the
    version 2 names, read it with the store's pager, at most
    :data:`MAX_ANSWER_BYTES` of rows, at most :data:`MAX_READS` at once.
    """

    def __init__(self, server: Any) -> None:
        self._server = server
        #: reads under way
        self.reading = 0

    def plan(self, select: Dict[str, Any]) -> query.SelectPlan:
        """The compiled plan of ``select`` (a :class:`query.QueryError` for a bad value)."""
        return query.compile_select(select, self._server.schema_v2, self._server.limits)

    def answer(self, request: server.Request, select: Dict[str, Any],
               shape: Callable[[List[str], bool], str]) -> Any:
        """
        Read ``select`` and answer ``request`` with ``shape(rows, more)``
        (``more``: the answer was cut by its bytes): the whole of a route's
        ``render_GET`` after its parameters.
        """
        try:
            plan = self.plan(select)
        except query.QueryError as error:
            return error_answer(request, 400, str(error))
        if self.reading >= MAX_READS:
            return error_answer(request, 503, f"the page's reads are busy ({MAX_READS} under "
                                "way); try again")
        gone: List[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        self.reading += 1

        def done(result: Tuple[List[str], bool]) -> None:
            if not gone:
                request.write(json_answer(request, 200, shape(*result)))
                request.finish()

        def failed(failure: Failure) -> None:
            code, message = _read_failure(failure)
            if not gone:
                request.write(error_answer(request, code, message))
                request.finish()

        def finished(result: object) -> object:
            self.reading -= 1
            return result

        d = defer.Deferred.fromCoroutine(self._read(plan))
        d.addBoth(finished)
        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET

    async def _read(self, plan: query.SelectPlan) -> Tuple[List[str], bool]:
        pager = self._server.store.pager(plan)
        rows: List[str] = []
        total = 0
        while True:
            bodies, exhausted = await pager.next_page()
            for body in bodies:
                if total >= MAX_ANSWER_BYTES:
                    return rows, True
                row = shown_row(body)
                rows.append(row)
                total += len(row)
            if exhausted or not bodies:
                return rows, False


def _events_json(rows: List[str], more: bool, limit: int) -> str:
    return ('{"events":[' + ",".join(rows) + '],"limit":' + str(limit)
            + ',"more":' + ("true" if more or len(rows) >= limit else "false") + "}")


class EventsRoute(ReadOnly):
    """``/api/events``: the last events, newest first, filtered by pid, domain, name."""

    names = ("pid", "domain", "name", "limit", "before")

    def __init__(self, reader: Reader) -> None:
        super().__init__()
        self._reader = reader

    def render_GET(self, request: server.Request) -> Any:
        try:
            given = parameters(request, self.names)
            where = filters(given)
            limit = count_value(given, "limit", EVENTS_LIMIT, MAX_EVENTS_LIMIT, least=1)
            before = count_value(given, "before", None, least=1)
        except BadParameter as bad:
            return error_answer(request, 400, str(bad))
        assert limit is not None
        if before is not None:
            where["position"] = {"$lt": before}
        select = {"$where": where, "$orderBy": {"position": -1}, "$limit": limit}
        return self._reader.answer(request, select,
                                   lambda rows, more: _events_json(rows, more, limit))


class StreamRoute(ReadOnly):
    """``/api/stream/<pid>``: one stream, in version order (its ``pid_version`` key)."""

    names = ("from_version", "limit")

    def __init__(self, reader: Reader) -> None:
        super().__init__()
        self._reader = reader

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        if request.postpath:  # (a pid holding "/" is sent as %2F)
            return super().getChild(path, request)
        return _OneStream(self._reader, path)

    def render_GET(self, request: server.Request) -> bytes:
        return error_answer(request, 404, "name a stream: /api/stream/<pid>")


class _OneStream(ReadOnly):
    def __init__(self, reader: Reader, pid: bytes) -> None:
        super().__init__()
        self._reader = reader
        self._pid = pid

    def render_GET(self, request: server.Request) -> Any:
        try:
            try:
                pid = self._pid.decode("utf-8")
            except UnicodeDecodeError:
                raise BadParameter("the pid is not UTF-8") from None
            pid = text_value({"pid": pid}, "pid") or ""
            if not pid:
                raise BadParameter("name a stream: /api/stream/<pid>")
            given = parameters(request, StreamRoute.names)
            start = count_value(given, "from_version", 0)
            limit = count_value(given, "limit", STREAM_LIMIT, MAX_STREAM_LIMIT, least=1)
        except BadParameter as bad:
            return error_answer(request, 400, str(bad))
        assert limit is not None
        select = {"$where": {"pid": pid, "version": {"$gte": start}}, "$limit": limit}

        def shape(rows: List[str], more: bool) -> str:
            return ('{"pid":' + json.dumps(pid) + ',"fromVersion":' + str(start) + ","
                    + _events_json(rows, more, limit)[1:])

        return self._reader.answer(request, select, shape)


# -- throughput -------------------------------------------------------------


def traffic(server: Any) -> Tuple[int, int]:
    """``(events written, rows sent to fetch streams)`` by the server since it started."""
    stats = server.stats
    sent = stats.closed_rows_sent
    for stream in list(server.streams.values()):
        sent += stream.rows_sent
    return stats.events_written, sent


class Throughput:
    """
    A ring of the last :data:`THROUGHPUT_SAMPLES` samples, one every
    ``period`` seconds: the events written and rows sent in that time (the
    differences of the server's counts, read once per sample: nothing on
    the hot paths).
    """

    def __init__(self, clock: IReactorTime, counts: Callable[[], Tuple[int, int]],
                 period: float = THROUGHPUT_PERIOD, size: int = THROUGHPUT_SAMPLES) -> None:
        self._clock = clock
        self._counts = counts
        self.period = period
        #: ``(end, written, sent)``, oldest first (``end``: the clock's seconds)
        self.samples: Deque[Tuple[float, int, int]] = deque(maxlen=size)
        self._last: Tuple[int, int] = (0, 0)
        self._call: Optional[task.LoopingCall] = None

    def start(self) -> None:
        if self._call is not None:
            return
        self._last = self._counts()
        call = task.LoopingCall(self.sample)
        call.clock = self._clock
        self._call = call
        call.start(self.period, now=False)

    def stop(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.running:
            call.stop()

    def sample(self) -> None:
        """One sample, now (the loop's, and the tests')."""
        counts = self._counts()
        written, sent = counts[0] - self._last[0], counts[1] - self._last[1]
        self._last = counts
        self.samples.append((self._clock.seconds(), max(written, 0), max(sent, 0)))

    def as_json(self) -> Dict[str, Any]:
        return {"period": self.period, "capacity": self.samples.maxlen,
                "samples": [{"end": round(end, 3), "written": written, "sent": sent}
                            for end, written, sent in self.samples]}


# -- the live tail ----------------------------------------------------------


class TailListener(Protocol):
    """What a :class:`TailSource` calls (the tailer's subscriber methods)."""

    #: False once the listener ended (a source drops it then)
    is_live: bool

    def join(self, position: int) -> None:
        """Registered: every matching event after ``position`` will be delivered."""

    def deliver(self, events: List[Tuple[int, str, int]]) -> None:
        """New events, in position order: ``(position, version 2 row, bytes)``."""

    def fail(self, reason: str) -> None:
        """No more events can come (the reason is for the person reading)."""


class TailSource(Protocol):
    """New events as they commit, for the listeners whose ``$where`` they match."""

    def follow(self, listener: TailListener, where: Dict[str, Any]) -> None:
        """Deliver to ``listener`` the events matching ``where`` (compiled already) from now on."""

    def unfollow(self, listener: TailListener) -> None:
        """Deliver nothing more to ``listener``."""


class SubscriptionTail:
    """
    The tail source of a server: its tailer (:class:`eventsource.tailer.Tailer`,
    the subscription machinery), which reads the new events once per commit
    of this server (and every ``--tail-interval``) for every subscription and
    every tail together, and hands each the events its ``$where`` matches.
    A tail runs no query of its own.
    """

    def __init__(self, server: Any) -> None:
        self._server = server

    def follow(self, listener: TailListener, where: Dict[str, Any]) -> None:
        from eventsource.matcher import compile_matcher

        server = self._server
        matcher = compile_matcher(where, server.schema_v2)
        condition = None
        if matcher.sql:  # (not for the page's equalities; for any $where all the same)
            plan = query.compile_select({"$where": where}, server.schema_v2, server.limits)
            condition = (plan.where_sql or "TRUE", plan.where_params)
        server.tailer.join(listener, matcher, condition)

    def unfollow(self, listener: TailListener) -> None:
        self._server.tailer.leave(listener)


def sse(event: Optional[str], data: str, event_id: Optional[int] = None) -> bytes:
    """One server-sent event (``data`` split at its line breaks, as the format wants)."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines += ["data: " + line for line in re.split(r"\r\n|\r|\n", data)]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


@implementer(IPushProducer)
class Tail:
    """
    One ``/api/tail`` answer: the events its source delivers, as
    server-sent events, until the client goes, the source fails or the
    server stops.  The transport's backpressure pauses it: while paused, a
    tail may write :data:`TAIL_BUFFER_BYTES` (kept by Twisted until the
    client reads); a client that reads nothing for longer is cut off, so a
    stalled browser never grows the server's memory without bound.
    """

    def __init__(self, request: server.Request, clock: IReactorTime,
                 closed: Callable[["Tail"], object]) -> None:
        self._request = request
        self._clock = clock
        self._closed = closed
        self.is_live = True
        self.position: Optional[int] = None
        self.events = 0
        self._paused = False
        self._held = 0
        self._heartbeat: Optional[IDelayedCall] = None

    def start(self) -> None:
        request = self._request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")  # (nginx: pass it on at once)
        _secure(request)
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(lambda _: self.close(gone=True))
        self._write(b": the events of eventsource as they commit\n\n")
        self._beat()

    def _beat(self) -> None:
        self._heartbeat = self._clock.callLater(HEARTBEAT, self._heartbeat_due)

    def _heartbeat_due(self) -> None:
        self._heartbeat = None
        if self.is_live:
            self._write(b": heartbeat\n\n")
            if self.is_live:
                self._beat()

    def _write(self, data: bytes) -> None:
        if not self.is_live:
            return
        if self._paused:
            self._held += len(data)
            if self._held > TAIL_BUFFER_BYTES:
                log.info("a live tail's client read nothing while {bytes} bytes waited; "
                         "closing it", bytes=self._held)
                self.close(abort=True)
                return
        self._request.write(data)

    # -- the source's calls ---------------------------------------------------

    def join(self, position: int) -> None:
        self.position = position
        self._write(sse("ready", json.dumps({"position": position})))

    def deliver(self, events: List[Tuple[int, str, int]]) -> None:
        for position, body, _ in events:
            self.events += 1
            self.position = position
            self._write(sse("event", shown_row(body), position))

    def fail(self, reason: str) -> None:
        self._write(sse("failed", json.dumps({"error": reason})))
        self.close()

    # -- IPushProducer ----------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._held = 0

    def stopProducing(self) -> None:
        self.close(gone=True)

    # -- the end ----------------------------------------------------------------

    def close(self, gone: bool = False, abort: bool = False, drop: bool = False) -> None:
        """
        End the answer (``gone``: the connection is gone already; ``abort``:
        cut it, unsent data and all; ``drop``: close it once the answer's
        end is sent); idempotent.
        """
        if not self.is_live:
            return
        self.is_live = False
        if self._heartbeat is not None and self._heartbeat.active():
            self._heartbeat.cancel()
        self._heartbeat = None
        self._closed(self)
        request = self._request
        if gone:
            return
        request.unregisterProducer()
        channel = request.channel
        if abort:
            transport: Any = channel.transport if channel is not None else None
            if transport is not None:
                transport.abortConnection()
            return
        request.finish()
        if drop and channel is not None:
            channel.loseConnection()


class TailRoute(ReadOnly):
    """``/api/tail``: new events as server-sent events (see :class:`Tail`)."""

    names = ("pid", "domain", "name")

    def __init__(self, reader: Reader, source: Optional[TailSource], clock: IReactorTime) -> None:
        super().__init__()
        self._reader = reader
        self.source = source
        self._clock = clock
        self.tails: Set[Tail] = set()

    def render_HEAD(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        _secure(request)
        return b""

    def render_GET(self, request: server.Request) -> Any:
        try:
            where = filters(parameters(request, self.names))
        except BadParameter as bad:
            return error_answer(request, 400, str(bad))
        try:
            self._reader.plan({"$where": where})  # (the checks of fetch's path)
        except query.QueryError as error:
            return error_answer(request, 400, str(error))
        source = self.source
        if source is None:
            return error_answer(request, 501, "this server has no live tail")
        if len(self.tails) >= MAX_TAILS:
            return error_answer(request, 503, f"{MAX_TAILS} live tails are open (the most); "
                                "close one and try again")
        tail = Tail(request, self._clock, self._closed)
        self.tails.add(tail)
        tail.start()
        if tail.is_live:
            source.follow(tail, where)
        return server.NOT_DONE_YET

    def _closed(self, tail: Tail) -> None:
        self.tails.discard(tail)
        if self.source is not None:
            self.source.unfollow(tail)

    def close_all(self) -> None:
        """The server stops: end every tail, and drop its connection."""
        for tail in list(self.tails):
            tail.close(drop=True)


# -- the server's state -----------------------------------------------------


def _channel(name: str) -> str:
    return name if len(name) <= MAX_CHANNEL else name[:MAX_CHANNEL - 1] + "…"


def state(server: Any, throughput: Throughput, tails: int, started: float) -> Dict[str, Any]:
    """What ``/api/state`` answers (counts and open streams; no setting that could be secret)."""
    config = server.config
    streams = list(server.streams.values())
    by_state: Dict[str, int] = {"awaiting-row": 0, "awaiting-accept": 0}
    for stream in streams:
        by_state[stream.state.value] = by_state.get(stream.state.value, 0) + 1
    listed = [{"channel": _channel(stream.channel), "version": stream.version,
               "state": stream.state.value, "window": stream.window,
               "rowsSent": stream.rows_sent, "rowsAccepted": stream.rows_accepted}
              for stream in streams[:MAX_LISTED]]
    store = server.store
    stats = getattr(store, "stats", None)
    position = getattr(stats, "last_position", None)
    load = getattr(store, "pool_load", None)
    pool: Optional[Dict[str, int]] = None
    if load is not None:
        in_use, writes, reads = load()
        pool = {"threads": config.pool_size, "inUse": in_use, "queuedWrites": writes,
                "queuedReads": reads}
    serving = bool(server.accepting and getattr(server.bus, "connected", False))
    return {
        "version": eventsource.__version__,
        "table": config.table,
        "serving": serving,
        "readOnly": bool(config.read_only),
        "uptimeSeconds": round(time.time() - started, 1),
        "lastPosition": position,
        "persistsInFlight": server.persists_in_flight,
        "eventsWritten": server.stats.events_written,
        "streams": {"open": len(streams), "max": config.max_streams, "byState": by_state,
                    "listed": listed},
        "subscriptions": _subscriptions(server),
        "tails": {"open": tails, "max": MAX_TAILS},
        "pool": pool,
        "throughput": throughput.as_json(),
    }


def _subscriptions(server: Any) -> Dict[str, Any]:
    """The subscriptions of ``/api/state``: by state, the first :data:`MAX_LISTED` listed."""
    subscriptions = list(server.subscriptions.values())
    by_state: Dict[str, int] = {"catching-up": 0, "live": 0}
    for subscription in subscriptions:
        by_state[subscription.state.value] = by_state.get(subscription.state.value, 0) + 1
    listed = [{"channel": _channel(subscription.channel), "state": subscription.state.value,
               "position": subscription.covered, "window": subscription.window,
               "rowsSent": subscription.rows_sent, "heldBytes": subscription.held_bytes}
              for subscription in subscriptions[:MAX_LISTED]]
    return {"open": len(subscriptions), "max": server.config.max_subscriptions,
            "byState": by_state, "listed": listed}


class StateRoute(ReadOnly):
    """``/api/state``."""

    def __init__(self, page: "Page") -> None:
        super().__init__()
        self._page = page

    def render_GET(self, request: server.Request) -> bytes:
        try:
            parameters(request, ())
        except BadParameter as bad:
            return error_answer(request, 400, str(bad))
        return json_answer(request, 200, json.dumps(self._page.state()))


# -- the page's files -------------------------------------------------------

#: the files under ``/static/`` (and ``/``: index.html), with their types
FILES = {
    "index.html": b"text/html; charset=utf-8",
    "page.js": b"text/javascript; charset=utf-8",
    "page.css": b"text/css; charset=utf-8",
}


def read_file(name: str) -> bytes:
    """One of the page's files, from the installed package."""
    return (importlib_resources.files("eventsource") / "static" / name).read_bytes()


class StaticFile(ReadOnly):
    """One of the page's files, read once (they are small); revalidated by its ETag."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._content = read_file(name)
        self._type = FILES[name]
        self._etag = b'"' + hashlib.sha256(self._content).hexdigest()[:16].encode("ascii") + b'"'

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", self._type)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"etag", self._etag)
        _secure(request)
        if request.getHeader(b"if-none-match") == self._etag:
            request.setResponseCode(304)
            return b""
        return self._content


class _Files(ReadOnly):
    def render_GET(self, request: server.Request) -> bytes:
        return plain(request, 404, "not found")


class Page:
    """
    The page and its routes, for one server: :attr:`files` is ``/static``,
    :attr:`index` is ``/``, :attr:`api` is ``/api``.  :meth:`start` and
    :meth:`stop` follow the HTTP service (the throughput samples; the tails).
    """

    def __init__(self, server: Any, clock: IReactorTime,
                 tail_source: Optional[TailSource] = None) -> None:
        self._server = server
        self._clock = clock
        self._started = time.time()
        self.reader = Reader(server)
        self.throughput = Throughput(clock, lambda: traffic(server))
        self.index = StaticFile("index.html")
        self.files = _Files()
        for name in ("page.js", "page.css"):
            self.files.putChild(name.encode("ascii"), StaticFile(name))
        if tail_source is None and hasattr(server, "tailer"):
            tail_source = SubscriptionTail(server)
        self.tail = TailRoute(self.reader, tail_source, clock)
        self.api = _Files()
        self.api.putChild(b"events", EventsRoute(self.reader))
        self.api.putChild(b"stream", StreamRoute(self.reader))
        self.api.putChild(b"state", StateRoute(self))
        self.api.putChild(b"tail", self.tail)

    def state(self) -> Dict[str, Any]:
        return state(self._server, self.throughput, len(self.tail.tails), self._started)

    def metrics(self) -> Iterator[Metric]:
        """The page's metrics (a source of :class:`eventsource.metrics.ServerCollector`)."""
        yield GaugeMetricFamily("eventsource_page_tails", "Live tails of the page open now "
                                "(/api/tail).", value=len(self.tail.tails))

    def start(self) -> None:
        self._started = time.time()
        self.throughput.start()

    def stop(self) -> None:
        self.throughput.stop()
        self.tail.close_all()
