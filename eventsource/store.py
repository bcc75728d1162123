"""
The MySQL boundary: the events table, the pool that runs appends (written
by :mod:`eventsource.writer`), and pages of query results.

All SQL runs in an ``adbapi`` pool of ``pymysql`` connections (one thread per
connection).  Streams never hold a connection or a thread between pages: a
:class:`Pager` asks for one page at a time (keyset on ``id`` for the default
order, ``LIMIT``/``OFFSET`` over a snapshot for ordered and grouped queries),
so a thousand streams waiting on their clients cost no database resources.

Rows are encoded to their wire form in the pool thread, so the reactor
thread only moves finished message bodies.
"""

import math
import threading
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from eventsource import appends, schema, wire
from eventsource.writer import (GroupCommitWriter, Outcome, _as_append, _autoinc_settings,
                                _insert_batch, _stream)
from eventsource.stats import StoreStats
from eventsource.config import Config
from eventsource.interfaces import IEventStore, IPager, Page
from eventsource.query import InsertPlan, SelectPlan

if TYPE_CHECKING:
    import ssl

#: adbapi's Transaction: a pymysql cursor over the interaction's connection
#: (untyped: it forwards every attribute to the cursor)
Txn = Any
#: the rows of one persist: ``(pid, domain, name, data_text)`` tuples
Rows = Tuple[Tuple[Any, ...], ...]
#: a persist's answer: ``(affected_rows, insert_id)``
Answer = defer.Deferred[Tuple[int, int]]
#: queued work: ``(work, args, answer)``
Work = Tuple[Callable[..., Any], Tuple[Any, ...], "defer.Deferred[Any]"]

log = Logger()

#: pymysql error codes that mean the connection died under us
LOST_CONNECTION = frozenset({0, 2006, 2013, 2014, 2045, 2055})

#: the first page of a stream is small (quick first row, little memory for
#: streams that are opened and left idle); pages then double up to page_size,
#: and down to what the page's byte budget fits of the rows seen last
FIRST_PAGE = 32


def _conversions() -> Dict[Any, Any]:
    """
    pymysql's result conversions, except that DATETIME and TIMESTAMP values
    arrive already in their wire form (see :func:`wire.format_mysql_datetime`).
    Query parameters are encoded by pymysql's encoders, which this leaves alone.
    """
    from pymysql.constants import FIELD_TYPE
    from pymysql.converters import conversions

    converted = dict(conversions)
    converted[FIELD_TYPE.DATETIME] = wire.format_mysql_datetime
    converted[FIELD_TYPE.TIMESTAMP] = wire.format_mysql_datetime
    return converted


