"""
The MySQL boundary: the events table, appends, and pages of query results.

All SQL runs in an ``adbapi`` pool of ``pymysql`` connections (one thread per
connection).  Streams never hold a connection or a thread between pages: a
:class:`Pager` asks for one page at a time (keyset on ``id`` for the default
order, ``LIMIT``/``OFFSET`` over a snapshot for ordered and grouped queries),
so a thousand streams waiting on their clients cost no database resources.

Rows are encoded to their wire form in the pool thread, so the reactor
thread only moves finished message bodies.
"""

from collections import deque

from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from eventsource import wire

log = Logger()

#: pymysql error codes that mean the connection died under us
LOST_CONNECTION = frozenset({0, 2006, 2013, 2014, 2045, 2055})

#: the first page of a stream is small (quick first row, little memory for
#: streams that are opened and left idle); pages then double up to page_size
FIRST_PAGE = 32


def _conversions():
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

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


def _is_lost_connection(error) -> bool:
    import pymysql

    if isinstance(error, (pymysql.err.OperationalError, pymysql.err.InterfaceError)):
        return bool(error.args) and error.args[0] in LOST_CONNECTION
    return False


def _guarded(work):
    """Wrap ``work`` so a connection lost while it runs is marked retryable."""

    def interaction(txn, *args):
        try:
            return work(txn, *args)
        except Exception as error:
            if _is_lost_connection(error):
                raise ConnectionLostBeforeCommit(error) from error
            raise

    return interaction


#: the one collation of the table's text columns: stream ids, domains and
#: event names are identifiers, compared byte for byte (as in the original's
#: ``utf8_bin`` table), so ``"p1"`` never matches ``"P1"``
COLLATION = "utf8mb4_bin"

#: MariaDB error codes of a statement the user has no privilege for
ACCESS_DENIED = frozenset({1044, 1142})

#: the secondary indexes of the events table, each ending in ``id`` so that
#: a keyset page is one range read (query.TableSchema names them too)
INDEXES = (
    ("pid_id", "`pid`, `id`"),
    ("domain_name_id", "`domain`, `name`, `id`"),
    ("domain_id", "`domain`, `id`"),
    ("name_id", "`name`, `id`"),
    ("timestamp_id", "`timestamp`, `id`"),
)


def _schema_ddl(database, table):
    qualified = f"`{database}`.`{table}`"
    return [
        f"CREATE DATABASE IF NOT EXISTS `{database}` "
        f"CHARACTER SET utf8mb4 COLLATE {COLLATION}",
        f"CREATE TABLE IF NOT EXISTS {qualified} ("
        " `id` BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,"
        " `timestamp` DATETIME(6) NOT NULL DEFAULT NOW(6),"
        " `pid` VARCHAR(255) NOT NULL,"
        " `domain` VARCHAR(255) NOT NULL,"
        " `name` VARCHAR(255) NOT NULL,"
        " `data` JSON,"
        + ",".join(f" KEY `{name}` ({columns})" for name, columns in INDEXES)
        + f") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE={COLLATION}",
    ]


def ensure_schema(txn, database, table):
    """
    Create the database and events table if missing, and upgrade in place a
    table made by the original service (no ``id``, utf8mb3 columns) or by an
    earlier release of this one (case-insensitive ids).

    Returns the list of changes made (for the log).
    """
    changes = []
    txn.execute(
        "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
        (database, table),
    )
    existed = txn.fetchone()[0] > 0
    if not existed:
        # (only then: a read-only server's user may lack CREATE privileges)
        for statement in _schema_ddl(database, table):
            txn.execute(statement)
        return ["created table"]
    qualified = f"`{database}`.`{table}`"
    txn.execute(
        "SELECT COLUMN_NAME, COLLATION_NAME FROM information_schema.COLUMNS"
        " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
        (database, table),
    )
    columns = {name.lower(): collation for name, collation in txn.fetchall()}
    missing = {"timestamp", "pid", "domain", "name", "data"} - set(columns)
    if missing:
        raise RuntimeError(
            f"table {database}.{table} exists but lacks the columns {sorted(missing)}"
        )
    alterations = []
    collations = {columns[name] for name in ("pid", "domain", "name")}
    if collations != {COLLATION}:
        # The original's utf8 table (utf8_bin) and this project's earlier
        # tables (utf8mb4_unicode_ci, which matched "p1" with "P1") alike.
        log.warn("events table {database}.{table}: ids are collated {collations}; converting "
                 "the table to {collation} so that pid, domain and name compare byte for byte",
                 database=database, table=table, collations=", ".join(sorted(collations)),
                 collation=COLLATION)
        alterations.append(f"CONVERT TO CHARACTER SET utf8mb4 COLLATE {COLLATION}")
        changes.append(f"converted to utf8mb4 ({COLLATION})")
    if "id" not in columns:
        # InnoDB numbers the existing rows in their stored (insertion) order.
        alterations.append(
            "ADD COLUMN `id` BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY FIRST"
        )
        changes.append("added id")
    txn.execute(
        "SELECT DISTINCT INDEX_NAME FROM information_schema.STATISTICS"
        " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
        (database, table),
    )
    indexes = {row[0] for row in txn.fetchall()}
    for name, columns in INDEXES:
        if name not in indexes:
            alterations.append(f"ADD KEY `{name}` ({columns})")
            changes.append(f"added index {name}")
    if alterations:
        try:
            txn.execute(f"ALTER TABLE {qualified} " + ", ".join(alterations))
        except Exception as error:
            if getattr(error, "args", None) and error.args[0] in ACCESS_DENIED:
                raise RuntimeError(
                    f"table {database}.{table} needs an upgrade ({', '.join(changes)}) that this"
                    " MariaDB user may not make: start the server once with a user that may"
                    " ALTER the table"
                ) from error
            raise
    return changes


