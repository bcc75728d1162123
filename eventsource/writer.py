"""
The write path: how the one writer of a server appends persists.

Persists queue in the :class:`GroupCommitWriter`, which writes them in
batches, one transaction each; :func:`_insert_batch` is that transaction
(run in a pool thread by :class:`eventsource.store.Store`): the append lock,
the streams' next versions, the expected-version checks of version 2, the
event ids, the positions, the INSERT, the COMMIT, and what a refusal means
(a duplicate key: another writer took a version, or a request repeats event
ids already stored; a deadlock or a Galera certification conflict: another
writer's transaction went first).  The decisions
themselves are :mod:`eventsource.appends`'s; the SQL is
:mod:`eventsource.schema`'s.
"""

import random
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Set, Tuple

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from eventsource import appends, ids, schema

#: adbapi's Transaction: a pymysql cursor over the interaction's connection
Txn = Any

log = Logger()


class BatchStore(Protocol):
    """What the writer writes through (:class:`eventsource.store.Store`)."""

    def _write(self, batch: List[Any]) -> "defer.Deferred[Any]":
        """Write the requests of ``batch`` in one transaction; fires with their outcomes."""


#: MariaDB's ER_DUP_ENTRY (a version or event id taken by another writer)
#: and ER_LOCK_DEADLOCK (a deadlock, or on Galera a transaction that another
#: node's conflicting one aborted or that certification refused, at COMMIT
#: too): the batch is run again
RETRIED_ERRORS = frozenset({1062, 1213})

#: how many times a batch is written again after a duplicate version
VERSION_RETRIES = 5

#: MariaDB's ER_LOCK_DEADLOCK
DEADLOCK = 1213

#: how many times a batch is written again after a deadlock or a refused
#: certification (each means another writer's transaction committed first)
CONFLICT_RETRIES = 50

#: the longest pause, in seconds, before a batch is written again after a
#: conflict: the n-th waits a random time up to ``min(CONFLICT_PAUSE,
#: 0.001 * 2 ** (n - 1))``, so that writers that keep meeting each other
#: stop doing so in step
CONFLICT_PAUSE = 0.05


class VersionConflict(Exception):
    """Other writers kept taking the versions a batch was given, or kept committing first."""


#: MariaDB's ER_DUP_ENTRY
DUPLICATE_KEY = 1062

#: a stream as the ``pid_version`` key compares pids (trailing spaces ignored)
_stream = appends.stream_of

#: one request's outcome in a batch: ``(affected_rows, insert_id)`` for
#: version 1, :class:`appends.Appended` or an :class:`appends.AppendRefused`
#: for version 2
Outcome = Any


def _last_versions(txn: Txn, table: str, streams: List[str]) -> Dict[str, int]:
    """stream -> its last version, for the streams that have events."""
    txn.execute(schema.last_versions_sql(table, len(streams)), streams)
    return {_stream(pid): int(version) for pid, version in txn.fetchall() if pid is not None}


def _top_and_versions(txn: Txn, table: str, streams: List[str]) -> Tuple[int, Dict[str, int]]:
    """The table's largest position and the streams' last versions, in one statement."""
    txn.execute(schema.last_versions_sql(table, len(streams), top=True), streams)
    top = 0
    last = {}
    for pid, value in txn.fetchall():
        if pid is not None:
            last[_stream(pid)] = int(value)
        elif value is not None:
            top = int(value)
    return top, last


def _stored_events(txn: Txn, table: str, event_ids: List[bytes]) -> Dict[bytes, appends.Stored]:
    """event id -> ``(pid, version, position)`` of those of ``event_ids`` that are stored."""
    if not event_ids:
        return {}
    txn.execute(schema.stored_events_sql(table, len(event_ids)), event_ids)
    return {bytes(event_id): (pid, int(version), int(position))
            for event_id, pid, version, position in txn.fetchall()}


def _as_append(request: Any) -> appends.Append:
    """A batch item: an :class:`appends.Append`, or the bare rows of a version 1 persist."""
    return request if isinstance(request, appends.Append) else appends.Append(tuple(request))


def _pause(seconds: float) -> None:
    """Wait, in the pool thread that runs the transaction (the reactor's is never blocked)."""
    time.sleep(seconds)


def _lock_appends(txn: Txn, lock_sql: str) -> None:
    """
    Take the append lock (the first statement of the transaction, so that
    its positions are allocated and its reads made under it); a lock row
    someone deleted is made again.
    """
    txn.execute(schema.lock_append_sql(lock_sql))
    if txn.rowcount == 0:
        txn.execute(schema.restore_lock_row_sql(lock_sql))