class ConnectionLostBeforeCommit(Exception):
    """The connection died before anything was committed: safe to run again."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class StatementTimeLimit(Exception):
    """MariaDB stopped a query at ``max_statement_time`` (error 1969)."""


class StoreStopping(Exception):
    """The server is stopping: work that had not started is dropped."""


class StoreNotRunning(RuntimeError):
    """Work asked of a store that was not started (or is stopped)."""


#: MariaDB's ER_STATEMENT_TIMEOUT
STATEMENT_TIMEOUT = 1969

#: the session ``sql_mode`` of every connection, whatever the server's
#: global one: strict writes, and none of the modes that change how our SQL
#: reads (``ANSI_QUOTES``: we quote identifiers with backquotes;
#: ``NO_BACKSLASH_ESCAPES``: PyMySQL escapes values with backslashes;
#: ``PIPES_AS_CONCAT``, ``IGNORE_SPACE``, ``ONLY_FULL_GROUP_BY``...)
SQL_MODE = "STRICT_TRANS_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION"

#: seconds shutdown gives statements to stop after ``KILL QUERY`` before it
#: cuts their connections (a stalled MariaDB never answers the kill)
KILL_GRACE = 2.0

#: seconds the separate connection that sends ``KILL QUERY`` may take
KILL_TIMEOUT = 2.0

#: seconds shutdown waits for threads whose connections it cut to notice
CUT_GRACE = 1.0

#: seconds :meth:`Store.probe` may take to connect, and to send and read
PROBE_TIMEOUT = 2.0

#: the longest ``idle_transaction_timeout`` the server's sessions get (see
#: :func:`idle_transaction_timeout`)
IDLE_TRANSACTION_CAP = 10


def idle_transaction_timeout(mysql_timeout: float) -> int:
    """
    Seconds MariaDB lets one of the server's sessions sit idle inside a
    transaction before it kills the session (rolling the transaction back):
    ``mysql_timeout`` rounded up, at most :data:`IDLE_TRANSACTION_CAP`.  The
    server runs a transaction's statements one after the other, so it never
    waits that long itself; a server cut off from MariaDB mid-transaction
    (a network partition: nothing tells MariaDB the client is gone) would
    otherwise hold the append lock, and every writer of the table behind it,
    until TCP gave up, hours later.
    """
    return max(1, min(IDLE_TRANSACTION_CAP, math.ceil(mysql_timeout)))


def _is_lost_connection(error: BaseException) -> bool:
    import pymysql

    if isinstance(error, (pymysql.err.OperationalError, pymysql.err.InterfaceError)):
        return bool(error.args) and error.args[0] in LOST_CONNECTION
    return False


def _unsafe_to_split(error: BaseException) -> bool:
    """
    Whether a batch that failed with ``error`` must fail whole rather than
    be written again request by request: the store is stopping, or the
    connection died (perhaps at COMMIT: the batch may be stored).
    """
    return isinstance(error, StoreStopping) or _is_lost_connection(error)


def _not_sent(error: BaseException) -> bool:
    """
    Whether ``error`` says the statement never reached MariaDB (PyMySQL had
    no socket, or could not write to it), so running it again is safe.  A
    connection lost while waiting for the answer (2013, a read timeout
    included) is not: the statement may still be running there.
    """
    import pymysql

    if isinstance(error, pymysql.err.InterfaceError):
        return bool(error.args) and error.args[0] == 0
    if isinstance(error, pymysql.err.OperationalError):
        return bool(error.args) and error.args[0] == 2006
    return False


def _found_dead(connection: Any) -> bool:
    """
    An idle connection has nothing to read: if its socket is readable,
    MariaDB closed it (``KILL``, a restart, ``wait_timeout``) or the network
    did.  Checked without a round trip before every interaction.
    """
    import select

    sock = getattr(connection, "_sock", None)
    if sock is None:
        return True
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _check_server(txn: Txn, statement_time: float) -> str:
    """
    The statement time limit needs MariaDB (``SET STATEMENT``): refuse to
    start against anything else unless the limit is off.
    """
    txn.execute("SELECT VERSION()")
    version = str(txn.fetchone()[0])
    if statement_time and "mariadb" not in version.lower():
        raise RuntimeError(
            f"the database server {version} is not MariaDB: --max-statement-time needs "
            "MariaDB's SET STATEMENT max_statement_time (MySQL has MAX_EXECUTION_TIME "
            "instead); start with --max-statement-time 0 (EVENTSOURCE_MAX_STATEMENT_TIME=0) "
            "to run without a statement time limit")
    return version


def _kill_queries(kwargs: Dict[str, Any], thread_ids: List[int]) -> None:
    """``KILL QUERY`` each MariaDB connection id, on a connection of its own."""
    import pymysql

    connection = pymysql.connect(**kwargs)
    try:
        with connection.cursor() as cursor:
            for thread_id in thread_ids:
                try:
                    cursor.execute(f"KILL QUERY {int(thread_id)}")
                except pymysql.err.OperationalError:
                    pass  # (1094: that connection is gone already)
    finally:
        connection.close()


#: MariaDB error codes of a statement the user has no privilege for
ACCESS_DENIED = frozenset({1044, 1142})


def ensure_schema(txn: Txn, database: str, table: str) -> Tuple[List[str], bool]:
    """
    Create the database and events table if missing, and upgrade in place a
    table made by the original service or an earlier release of this one
    (see :func:`eventsource.schema.plan_upgrade`).

    Returns the list of changes made (for the log) and whether the stream
    columns are then to be filled (:func:`fill_range`) and the table
    finished (:func:`finish_upgrade`).
    """
    txn.execute(schema.TABLE_EXISTS_SQL, (database, table))
    existed = txn.fetchone()[0] > 0
    if not existed:
        # (only then: a read-only server's user may lack CREATE privileges)
        for statement in schema.create_statements(database, table):
            txn.execute(statement)
        _ensure_append_lock(txn, database, table)
        return ["created table"], False
    txn.execute(schema.COLUMNS_SQL, (database, table))
    columns = {name.lower(): collation for name, collation in txn.fetchall()}
    txn.execute(schema.INDEXES_SQL, (database, table))
    indexes = [row[0] for row in txn.fetchall()]
    txn.execute(schema.NULLABLE_SQL, (database, table))
    nullable = [row[0].lower() for row in txn.fetchall()]
    try:
        upgrade = schema.plan_upgrade(columns, indexes, nullable)
    except schema.MissingColumns as missing:
        raise RuntimeError(
            f"table {database}.{table} exists but lacks the columns {missing.args[0]}"
        ) from None
    if upgrade.converted_from:
        log.warn("events table {database}.{table}: ids are collated {collations}; converting "
                 "the table to {collation} so that pid, domain and name compare byte for byte",
                 database=database, table=table, collations=", ".join(upgrade.converted_from),
                 collation=schema.COLLATION)
    if upgrade.alterations:
        try:
            txn.execute(upgrade.sql(database, table))
        except Exception as error:
            if getattr(error, "args", None) and error.args[0] in ACCESS_DENIED:
                raise RuntimeError(
                    f"table {database}.{table} needs an upgrade ({', '.join(upgrade.changes)})"
                    " that this MariaDB user may not make: start the server once with a user"
                    " that may ALTER the table"
                ) from error
            raise
    # (after the table's own upgrade, whose refusal names what it lacks)
    lock_changes = _ensure_append_lock(txn, database, table)
    return list(upgrade.changes) + lock_changes, upgrade.fill


def _ensure_append_lock(txn: Txn, database: str, table: str) -> List[str]:
    """
    Make the append lock table (:func:`eventsource.schema.append_lock_name`)
    if it is missing, or add its counter to the table of an earlier release:
    every writer changes its row first in each transaction.
    """
    lock = schema.append_lock_name(table)
    txn.execute(schema.COLUMNS_SQL, (database, lock))
    columns = {row[0].lower() for row in txn.fetchall()}
    if schema.APPEND_LOCK_COUNTER in columns:
        return []
    try:
        if columns:
            txn.execute(schema.append_lock_upgrade_sql(database, table))
            return [f"added {schema.APPEND_LOCK_COUNTER} to {lock}"]
        for statement in schema.append_lock_statements(database, table):
            txn.execute(statement)
    except Exception as error:
        if getattr(error, "args", None) and error.args[0] in ACCESS_DENIED:
            raise RuntimeError(
                f"table {database}.{table} needs its append lock table {lock} (see "
                f"docs/OPERATIONS.md), with its column {schema.APPEND_LOCK_COUNTER}, which this"
                " MariaDB user may not make: start the server once with a user that may CREATE"
                " and ALTER tables in that database") from error
        raise
    return [f"created {lock}"]


def first_unfilled(txn: Txn, table: str) -> Tuple[Optional[int], int, int]:
    """``(first unfilled id or None, rows left, largest id)`` of a fill."""
    txn.execute(schema.first_unfilled_sql(table))
    row = txn.fetchone()
    txn.execute(schema.unfilled_count_sql(table))
    left = int(txn.fetchone()[0])
    return (None if row is None else int(row[0])), left, _high_water(txn, table)


def fill_range(txn: Txn, table: str, first: int, end: int) -> int:
    """Fill the stream columns of ids ``[first, end)`` in one transaction; returns the rows."""
    txn.execute(schema.fill_sql(table), (first, end))
    return int(txn.rowcount)


def finish_upgrade(txn: Txn, table: str) -> Optional[int]:
    """
    The stream columns made NOT NULL; the id of a row left unfilled
    (written meanwhile by an older server) is returned instead.
    """
    txn.execute(schema.first_unfilled_sql(table))
    row = txn.fetchone()
    if row is not None:
        return int(row[0])
    txn.execute(schema.finish_sql(table))
    return None


def _keyset_layout(plan: SelectPlan) -> Tuple[bool, Optional[int]]:
    """
    How a page's rows carry the keyset: ``(strip, at)``.  A keyset plan
    whose outputs hold the keyset column reads it there (``at``: its
    place); another reads its own ``__keyset`` last column, stripped before
    encoding (``at`` -1); an offset page has none (``at`` None).
    """
    if not plan.keyset:
        return False, None
    if plan.keyset_index is not None:
        return False, plan.keyset_index
    return True, -1


def _encode_page(txn: Txn, plan: SelectPlan,
                 checked_json: bool = False) -> Tuple[List[str], Optional[int]]:
    """Encode the rows of the last statement; returns ``(bodies, last_keyset)``."""
    strip, at = _keyset_layout(plan)
    names = [column[0] for column in txn.description]
    rows = txn.fetchall()
    encode = plan.row_encoder(names[:-1] if strip else names, checked_json)
    bodies = [encode(row[:-1]) for row in rows] if strip else [encode(row) for row in rows]
    return bodies, rows[-1][at] if rows and at is not None else None


def _encode_bounded(cursor: Any, plan: SelectPlan, max_bytes: int,
                    checked_json: bool = False) -> Tuple[List[str], Optional[int], bool]:
    """
    Encode rows from an unbuffered cursor until they reach ``max_bytes``
    (so a page holds at most its budget plus one row); returns
    ``(bodies, last_keyset, cut)``, ``cut`` when rows were left unread.
    """
    strip, at = _keyset_layout(plan)
    names = [column[0] for column in cursor.description]
    encode = plan.row_encoder(names[:-1] if strip else names, checked_json)
    bodies: List[str] = []
    append = bodies.append
    total = 0
    row = None
    for row in cursor.fetchall_unbuffered():
        body = encode(row[:-1] if strip else row)
        append(body)
        total += len(body)
        if total >= max_bytes:
            # (whether more rows follow is left unread: the next page tells)
            return bodies, None if at is None else row[at], True
    return bodies, None if at is None or row is None else row[at], False


def _high_water(txn: Txn, table: str, statement_time: float = 0) -> int:
    txn.execute(schema.statement_limited(schema.high_water_sql(table), statement_time))
    return int(txn.fetchone()[0])


def _read_page(txn: Txn, plan: SelectPlan, table: str, high_water: Optional[int], position: int,
               size: int, statement_time: float = 0, max_bytes: Optional[int] = None,
               checked_json: bool = False) -> Page:
    """
    One page: at most ``size`` rows and, with ``max_bytes``, at most that
    many bytes of encoded rows plus one row.  The rows are read unbuffered,
    one at a time, so rows past the byte budget are never held: closing the
    cursor skips them on the wire (the pager sizes the next ``LIMIT`` from
    the rows it saw, so that is rare).  Returns ``(high_water, bodies,
    last_keyset, cut)``.
    """
    import pymysql

    try:
        if high_water is None:
            high_water = _high_water(txn, table, statement_time)
        if plan.keyset:
            sql, params = plan.page_sql(position, high_water, size)
        else:
            sql, params = plan.offset_sql(position, high_water, size)
        sql = schema.statement_limited(sql, statement_time)
        if max_bytes is None:
            txn.execute(sql, params)
            bodies, last = _encode_page(txn, plan, checked_json)
            return high_water, bodies, last, False
        cursor = txn.connection.cursor(pymysql.cursors.SSCursor)
        try:
            cursor.execute(sql, params)
            # (unbuffered: the statement time limit may also fire while rows arrive)
            bodies, last, cut = _encode_bounded(cursor, plan, max_bytes, checked_json)
        finally:
            cursor.close()
    except pymysql.err.OperationalError as error:
        if error.args and error.args[0] == STATEMENT_TIMEOUT:
            raise StatementTimeLimit(
                f"the query ran longer than the statement time limit ({statement_time:g} s)"
            ) from error
        raise
    return high_water, bodies, last, cut


#: an event read by the tail: ``(position, body, event)``, the body the
#: version 2 row of the default columns and ``event`` the fields of
#: :data:`eventsource.matcher.EVENT_FIELDS`
TailRow = Tuple[int, str, Tuple[Any, ...]]

#: the encoders of a version 2 row of the default columns, as a plan has
#: them: for a table whose ``data`` MariaDB checks, and for one it does not
_TAIL_ENCODINGS = [{"eventId": wire.UUID_VALUE, "data": wire.JSON_VALUE}.get(c, wire.PLAIN_VALUE)
                   for c in schema.V2_DEFAULT_COLUMNS]
_encode_tail_rows = {checked: wire.row_encoder(schema.V2_DEFAULT_COLUMNS, _TAIL_ENCODINGS, checked)
                     for checked in (True, False)}


def _read_tail(txn: Txn, table: str, after: int, size: int,
               checked_json: bool = False) -> List[TailRow]:
    """The events after ``after`` (see :meth:`Store.read_tail`), encoded here, in the pool thread."""
    import datetime

    _encode_tail_row = _encode_tail_rows[checked_json]
    txn.execute(schema.tail_sql(table), (after, size))
    rows = []
    parse = datetime.datetime.fromisoformat
    for row in txn.fetchall():
        position, event_id, pid, version, domain, name = row[:6]
        event_id = bytes(event_id)
        rows.append((position, _encode_tail_row(row[:8]),
                     (position, event_id, pid, version, domain, name, parse(row[8]))))
    return rows


def _match_rows(txn: Txn, table: str, conditions: List[Tuple[str, Tuple[Any, ...]]],
                positions: List[int]) -> Dict[int, Tuple[bool, ...]]:
    params: List[Any] = [param for _, params in conditions for param in params]
    params += positions
    txn.execute(schema.match_rows_sql(table, [sql for sql, _ in conditions], len(positions)),
                params)
    return {int(row[0]): tuple(bool(met) for met in row[1:]) for row in txn.fetchall()}


def _data_is_checked(txn: Txn, database: str, table: str) -> bool:
    """Whether the table has MariaDB's ``json_valid(data)`` check (a JSON column's own)."""
    txn.execute(schema.DATA_CHECKED_SQL, (database, table))
    return bool(txn.fetchone()[0])


def _ping(txn: Txn) -> None:
    txn.execute("SELECT 1")
    txn.fetchall()


def mysql_tls_context(config: Config) -> "ssl.SSLContext":
    """
    The TLS context of every MySQL connection.  With ``mysql_tls_verify`` the
    server's certificate must chain to ``mysql_tls_ca`` (the system's trust
    store when none is given) and name ``mysql_host``; without it the
    connection is encrypted but the certificate is not checked.  The client
    certificate (``mysql_tls_cert``/``mysql_tls_key``) is presented either
    way.  (Built here rather than from pymysql's ``ssl_*`` arguments, which
    turn host name checking off whenever no CA file is given.)
    """
    import ssl

    context = ssl.create_default_context(cafile=config.mysql_tls_ca)
    # Python 3.13 turns strict X.509 checks on; MariaDB's own generated
    # certificates fail them (pymysql relaxes this too).
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    if config.mysql_tls_verify:
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if config.mysql_tls_cert:
        context.load_cert_chain(config.mysql_tls_cert, keyfile=config.mysql_tls_key)
    return context


class _PoolConnection(adbapi.Connection):
    """
    adbapi's wrapper of a pool connection (one per interaction), whose
    COMMIT after the work is left out when the work committed itself.
    """

    #: the work committed its transaction (:meth:`_PoolTransaction.commit`)
    committed = False

    def commit(self) -> None:
        if not self.committed:
            self.commit_now()

    def commit_now(self) -> None:
        """COMMIT on the pymysql connection."""
        connection: Any = self._connection
        connection.commit()


class _PoolTransaction(adbapi.Transaction):
    """adbapi's transaction, which the work may commit itself."""

    _connection: _PoolConnection

    def commit(self) -> None:
        """
        COMMIT now, as the work's last statement: its errors reach the work
        (the writer writes a transaction again when Galera's certification
        refuses its COMMIT), and adbapi sends no second COMMIT after it.
        """
        self._connection.committed = False
        self._connection.commit_now()
        self._connection.committed = True


