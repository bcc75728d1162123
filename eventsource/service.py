"""
The service that wires Redis, MySQL and the reply-channel machines together.

A message enters at :meth:`EventSourceService.message_received`; SQL is built
by :mod:`eventsource.query`; rows leave through :class:`eventsource.stream.Stream`
and :meth:`eventsource.bus.RedisBus.publish`.  Every failure of one request
becomes ``"error"``, ``"end"`` on its reply channel (or a log line when it
has none) and touches nothing else.
"""

import dataclasses
import hashlib
import os
import signal
import socket
import uuid
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from eventsource import appends, query, wire
from eventsource.stats import ServerStats
from eventsource.matcher import compile_matcher
from eventsource.stream import EchoBudget, Stream
from eventsource.subscription import Subscription
from eventsource.tailer import Tailer
from eventsource.lease import WriterLease
from eventsource.config import Config
from eventsource.interfaces import IEventBus, IEventStore

log = Logger()

FIRST_EVENT_HINT = (
    "redis-cli SUBSCRIBE {reply}   # in one terminal; then in another:\n"
    "redis-cli PUBLISH {persist} '{{\"channel\": \"{reply}\", \"query\": {{\"$insert\": "
    "{{\"$documents\": {{\"pid\": \"p1\", \"domain\": \"user\", \"name\": \"created\", "
    "\"data\": {{\"foo\": \"bar\"}}}}}}}}}}'"
)

#: replica mode: seconds between two checks that this replica's database
#: answers (:class:`DatabaseWatch`), and how long one may take before the
#: database counts as unreachable
DATABASE_CHECK_INTERVAL = 1.0

#: ``on_message(channel, body)``: every message on a subscribed channel
MessageHandler = Callable[[str, str], None]
#: builds the bus that delivers to ``(on_message, on_connection_lost)``; the
#: bus and the service each need the other, so the service builds its bus
BusFactory = Callable[[MessageHandler, Callable[[], None]], IEventBus]


def _ignore_failure(failure: Failure) -> None:
    # Leaving a reply channel only fails when Redis went away, and then the
    # subscription is gone with the connection anyway.
    return None


def _forget_sigterm(reactor: IReactorTime) -> None:
    """
    twistd re-raises the signal that stopped the reactor, so after a clean
    shutdown a SIGTERM'd server would still exit "killed by SIGTERM"; a
    graceful stop is a success: exit code 0.  Twisted has no public way to
    say so (``_ISupportsExitSignalCapturing`` is private and only read), so
    this is the one place that writes the reactor's ``_exitSignal``.
    """
    if getattr(reactor, "_exitSignal", None) == signal.SIGTERM:
        reactor._exitSignal = None  # type: ignore[attr-defined]