def _insert_batch(txn: Txn, table: str, batch: List[Any], consecutive_ids: bool,
                  known: Optional[Dict[str, int]] = None,
                  lock_sql: Optional[str] = None) -> Tuple[List[Outcome], Dict[str, int]]:
    """
    Append the requests of a batch (:class:`appends.Append`, or version 1's
    bare rows) in one transaction, and commit it: each request's expected
    versions checked against its streams as the requests before it in the
    batch leave them, then its rows given their streams' next versions (in
    request order), event ids (the client's, or new UUIDv7s) and positions.

    ``consecutive_ids``: auto-increment gives the rows of one INSERT
    consecutive ids (a single MariaDB, see :func:`_autoinc_settings`), and
    is left to allocate positions; otherwise (Galera steps ids by the
    cluster size, from each node's own offset) the writer gives each row
    its position itself: the next after the table's largest, read under the
    append lock (see :func:`_write_attempt`).  ``known``: the last versions
    of some of the batch's streams as this server committed them; the others
    are read (one statement; with positions given, all are read).  Returns
    each request's outcome (see :data:`Outcome`) and the streams' new last
    versions.  ``txn`` commits with ``txn.commit()`` (the store's
    transaction does, see :class:`eventsource.store.Store`).

    A duplicate key rolls the transaction back.  When requests carry the
    client's event ids, those already stored are looked up (one statement):
    a request whose events are all stored is answered as the duplicate of
    its first append, one partly stored is refused, and the rest is written
    again.  Otherwise another writer took a version: the batch is written
    again on versions all read anew, at most :data:`VERSION_RETRIES` times.
    A deadlock, or on Galera a conflict with another node's transaction (a
    statement or the COMMIT refused with 1213: the transaction was rolled
    back), is written again the same way, after a short random pause (see
    :data:`CONFLICT_PAUSE`), at most :data:`CONFLICT_RETRIES` times.  Every
    try writes the same event ids, so a request is stored at most once
    whatever is retried.
    """
    import pymysql

    requests = [_as_append(request) for request in batch]
    made = iter(ids.uuid7.many(sum(len(r.rows) for r in requests if r.event_ids is None)))
    event_ids = [r.event_ids or tuple(next(made) for _ in r.rows) for r in requests]
    #: request index -> its outcome, known whatever happens to the others
    settled: Dict[int, Outcome] = {}
    known = dict(known or {})
    retries = {DUPLICATE_KEY: 0, DEADLOCK: 0}
    while True:
        try:
            result = _write_attempt(txn, table, requests, event_ids, settled, known,
                                    consecutive_ids, lock_sql)
            # (here, not after the interaction: a COMMIT that certification
            # refuses is retried as the statements before it are)
            txn.commit()
            return result
        except pymysql.err.MySQLError as error:
            code = error.args[0] if error.args else None
            if code not in RETRIED_ERRORS:
                raise
            txn.connection.rollback()
            known = {}
            if code == DUPLICATE_KEY and _settle_repeats(txn, table, requests, settled):
                continue
            retries[code] += 1
            most = VERSION_RETRIES if code == DUPLICATE_KEY else CONFLICT_RETRIES
            if retries[code] > most:
                what = ("versions kept being taken by another writer" if code == DUPLICATE_KEY
                        else "other writers' transactions kept committing first")
                raise VersionConflict(f"{what} ({most} retries)") from error
            if code == DUPLICATE_KEY:
                log.info("a batch of persists met versions taken by another writer ({error});"
                         " writing it again ({attempt} of {retries})", error=error,
                         attempt=retries[code], retries=most)
            else:
                log.info("a batch of persists met another writer's transaction, which committed"
                         " first ({error}); writing it again ({attempt} of {retries})",
                         error=error, attempt=retries[code], retries=most)
                _pause(random.uniform(0, min(CONFLICT_PAUSE, 0.001 * 2 ** (retries[code] - 1))))


def _settle_repeats(txn: Txn, table: str, requests: List[appends.Append],
                    settled: Dict[int, Outcome]) -> bool:
    """
    After a duplicate key (the transaction rolled back): settle the requests
    whose client event ids are stored already (duplicates, or conflicts);
    whether any was.  When requests are left to write, the transaction of
    this read ends here: the next try must read the versions and positions
    in a snapshot taken under the append lock, not in this one.
    """
    pending = [i for i, request in enumerate(requests)
               if i not in settled and request.event_ids is not None]
    wanted = [event_id for i in pending for event_id in requests[i].event_ids or ()]
    if not wanted:
        return False
    stored = _stored_events(txn, table, wanted)
    found = False
    for i in pending:
        outcome = appends.repeated(requests[i], stored)
        if outcome is not None:
            settled[i] = outcome
            found = True
    if len(settled) < len(requests):
        txn.connection.rollback()
    return found


