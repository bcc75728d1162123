"""
:class:`Subscription`: the events matching a filter from a position on, then
every new one as it is committed, forever (docs/PROTOCOL.md, "Subscriptions"),
as an async iterator that survives the server's ends.

One subscription of the client is a series of ``subscribe`` requests
(:class:`~eventsource.client._requests.SubscribeRequest`), each from the
position the previous one had reached: after a ``"timeout"``, an
``unavailable`` error, a server restart (no server, then one again), a Redis
outage (the subscriber connection lost and made again) or a silence longer
than two heartbeats, the next request starts ``"from"`` the last position
the consumer was handed (or the last marker's, when later), so the consumer
sees every event once, in order.  Refusals that a new request would get
again (a bad filter, an old server) are raised.
"""

import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Union

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from eventsource.client._errors import (
    EventSourceError,
    NoServerError,
    RedisConnectionError,
    ReplyTimeout,
    ServerError,
    StreamTimeout,
)
from eventsource.client._events import VERSION_2, RecordedEvent, RetryPolicy
from eventsource.client._requests import CAUGHT_UP, END_OF_ROWS, Marker, SubscribeRequest
from eventsource.wire import FROM_END, FROM_START, encode_body

if TYPE_CHECKING:
    from eventsource.client._client import EventSourceClient

log = Logger()

#: where a subscription starts: ``"start"``, ``"end"`` or a position (exclusive)
Start = Union[int, str]
#: the server's ``--heartbeat`` default, in seconds
DEFAULT_HEARTBEAT = 15.0
#: the window a subscription asks for (the server's default)
DEFAULT_SUBSCRIPTION_WINDOW = 100
#: how a subscription backs off between attempts that heard nothing
#: (the retry count is not used: it subscribes again for as long as it is open)
DEFAULT_RESUBSCRIBE = RetryPolicy(initial_delay=0.1, max_delay=2.0)


def check_start(start: Any) -> Start:
    """``start`` if it is where a subscription may start, else ``ValueError``."""
    if start in (FROM_START, FROM_END) and isinstance(start, str):
        return start
    if type(start) is int and start >= 0:
        return start
    raise ValueError(f"start must be {FROM_START!r}, {FROM_END!r} or a position (an int "
                     f">= 0), not {start!r:.60}")


class _Link:
    """
    What a :class:`Subscription` holds open: its request of the moment and
    its pause between attempts.  Apart from the subscription, so that
    dropping the subscription (a loop left with ``break``) can end them.
    """

    def __init__(self) -> None:
        self.request: Optional[SubscribeRequest] = None
        self.sleeping: Optional[Deferred] = None
        self.closed = False

    def close(self) -> Deferred:
        self.closed = True
        if self.sleeping is not None:
            self.sleeping.cancel()
        request, self.request = self.request, None
        if request is None:
            return defer.succeed(None)
        return request.close()


