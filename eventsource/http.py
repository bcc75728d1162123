"""
The HTTP side, off unless ``--http-port`` is given: ``/metrics`` for
Prometheus, ``/health/live`` and ``/health/ready`` for orchestrators' probes,
and the page at ``/`` with its ``/api`` (:mod:`eventsource.page`).

It runs on the server's reactor, as a child service of the
:class:`eventsource.service.EventSourceService` (:class:`HTTPService`), and
listens on loopback unless ``--http-interface`` says otherwise.  With
``--http-token`` every route but ``/health/*`` and the page's own files
needs ``Authorization: Bearer <token>`` (compared in constant time);
without one, ``/api`` answers only a ``Host`` that is an address or
``localhost`` (:func:`local_host`).

Nothing here writes or takes a request body: every route is read-only
(``GET``/``HEAD``; other methods get 405), and a body sent anyway is dropped
unread.  Only ``/api`` reads the events table, through fetch's own path
(:mod:`eventsource.page`); otherwise the only statement the port causes is
the readiness check's ``SELECT 1``, at most once a second however often it
is asked.

``/metrics`` is rendered in the reactor thread from the server's own
registry (:func:`eventsource.metrics.make_registry`), with prometheus_client's
encoders.  (prometheus_client's ``twisted.MetricsResource`` is a WSGI
resource that collects in a thread of the reactor's pool: our collector reads
the server's streams and queues, which only the reactor thread may touch.)
"""

import hmac
import ipaddress
from typing import Any, List, Optional, Tuple

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from eventsource.metrics import make_registry
from eventsource.stats import mysql_error_code

log = Logger()

#: seconds a readiness answer about the database is reused: probes, however
#: many and however often, cause at most one ``SELECT 1`` per this
READY_CACHE_SECONDS = 1.0

#: seconds the readiness check waits for ``SELECT 1`` before saying not ready
PING_TIMEOUT = 1.0

#: seconds an idle HTTP connection is kept
IDLE_TIMEOUT = 60

TEXT = b"text/plain; charset=utf-8"


class Readiness:
    """
    Whether the server can serve: started (events table ready), subscribed
    to Redis, and the database answering ``SELECT 1``.  :meth:`check` fires
    with ``(ready, reason)``; the database's answer is shared by the checks
    that wait for it and kept :data:`READY_CACHE_SECONDS`.
    """

    def __init__(self, server: Any, clock: Any) -> None:
        self._server = server
        self._clock = clock
        self._waiters: Optional[List["defer.Deferred[Optional[str]]"]] = None
        self._timer: Optional[IDelayedCall] = None
        self._answer: Optional[Tuple[float, Optional[str]]] = None

    def check(self) -> "defer.Deferred[Tuple[bool, str]]":
        server = self._server
        if not server.accepting:
            if server.ready.called:
                return defer.succeed((False, "the server is stopping"))
            if not server.table_ready:
                return defer.succeed((False, "starting: the events table is not ready yet"))
            return defer.succeed((False, "starting: not subscribed to Redis yet"))
        if not getattr(server.bus, "connected", True):
            return defer.succeed((False, "not subscribed to Redis: reconnecting"))
        return self._database().addCallback(_readiness_of)

    def _database(self) -> "defer.Deferred[Optional[str]]":
        """Fires with None when the database answered, else the reason."""
        d: "defer.Deferred[Optional[str]]" = defer.Deferred()
        if self._waiters is not None:
            self._waiters.append(d)
            return d
        answer = self._answer
        if answer is not None and self._clock.seconds() - answer[0] < READY_CACHE_SECONDS:
            return defer.succeed(answer[1])
        self._waiters = [d]
        self._timer = self._clock.callLater(
            PING_TIMEOUT, self._answered, f"the database did not answer within {PING_TIMEOUT:g} s")
        ping = defer.maybeDeferred(self._server.store.ping)
        ping.addCallbacks(lambda _: self._answered(None), self._ping_failed)
        return d

    def _ping_failed(self, failure: Failure) -> None:
        error = failure.value
        if type(error).__name__ == "StoreStopping":
            self._answered("the server is stopping")
            return
        code = mysql_error_code(error) if isinstance(error, BaseException) else None
        if code and code != "other":
            self._answered(f"the database is unreachable (MySQL error {code})")
        else:
            self._answered(f"the database is unreachable ({type(error).__name__})")

    def _answered(self, reason: Optional[str]) -> None:
        if self._waiters is None:
            return  # (the ping's answer after the timeout's)
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._answer = (self._clock.seconds(), reason)
        waiters, self._waiters = self._waiters, None
        for waiter in waiters:
            waiter.callback(reason)

    def cancel(self) -> None:
        """The HTTP side stops: answer the waiting checks, leave no timer behind."""
        if self._waiters is not None:
            self._answered("the server is stopping")