class DatabaseWatch:
    """
    Replica mode: whether this replica reaches its database now.  Every
    ``interval`` seconds a ``probe()`` (``SELECT 1`` on a connection of its
    own, :meth:`eventsource.store.Store.probe`) is sent unless one is still
    out; the database is :attr:`reachable` while the last probe answered
    within ``interval``, and not once one failed or has been out longer.

    A replica that cannot reach its database still hears every request on
    Redis; were it to claim them, it would win its share of the claims and
    answer each ``unavailable`` (or nothing, until ``--mysql-timeout``), and
    the retries would come back to it as often: so while the database is
    unreachable the replica claims nothing and the others serve.
    """

    def __init__(self, probe: Callable[[], "defer.Deferred[Any]"], clock: IReactorTime,
                 interval: float = DATABASE_CHECK_INTERVAL) -> None:
        self._probe = probe
        self._clock = clock
        self.interval = interval
        self.reachable = True
        #: when the probe still out was sent (None: none is out)
        self._sent: Optional[float] = None
        self._since: Optional[float] = None
        self._call: Any = None

    def start(self) -> None:
        if self._call is None:
            self._check()

    def stop(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _check(self) -> None:
        now = self.seconds()
        if self._sent is None:
            self._sent = now
            d = defer.maybeDeferred(self._probe)
            d.addCallbacks(self._answered, self._failed, callbackArgs=(now,),
                           errbackArgs=(now,))
        elif now - self._sent >= self.interval:
            self._unreachable(f"it did not answer SELECT 1 within {self.interval:g} s")
        self._call = self._clock.callLater(self.interval, self._check)

    def seconds(self) -> float:
        return float(self._clock.seconds())

    def _answered(self, _: object, sent: float) -> None:
        self._sent = None
        if self.seconds() - sent < self.interval:
            self._reachable()
        else:
            self._unreachable(f"it took {self.seconds() - sent:.1f} s to answer SELECT 1")

    def _failed(self, failure: Failure, sent: float) -> None:
        self._sent = None
        self._unreachable(f"SELECT 1 failed: {failure.getErrorMessage()}")

    def _unreachable(self, why: str) -> None:
        if self.reachable:
            self.reachable = False
            self._since = self.seconds()
            log.warn("the database is unreachable ({why}): this replica leaves requests to "
                     "the other replicas until it answers again", why=why)

    def _reachable(self) -> None:
        if not self.reachable:
            self.reachable = True
            log.info("the database answers again after {seconds:.1f} s: this replica takes "
                     "requests again", seconds=self.seconds() - (self._since or 0.0))


class BoundaryService(service.Service):
    """
    A boundary (the store, the bus) as a child service: started once the
    service before it (``after``) has started, and stopped by its parent.

    Its start's outcome goes to every :meth:`when_started` caller, so the
    parent (ready, log) and the next boundary can each wait for it.
    """

    def __init__(self, name: str, boundary: Any, after: "Optional[BoundaryService]" = None):
        self.setName(name)
        self.boundary = boundary
        self._after = after
        self._outcome: Optional[object] = None
        self._fired = False
        self._observers: "List[defer.Deferred[Any]]" = []

    def when_started(self) -> "defer.Deferred[Any]":
        """Fires with what the boundary's ``start`` fired with (or its failure)."""
        if self._fired:
            outcome = self._outcome
            return defer.fail(outcome) if isinstance(outcome, Failure) else defer.succeed(outcome)
        d: "defer.Deferred[Any]" = defer.Deferred()
        self._observers.append(d)
        return d

    def startService(self) -> None:
        super().startService()
        self._fired = False
        ready = defer.succeed(None) if self._after is None else self._after.when_started()
        ready.addCallback(lambda _: self.boundary.start())
        ready.addBoth(self._started)

    def _started(self, outcome: object) -> None:
        self._outcome, self._fired = outcome, True
        observers, self._observers = self._observers, []
        for d in observers:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    def stopService(self) -> "defer.Deferred[Any]":
        super().stopService()
        self._fired, self._outcome = False, None  # (a later start is a new outcome)
        return defer.maybeDeferred(self.boundary.stop)


class EventSourceService(service.MultiService):
    """
    The eventsource server: a service whose children are the store, then the
    bus (started in that order, the bus once the table is ready; stopped in
    reverse order, after the requests in flight are settled).

    :param config: a :class:`eventsource.config.Config`.
    :param reactor: the clock of every timer (a ``Clock`` in unit tests);
        stopped when the server cannot start if it is a running reactor.
    :param store: the MySQL boundary, an :class:`IEventStore`.
    :param bus: builds the Redis boundary, an :class:`IEventBus`, given the
        service's message and connection-lost handlers (see :func:`make_server`).
    :param stop_reactor_on_failure: stop the reactor when the server cannot
        start (what ``twistd`` needs); tests running their own servers say no.
    :param database_probe: replica mode's check that the database answers
        (:class:`DatabaseWatch`); ``store.probe`` when omitted.
    """

    def __init__(self, config: Config, reactor: IReactorTime, *, store: IEventStore, bus: BusFactory,
                 stop_reactor_on_failure: bool = True,
                 database_probe: Optional[Callable[[], "defer.Deferred[Any]"]] = None) -> None:
        super().__init__()
        self.config = config
        self._reactor = reactor
        self._stop_reactor_on_failure = stop_reactor_on_failure
        self.store = store
        self.bus = bus(self.message_received, self.redis_lost)
        self._store_service = BoundaryService("store", store)
        self._store_service.setServiceParent(self)
        self._bus_service = BoundaryService("bus", self.bus, after=self._store_service)
        self._bus_service.setServiceParent(self)
        self.schema = query.TableSchema(self.config.database, self.config.table_name)
        #: the table as version 2 queries name it
        self.schema_v2 = query.TableSchema.version2(self.config.database, self.config.table_name)
        #: the table as subscriptions read it: in position order, whatever the $where
        self.schema_subscribe = dataclasses.replace(self.schema_v2, stream_reads=False)
        self.limits = query.Limits(
            max_depth=self.config.max_query_depth,
            max_terms=self.config.max_query_terms,
            max_in_list=self.config.max_in_list,
        )
        channels = self.config.request_channels
        #: the handler of each request kind
        self._kinds: Dict[str, Callable[[Any], None]] = {
            "persist": self._persist, "fetch": self._fetch, "fetch-next": self._fetch_next,
            "subscribe": self._subscribe}
        # In tenant mode requests arrive on <prefix>T:<kind> (see
        # message_received) and the version 1 channels are not served.
        self._handlers: Dict[str, Tuple[str, Callable[[Any], None]]] = {} if self.config.tenants else {
            channels[kind]: (kind, handler) for kind, handler in self._kinds.items()}
        self._reserved = frozenset(channels.values()) | frozenset(channels)
        pattern = self.config.reply_channels
        self._reply_rules = wire.ReplyRules(pattern=wire.Glob(pattern) if pattern else None)
        self.streams: Dict[str, Stream] = {}
        #: open subscriptions, by reply channel (a channel holds a stream or a subscription)
        self.subscriptions: Dict[str, Subscription] = {}
        #: reads the table's new events for every subscription
        self.tailer = Tailer(store, reactor, interval=self.config.tail_interval,
                             page_size=self.config.page_size, failed=self._tail_failed)
        store.on_commit(self.tailer.poke)
        #: the rows the server hears again on the reply channels of version 1 streams
        self.echo_budget = EchoBudget(self.config.max_echo_bytes, reactor)
        #: reply channels of open version 1 streams (the server listens on them)
        self._listened: Set[str] = set()
        self._persists: "Set[defer.Deferred[Any]]" = set()
        #: requests, latencies, closed streams (read by eventsource.metrics)
        self.stats = ServerStats(reactor)
        #: the events table exists and is up to date (the store started)
        self.table_ready = False
        self._accepting = False
        #: this replica's name in the claims it takes (replica mode)
        self.replica_id = replica_name()
        #: replica mode: whether the database answers (claims wait for it)
        self.database_watch = DatabaseWatch(database_probe or store.probe, reactor) \
            if config.replicas else None
        #: replica mode with ``--writer-lease``: which replica writes the persists
        self.writer_lease = WriterLease(
            lambda: self.bus, reactor, f"{config.channel_prefix}claim:writer",
            self.replica_id, config.writer_lease, self._may_write, self._lease_changed) \
            if config.replicas and config.writer_lease else None
        #: the writer lease's other side: not subscribed to the persist channel
        #: while another replica holds the lease (see :meth:`_lease_changed`)
        self.persists_muted = False
        self.ready: "defer.Deferred[EventSourceService]" = defer.Deferred()

    @property
    def accepting(self) -> bool:
        """Taking requests: started (table ready, subscribed to Redis) and not stopping."""
        return self._accepting

    @property
    def persists_in_flight(self) -> int:
        """Persists taken and not answered yet."""
        return len(self._persists)

    def seconds(self) -> float:
        """The time on the server's clock (the reactor's; a test's ``Clock``)."""
        return float(self._reactor.seconds())

    # -- life cycle -----------------------------------------------------

    def startService(self) -> None:
        # (observers first: the table's log line comes before the bus starts)
        self._store_service.when_started().addCallbacks(self._schema_ready, _ignore_failure)
        self._bus_service.when_started().addCallbacks(self._started, self._start_failed)
        super().startService()

    def _schema_ready(self, changes: Optional[List[str]]) -> None:
        self.table_ready = True
        log.info("events table {table} ready ({changes})", table=self.config.table,
                 changes=", ".join(changes or []) or "unchanged")

    def _started(self, _: object) -> None:
        self._accepting = True
        self.tailer.start()
        if self.database_watch is not None:
            self.database_watch.start()
        if self.writer_lease is not None:
            self.writer_lease.start()
        log.info(
            "eventsource serving {table} on Redis {redis}, "
            "MySQL {mysql_host}:{mysql_port}; send a first event with:\n{hint}",
            table=self.config.table,
            redis=self.config.redis_where,
            redis_host=self.config.redis_host, redis_port=self.config.redis_port,
            redis_sentinels=[f"{host}:{port}" for host, port in self.config.redis_sentinels],
            redis_master_name=self.config.redis_master_name,
            mysql_host=self.config.mysql_host, mysql_port=self.config.mysql_port,
            hint=self._first_event_hint(),
        )
        self.ready.callback(self)

    def _first_event_hint(self) -> str:
        prefix = self.config.channel_prefix
        if self.config.tenants:
            persist, reply = f"{prefix}TENANT:persist", f"{prefix}TENANT:reply-1"
        else:
            persist, reply = self.config.request_channels["persist"], "reply-1"
        return FIRST_EVENT_HINT.format(persist=persist, reply=reply)

    def _start_failed(self, failure: Failure) -> None:
        log.failure("eventsource could not start", failure)
        if not self.ready.called:
            self.ready.errback(failure)
        reactor = self._reactor
        if self._stop_reactor_on_failure and IReactorCore.providedBy(reactor) and reactor.running:
            reactor.stop()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """
        Stop taking requests, end streams (dropping their reads that have not
        started), finish persists in flight, then stop the bus and the store,
        one after the other.  Takes at most ``shutdown_timeout`` plus the
        store's kill grace, whatever is queued.
        """
        self._accepting = False
        if self.database_watch is not None:
            self.database_watch.stop()
        # (given up at once, so the other replicas take it at their next
        # attempt while this one answers the persists it took; the bus
        # stays until Redis took that, a second at most)
        released = self.writer_lease.stop() if self.writer_lease is not None else None
        for stream in list(self.streams.values()):
            stream.fail("the server is shutting down", "unavailable")
        for subscription in list(self.subscriptions.values()):
            subscription.fail("the server is shutting down", "unavailable")
        self.tailer.stop()
        self.echo_budget.cancel()
        # Reads no stream waits for any more must not hold the pool (or the
        # persists behind them) during the wait below.
        self.store.drop_reads()
        if self._persists:
            log.info("waiting for {count} persists in flight", count=len(self._persists))
            finished = yield self._wait_for_persists(self.config.shutdown_timeout)
            if not finished:
                log.warn("{count} persists still unanswered after {timeout} s; closing anyway "
                         "(their outcome is unknown to their clients)",
                         count=len(self._persists), timeout=self.config.shutdown_timeout)
        if released is not None:
            yield self._within(released, 1.0)  # (True, or False after a second: either way on)
        # (not MultiService's stop, which stops the children all at once:
        # the bus goes first, and the store only once the bus is gone)
        service.Service.stopService(self)
        for child in reversed(list(self)):
            yield child.stopService()
        _forget_sigterm(self._reactor)

    def _within(self, d: "defer.Deferred[Any]", timeout: float) -> "defer.Deferred[bool]":
        """
        Fires True when ``d`` fires, or False after ``timeout``, whichever
        comes first.  ``d`` is not cancelled on timeout (a late answer must
        still find its Deferred), and its result is left to its own callbacks.
        """
        result: "defer.Deferred[bool]" = defer.Deferred()
        result.addTimeout(timeout, self._reactor, onTimeoutCancel=lambda _, __: False)

        def finished(outcome: object) -> object:
            if not result.called:
                result.callback(True)
            return outcome

        d.addBoth(finished)
        return result

    def _wait_for_persists(self, timeout: float) -> "defer.Deferred[bool]":
        """Fires True once every persist in flight is answered, False after ``timeout``."""
        return self._within(defer.DeferredList(list(self._persists)), timeout)

    # -- messages in ------------------------------------------------------

    def message_received(self, channel: str, body: str) -> None:
        """Every message on every subscribed channel enters here."""
        handler = self._handlers.get(channel)
        if handler is not None:
            self._request(handler[0], body, handler[1])
        else:
            stream = self.streams.get(channel)
            if stream is not None:
                if channel in self._listened:  # (a version 1 stream's)
                    control = wire.parse_control(body)
                    if control == wire.ACCEPTED:
                        stream.accept(1)
                    elif control == wire.END:
                        stream.end()
            elif self.config.tenants:
                self._tenant_request(channel, body)

    def _tenant_request(self, channel: str, body: str) -> None:
        """
        A message on ``<prefix>T:<kind>``: a request of tenant ``T``.  The
        tenant comes from the channel (which a Redis ACL guards), never from
        the body; every channel the request names must lie under ``<prefix>T:``.
        """
        prefix = self.config.channel_prefix
        found = wire.tenant_request_channel(channel, prefix)
        if found is None:
            return  # (a late message on a reply channel whose stream ended)
        kind, tenant = found
        if not wire.valid_tenant(tenant):
            log.warn("request on {request_channel} ignored: {tenant!r} is not a tenant name",
                     request_channel=wire.truncate(channel, 200),
                     tenant=wire.truncate(tenant, 80))
            return
        rules = wire.ReplyRules(pattern=self._reply_rules.pattern,
                                namespace=f"{prefix}{tenant}:", request_prefix=prefix)
        self._request(kind, body, self._kinds[kind], rules, channel)

    def _request(self, request_channel: str, body: str, handler: Callable[[Any], None],
                 rules: Optional[wire.ReplyRules] = None, source: Optional[str] = None) -> None:
        """
        A request of kind ``request_channel`` (``persist``...) arrived; in
        replica mode, it is served only once this replica claimed it.
        """
        if self.config.replicas and request_channel != "fetch-next":
            self._claim(request_channel, body, handler, rules, source)
        else:
            self._serve(request_channel, body, handler, rules, source)

    def _claim(self, request_channel: str, body: str, handler: Callable[[Any], None],
               rules: Optional[wire.ReplyRules], source: Optional[str]) -> None:
        """
        Replica mode: every replica hears every request; the one whose claim
        (``SET <prefix>claim:<digest> <replica> NX PX <ttl>``) Redis takes
        first serves it, the others drop it unanswered.  Nothing about a
        request is published (not even a refusal) before its claim is won,
        so a replica that lost it never writes on another's reply channel.
        Acknowledgements (fetch-next) are not claimed: only the replica
        holding their stream acts on them.
        """
        if not self._accepting:
            # (stopping: leave it to the replicas still serving)
            self.stats.request(request_channel, "elsewhere")
            log.debug("left a {request_channel} request to the other replicas: this one is "
                      "not serving", request_channel=request_channel)
            return
        watch = self.database_watch
        if watch is not None and not watch.reachable:
            self.stats.request(request_channel, "elsewhere")
            log.debug("left a {request_channel} request to the other replicas: this one "
                      "does not reach its database", request_channel=request_channel)
            return
        lease = self.writer_lease
        if request_channel == "persist" and lease is not None and lease.leaves_persists():
            self.stats.request(request_channel, "elsewhere")
            return
        key = claim_key(self.config.channel_prefix,
                        source or self.config.request_channels[request_channel], body)
        d = self.bus.claim(key, self.replica_id, self.config.claim_ttl)
        d.addCallbacks(self._claimed, self._claim_failed,
                       callbackArgs=(request_channel, body, handler, rules, source, key),
                       errbackArgs=(request_channel, key))

    def _lease_changed(self) -> None:
        """
        While another replica holds the writer lease, this one leaves the
        persist channel (``UNSUBSCRIBE``): Redis no longer sends it the
        persists it would only drop, which on a busy machine is CPU the
        writer lacks.  It subscribes again when the lease is its own, free,
        or not known (and the bus subscribes every request channel again
        after a reconnection).  Tenant mode's pattern is left alone.
        """
        lease = self.writer_lease
        if lease is None or self.config.tenants or not self._accepting:
            return
        mute = lease.leaves_persists()
        if mute == self.persists_muted:
            return
        self.persists_muted = mute
        channel = self.config.request_channels["persist"]
        d: "defer.Deferred[Any]" = self.bus.unsubscribe(channel) if mute \
            else self.bus.subscribe(channel)
        d.addErrback(self._mute_failed, channel, mute)

    def _mute_failed(self, failure: Failure, channel: str, mute: bool) -> None:
        # (the connection went: the bus subscribes every request channel again)
        self.persists_muted = False
        log.warn("could not {what} {channel} ({error})", channel=channel,
                 what="leave" if mute else "listen on again", error=failure.getErrorMessage())

    def _may_write(self) -> bool:
        """Replica mode: whether this replica may hold the writer lease now."""
        watch = self.database_watch
        return self._accepting and (watch is None or watch.reachable)

    def _claimed(self, won: bool, request_channel: str, body: str,
                 handler: Callable[[Any], None], rules: Optional[wire.ReplyRules],
                 source: Optional[str], key: str) -> None:
        if won:
            self._serve(request_channel, body, handler, rules, source)
        else:
            self.stats.request(request_channel, "elsewhere")
            log.debug("{request_channel} request {key} is served by another replica",
                      request_channel=request_channel, key=key)

    def _claim_failed(self, failure: Failure, request_channel: str, key: str) -> None:
        self.stats.request(request_channel, "unclaimed")
        log.warn("{request_channel} request {key} not served: claiming it in Redis failed "
                 "({error}); its client will time out and may retry",
                 request_channel=request_channel, key=key, error=failure.getErrorMessage())

    def _serve(self, request_channel: str, body: str, handler: Callable[[Any], None],
               rules: Optional[wire.ReplyRules] = None, source: Optional[str] = None) -> None:
        try:
            request = wire.parse_request(request_channel, body, self.config.max_body_bytes,
                                         self._reserved, rules or self._reply_rules)
        except wire.BadRequest as bad:
            self._bad_request(request_channel, body, bad.reason, bad.channel,
                              bad.version, source=source)
            return
        if not self._accepting:
            self.stats.request(request_channel, "ignored" if request_channel == "fetch-next" else "refused")
            log.info("refused a {request_channel} request for {channel}: the server is not "
                     "serving", request_channel=request_channel, channel=request.channel)
            if request_channel != "fetch-next":
                self._reply_error(request.channel, "the server is shutting down",
                                  getattr(request, "version", 1), "unavailable")
            return
        handler(request)

    def _bad_request(self, request_channel: str, body: Optional[str], reason: str,
                     channel: Optional[str], version: int = 1, code: str = "badRequest",
                     source: Optional[str] = None) -> None:
        """
        A request refused before it was served: ``request_channel`` is its
        kind (``persist``, ``fetch``...), ``source`` the channel it came on
        when that is not the kind's own (a tenant's), for the log.
        """
        if request_channel == "fetch-next" and not self._busy(channel):
            # An acknowledgement is never answered unless it concerns a live
            # stream: a client that acknowledges every message it gets would
            # otherwise ping-pong with the server forever.
            self.stats.request(request_channel, "ignored")
            log.info("ignored a bad fetch-next request for {channel}: {reason}; body: {body}",
                     channel=channel, reason=reason, body=wire.truncate(body))
            return
        if channel is None:
            self.stats.request(request_channel, "unanswerable")
            log.warn("unanswerable request on {request_channel}: {reason}; body: {body}",
                     request_channel=source or request_channel, reason=reason,
                     body=wire.truncate(body))
            return
        log.info("bad request on {request_channel} for {channel}: {reason}",
                 request_channel=source or request_channel, channel=channel, reason=reason)
        self.stats.request(request_channel, "refused")
        self._refuse(channel, reason, version, code)

    def _refuse(self, channel: str, reason: str, version: int = 1, code: str = "busy") -> None:
        """
        Answer ``"error"`` (version 2: the error object of ``code``),
        ``"end"``; a live stream on that channel ends with it (its own
        request's version says how).
        """
        stream = self.streams.get(channel) or self.subscriptions.get(channel)
        if stream is not None:
            log.info("reply channel {channel} is busy; ending its stream: {reason}",
                     channel=channel, reason=reason)
            stream.fail(reason, code)
        else:
            self._reply_error(channel, reason, version, code)

    def _busy(self, channel: Optional[str]) -> bool:
        """Whether a stream or a subscription is open on ``channel``."""
        return channel in self.streams or channel in self.subscriptions

    def _reply_error(self, channel: str, reason: str, version: int = 1,
                     code: str = "internal", **fields: Any) -> None:
        """``"error"``, ``"end"``; for version 2 the error is ``{"error": {code, message, ...}}``."""
        if version == 2:
            self.publish(channel, wire.encode_error(code, reason, **fields))
        else:
            self.publish(channel, wire.ERROR_BODY)
        self.publish(channel, wire.END_BODY)

    def publish(self, channel: str, body: str) -> None:
        self.bus.publish(channel, body)

    # -- persist --------------------------------------------------------

    def _persist(self, request: Any) -> None:
        channel, version = request.channel, request.version
        if self._busy(channel):
            self.stats.request("persist", "refused")
            self._refuse(channel, "the reply channel is streaming another request", version)
            return
        if self.config.read_only:
            self.stats.request("persist", "refused")
            log.info("refused persist on {channel}: read-only mode", channel=channel)
            self._reply_error(channel, "this server is read-only: it appends nothing", version,
                              "readOnly")
            return
        try:
            if version == 2:
                plan = query.compile_append(request.insert, self.schema, self.config.max_documents,
                                            request.expected)
            else:
                plan = query.compile_insert(request.insert, self.schema, self.config.max_documents)
        except query.QueryError as error:
            self._bad_request("persist", None, str(error), channel, version, error.code)
            return
        if plan.ignored:
            log.debug("persist for {channel}: ignored document fields {ignored}",
                      channel=channel, ignored=wire.truncate(repr(plan.ignored)))
        # (counted and timed in the answer's own callbacks, once the answer
        # is out: no pass-through callback, and a count cannot hold an answer back)
        taken = (self._reactor.seconds(), len(plan.rows))
        if version == 2:
            d = self.store.append(plan)
            d.addCallbacks(self._appended, self._append_failed,
                           callbackArgs=(channel, taken), errbackArgs=(channel,))
        else:
            d = self.store.insert(plan)
            d.addCallbacks(self._persisted, self._persist_failed,
                           callbackArgs=(channel, taken), errbackArgs=(channel,))
        self._persists.add(d)
        d.addBoth(self._persist_done, d)

    def _persisted(self, result: Tuple[int, int], channel: str,
                   taken: Tuple[float, int]) -> None:
        affected, insert_id = result
        self.publish(channel, wire.encode_ok_packet(affected, insert_id))
        self.publish(channel, wire.END_BODY)
        self.stats.persist_answered(*taken)

    def _persist_failed(self, failure: Failure, channel: str) -> None:
        self.stats.persist_failed(failure)
        if failure.check("eventsource.store.StoreStopping"):
            log.warn("persist for {channel} not written: the server stopped first",
                     channel=channel)
        else:
            log.failure("persist for {channel} failed", failure, channel=channel)
        self._reply_error(channel, "the database refused the insert")

    def _appended(self, result: appends.Appended, channel: str,
                  taken: Tuple[float, int]) -> None:
        self.publish(channel, wire.encode_appended(
            [(appends.format_event_id(e.event_id), e.pid, e.version, e.position)
             for e in result.events], result.duplicate))
        self.publish(channel, wire.END_BODY)
        self.stats.persist_answered(taken[0], taken[1], result.duplicate)

    def _append_failed(self, failure: Failure, channel: str) -> None:
        self.stats.persist_failed(failure)
        error = failure.value
        if isinstance(error, appends.WrongExpectedVersion):
            log.debug("persist for {channel} refused: {reason}", channel=channel, reason=error)
            self._reply_error(channel, str(error), 2, error.code, pid=error.pid,
                              expected=error.expected, actual=error.actual)
            return
        if isinstance(error, appends.IdempotencyConflict):
            log.info("persist for {channel} refused: {reason}", channel=channel, reason=error)
            self._reply_error(channel, str(error), 2, error.code,
                              eventId=appends.format_event_id(error.event_id))
            return
        code, message = _failure_code(failure)
        if code == "internal":
            log.failure("persist for {channel} failed", failure, channel=channel)
        else:
            log.warn("persist for {channel} not written ({code}): {error}", channel=channel,
                     code=code, error=error)
        if code == "unavailable":
            message += ": whether the events were written is unknown; send the request again " \
                       "with the same event ids"
        self._reply_error(channel, message, 2, code)

    def _persist_done(self, _: object, d: "defer.Deferred[Any]") -> None:
        self._persists.discard(d)

    # -- fetch ----------------------------------------------------------

    def _fetch(self, request: Any) -> None:
        channel, version = request.channel, request.version
        if self._busy(channel):
            self.stats.request("fetch", "refused")
            self._refuse(channel, "the reply channel is already streaming", version)
            return
        if len(self.streams) >= self.config.max_streams:
            self.stats.request("fetch", "refused")
            log.warn("refused fetch on {channel}: {count} streams open (the limit)",
                     channel=channel, count=len(self.streams))
            self._reply_error(channel, "too many open streams", version, "busy")
            return
        try:
            plan = query.compile_select(request.select,
                                        self.schema_v2 if version == 2 else self.schema, self.limits)
        except query.QueryError as error:
            self._bad_request("fetch", None, str(error), channel, version, error.code)
            return
        pager = self.store.pager(plan)
        # A version 1 client accepts and ends on the reply channel, so the
        # server listens there (and hears every row it publishes: the echo
        # budget bounds those).  A windowed stream is never listened to: its
        # client accepts and ends on fetch-next, and its rows, however many
        # and large, never come back to the server's own connection.
        windowed = request.window > 1
        subscribed = None
        if not windowed:
            self._listened.add(channel)
            subscribed = self.bus.subscribe(channel)
        first = [not windowed]

        def fetch_more(stream: Stream) -> None:
            d: "defer.Deferred[Any]" = pager.next_page()
            if first[0] and subscribed is not None:
                # The first row goes out only once Redis confirmed our
                # subscription, or an early "accepted" could be missed.
                first[0] = False
                d = defer.gatherResults([subscribed, d], consumeErrors=True)
                d.addCallback(lambda results: results[1])
            d.addCallbacks(lambda page: stream.receive(*page), self._stream_failed,
                           errbackArgs=(stream,))

        stream = Stream.open(
            channel,
            window=min(request.window, self.config.max_window),
            window_bytes=self.config.max_window_bytes,
            budget=None if windowed else self.echo_budget,
            row_timeout=self.config.row_timeout,
            clock=self._reactor,
            publish=self.publish,
            fetch_more=fetch_more,
            closed=self._stream_closed,
            version=version,
            on_first_row=self.stats.first_row_timer(),
        )
        self.stats.request("fetch", "ok")
        if stream.is_live:  # (a test double may have answered synchronously)
            self.streams[channel] = stream

    def _stream_failed(self, failure: Failure, stream: Stream) -> None:
        if isinstance(failure.value, defer.FirstError):
            failure = failure.value.subFailure
        if stream.is_live:
            if failure.check("eventsource.store.StatementTimeLimit"):
                # the client's query, not a fault of the server: no traceback
                log.warn("fetch on {channel} stopped: {reason}", channel=stream.channel,
                         reason=failure.value)
            elif not failure.check("eventsource.bus.ReplyChannelRefused"):
                # (a reply channel Redis refused us: the bus logged it, as a warning)
                log.failure("stream on {channel} failed", failure, channel=stream.channel)
            code, message = _failure_code(failure)
            stream.fail(str(failure.value) if stream.version == 1 else message, code)

    def _stream_closed(self, stream: Stream) -> None:
        channel = stream.channel
        if self.streams.get(channel) is stream:
            del self.streams[channel]
        self.stats.stream_closed(stream)
        log.debug("stream {channel} {state} after {rows} rows{reason}", channel=channel,
                  state=stream.state.value,
                  rows=stream.rows_sent,
                  reason=f": {stream.reason}" if stream.reason else "")
        if channel in self._listened:
            self._listened.discard(channel)
            self.bus.unsubscribe(channel).addErrback(_ignore_failure)

    def _fetch_next(self, request: Any) -> None:
        stream: Any = self.streams.get(request.channel) or self.subscriptions.get(request.channel)
        self.stats.request("fetch-next", "ok" if stream is not None else "ignored")
        if stream is not None:
            if request.end:
                stream.end()
            else:
                stream.accept(request.accepted)
        else:
            # Never answered (see _bad_request): the stream ended, or never was.
            log.debug("acceptance on {channel} ignored: no stream is open there",
                      channel=request.channel)

    # -- subscribe ------------------------------------------------------

    def _subscribe(self, request: wire.SubscribeRequest) -> None:
        """
        A subscription: history from the table, then the tailer's new events
        (docs/PROTOCOL.md, "Subscriptions"), on fetch-next acceptance only.
        """
        channel = request.channel
        if self._busy(channel):
            self.stats.request("subscribe", "refused")
            self._refuse(channel, "the reply channel is already streaming", 2)
            return
        if len(self.subscriptions) >= self.config.max_subscriptions:
            self.stats.request("subscribe", "refused")
            log.warn("refused subscribe on {channel}: {count} subscriptions open (the limit)",
                     channel=channel, count=len(self.subscriptions))
            self._reply_error(channel, "too many subscriptions", 2, "busy")
            return
        try:
            plan = query.compile_select(request.select, self.schema_subscribe, self.limits)
            matcher = compile_matcher(request.select.get("$where"), self.schema_v2)
        except query.QueryError as error:
            self._bad_request("subscribe", None, str(error), channel, 2, error.code)
            return
        store = self.store
        pagers: List[Any] = [None]

        def read_history(subscription: Subscription, after: int, high_water: int,
                         new_round: bool) -> None:
            if new_round or pagers[0] is None:
                pagers[0] = store.pager(plan, start=after, high_water=high_water)
            d: "defer.Deferred[Any]" = pagers[0].next_page()
            d.addCallbacks(lambda page: subscription.receive(*page), self._subscription_failed,
                           errbackArgs=(subscription,))

        tailer = self.tailer
        subscription = Subscription.open(
            channel,
            start=request.start,
            window=min(request.window, self.config.max_window),
            window_bytes=self.config.max_window_bytes,
            buffer_bytes=self.config.max_subscription_bytes,
            row_timeout=self.config.row_timeout,
            heartbeat=self.config.heartbeat,
            clock=self._reactor,
            publish=self.publish,
            publish_counted=self.bus.publish_counted,
            read_history=read_history,
            position=lambda: tailer.position or 0,
            closed=self._subscription_closed,
        )
        self.subscriptions[channel] = subscription
        self.stats.request("subscribe", "ok")
        log.debug("subscription on {channel} from {start}", channel=channel, start=request.start)
        tailer.join(subscription, matcher,
                    (plan.where_sql or "TRUE", plan.where_params) if matcher.sql else None)

    def _subscription_failed(self, failure: Failure, subscription: Subscription) -> None:
        if not subscription.is_live:
            return
        if failure.check("eventsource.store.StatementTimeLimit"):
            log.warn("subscription on {channel} stopped: {reason}",
                     channel=subscription.channel, reason=failure.value)
        elif not failure.check("eventsource.store.StoreStopping"):
            log.failure("subscription on {channel} failed", failure, channel=subscription.channel)
        code, message = _failure_code(failure)
        subscription.fail(message, code)

    def _subscription_closed(self, subscription: Subscription) -> None:
        channel = subscription.channel
        if self.subscriptions.get(channel) is subscription:
            del self.subscriptions[channel]
        self.tailer.leave(subscription)
        log.debug("subscription {channel} {state} after {rows} rows{reason}", channel=channel,
                  state=subscription.state.value, rows=subscription.rows_sent,
                  reason=f": {subscription.reason}" if subscription.reason else "")

    def _tail_failed(self, failure: Failure) -> None:
        """Reading the new events failed: no subscription can know what it missed."""
        code, message = _failure_code(failure)
        if self.subscriptions:
            log.warn("ending {count} subscriptions: reading new events failed ({error})",
                     count=len(self.subscriptions), error=failure.value)
        for subscription in list(self.subscriptions.values()):
            subscription.fail(message, code)

    # -- faults ---------------------------------------------------------

    def redis_lost(self) -> None:
        """The subscriber connection dropped: no acceptance can reach open streams."""
        # (the next connection subscribes to every request channel)
        self.persists_muted = False
        if self.streams or self.subscriptions:
            log.warn("Redis connection lost: ending {count} open streams and {subscriptions} "
                     "subscriptions", count=len(self.streams),
                     subscriptions=len(self.subscriptions))
        for stream in list(self.streams.values()):
            stream.fail("lost the Redis connection", "unavailable")
        for subscription in list(self.subscriptions.values()):
            subscription.fail("lost the Redis connection", "unavailable")


def _failure_code(failure: Failure) -> Tuple[str, str]:
    """
    The version 2 error code of a failed append or read, and a sentence for
    its client: the database's own messages (SQL, server internals) stay in
    the log.
    """
    if failure.check("eventsource.store.StoreStopping"):
        return "unavailable", "the server is shutting down"
    if failure.check("eventsource.store.StatementTimeLimit"):
        return "tooLarge", str(failure.value)
    if failure.check("eventsource.writer.VersionConflict"):
        return "busy", "other writers kept taking this append's versions; try again"
    if failure.check("eventsource.bus.ReplyChannelRefused"):
        return "refused", "Redis refused to publish on the reply channel"
    if failure.check("pymysql.err.OperationalError", "pymysql.err.InterfaceError"):
        return "unavailable", "the database could not be reached"
    if failure.check("eventsource.store.StoreNotRunning"):
        return "unavailable", "the database is not connected"
    return "internal", "the server failed to handle the request (its log says why)"


def claim_key(prefix: str, channel: str, body: Any) -> str:
    """
    The Redis key of a request's claim in replica mode:
    ``<prefix>claim:<digest>``, the digest a hash of the request channel
    (its kind, and its tenant in tenant mode) and the exact body.
    """
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else bytes(body)
    digest = hashlib.sha256(channel.encode("utf-8", "surrogatepass") + b"\n" + data)
    return f"{prefix}claim:{digest.hexdigest()[:32]}"


def replica_name() -> str:
    """This process among the replicas, for the claims it takes: host, pid, a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def make_server(config: Config, reactor: Any = None,
                stop_reactor_on_failure: bool = True) -> EventSourceService:
    """
    The server on the real Redis (:class:`RedisBus`) and MariaDB (:class:`Store`),
    on ``reactor`` (the global one when omitted: the boundaries need a whole
    reactor, with TCP and threads, not a clock).
    """
    from eventsource.bus import RedisBus
    from eventsource.store import Store

    if reactor is None:
        from twisted.internet import reactor
    server = EventSourceService(config, reactor, store=Store(config, reactor),
                                bus=partial(RedisBus, config, reactor),
                                stop_reactor_on_failure=stop_reactor_on_failure)
    if config.http_port is not None:
        from eventsource.http import HTTPService

        HTTPService(server, reactor).setServiceParent(server)
    return server
