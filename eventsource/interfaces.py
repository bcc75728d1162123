"""
The server's boundaries, declared.

:class:`eventsource.service.EventSourceService` talks to Redis and MariaDB
only through these: the real :class:`eventsource.bus.RedisBus` and
:class:`eventsource.store.Store`, and the in-memory doubles of
:mod:`eventsource.testing`, all provide them, and a test checks each one
with ``zope.interface.verify.verifyObject``, so the doubles cannot drift
from what they stand in for.
"""

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from zope.interface import Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from eventsource.query import InsertPlan, SelectPlan

#: what :meth:`IEventStore.read_page` fires with: ``(high_water, bodies,
#: last_keyset, cut)``
Page = Tuple[int, List[str], Optional[int], bool]


class IEventBus(Interface):
    """Pub/sub with the outside world (Redis)."""

    def start() -> "Deferred[Any]":
        """
        Connect and subscribe to the request channels; a Deferred that fires
        once requests can be taken and answered, or fails if they never can.
        """

    def stop() -> "Deferred[Any]":
        """Disconnect and stop reconnecting; a Deferred that fires when done."""

    def publish(channel: str, body: str) -> None:
        """Send ``body`` on ``channel``; nothing to wait for (a lost message is the client's timeout)."""

    def publish_counted(channel: str, body: str) -> "Deferred[int]":
        """Send ``body`` on ``channel``; a Deferred firing with the number of clients that got it."""

    def subscribe(channel: str) -> "Deferred[Any]":
        """Listen on a reply channel; a Deferred that fires once Redis confirmed it."""

    def unsubscribe(channel: str) -> "Deferred[Any]":
        """Stop listening on a reply channel; a Deferred."""

    def claim(key: str, owner: str, ttl: float) -> "Deferred[bool]":
        """
        Take ``key`` for ``owner`` for ``ttl`` seconds unless someone holds
        it (Redis ``SET key owner NX PX``): a Deferred firing True when this
        call took it, False when it was taken already, or failing when Redis
        could not be asked (replicas, docs/OPERATIONS.md "Replicas").
        """

    def lease(key: str, owner: str, ttl: float) -> "Deferred[Optional[str]]":
        """
        Take ``key`` for ``owner`` for ``ttl`` seconds unless another holds
        it, or renew it when ``owner`` holds it: a Deferred firing with the
        holder after the attempt (``owner``: held; None: nobody), or failing
        when Redis could not be asked (docs/OPERATIONS.md "The writer lease").
        """

    def release_lease(key: str, owner: str) -> "Deferred[None]":
        """Give up ``key`` if ``owner`` holds it; a Deferred."""


class IPager(Interface):
    """One query's result, read a page at a time, holding nothing in between."""

    def next_page() -> "Deferred[Tuple[List[str], bool]]":
        """A Deferred that fires with ``(bodies, exhausted)``: encoded rows, and whether they were the last."""


class IEventStore(Interface):
    """The events table (MariaDB)."""

    def start() -> "Deferred[Any]":
        """Connect and make sure the table is there; a Deferred firing with the changes made (for the log)."""

    def stop() -> "Deferred[Any]":
        """Drop queued work, stop running statements, close the connections; a Deferred."""

    def ping() -> "Deferred[Any]":
        """A trivial statement on a pool connection (the readiness check); a Deferred."""

    def probe() -> "Deferred[Any]":
        """
        A trivial statement on a connection of its own, with short timeouts
        (whether the database can be reached at all, however busy or stuck
        the pool is: replica mode's check); a Deferred.
        """

    def drop_reads() -> None:
        """Shutdown began: fail reads not started, stop running ones (no stream waits for them)."""

    def insert(plan: "InsertPlan") -> "Deferred[Tuple[int, int]]":
        """
        Append the rows of an :class:`eventsource.query.InsertPlan`
        atomically; a Deferred firing with ``(affected_rows, insert_id)``.
        """

    def append(plan: "InsertPlan") -> "Deferred[Any]":
        """
        Append a version 2 persist atomically, its expected versions
        checked and its event ids kept: a Deferred firing with an
        :class:`eventsource.appends.Appended` (``duplicate`` when every event
        id was stored already), or failing with an
        :class:`eventsource.appends.AppendRefused`.
        """

    def pager(plan: "SelectPlan", start: Optional[int] = None,
              high_water: Optional[int] = None) -> "IPager":
        """
        An :class:`IPager` over the rows of an :class:`eventsource.query.SelectPlan`
        (keyset plans: after ``start``, up to ``high_water`` when given).
        """

    def high_water() -> "Deferred[int]":
        """The largest position of the table (0 when it is empty)."""

    def read_tail(after: int, size: int) -> "Deferred[List[Tuple[int, str, Tuple[Any, ...]]]]":
        """
        The events after position ``after`` (at most ``size``), in position
        order, as ``(position, body, event)``: the version 2 row and the
        fields of :data:`eventsource.matcher.EVENT_FIELDS`.
        """

    def match_rows(conditions: List[Tuple[str, Tuple[Any, ...]]],
                   positions: List[int]) -> "Deferred[Dict[int, Tuple[bool, ...]]]":
        """Whether the events at ``positions`` meet each compiled condition, as MariaDB decides."""

    def on_commit(listener: Any) -> None:
        """Call ``listener()`` after each transaction of the server's writer commits."""

    def read_page(plan: "SelectPlan", high_water: Optional[int], position: int, size: int,
                  max_bytes: Optional[int] = None) -> "Deferred[Page]":
        """
        One page for a pager: a Deferred firing with ``(high_water, bodies,
        last_keyset, cut)`` (see :class:`eventsource.store.Pager`).
        """