def _encode_page(txn, strip_keyset):
    """Encode the rows of the last statement; returns ``(bodies, last_keyset)``."""
    names = [column[0] for column in txn.description]
    rows = txn.fetchall()
    last = None
    if strip_keyset:
        names = names[:-1]
        bodies = [wire.encode_row(names, row[:-1]) for row in rows]
        if rows:
            last = rows[-1][-1]
    else:
        bodies = [wire.encode_row(names, row) for row in rows]
    return bodies, last


def _high_water(txn, table):
    txn.execute(f"SELECT COALESCE(MAX(`id`), 0) FROM {table}")
    return int(txn.fetchone()[0])


def _read_page(txn, plan, table, high_water, position, size):
    if high_water is None:
        high_water = _high_water(txn, table)
    if plan.keyset:
        sql, params = plan.page_sql(position, high_water, size)
    else:
        sql, params = plan.offset_sql(position, high_water, size)
    txn.execute(sql, params)
    bodies, last = _encode_page(txn, plan.keyset)
    return high_water, bodies, last


def _insert_sql(table, count):
    # (the append time is the column's default, NOW(6): always the server's)
    return (
        f"INSERT INTO {table} (`pid`, `domain`, `name`, `data`) VALUES "
        + ", ".join(["(%s, %s, %s, %s)"] * count)
    )


def _insert_batch(txn, table, batch, consecutive_ids):
    """
    Append the rows of several requests in one transaction.

    Returns ``(affected_rows, insert_id)`` per request.  With consecutive
    auto-increment ids (``innodb_autoinc_lock_mode`` 0 or 1 and an increment
    of 1) one multi-row statement writes them all and each request's first
    id follows from its place in it; otherwise every request gets its own
    statement, still in the one transaction.
    """
    if consecutive_ids and len(batch) > 1:
        rows = [row for request in batch for row in request]
        txn.execute(_insert_sql(table, len(rows)), [value for row in rows for value in row])
        if txn.rowcount != len(rows):
            raise RuntimeError(f"inserted {txn.rowcount} rows of {len(rows)}")
        first = txn.lastrowid
        results = []
        for request in batch:
            results.append((len(request), first))
            first += len(request)
        return results
    results = []
    for request in batch:
        txn.execute(_insert_sql(table, len(request)), [value for row in request for value in row])
        results.append((txn.rowcount, txn.lastrowid or 0))
    return results


def _autoinc_settings(txn):
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

    def __init__(self, store, max_rows=2000, max_bytes=4 * 1024 * 1024):
        self._store = store
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._queue = deque()
        self._busy = False
        self.batches = 0

    def submit(self, rows):
        d = defer.Deferred()
        self._queue.append((rows, d, sum(len(row[3]) for row in rows)))
        if not self._busy:
            self._write_next()
        return d

    def _take_batch(self):
        batch, count, size = [], 0, 0
        while self._queue:
            rows, d, nbytes = self._queue[0]
            if batch and (count + len(rows) > self._max_rows or size + nbytes > self._max_bytes):
                break
            self._queue.popleft()
            batch.append((rows, d))
            count += len(rows)
            size += nbytes
        return batch

    def _write_next(self):
        batch = self._take_batch()
        if not batch:
            self._busy = False
            return
        self._busy = True
        self.batches += 1
        d = self._store._write([rows for rows, _ in batch])
        d.addCallbacks(self._written, self._batch_failed, callbackArgs=(batch,), errbackArgs=(batch,))
        d.addBoth(lambda _: self._write_next())

    def _written(self, results, batch):
        for (_, d), result in zip(batch, results):
            d.callback(result)

    @defer.inlineCallbacks
    def _batch_failed(self, failure, batch):
        if len(batch) == 1 or _is_lost_connection(failure.value):
            # A connection lost at COMMIT leaves the outcome unknown (MariaDB
            # may have committed): writing the rows again could store them
            # twice, so every request of the batch fails instead.
            for _, d in batch:
                d.errback(failure)
            return
        log.warn("a batch of {count} persists failed ({error}); writing them one by one",
                 count=len(batch), error=failure.value)
        for rows, d in batch:
            try:
                (result,) = yield self._store._write([rows])
            except Exception:
                d.errback()
            else:
                d.callback(result)