class Subscription:
    """
    The events matching ``where`` after ``start``, then every new one as it
    is committed, as an async iterator of :class:`RecordedEvent` that never
    ends on its own (made by :meth:`EventSourceClient.subscribe`)::

        async for event in client.subscribe({"domain": "order"}, start=last_position):
            apply(event)
            save(event.position)

    Each event is accepted when the next one is asked for (in batches, as a
    windowed fetch).  Leaving the loop (``break``, an exception, dropping the
    subscription) or :meth:`aclose` tells the server ``end``.

    It subscribes again by itself, from :attr:`position`, after the server's
    ``"timeout"`` (the consumer took longer than the server's row timeout
    over an event), an ``unavailable`` or ``busy`` error (the server is
    shutting down, lost its database or Redis, or has too many
    subscriptions), a Redis outage, no server listening once one had
    answered (a restart), and a silence of ``2 × heartbeat`` seconds while
    the consumer waits (a server that stopped without a word), pausing
    between attempts that heard nothing as ``retry`` says.  The consumer sees
    each event once, in position order, across all of them.

    It raises what another attempt would meet again: the server's refusal
    of the request (:class:`BadRequest`, :class:`Refused`,
    :class:`TooLarge`...), :class:`ServerTooOld`, :class:`NoServerError`
    before any server answered, and :class:`RedisConnectionError` once the
    client is disconnected.
    """

    def __init__(self, client: "EventSourceClient", where: Optional[Mapping[str, Any]] = None,
                 start: Start = FROM_START, *, window: int = DEFAULT_SUBSCRIPTION_WINDOW,
                 table: Optional[str] = None, heartbeat: float = DEFAULT_HEARTBEAT,
                 on_caught_up: Optional[Callable[[int], Any]] = None,
                 until_caught_up: bool = False, retry: Optional[RetryPolicy] = None,
                 timeout: Optional[float] = None):
        if where is not None and not isinstance(where, Mapping):
            raise ValueError(f"where must be a $where object (a dict), not {where!r:.60}")
        start = check_start(start)
        if type(window) is not int or window < 1:
            raise ValueError("window must be an integer of at least 1")
        if not (isinstance(heartbeat, (int, float)) and 0 < heartbeat < float("inf")):
            raise ValueError("heartbeat must be a number of seconds > 0")
        select: Dict[str, Any] = {}
        if where:
            select["$where"] = dict(where)
        if table is not None:
            select["$from"] = table
        self._query = {"$select": select}
        encode_body(self._query)  # TypeError now, not inside the request
        self._client = client
        self._start = start
        self._window = window
        self.heartbeat = float(heartbeat)
        self._on_caught_up = on_caught_up
        self._until_caught_up = until_caught_up
        self._retry = DEFAULT_RESUBSCRIBE if retry is None else retry
        self._timeout = client.timeout if timeout is None else timeout
        #: the position of the last event handed out, or of the last marker
        #: when later (every matching event up to it has been handed out);
        #: ``None`` before anything is known of a subscription from ``"end"``
        self.position: Optional[int] = (0 if start == FROM_START else
                                        None if start == FROM_END else int(start))
        #: whether the server said ``caughtUp`` once (it stays true)
        self.caught_up = False
        #: subscribe requests made so far (the first, and every resubscription)
        self.attempts = 0
        #: events handed out so far
        self.events = 0
        #: the error that made the last resubscription (``None``: a plain ``"end"``)
        self.last_error: Optional[EventSourceError] = None
        self._link = _Link()
        # attempts in a row that heard nothing from the server
        self._failures = 0
        # whether any attempt heard the server: "no server" is then a restart
        self._heard = False
        self._finalizer = weakref.finalize(self, self._link.close)
        self._finalizer.atexit = False

    def __repr__(self) -> str:
        return (f"<Subscription {self._query!r:.80} at {self.position} "
                f"({self.attempts} attempts)>")

    @property
    def channel(self) -> Optional[str]:
        """The reply channel of the request of the moment (``None`` between two)."""
        request = self._link.request
        return None if request is None else request.channel

    @property
    def pending(self) -> int:
        """
        Events (and markers) received and not handed out yet: while it is
        above 0 the next event comes without waiting for the server, so a
        consumer that commits its work in batches may wait for 0.
        """
        request = self._link.request
        return 0 if request is None else request.buffered

    @property
    def closed(self) -> bool:
        """Whether it was closed (:meth:`aclose`, ``until_caught_up``, an error raised)."""
        return self._link.closed

    # -- the consumer ----------------------------------------------------------

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> RecordedEvent:
        while True:
            if self._link.closed:
                self._finalizer.detach()
                raise StopAsyncIteration
            try:
                if self._link.request is None:
                    await self._open()
                    continue
                item = await self._link.request.next_row()
            except EventSourceError as error:
                self._ended(error)
                continue
            if item is END_OF_ROWS:
                # the server's "end" without a word (or ours: closed)
                self._ended(None)
                continue
            self._failures = 0
            self._heard = True
            if isinstance(item, Marker):
                self._take_marker(item)
                continue
            event: RecordedEvent = item
            if self.position is not None and event.position <= self.position:
                log.warn("subscription on {channel}: ignored event at position {position}, "
                         "not after {last}", channel=self.channel, position=event.position,
                         last=self.position)
                continue
            self.position = event.position
            self.events += 1
            return event

    def next_event(self) -> Deferred:
        """
        Callback style: a Deferred firing with the next event (accepting the
        one before), or with ``None`` once the subscription is closed.
        """
        async def next_or_none() -> Optional[RecordedEvent]:
            try:
                return await self.__anext__()
            except StopAsyncIteration:
                return None

        return Deferred.fromCoroutine(next_or_none())

    def aclose(self) -> Deferred:
        """Stop: tell the server ``end`` and leave the reply channel; fires once sent."""
        self._finalizer.detach()
        return self._link.close()

    async def __aenter__(self) -> "Subscription":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- attempts ----------------------------------------------------------------

    async def _open(self) -> None:
        """Make the next request, after the pause its failures call for."""
        if self._failures:
            await self._pause(self._retry.delay(self._failures - 1))
        if not self.attempts:
            await self._client.require_version_2(self._timeout)
        if self._link.closed:
            return
        # (the first request says what it was asked; later ones, where it got to)
        start = self._start if self.position is None or not self.attempts else self.position
        body: Dict[str, Any] = {"v": VERSION_2, "query": self._query, "window": self._window,
                                "from": start}
        self._link.request = SubscribeRequest(self._client, body, 2 * self.heartbeat,
                                              self._window)
        self.attempts += 1
        log.debug("subscription on {channel} from {start}", channel=self.channel,
                  start=body["from"])

    async def _pause(self, delay: float) -> None:
        sleeping = deferLater(self._client._clock, delay, lambda: None)
        self._link.sleeping = sleeping
        self._client._backoffs.add(sleeping)
        try:
            await sleeping
        except defer.CancelledError:
            if self._link.closed:
                return
            if self._client._disconnecting:
                raise RedisConnectionError("the client was disconnected") from None
            raise
        finally:
            self._link.sleeping = None
            self._client._backoffs.discard(sleeping)

    def _ended(self, error: Optional[EventSourceError]) -> None:
        """The request of the moment is over: raise ``error``, or subscribe again later."""
        request, self._link.request = self._link.request, None
        if self._link.closed:
            return
        if error is not None and not self._retryable(error):
            self._link.close()
            self._finalizer.detach()
            raise error
        self._failures += 1
        self.last_error = error
        why = "the server ended it" if error is None else str(error)
        log.info("subscription on {channel}: {why}; subscribing again from position "
                 "{position} (attempt {attempt})", channel=None if request is None
                 else request.channel, why=why, position=self.position,
                 attempt=self.attempts + 1)

    def _retryable(self, error: EventSourceError) -> bool:
        """Whether another attempt may go on where ``error`` stopped this one."""
        if self._client._disconnecting:
            return False
        if isinstance(error, (StreamTimeout, ReplyTimeout, RedisConnectionError)):
            return True
        if isinstance(error, NoServerError):
            return self._heard  # a server answered before: it is restarting
        if isinstance(error, ServerError):
            return error.retryable  # unavailable, busy
        return False  # ServerTooOld, BadReply

    def _take_marker(self, marker: Marker) -> None:
        if self.position is None or marker.position > self.position:
            self.position = marker.position
        if marker.kind != CAUGHT_UP:
            return
        self.caught_up = True
        if self._until_caught_up:
            self._link.close()
        if self._on_caught_up is not None:
            try:
                self._on_caught_up(marker.position)
            except BaseException:
                self._link.close()
                self._finalizer.detach()
                raise