class _Pool(adbapi.ConnectionPool):
    connectionFactory = _PoolConnection
    transactionFactory = _PoolTransaction


@implementer(IEventStore)
class Store:
    """
    The events table behind an ``adbapi`` pool.

    Work waits in queues of our own and goes to the pool only when one of
    its threads is free, persists before reads: a stop can then drop the
    reads that have not started (adbapi's own queue could only be drained
    by running everything in it) and knows which connection runs what.

    :param config: the :class:`eventsource.config.Config`.
    :param reactor: the reactor the pool reports back to.
    """

    def __init__(self, config: Config, reactor: Any) -> None:
        self._config = config
        self._reactor = reactor
        self._pool: Optional[adbapi.ConnectionPool] = None
        self._writer: Optional[GroupCommitWriter] = None
        self._consecutive_ids = False
        #: stream -> the last version this server committed (see _write)
        self._known_versions: Dict[str, int] = {}
        self._row_sizes = RowSizeHint()
        #: whether MariaDB checks that ``data`` is JSON text (its ``json_valid``
        #: constraint, which a ``JSON`` column has on MariaDB): version 2 rows
        #: then carry it as it is, without decoding it first
        self.data_checked = False
        #: group commits, the last position, MySQL errors (see eventsource.metrics)
        self.stats = StoreStats(reactor)
        self.table = f"`{config.database}`.`{config.table_name}`"
        #: the append lock table every write transaction locks first
        self.append_lock = schema.qualified(config.database,
                                            schema.append_lock_name(config.table_name))
        self._commit_listeners: List[Callable[[], object]] = []
        self._writes: Deque[Work] = deque()
        self._reads: Deque[Work] = deque()
        #: work handed to the pool and not finished (adbapi's commit or
        #: rollback included)
        self._in_flight = 0
        self._idle_waiters: "List[defer.Deferred[None]]" = []
        #: token -> (pymysql connection, is_read), while our work runs on it
        #: (written by pool threads, read by the reactor thread)
        self._busy: Dict[object, Tuple[Any, bool]] = {}
        #: MariaDB connection ids of statements given up on at the read
        #: timeout: they may still run there, so they are killed
        self._orphans: Set[int] = set()
        #: no new reads (shutdown began); ``_closing``: no new work at all
        self._stopping = False
        self._closing = False
        #: :meth:`probe`'s connection, and the lock of whoever uses it (a
        #: probe's thread, or a stop)
        self._probe_connection: Any = None
        self._probe_lock = threading.Lock()

    def _connect_kwargs(self) -> Dict[str, Any]:
        config = self._config
        kwargs = dict(
            host=config.mysql_host,
            port=config.mysql_port,
            user=config.mysql_user,
            password=config.mysql_password,
            charset=config.mysql_charset,
            autocommit=False,
            # (the /*M! part runs on MariaDB only: MySQL has no such variable)
            init_command=(f"SET time_zone = '+00:00', sql_mode = '{SQL_MODE}'"
                          f"/*M!100300 , idle_transaction_timeout = "
                          f"{idle_transaction_timeout(config.mysql_timeout)} */"),
            conv=_conversions(),
            connect_timeout=min(10, config.mysql_timeout),
            read_timeout=config.mysql_timeout,
            write_timeout=config.mysql_timeout,
        )
        if config.mysql_tls_ca or config.mysql_tls_cert or config.mysql_tls_verify:
            kwargs["ssl"] = mysql_tls_context(config)
        else:
            # pymysql otherwise builds a TLS context on every connect (~19 ms)
            kwargs["ssl_disabled"] = True
        return kwargs

    def start(self) -> "defer.Deferred[List[str]]":
        """Open the pool and make sure the schema is there; fires with the changes made."""
        size = self._config.pool_size
        self._stopping = self._closing = False
        self._pool = pool = _Pool(  # type: ignore[no-untyped-call]
            "pymysql",
            cp_min=min(2, size),
            cp_max=size,
            cp_reconnect=True,
            cp_noisy=False,
            cp_reactor=self._reactor,
            **self._connect_kwargs(),
        )
        pool.start()  # type: ignore[no-untyped-call]
        self._writer = GroupCommitWriter(self, fails_whole_batch=_unsafe_to_split)
        self._known_versions.clear()
        d = self._run(_check_server, self._config.max_statement_time)
        d.addCallback(lambda _: self._run(_autoinc_settings))
        d.addCallback(self._set_autoinc)
        d.addCallback(lambda _: self._run(ensure_schema, self._config.database, self._config.table_name))
        d.addCallback(self._upgrade)
        d.addCallback(self._check_data)
        return d

    @defer.inlineCallbacks
    def _check_data(self, changes: List[str]) -> Any:
        """Learn whether MariaDB checks ``data`` on the way in (see :attr:`data_checked`)."""
        self.data_checked = yield self._run(_data_is_checked, self._config.database,
                                            self._config.table_name)
        if not self.data_checked:
            log.warn("events table {table}: MariaDB does not check that data is JSON (no "
                     "json_valid constraint); version 2 rows check it as they are read",
                     table=self.table)
        return changes

    #: ids filled per transaction by an upgrade
    fill_batch = 10000
    #: seconds between the upgrade's progress lines (one transaction, well
    #: under a second, may come on top: still one at least every 5 s)
    progress_interval = 4.0

    @defer.inlineCallbacks
    def _upgrade(self, planned: Tuple[List[str], bool]) -> Any:
        """
        Give every existing row its version and event id, ``fill_batch`` ids
        per transaction in ``id`` order, then make the columns NOT NULL: the
        server serves only once this is done.  Each committed range stays
        done, so a server killed meanwhile continues where it stopped.
        """
        changes, fill = planned
        if not fill:
            return changes
        table = self.table
        clock = self._reactor.seconds
        first, left, top = yield self._run(first_unfilled, table)
        log.info("events table {table}: numbering {left} events by stream (versions and "
                 "event ids), {batch} ids per transaction", table=table, left=left,
                 batch=self.fill_batch)
        started = last_line = clock()
        done = 0
        while True:
            while first is not None and first <= top:
                end = first + self.fill_batch
                try:
                    count = yield self._run(fill_range, table, first, end)
                except Exception as error:
                    if getattr(error, "args", None) and error.args[0] in ACCESS_DENIED:
                        raise RuntimeError(
                            f"table {table} needs its events numbered (stream versions and event"
                            " ids), which this MariaDB user may not do: start the server once"
                            " with a user that may UPDATE and ALTER the table") from error
                    raise
                done += count
                first = end
                now = clock()
                if now - last_line >= self.progress_interval:
                    last_line = now
                    log.info("events table {table}: numbered {done} events, {left} left"
                             " ({rate:.0f} events/s)", table=table, done=done,
                             left=max(0, left - done), rate=done / max(now - started, 1e-9))
            # (a row written meanwhile by an older server is numbered before the keys)
            first = yield self._run(finish_upgrade, table)
            if first is None:
                break
            top = yield self._run(_high_water, table)
        elapsed = clock() - started
        log.info("events table {table}: numbered {done} events in {elapsed:.1f} s"
                 " ({rate:.0f} events/s); version and event_id are NOT NULL", table=table,
                 done=done, elapsed=elapsed, rate=done / max(elapsed, 1e-9))
        return changes + [f"numbered {done} events"]

    def _set_autoinc(self, consecutive: bool) -> None:
        self._consecutive_ids = consecutive

    def drop_reads(self) -> None:
        """
        Fail every read that has not started yet, and stop those running
        (their streams have ended): shutdown must not wait for them.
        """
        self._stopping = True
        reads, self._reads = self._reads, deque()
        for _, _, d in reads:
            d.errback(StoreStopping("the server is shutting down"))
        running = [connection for connection, is_read in list(self._busy.values()) if is_read]
        if running:
            self._kill(running, set())

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """
        Stop every statement still running and close the pool: queued work
        is dropped, running statements get ``KILL QUERY`` (from a separate
        connection), and connections still busy :data:`KILL_GRACE` seconds
        later are cut, so the pool's threads can be joined at once.  (Only a
        thread still opening a connection can hold the join longer, up to
        the connect timeout.)
        """
        self.drop_reads()
        self._closing = True
        writes, self._writes = self._writes, deque()
        for _, _, d in writes:
            d.errback(StoreStopping("the server is shutting down"))
        if self._in_flight or self._orphans:
            running = [connection for connection, _ in list(self._busy.values())]
            orphans, self._orphans = self._orphans, set()
            if running:
                log.warn("stopping {count} statements still running in MySQL",
                         count=len(running))
            self._kill(running, orphans)
            yield self._wait_idle(KILL_GRACE)
        if self._in_flight:
            log.warn("{count} MySQL connections did not answer within {grace} s of KILL "
                     "QUERY; closing them", count=self._in_flight, grace=KILL_GRACE)
            self._cut_connections()
            yield self._wait_idle(CUT_GRACE)
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()  # type: ignore[no-untyped-call]
        self._close_probe()

    def _wait_idle(self, timeout: float) -> "defer.Deferred[None]":
        """Fires once no work is in the pool, or after ``timeout`` seconds."""
        if not self._in_flight:
            return defer.succeed(None)
        d: "defer.Deferred[None]" = defer.Deferred()
        self._idle_waiters.append(d)
        d.addTimeout(timeout, self._reactor, onTimeoutCancel=lambda _, __: None)
        return d

    def _kill(self, connections: List[Any], orphans: Set[int]) -> "defer.Deferred[None]":
        """``KILL QUERY`` the statements of ``connections`` (and ``orphans``), in a thread."""
        from twisted.internet import threads

        ids = set(orphans)
        for connection in connections:
            thread_id = getattr(connection, "server_thread_id", None)
            if thread_id:
                ids.add(int(thread_id[0]))
        if not ids:
            return defer.succeed(None)
        kwargs = self._connect_kwargs()
        kwargs.update(connect_timeout=KILL_TIMEOUT, read_timeout=KILL_TIMEOUT,
                      write_timeout=KILL_TIMEOUT, autocommit=True)
        d = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                      _kill_queries, kwargs, sorted(ids))
        d.addErrback(lambda failure: log.warn("could not stop MySQL statements: {error}",
                                              error=failure.value))
        return d

    def _cut_connections(self) -> None:
        import socket

        pool = self._pool
        connections: List[Any] = list(pool.connections.values()) if pool is not None else []
        for connection in connections:
            sock = getattr(connection, "_sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _run(self, work: Callable[..., Any], *args: Any, read: bool = False,
             urgent: bool = False) -> "defer.Deferred[Any]":
        """
        Run ``work(txn, *args)`` in the pool, once a thread is free.

        A connection found dead before the work starts is reconnected, and
        work whose statement never reached MariaDB is run once more; a
        statement that was sent and then lost (killed, timed out, MariaDB
        gone while it ran) is never run again: it may still be running.
        """
        if self._closing or (read and self._stopping):
            return defer.fail(StoreStopping("the server is shutting down"))
        if self._pool is None:
            return defer.fail(StoreNotRunning("the store is not running"))
        d: "defer.Deferred[Any]" = defer.Deferred()
        if urgent:
            (self._reads if read else self._writes).appendleft((work, args, d))
        else:
            (self._reads if read else self._writes).append((work, args, d))
        self._next()
        return d

    def _next(self) -> None:
        pool = self._pool
        while pool is not None and self._in_flight < self._config.pool_size:
            if self._writes:
                work, args, d = self._writes.popleft()
                read = False
            elif self._reads:
                work, args, d = self._reads.popleft()
                read = True
            else:
                return
            self._in_flight += 1
            ran = self._attempt(pool, work, args, read)
            ran.addBoth(self._finished, d)

    def _finished(self, result: object, d: "defer.Deferred[Any]") -> None:
        self._in_flight -= 1
        # The freed thread gets its next work before the reactor spends time
        # on this result (publishing a page of rows); then the caller hears
        # (a persist answered, the writer's next batch queued), and only
        # then a stop waiting for the pool to be idle.
        self._next()
        if isinstance(result, Failure):
            self.stats.error(result.value)  # type: ignore[arg-type]
            d.errback(result)
        else:
            d.callback(result)
        if self._orphans:
            orphans, self._orphans = self._orphans, set()
            self._kill([], orphans)
        if not self._in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.called:
                    waiter.callback(None)

    def _attempt(self, pool: adbapi.ConnectionPool, work: Callable[..., Any],
                 args: Tuple[Any, ...], read: bool) -> "defer.Deferred[Any]":
        def retry(failure: Failure) -> Any:
            if not isinstance(failure.value, ConnectionLostBeforeCommit):
                return failure
            if self._pool is not pool or self._closing:
                return failure
            log.warn("MySQL connection lost ({error}); retrying once on a new one",
                     error=failure.value)
            again: "defer.Deferred[Any]" = pool.runInteraction(  # type: ignore[no-untyped-call]
                self._interaction, work, args, read)
            return again

        def unwrap(failure: Failure) -> Failure:
            if isinstance(failure.value, ConnectionLostBeforeCommit):
                return Failure(failure.value.error)  # type: ignore[no-untyped-call]
            return failure

        d: "defer.Deferred[Any]" = pool.runInteraction(  # type: ignore[no-untyped-call]
            self._interaction, work, args, read)
        d.addErrback(retry)
        d.addErrback(unwrap)
        return d

    def _interaction(self, txn: Any, work: Callable[..., Any], args: Tuple[Any, ...],
                     read: bool) -> Any:
        """In a pool thread: ``work`` on a live connection, its statements tracked."""
        if read and self._stopping:
            raise StoreStopping("the server is shutting down")
        connection = txn.connection
        if _found_dead(connection):
            connection.ping(reconnect=True)
        token = object()
        self._busy[token] = (connection, read)
        try:
            return work(txn, *args)
        except Exception as error:
            if _not_sent(error):
                raise ConnectionLostBeforeCommit(error) from error
            if isinstance(error.__context__, TimeoutError) and connection.server_thread_id:
                self._orphans.add(int(connection.server_thread_id[0]))
            raise
        finally:
            del self._busy[token]

    def insert(self, plan: InsertPlan) -> "defer.Deferred[Tuple[int, int]]":
        """
        Append the rows of an :class:`eventsource.query.InsertPlan` atomically;
        fires with ``(affected_rows, insert_id)``.
        """
        if self._writer is None:
            return defer.fail(StoreNotRunning("the store is not running"))
        return self._writer.submit(plan.rows)

    def append(self, plan: InsertPlan) -> "defer.Deferred[appends.Appended]":
        """
        Append a version 2 persist (expected versions checked, the client's
        event ids kept); fires with :class:`appends.Appended`, or fails with
        an :class:`appends.AppendRefused` (a wrong expected version, an
        idempotency conflict).
        """
        if self._writer is None:
            return defer.fail(StoreNotRunning("the store is not running"))
        return self._writer.submit(plan.append(detailed=True))

    #: streams whose last version the writer remembers (then forgets them all)
    max_known_versions = 100_000

    def _write(self, batch: List[Any]) -> "defer.Deferred[Any]":
        """
        Write a batch, numbering its streams from the last versions this
        server committed when it knows them (a stream another writer
        appended to meanwhile fails on the ``pid_version`` key and is read
        anew), so that the usual batch reads no version at all.  Versions
        are remembered only once their transaction committed.
        """
        known = self._known_versions
        streams = {_stream(row[0]) for request in map(_as_append, batch) for row in request.rows}
        given = {stream: known[stream] for stream in streams if stream in known}

        def committed(result: Tuple[List[Outcome], Dict[str, int]]) -> List[Outcome]:
            results, last = result
            if len(known) + len(last) > self.max_known_versions:
                known.clear()
            known.update(last)
            self._committed()
            return results

        def failed(failure: Failure) -> Failure:
            # (maybe committed, maybe not: read these streams next time)
            for stream in streams:
                known.pop(stream, None)
            return failure

        d = self._run(_insert_batch, self.table, batch, self._consecutive_ids, given,
                      self.append_lock)
        d.addCallbacks(committed, failed)
        self.stats.batch_started(d, len(batch))
        return d

    def ping(self) -> "defer.Deferred[None]":
        """``SELECT 1`` on a pool connection, ahead of queued reads (the readiness check)."""
        return self._run(_ping)

    def probe(self) -> "defer.Deferred[None]":
        """
        ``SELECT 1`` on a connection of its own, outside the pool (whose
        threads may all be busy, or waiting out ``--mysql-timeout`` on a
        network that went silent), each step bounded by :data:`PROBE_TIMEOUT`:
        whether MariaDB can be reached now.  Call one at a time.
        """
        from twisted.internet import threads

        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                         self._probe)

    def _probe(self) -> None:
        import pymysql

        with self._probe_lock:
            connection = self._probe_connection
            if connection is not None and _found_dead(connection):
                self._drop_probe_connection()
                connection = None
            try:
                if connection is None:
                    kwargs = self._connect_kwargs()
                    kwargs.update(connect_timeout=PROBE_TIMEOUT, read_timeout=PROBE_TIMEOUT,
                                  write_timeout=PROBE_TIMEOUT, autocommit=True)
                    connection = self._probe_connection = pymysql.connect(**kwargs)
                with connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
                    cursor.fetchall()
            except Exception:
                self._drop_probe_connection()
                raise
            finally:
                if self._closing:  # (the store stopped meanwhile)
                    self._drop_probe_connection()

    def _close_probe(self) -> None:
        """At stop: close :meth:`probe`'s connection (a probe running now closes it when done)."""
        if self._probe_lock.acquire(blocking=False):
            try:
                self._drop_probe_connection()
            finally:
                self._probe_lock.release()

    def _drop_probe_connection(self) -> None:
        connection, self._probe_connection = self._probe_connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                pass  # (closing a connection that is gone)

    def pool_load(self) -> Tuple[int, int, int]:
        """``(work running in the pool's threads, writes queued, reads queued)``."""
        return self._in_flight, len(self._writes), len(self._reads)

    def on_commit(self, listener: Callable[[], object]) -> None:
        """Call ``listener()`` after each transaction of this server's writer commits."""
        self._commit_listeners.append(listener)

    def _committed(self) -> None:
        for listener in self._commit_listeners:
            try:
                listener()
            except Exception:
                log.failure("a commit listener failed")

    def high_water(self) -> "defer.Deferred[int]":
        """The largest position of the table (0 when it is empty)."""
        return self._run(_high_water, self.table, read=True)

    def read_tail(self, after: int, size: int) -> "defer.Deferred[List[TailRow]]":
        """
        The events after position ``after``, at most ``size``, in position
        order, as :data:`TailRow` (read before every other waiting read: a
        subscription's latency waits on it).
        """
        return self._run(_read_tail, self.table, after, size, self.data_checked, read=True,
                         urgent=True)

    def match_rows(self, conditions: List[Tuple[str, Tuple[Any, ...]]],
                   positions: List[int]) -> "defer.Deferred[Dict[int, Tuple[bool, ...]]]":
        """
        Whether the events at ``positions`` meet each of ``conditions``
        (compiled ``$where`` fragments and their parameters), as MariaDB
        decides: position -> one bool per condition.
        """
        return self._run(_match_rows, self.table, conditions, positions, read=True, urgent=True)

    def pager(self, plan: SelectPlan, start: Optional[int] = None,
              high_water: Optional[int] = None) -> "Pager":
        """A :class:`Pager` over the rows of an :class:`eventsource.query.SelectPlan`."""
        return Pager(self, plan, self._config.page_size, self._config.page_bytes,
                     self._row_sizes, start=start, high_water=high_water)

    def read_page(self, plan: SelectPlan, high_water: Optional[int], position: int, size: int,
                  max_bytes: Optional[int] = None) -> "defer.Deferred[Page]":
        return self._run(_read_page, plan, self.table, high_water, position, size,
                         self._config.max_statement_time, max_bytes, self.data_checked, read=True)