def mysql_tls_context(config):
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


class Store:
    """
    The events table behind an ``adbapi`` pool.

    :param config: the :class:`eventsource.config.Config`.
    :param reactor: the reactor the pool reports back to.
    """

    def __init__(self, config, reactor):
        self._config = config
        self._reactor = reactor
        self._pool = None
        self._writer = None
        self._consecutive_ids = False
        self.table = f"`{config.database}`.`{config.table_name}`"

    def _connect_kwargs(self):
        config = self._config
        kwargs = dict(
            host=config.mysql_host,
            port=config.mysql_port,
            user=config.mysql_user,
            password=config.mysql_password,
            charset=config.mysql_charset,
            autocommit=False,
            init_command="SET time_zone = '+00:00'",
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

    def start(self):
        """Open the pool and make sure the schema is there; fires with the changes made."""
        size = self._config.pool_size
        self._pool = adbapi.ConnectionPool(
            "pymysql",
            cp_min=min(2, size),
            cp_max=size,
            cp_reconnect=True,
            cp_noisy=False,
            cp_reactor=self._reactor,
            **self._connect_kwargs(),
        )
        self._pool.start()
        self._writer = GroupCommitWriter(self)
        d = self._run(_autoinc_settings)
        d.addCallback(self._set_autoinc)
        d.addCallback(lambda _: self._run(ensure_schema, self._config.database, self._config.table_name))
        return d

    def _set_autoinc(self, consecutive):
        self._consecutive_ids = consecutive

    def stop(self):
        """Close every connection and stop the pool's threads."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        return defer.succeed(None)

    def _run(self, work, *args):
        """Run ``work(txn, *args)`` in the pool; once more if the connection had died."""
        interaction = _guarded(work)
        pool = self._pool
        if pool is None:
            return defer.fail(RuntimeError("the store is not running"))

        def again(txn, *args):
            # The retry may run on another pool thread whose connection died
            # the same way (MariaDB restarted, every connection killed):
            # check it first, reconnecting if it is dead.
            txn.connection.ping(reconnect=True)
            return interaction(txn, *args)

        def retry(failure):
            failure.trap(ConnectionLostBeforeCommit)
            log.warn("MySQL connection lost ({error}); retrying once on a new one",
                     error=failure.value)
            return pool.runInteraction(again, *args)

        def unwrap(failure):
            if failure.check(ConnectionLostBeforeCommit):
                return Failure(failure.value.error)
            return failure

        d = pool.runInteraction(interaction, *args)
        d.addErrback(retry)
        d.addErrback(unwrap)
        return d

    def insert(self, plan):
        """
        Append the rows of an :class:`eventsource.query.InsertPlan` atomically;
        fires with ``(affected_rows, insert_id)``.
        """
        return self._writer.submit(plan.rows)

    def _write(self, batch):
        return self._run(_insert_batch, self.table, batch, self._consecutive_ids)

    def pager(self, plan):
        """A :class:`Pager` over the rows of an :class:`eventsource.query.SelectPlan`."""
        return Pager(self, plan, self._config.page_size)

    def read_page(self, plan, high_water, position, size):
        return self._run(_read_page, plan, self.table, high_water, position, size)


class Pager:
    """
    Reads one query's result a page at a time, holding nothing in between.

    The first page fixes a high-water mark (the largest ``id`` then), so the
    stream is a snapshot of the append-only table.  :meth:`next_page` fires
    with ``(bodies, exhausted)``.
    """

    def __init__(self, store, plan, page_size):
        self._store = store
        self._plan = plan
        self._max_page = max(1, page_size)
        self._size = min(FIRST_PAGE, self._max_page)
        self._high_water = None
        self._remaining = plan.limit
        self._position = 0 if plan.keyset else plan.offset

    def next_page(self):
        size = self._size
        if self._remaining is not None:
            size = min(size, self._remaining)
            if size == 0:
                return defer.succeed(([], True))
        self._size = min(self._size * 2, self._max_page)
        d = self._store.read_page(self._plan, self._high_water, self._position, size)
        d.addCallback(self._got_page, size)
        return d

    def _got_page(self, result, size):
        self._high_water, bodies, last = result
        if self._plan.keyset:
            if last is not None:
                self._position = last
        else:
            self._position += len(bodies)
        if self._remaining is not None:
            self._remaining -= len(bodies)
        exhausted = len(bodies) < size or self._remaining == 0
        return bodies, exhausted