def _number(requests: List[appends.Append], live: List[int], event_ids: List[Tuple[bytes, ...]],
            last: Dict[str, int]) -> Tuple[Dict[int, Outcome], Dict[int, List[Tuple[Any, ...]]]]:
    """
    Check and number the ``live`` requests in order, from ``last`` (updated
    in place): returns the refused ones' errors and the others' full rows.
    """
    refused: Dict[int, Outcome] = {}
    numbered: Dict[int, List[Tuple[Any, ...]]] = {}
    for i in live:
        request = requests[i]
        if request.expected:
            wrong = appends.check(request.expected, last)
            if wrong is not None:
                refused[i] = wrong
                continue
        rows = []
        for row, event_id in zip(request.rows, event_ids[i]):
            stream = _stream(row[0])
            version = last.get(stream, -1) + 1
            last[stream] = version
            rows.append(tuple(row) + (version, event_id))
        numbered[i] = rows
    return refused, numbered


def _write_attempt(txn: Txn, table: str, requests: List[appends.Append],
                   event_ids: List[Tuple[bytes, ...]], settled: Dict[int, Outcome],
                   known: Dict[str, int], consecutive_ids: bool,
                   lock_sql: Optional[str] = None) -> Tuple[List[Outcome], Dict[str, int]]:
    """
    One try of :func:`_insert_batch`, in its transaction, up to its COMMIT.

    Positions commit in position order because every writer takes the
    append lock first and allocates its positions after it.  With
    auto-increment (``consecutive_ids``) that holds on one MariaDB, whose one
    counter is past every committed id.  Otherwise the positions are the
    next after the table's largest ``id``, read under the lock (with the
    versions: one statement): every transaction that took the lock before
    committed first (on Galera, on this node too: certification lets no two
    transactions that changed the lock row commit unless the later one's
    node had the earlier one's rows when it took the lock), so no committed
    position is above them and none will be below them later; positions are
    then dense, whatever ids each node's auto-increment would have given.
    """
    live = [i for i in range(len(requests)) if i not in settled]
    if not live:
        return [settled[i] for i in range(len(requests))], {}
    if lock_sql is not None:
        # (first: the versions are then read as the last writer left them)
        _lock_appends(txn, lock_sql)
    streams = sorted({_stream(row[0]) for i in live for row in requests[i].rows})
    top: Optional[int] = None
    remembered = False
    if consecutive_ids:
        last = {stream: known[stream] for stream in streams if stream in known}
        remembered = bool(last)
        unknown = [stream for stream in streams if stream not in known]
        if unknown:
            last.update(_last_versions(txn, table, unknown))
    else:
        top, last = _top_and_versions(txn, table, streams)
    refused, numbered = _number(requests, live, event_ids, last)
    if refused and remembered:
        # An expected version judged on remembered versions: another writer
        # may have appended since, so judge every check on versions read now.
        last = _last_versions(txn, table, streams)
        refused, numbered = _number(requests, live, event_ids, last)
    repeats = [i for i in refused if requests[i].event_ids is not None]
    if repeats:
        # A request repeated after its first append committed fails its
        # expected version; its events being stored says it is a duplicate.
        stored = _stored_events(txn, table, [e for i in repeats for e in requests[i].event_ids or ()])
        for i in repeats:
            outcome = appends.repeated(requests[i], stored)
            if outcome is not None:
                refused[i] = outcome
    written = [i for i in live if i in numbered]
    outcomes: List[Outcome] = [settled.get(i, refused.get(i)) for i in range(len(requests))]
    if written:
        firsts = _insert_numbered(txn, table, [numbered[i] for i in written], consecutive_ids, top)
        for i, (affected, first) in zip(written, firsts):
            if not requests[i].detailed:
                outcomes[i] = (affected, first)
                continue
            outcomes[i] = appends.Appended(tuple(
                appends.Event(row[-1], row[0], row[-2], first + k)
                for k, row in enumerate(numbered[i])))
    return outcomes, last


