"""
The writer lease of replica mode (``--writer-lease``, docs/OPERATIONS.md
"The writer lease").

Replicas that all write contend for the append lock: each takes it for its
own group commit, so the persists of two replicas commit in half-size
batches, one replica at a time, and two replicas write fewer events a second
than one.  With the lease, one replica at a time (the holder of a key in
Redis) claims the persists; the others leave them to it and serve fetches
and subscriptions.  The lease routes the load, it does not guard anything:
each persist is still claimed before it is served, and every writer still
takes the append lock, so two replicas that both believe they hold the lease
for a moment (a stalled holder whose lease expired) write each persist once
and in commit order all the same.
"""

from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

#: attempts (to take or renew the lease) per lease time: a holder renews
#: it three times before it would expire
ATTEMPTS_PER_TTL = 4


class WriterLease:
    """
    Holds, or watches, the lease ``key`` in Redis for ``owner``.

    Every ``ttl / 4`` seconds, while ``eligible()`` (serving, and reaching
    its database), it asks the bus to take or renew the lease; the answer
    names the holder.  :meth:`leaves_persists` is true while another replica
    was seen holding it within the last ``ttl``: persists are then left to
    that replica.  When the lease could not be asked (Redis away), nobody is
    known to hold it and this replica claims persists as without a lease.
    While not eligible it gives up a lease it holds, so another replica
    takes it at its next attempt.

    :param bus: a callable returning the :class:`eventsource.interfaces.IEventBus`
        (the service's bus may be made after this)
    :param changed: called after every answer, failure or give-up, and
        before every attempt (an answer may have grown stale): whoever
        holds the lease may have changed
    """

    def __init__(self, bus: Callable[[], Any], clock: IReactorTime, key: str, owner: str,
                 ttl: float, eligible: Callable[[], bool],
                 changed: Optional[Callable[[], None]] = None) -> None:
        self._bus = bus
        self._changed = changed or (lambda: None)
        self._clock = clock
        self.key = key
        self.owner = owner
        self.ttl = ttl
        self.interval = ttl / ATTEMPTS_PER_TTL
        self._eligible = eligible
        #: the holder named by the last answer (None: nobody, or not known)
        self.holder: Optional[str] = None
        #: when that answer came (the clock's seconds)
        self._answered_at = 0.0
        self._asking = False
        self._call: Any = None
        self._stopped = True
        #: the last attempt failed (logged once until one is answered)
        self._failing = False

    @property
    def held(self) -> bool:
        """This replica holds the lease (as of the last answer)."""
        return self.holder == self.owner and self._fresh()

    def leaves_persists(self) -> bool:
        """Another replica holds the lease: persists are its to serve."""
        return self.holder is not None and self.holder != self.owner and self._fresh()

    def _fresh(self) -> bool:
        return float(self._clock.seconds()) - self._answered_at < self.ttl

    def start(self) -> None:
        if not self._stopped:
            return
        self._stopped = False
        self._attempt()

    def stop(self) -> "defer.Deferred[None]":
        """No more attempts; a lease held is given up (its Deferred fires when Redis took that)."""
        self._stopped = True
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        return self._give_up()

    def _give_up(self) -> "defer.Deferred[None]":
        was_held = self.holder == self.owner
        self.holder = None
        self._changed()
        if not was_held:
            return defer.succeed(None)
        log.info("gave up the writer lease: another replica takes the persists")
        d: "defer.Deferred[None]" = self._bus().release_lease(self.key, self.owner)
        d.addErrback(self._release_failed)
        return d

    def _release_failed(self, failure: Failure) -> None:
        log.warn("could not give up the writer lease ({error}); it expires within "
                 "{ttl} s", error=failure.getErrorMessage(), ttl=self.ttl)

    def _attempt(self) -> None:
        self._call = self._clock.callLater(self.interval, self._attempt)
        self._changed()
        if self._asking:
            return  # (the last attempt is still out: Redis is slow or away)
        if not self._eligible():
            self._give_up()
            return
        self._asking = True
        try:
            d: "defer.Deferred[Optional[str]]" = self._bus().lease(self.key, self.owner,
                                                                  self.ttl)
        except Exception:
            d = defer.fail()
        d.addCallbacks(self._answered, self._failed)

    def _answered(self, holder: Optional[str]) -> None:
        self._asking = False
        self._failing = False
        if self._stopped:
            if holder == self.owner:
                self.holder = holder
                self._give_up()
            return
        before = self.holder if self._fresh() else None
        self.holder, self._answered_at = holder, float(self._clock.seconds())
        self._changed()
        if holder == before:
            return
        if holder == self.owner:
            log.info("this replica holds the writer lease: it writes the persists",
                     lease_key=self.key)
        elif holder is not None and before == self.owner:
            log.warn("the writer lease went to {holder}: persists are left to it",
                     holder=holder, lease_key=self.key)
        elif holder is not None:
            log.info("the writer lease is held by {holder}: persists are left to it",
                     holder=holder, lease_key=self.key)

    def _failed(self, failure: Failure) -> None:
        self._asking = False
        self.holder = None
        if self._stopped:
            return
        self._changed()
        failing, self._failing = self._failing, True
        if not failing:
            log.warn("could not ask Redis for the writer lease ({error}): this replica "
                     "claims persists as if nobody held it", error=failure.getErrorMessage())