def _readiness_of(database_problem: Optional[str]) -> Tuple[bool, str]:
    return (False, database_problem) if database_problem else (True, "ready")


def plain(request: server.Request, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", TEXT)
    request.setHeader(b"cache-control", b"no-store")
    return (text + "\n").encode("utf-8")


class ReadOnly(resource.Resource):
    """
    A route that answers ``GET`` and ``HEAD`` only (405 to every other
    method, where Twisted would say 501 to some), and has no children.
    """

    def render(self, request: server.Request) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return plain(request, 405, "this server only answers GET and HEAD")
        return super().render(request)

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return _NotFound()


class _NotFound(ReadOnly):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return plain(request, 404, "not found: the routes are / (the page), /api/events, "
                     "/api/stream/<pid>, /api/state, /api/tail, /metrics, /health/live, "
                     "/health/ready")


class _Unauthorized(resource.Resource):
    """Every method: 401, and the scheme to use."""

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        request.setHeader(b"www-authenticate", b'Bearer realm="eventsource"')
        return plain(request, 401, "this route needs Authorization: Bearer <token> "
                     "(--http-token)")


class _Directory(ReadOnly):
    """A path with children only: itself, and any other child, is not found."""

    def render_GET(self, request: server.Request) -> bytes:
        return _NotFound().render_GET(request)


class MetricsPage(ReadOnly):
    """``/metrics``: the registry, in the format the scraper asks for (text or OpenMetrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: server.Request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        output: bytes = encoder(self._registry)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return output


class LivePage(ReadOnly):
    """``/health/live``: the reactor answered, so the process is alive."""

    def render_GET(self, request: server.Request) -> bytes:
        return plain(request, 200, "live")


class ReadyPage(ReadOnly):
    """``/health/ready``: 200 ``ready``, or 503 and the reason."""

    def __init__(self, readiness: Readiness) -> None:
        super().__init__()
        self._readiness = readiness

    def render_GET(self, request: server.Request) -> Any:
        gone: List[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(result: Tuple[bool, str]) -> None:
            if gone:
                return  # (the prober hung up)
            ready, reason = result
            request.write(plain(request, 200 if ready else 503, reason))
            request.finish()

        def failed(failure: Failure) -> None:
            log.failure("the readiness check failed", failure)
            if not gone:
                request.write(plain(request, 500, "the readiness check failed"))
                request.finish()

        self._readiness.check().addCallbacks(answer, failed)
        return server.NOT_DONE_YET


def authorized(request: server.Request, token: bytes) -> bool:
    """Whether ``request`` carries ``Authorization: Bearer <token>`` (compared in constant time)."""
    header = request.getHeader(b"authorization") or b""
    scheme, _, given = header.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)


def local_host(request: server.Request) -> bool:
    """
    Whether the request's ``Host`` is an IP address or ``localhost``: a page
    on another site that a DNS name of its own points at this port (DNS
    rebinding) names itself there, never an address.
    """
    host = (request.getHeader(b"host") or b"").decode("latin-1").strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Forbidden(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        return plain(request, 403, "without --http-token the page's data is served only to a "
                     "Host that is an IP address or localhost (a defence against DNS "
                     "rebinding); set a token to reach it by a name")


#: the paths a browser loads without the token: the page's files hold no data
_OPEN_PATHS = frozenset((b"health", b"", b"static"))


class Root(ReadOnly):
    """
    The routes, behind the token (when there is one) except ``/health``
    and the page's own files (``/``, ``/static``); ``/api`` is the page's
    data (:mod:`eventsource.page`), served without a token only to a
    ``Host`` that is an address (:func:`local_host`).
    """

    def __init__(self, registry: CollectorRegistry, readiness: Readiness,
                 token: Optional[str], page: Any = None) -> None:
        super().__init__()
        self._token = token.encode("ascii") if token else None
        health = _Directory()
        health.putChild(b"live", LivePage())
        health.putChild(b"ready", ReadyPage(readiness))
        self.putChild(b"health", health)
        self.putChild(b"metrics", MetricsPage(registry))
        if page is not None:
            self.putChild(b"", page.index)
            self.putChild(b"static", page.files)
            self.putChild(b"api", page.api)

    def getChildWithDefault(self, path: bytes, request: server.Request) -> resource.Resource:
        if self._token is None:
            if path == b"api" and not local_host(request):
                return _Forbidden()
        elif path not in _OPEN_PATHS and not authorized(request, self._token):
            return _Unauthorized()
        return super().getChildWithDefault(path, request)

    def render_GET(self, request: server.Request) -> bytes:
        return _NotFound().render_GET(request)


class _Request(server.Request):
    """No route takes a body: one sent anyway is dropped as it arrives, never stored."""

    def handleContentChunk(self, data: bytes) -> None:
        pass


class HTTPSite(server.Site):
    """No access log (a scrape every few seconds is not news), no factory start/stop lines."""

    noisy = False
    requestFactory = _Request

    def log(self, request: Any) -> None:
        pass


def _address(interface: str, port: int) -> str:
    return f"[{interface}]:{port}" if ":" in interface else f"{interface}:{port}"


class HTTPService(service.Service):
    """
    Listens on ``http_interface``:``http_port`` while the server runs (port
    0: any free one; :attr:`port` says which).  It listens in
    ``privilegedStartService``, as Twisted's own servers do, so under twistd
    a port that cannot be had stops the start with the reason.
    """

    name = "http"

    def __init__(self, server: Any, reactor: Any, process_metrics: bool = True,
                 tail_source: Any = None) -> None:
        self._server = server
        self._reactor = reactor
        config = server.config
        self.interface: str = config.http_interface
        self._wanted_port: int = config.http_port
        self.registry, self.collector = make_registry(server, process=process_metrics)
        self.readiness = Readiness(server, reactor)
        from eventsource.page import Page  # (it builds on this module's resources)

        self.page = Page(server, reactor, tail_source)
        self.collector.add_source(self.page.metrics)
        self.site = HTTPSite(Root(self.registry, self.readiness, config.http_token, self.page),
                             timeout=IDLE_TIMEOUT)
        self.site.displayTracebacks = False
        self._listening: Optional[IListeningPort] = None
        self._token_given = config.http_token is not None

    @property
    def port(self) -> Optional[int]:
        """The port listened on (None while not listening)."""
        if self._listening is None:
            return None
        port: int = self._listening.getHost().port  # type: ignore[attr-defined]
        return port

    def _listen(self) -> None:
        if self._listening is not None:
            return
        self._listening = self._reactor.listenTCP(self._wanted_port, self.site,
                                                  interface=self.interface)
        log.info("HTTP on {address}: the page at /, /api, /metrics, /health/live, "
                 "/health/ready{token}", address=_address(self.interface, self.port or 0),
                 token=" (a bearer token needed but on /health and the page's own files)"
                 if self._token_given else "")
        if not ipaddress.ip_address(self.interface).is_loopback and not self._token_given:
            log.warn("HTTP listens on {interface} without --http-token: anyone who can reach "
                     "it can read /metrics and the events, through the page",
                     interface=self.interface)

    def privilegedStartService(self) -> None:
        self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        self._listen()
        super().startService()
        self.page.start()

    def stopService(self) -> "defer.Deferred[None]":
        super().stopService()
        self.readiness.cancel()
        self.page.stop()
        listening, self._listening = self._listening, None
        if listening is None:
            return defer.succeed(None)
        stopped: Any = listening.stopListening()
        return stopped if isinstance(stopped, defer.Deferred) else defer.succeed(None)