def _insert_numbered(txn: Txn, table: str, batch: List[List[Tuple[Any, ...]]],
                     consecutive_ids: bool, top: Optional[int] = None) -> List[Tuple[int, int]]:
    """
    Insert every request's rows with one statement; returns each request's
    ``(rows, first position)``.  With ``top`` the rows are given the
    positions after it; otherwise auto-increment allocates them, which must
    then be consecutive (``innodb_autoinc_lock_mode`` 0 or 1 and an
    increment of 1): each request's first follows from its place.
    """
    rows = [row for request in batch for row in request]
    if top is not None:
        txn.execute(schema.insert_sql(table, len(rows), positions=True),
                    [value for k, row in enumerate(rows, top + 1) for value in (k,) + row])
        first = top + 1
    elif consecutive_ids:
        txn.execute(schema.insert_sql(table, len(rows)), [value for row in rows for value in row])
        first = txn.lastrowid
    else:
        raise ValueError("auto-increment ids that are not consecutive need the positions given")
    if txn.rowcount != len(rows):
        raise RuntimeError(f"inserted {txn.rowcount} rows of {len(rows)}")
    results = []
    for request in batch:
        results.append((len(request), first))
        first += len(request)
    return results


def _autoinc_settings(txn: Txn) -> bool:
    txn.execute("SELECT @@innodb_autoinc_lock_mode, @@auto_increment_increment")
    lock_mode, increment = txn.fetchone()
    return int(lock_mode) in (0, 1) and int(increment) == 1


class GroupCommitWriter:
    """
    The one writer of the events table.

    Persists queue here; while one transaction is being written, the next
    requests gather, and are then written together in one transaction (one
    fsync for all of them).  A single writer also means rows commit in ``id``
    order, so a reader paging by ``id`` never sees a row appear behind rows
    it has already read.  A batch that fails is retried request by request,
    so one bad request fails alone.
    """

    def __init__(self, store: "BatchStore", max_rows: int = 2000, max_bytes: int = 4 * 1024 * 1024,
                 fails_whole_batch: Callable[[BaseException], bool] = lambda error: False) -> None:
        self._store = store
        self._fails_whole_batch = fails_whole_batch
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._queue: Deque[Tuple[Any, "defer.Deferred[Any]", int]] = deque()
        self._busy = False
        self.batches = 0

    def submit(self, request: Any) -> "defer.Deferred[Any]":
        """
        Queue a persist: an :class:`appends.Append`, or the bare rows of a
        version 1 persist; fires with its outcome (see :data:`Outcome`; a
        refused version 2 append fails with its :class:`appends.AppendRefused`).
        """
        d: "defer.Deferred[Any]" = defer.Deferred()
        rows = request.rows if isinstance(request, appends.Append) else request
        self._queue.append((request, d, sum(len(row[3]) for row in rows)))
        if not self._busy:
            self._write_next()
        return d

    def _take_batch(self) -> List[Tuple[Any, "defer.Deferred[Any]"]]:
        batch: List[Tuple[Any, "defer.Deferred[Any]"]] = []
        count, size = 0, 0
        # (a request repeating event ids of one already in the batch waits for
        # the next: it must meet them stored, not fail beside them)
        event_ids: Set[bytes] = set()
        while self._queue:
            request, d, nbytes = self._queue[0]
            rows = request.rows if isinstance(request, appends.Append) else request
            if batch and (count + len(rows) > self._max_rows or size + nbytes > self._max_bytes):
                break
            ids_ = getattr(request, "event_ids", None)
            if ids_:
                if not event_ids.isdisjoint(ids_):
                    break
                event_ids.update(ids_)
            self._queue.popleft()
            batch.append((request, d))
            count += len(rows)
            size += nbytes
        return batch

    def _write_next(self) -> None:
        batch = self._take_batch()
        if not batch:
            self._busy = False
            return
        self._busy = True
        self.batches += 1
        d = self._store._write([rows for rows, _ in batch])
        d.addCallbacks(self._written, self._batch_failed, callbackArgs=(batch,), errbackArgs=(batch,))
        d.addBoth(lambda _: self._write_next())

    def _written(self, results: List[Outcome], batch: List[Tuple[Any, "defer.Deferred[Any]"]]) -> None:
        for (_, d), result in zip(batch, results):
            if isinstance(result, appends.AppendRefused):
                d.errback(Failure(result))  # type: ignore[no-untyped-call]
            else:
                d.callback(result)

    @defer.inlineCallbacks
    def _batch_failed(self, failure: Failure, batch: List[Tuple[Any, "defer.Deferred[Any]"]]) -> Any:
        error = failure.value
        if len(batch) == 1 or (error is not None and self._fails_whole_batch(error)):
            # A connection lost at COMMIT leaves the outcome unknown (MariaDB
            # may have committed): writing the rows again could store them
            # twice, so every request of the batch fails instead (the store
            # says which failures are such, and which mean it is stopping).
            for _, d in batch:
                d.errback(failure)
            return
        log.warn("a batch of {count} persists failed ({error}); writing them one by one",
                 count=len(batch), error=failure.value)
        for request, d in batch:
            try:
                results = yield self._store._write([request])
            except Exception:
                d.errback()
            else:
                self._written(results, [(request, d)])