class RowSizeHint:
    """
    The largest row of the last page any stream read: a new stream's first
    page is cut to what its byte budget fits of it, so that a table of large
    rows is not read 32 rows at a time only to skip all but the first.
    """

    largest = 0


@implementer(IPager)
class Pager:
    """
    Reads one query's result a page at a time, holding nothing in between.

    The first page fixes a high-water mark (the largest ``id`` then, unless
    one is given), so the stream is a snapshot of the append-only table.
    ``start``: for keyset plans, the keyset value after which rows are read.  :meth:`next_page` fires
    with ``(bodies, exhausted)``.

    A page is bounded in rows (``page_size``) and in bytes (``page_bytes``,
    plus one row).  Its ``LIMIT`` doubles from :data:`FIRST_PAGE` and is cut
    to what the byte budget fits of the largest row of the page before (for
    the first page, of the last page any stream read: ``row_sizes``), so
    rows past the budget are rarely sent by the database only to be skipped.
    """

    def __init__(self, store: IEventStore, plan: SelectPlan, page_size: int,
                 page_bytes: Optional[int] = None, row_sizes: Optional[RowSizeHint] = None,
                 start: Optional[int] = None, high_water: Optional[int] = None) -> None:
        self._store = store
        self._plan = plan
        self._max_page = max(1, page_size)
        self._max_bytes = page_bytes
        self._row_sizes = row_sizes
        self._size = min(FIRST_PAGE, self._max_page)
        if row_sizes is not None and row_sizes.largest and page_bytes is not None:
            self._size = min(self._size, max(1, page_bytes // row_sizes.largest))
        self._high_water: Optional[int] = high_water
        self._remaining = plan.limit
        self._position = plan.keyset_start if plan.keyset else plan.offset
        if start is not None:
            # (a subscription's history: the keyset rows after ``start``)
            self._position = start

    def next_page(self) -> "defer.Deferred[Tuple[List[str], bool]]":
        size = self._size
        if self._remaining is not None:
            size = min(size, self._remaining)
            if size == 0:
                return defer.succeed(([], True))
        d = self._store.read_page(self._plan, self._high_water, self._position, size,
                                  self._max_bytes)
        return d.addCallback(self._got_page, size)

    def _got_page(self, result: Page, size: int) -> Tuple[List[str], bool]:
        self._high_water, bodies, last, cut = result
        if self._plan.keyset:
            if last is not None:
                self._position = last
        else:
            self._position += len(bodies)
        if self._remaining is not None:
            self._remaining -= len(bodies)
        grown = min(size * 2, self._max_page)
        if self._max_bytes is not None and bodies:
            largest = max(map(len, bodies))
            grown = min(grown, max(1, self._max_bytes // largest))
            if self._row_sizes is not None:
                self._row_sizes.largest = largest
        self._size = max(grown, 1)
        exhausted = (len(bodies) < size and not cut) or self._remaining == 0
        return bodies, exhausted
