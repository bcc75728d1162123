"""
The events table, defined once.

Its columns (with their SQL types and how queries compare them), the columns
a ``$select`` returns by default, the secondary indexes and the collation
are written here and nowhere else: the DDL and the in-place upgrade
(:func:`create_statements`, :func:`plan_upgrade`), the query allow-list
(:class:`eventsource.query.TableSchema`), the INSERT statement and the
in-memory store of the tests are all derived from them, so they cannot
disagree.  The module is pure: it builds SQL text, :mod:`eventsource.store`
runs it.
"""

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

#: how queries compare a column's values (see :mod:`eventsource.query`);
#: UUID values are 16 bytes in the table and UUID text on the wire
TEXT, DATETIME, NUMBER, UUID = "text", "datetime", "number", "uuid"


@dataclass(frozen=True)
class Column:
    """One column: its name, its SQL definition and how queries compare it."""

    name: str
    sql_type: str
    kind: str = TEXT
    #: a stream id, domain or event name: a VARCHAR of at most ``length``
    #: characters, compared byte for byte (see :data:`COLLATION`)
    identifier: bool = False
    #: written by ``$insert`` (the others are the server's: id, append time)
    written: bool = False
    length: Optional[int] = None
    #: visible to version 1 queries (``$columns``, ``$where``...); the
    #: stream columns are not, so version 1 replies stay the original's
    v1: bool = True
    #: the SQL type an upgrade adds the column with, NULL-able until filled
    nullable_type: Optional[str] = None


@dataclass(frozen=True)
class Index:
    """
    A secondary index on ``columns`` then ``id``, so that a keyset page
    ("these columns equal, in id order", or a range of one column) is one
    range read.  ``keyset``: equality indexes; the others serve ranges.
    """

    name: str
    columns: Tuple[str, ...]
    keyset: bool = True
    #: a unique key on exactly ``columns`` (no ``id`` appended)
    unique: bool = False


#: the one collation of the table: stream ids, domains and event names are
#: identifiers, compared byte for byte (as in the original's ``utf8_bin``
#: table), so ``"p1"`` never matches ``"P1"``
COLLATION = "utf8mb4_bin"

#: the table's columns, in table order
COLUMNS: Tuple[Column, ...] = (
    Column("id", "BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY", NUMBER),
    Column("timestamp", "DATETIME(6) NOT NULL DEFAULT NOW(6)", DATETIME),
    Column("pid", "VARCHAR(255) NOT NULL", identifier=True, written=True, length=255),
    Column("domain", "VARCHAR(255) NOT NULL", identifier=True, written=True, length=255),
    Column("name", "VARCHAR(255) NOT NULL", identifier=True, written=True, length=255),
    Column("data", "JSON", written=True),
    # The stream columns: the event's 0-based number within its pid and a
    # UUIDv7, both assigned by the server's writer (see eventsource.store).
    Column("version", "BIGINT UNSIGNED NOT NULL", NUMBER, v1=False,
           nullable_type="BIGINT UNSIGNED NULL"),
    Column("event_id", "BINARY(16) NOT NULL", UUID, v1=False, nullable_type="BINARY(16) NULL"),
)

#: what a ``$select`` without ``$columns`` returns (the original service's
#: columns: ``id`` only when asked for explicitly)
DEFAULT_COLUMNS: Tuple[str, ...] = ("timestamp", "pid", "domain", "name", "data")

#: the secondary indexes; the keyset ones in the order queries prefer them
INDEXES: Tuple[Index, ...] = (
    Index("pid_id", ("pid",)),
    Index("domain_name_id", ("domain", "name")),
    Index("domain_id", ("domain",)),
    Index("name_id", ("name",)),
    Index("timestamp_id", ("timestamp",), keyset=False),
)

#: the unique keys: one version per stream position, one row per event id
#: (added last by an upgrade, once every row has its version and event id)
UNIQUE_KEYS: Tuple[Index, ...] = (
    Index("pid_version", ("pid", "version"), keyset=False, unique=True),
    Index("event_id", ("event_id",), keyset=False, unique=True),
)

COLUMN_NAMES: Tuple[str, ...] = tuple(column.name for column in COLUMNS)
#: the columns version 1 queries may name (the allow-list of ``$columns``, ``$where``...)
V1_COLUMN_NAMES: Tuple[str, ...] = tuple(c.name for c in COLUMNS if c.v1)
#: the columns the writer assigns to each row, after the written ones in INSERT order
STREAM_COLUMNS: Tuple[str, ...] = ("version", "event_id")
#: the columns ``$insert`` writes, in INSERT order
WRITTEN_COLUMNS: Tuple[str, ...] = tuple(c.name for c in COLUMNS if c.written)
#: the columns compared byte for byte, whose collation the upgrade checks
IDENTIFIER_COLUMNS: Tuple[str, ...] = tuple(c.name for c in COLUMNS if c.identifier)


#: version 2's names of the columns whose wire name is not the table's
V2_NAMES: Dict[str, str] = {"id": "position", "event_id": "eventId"}

#: what a version 2 ``$select`` without ``$columns`` returns, by version 2 name
V2_DEFAULT_COLUMNS: Tuple[str, ...] = (
    "position", "eventId", "pid", "version", "domain", "name", "timestamp", "data")


def columns_of_kind(kind: str) -> Tuple[str, ...]:
    """The names of the version 1 columns that queries compare as ``kind``."""
    return tuple(column.name for column in COLUMNS if column.kind == kind and column.v1)


def column(name: str) -> Column:
    """The column called ``name`` (a KeyError for any other name)."""
    for candidate in COLUMNS:
        if candidate.name == name:
            return candidate
    raise KeyError(name)


def quote(name: str) -> str:
    """An identifier backquoted for SQL (names here and checked table names only)."""
    return f"`{name}`"


def qualified(database: str, table: str) -> str:
    """The backquoted ``database.table`` of SQL."""
    return f"{quote(database)}.{quote(table)}"


def _index_sql(index: Index) -> str:
    if index.unique:
        return f"UNIQUE KEY {quote(index.name)} ({', '.join(quote(c) for c in index.columns)})"
    return f"KEY {quote(index.name)} ({', '.join(quote(c) for c in index.columns + ('id',))})"


def create_statements(database: str, table: str) -> List[str]:
    """The statements that create the database and the table, if missing."""
    definitions = [f"{quote(c.name)} {c.sql_type}" for c in COLUMNS]
    definitions += [_index_sql(index) for index in INDEXES + UNIQUE_KEYS]
    return [
        f"CREATE DATABASE IF NOT EXISTS {quote(database)} "
        f"CHARACTER SET utf8mb4 COLLATE {COLLATION}",
        f"CREATE TABLE IF NOT EXISTS {qualified(database, table)} ("
        + ", ".join(definitions)
        + f") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE={COLLATION}",
    ]


#: whether MariaDB checks that the table's ``data`` is JSON (parameters:
#: database, table): a ``JSON`` column has that constraint on MariaDB
DATA_CHECKED_SQL = ("SELECT COUNT(*) FROM information_schema.CHECK_CONSTRAINTS"
                    " WHERE CONSTRAINT_SCHEMA = %s AND TABLE_NAME = %s"
                    " AND REPLACE(CHECK_CLAUSE, '`', '') = 'json_valid(data)'")

#: whether the table exists (parameters: database, table)
TABLE_EXISTS_SQL = ("SELECT COUNT(*) FROM information_schema.TABLES"
                    " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s")
#: the table's columns and their collations (parameters: database, table)
COLUMNS_SQL = ("SELECT COLUMN_NAME, COLLATION_NAME FROM information_schema.COLUMNS"
               " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s")
#: the table's NULL-able columns (parameters: database, table)
NULLABLE_SQL = ("SELECT COLUMN_NAME FROM information_schema.COLUMNS"
                " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s AND IS_NULLABLE = 'YES'")
#: the names of the table's indexes (parameters: database, table)
INDEXES_SQL = ("SELECT DISTINCT INDEX_NAME FROM information_schema.STATISTICS"
               " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s")


class MissingColumns(Exception):
    """An existing table lacks columns that no upgrade can make up."""


@dataclass(frozen=True)
class Upgrade:
    """What an existing table needs: ``ALTER TABLE`` clauses and their log lines."""

    alterations: Tuple[str, ...] = ()
    changes: Tuple[str, ...] = ()
    #: the identifier columns' collations, when they must be converted
    converted_from: Tuple[str, ...] = ()
    #: the stream columns are (or were just made) NULL-able: every row must
    #: be numbered (:func:`fill_sql`) before :func:`finish_sql`
    fill: bool = False

    def sql(self, database: str, table: str) -> str:
        """The one ``ALTER TABLE`` statement making every alteration."""
        return f"ALTER TABLE {qualified(database, table)} " + ", ".join(self.alterations)


def plan_upgrade(columns: Dict[str, Optional[str]], indexes: Iterable[str],
                 nullable: Iterable[str] = ()) -> Upgrade:
    """
    The upgrade of a table made by the original service (no ``id``, utf8mb3
    columns) or by an earlier release of this one (case-insensitive ids,
    fewer indexes, no stream columns), from its columns (lower-cased name ->
    collation), index names and NULL-able columns.  Raises :class:`MissingColumns` when only
    ``id`` and the stream columns could be added.
    """
    missing = set(COLUMN_NAMES) - {"id"} - set(STREAM_COLUMNS) - set(columns)
    if missing:
        raise MissingColumns(sorted(missing))
    alterations, changes = [], []
    collations = {columns[name] for name in IDENTIFIER_COLUMNS}
    converted_from: Tuple[str, ...] = ()
    if collations != {COLLATION}:
        # The original's utf8 table (utf8_bin) and this project's earlier
        # tables (utf8mb4_unicode_ci, which matched "p1" with "P1") alike.
        converted_from = tuple(sorted(str(c) for c in collations))
        alterations.append(f"CONVERT TO CHARACTER SET utf8mb4 COLLATE {COLLATION}")
        changes.append(f"converted to utf8mb4 ({COLLATION})")
    if "id" not in columns:
        # InnoDB numbers the existing rows in their stored (insertion) order.
        alterations.append(f"ADD COLUMN {quote('id')} {column('id').sql_type} FIRST")
        changes.append("added id")
    fill = bool(set(STREAM_COLUMNS) & set(nullable))
    for name in STREAM_COLUMNS:
        if name not in columns:
            # NULL-able until every row has its value (see fill_sql)
            alterations.append(f"ADD COLUMN {quote(name)} {column(name).nullable_type}")
            changes.append(f"added {name}")
            fill = True
    present = set(indexes)
    # (the unique keys allow the NULLs of rows not numbered yet; the fill
    # reads each stream's last version through pid_version)
    for index in INDEXES + UNIQUE_KEYS:
        if index.name not in present:
            alterations.append("ADD " + _index_sql(index))
            changes.append(f"added index {index.name}")
    return Upgrade(tuple(alterations), tuple(changes), converted_from, fill)


def first_unfilled_sql(table_sql: str) -> str:
    """
    The smallest ``id`` whose stream columns are not filled yet (no row when
    all are): the fill goes in ``id`` order and commits whole ranges, so
    every row before it is filled and every row from it on is not.
    """
    return (f"SELECT {quote('id')} FROM {table_sql} WHERE {quote('version')} IS NULL"
            f" OR {quote('event_id')} IS NULL ORDER BY {quote('id')} LIMIT 1")


def unfilled_count_sql(table_sql: str) -> str:
    """How many rows the fill has left (for its progress line)."""
    return (f"SELECT COUNT(*) FROM {table_sql} WHERE {quote('version')} IS NULL"
            f" OR {quote('event_id')} IS NULL")


#: a UUIDv7 (RFC 9562) of a row's ``timestamp`` (UTC), as 16 bytes: 48-bit
#: Unix milliseconds, version 7, 12 random bits, the variant and 62 random bits
_UUID7_OF_TIMESTAMP = (
    "UNHEX(CONCAT("
    "LPAD(HEX(COALESCE(FLOOR(UNIX_TIMESTAMP(u.`timestamp`) * 1000), 0)), 12, '0'),"
    " '7', SUBSTR(HEX(RANDOM_BYTES(2)), 1, 3), HEX(8 + FLOOR(RAND() * 4)),"
    " SUBSTR(HEX(RANDOM_BYTES(8)), 1, 15)))")


def fill_sql(table_sql: str) -> str:
    """
    The UPDATE filling the stream columns of the rows with ``id`` in
    ``[first, end)`` (parameters: first, end), all rows before them being
    filled and none after: each row's version follows its ``pid``'s last
    version (one backward step into ``pid_version`` per pid, where NULLs
    sort first), in ``id`` order.  The numbering depends only on the rows,
    so a fill stopped and restarted numbers them exactly as one run would.
    """
    return (
        f"UPDATE {table_sql} AS u JOIN ("
        f"SELECT c.`id`, COALESCE((SELECT p.`version` + 1 FROM {table_sql} AS p"
        " WHERE p.`pid` = c.`pid` AND p.`version` IS NOT NULL"
        " ORDER BY p.`version` DESC LIMIT 1), 0)"
        " + ROW_NUMBER() OVER (PARTITION BY c.`pid` ORDER BY c.`id`) - 1 AS v"
        f" FROM {table_sql} AS c WHERE c.`id` >= %s AND c.`id` < %s"
        ") AS n ON u.`id` = n.`id`"
        f" SET u.`version` = n.v, u.`event_id` = {_UUID7_OF_TIMESTAMP}")


def finish_sql(table_sql: str) -> str:
    """The stream columns made NOT NULL, once every row is numbered."""
    clauses = [f"MODIFY {quote(name)} {column(name).sql_type}" for name in STREAM_COLUMNS]
    return f"ALTER TABLE {table_sql} " + ", ".join(clauses)


#: the columns of an INSERT: the request's, then the writer's
INSERT_COLUMNS: Tuple[str, ...] = WRITTEN_COLUMNS + STREAM_COLUMNS


def insert_sql(table_sql: str, count: int, positions: bool = False) -> str:
    """
    The INSERT of ``count`` rows of :data:`INSERT_COLUMNS` into
    ``table_sql`` (already quoted); the append time is the column's default,
    ``NOW(6)``: always the server's.  ``positions``: each row starts with its
    ``id``, given by the writer (otherwise auto-increment allocates it).
    """
    columns = (("id",) if positions else ()) + INSERT_COLUMNS
    row = "(" + ", ".join(["%s"] * len(columns)) + ")"
    return (f"INSERT INTO {table_sql} ({', '.join(quote(c) for c in columns)}) VALUES "
            + ", ".join([row] * count))


def last_versions_sql(table_sql: str, count: int, top: bool = False) -> str:
    """
    The last version of each of ``count`` pids (parameters: the pids), as
    ``(pid, version)`` rows, both NULL for a pid without events.  A ``MAX``
    on one pid is one dive into the ``pid_version`` key whatever the
    table's statistics (an ``IN (...) GROUP BY`` read every version of the
    pids until ``ANALYZE TABLE`` made MariaDB choose a loose scan).

    ``top``: first, in the same statement, the table's largest ``id`` (0
    when empty) as the row ``(NULL, top)``, told from a pid without events
    by its value.
    """
    one = (f"SELECT {quote('pid')}, MAX({quote('version')}) FROM {table_sql}"
           f" WHERE {quote('pid')} = %s")
    parts = [one] * count
    if top:
        parts.insert(0, f"SELECT NULL, COALESCE(MAX({quote('id')}), 0) FROM {table_sql}")
    return " UNION ALL ".join(parts)


def stored_events_sql(table_sql: str, count: int) -> str:
    """
    Where the events of ``count`` event ids are stored (parameters: the 16-byte
    ids), as ``(event_id, pid, version, id)`` rows: one statement on the
    ``event_id`` unique key, however many ids.
    """
    return (f"SELECT {quote('event_id')}, {quote('pid')}, {quote('version')}, {quote('id')}"
            f" FROM {table_sql} WHERE {quote('event_id')} IN ({', '.join(['%s'] * count)})")


def high_water_sql(table_sql: str) -> str:
    """The largest ``id`` of the table (0 when empty): the snapshot of a fetch."""
    return f"SELECT COALESCE(MAX({quote('id')}), 0) FROM {table_sql}"


#: the suffix of the append lock table's name (see :func:`append_lock_name`)
APPEND_LOCK_SUFFIX = "_append_lock"


def append_lock_name(table: str) -> str:
    """
    The append lock table of the events table ``table``: one row, which
    every writer locks first in each of its transactions (see
    :func:`lock_append_sql`).  Its name is the table's with
    :data:`APPEND_LOCK_SUFFIX`, so it must fit MariaDB's 64 characters.
    """
    name = table + APPEND_LOCK_SUFFIX
    if len(name) > 64:
        raise ValueError(f"the table name {table!r} is too long: its append lock table "
                         f"{name!r} would pass MariaDB's 64 characters")
    return name


#: the append lock row's counter: every write transaction adds one to it
#: (see :func:`lock_append_sql`)
APPEND_LOCK_COUNTER = "taken"


def append_lock_statements(database: str, table: str) -> List[str]:
    """The statements that make the append lock table and its one row, if missing."""
    lock = qualified(database, append_lock_name(table))
    return [
        f"CREATE TABLE IF NOT EXISTS {lock} ({quote('id')} TINYINT UNSIGNED NOT NULL"
        f" PRIMARY KEY, {quote(APPEND_LOCK_COUNTER)} BIGINT UNSIGNED NOT NULL DEFAULT 0)"
        " ENGINE=InnoDB",
        f"INSERT INTO {lock} ({quote('id')}) VALUES (1)"
        f" ON DUPLICATE KEY UPDATE {quote('id')} = {quote('id')}",
    ]


def append_lock_upgrade_sql(database: str, table: str) -> str:
    """
    The counter added to an append lock table of an earlier release (whose
    one column was ``id``, locked with ``SELECT ... FOR UPDATE``).
    """
    return (f"ALTER TABLE {qualified(database, append_lock_name(table))} ADD COLUMN"
            f" {quote(APPEND_LOCK_COUNTER)} BIGINT UNSIGNED NOT NULL DEFAULT 0")


def lock_append_sql(lock_sql: str) -> str:
    """
    The first statement of every write transaction: one added to the append
    lock row's counter, so the row is locked (exclusively, until COMMIT) and
    changed.  Writers that take it commit one after the other, so their
    events' positions, allocated after it, commit in position order across
    processes: a reader that has seen position p never later sees a new
    event below p.

    The change is what makes it hold on a Galera cluster too: a row lock is
    local to its node (a ``SELECT ... FOR UPDATE`` is neither replicated
    nor certified), but a changed row is in the transaction's write set, so
    two transactions that took the lock on different nodes conflict at
    certification and one of them is rolled back (error 1213) and written
    again.  (Matched rows: ``cursor.rowcount`` is 0 when the row is gone.)
    """
    counter = quote(APPEND_LOCK_COUNTER)
    return f"UPDATE {lock_sql} SET {counter} = {counter} + 1 WHERE {quote('id')} = 1"


def restore_lock_row_sql(lock_sql: str) -> str:
    """The lock row made again (and taken: its counter changed) when someone deleted it."""
    counter = quote(APPEND_LOCK_COUNTER)
    return (f"INSERT INTO {lock_sql} ({quote('id')}, {counter}) VALUES (1, 1)"
            f" ON DUPLICATE KEY UPDATE {counter} = {counter} + 1")


#: the table's columns a subscription's tail reads, in version 2's default
#: order (``id`` is the position), then the append time to the microsecond
#: (the row's own ``timestamp`` is read in its wire form, milliseconds)
TAIL_COLUMNS: Tuple[str, ...] = tuple(
    {new: old for old, new in V2_NAMES.items()}.get(c, c) for c in V2_DEFAULT_COLUMNS)


def tail_sql(table_sql: str) -> str:
    """
    The events after a position (parameters: the position, the most rows),
    in position order: the columns of :data:`TAIL_COLUMNS`, then the append
    time as ``YYYY-MM-DD HH:MM:SS.ffffff`` text.
    """
    columns = ", ".join(quote(c) for c in TAIL_COLUMNS)
    return (f"SELECT {columns}, CAST({quote('timestamp')} AS CHAR(26)) FROM {table_sql}"
            f" WHERE {quote('id')} > %s ORDER BY {quote('id')} LIMIT %s")


def match_rows_sql(table_sql: str, conditions: List[str], count: int) -> str:
    """
    Whether each of ``count`` rows (parameters: each condition's own, then
    the ids) meets each condition (``WHERE`` fragments of compiled queries):
    ``(id, met_1, met_2, ...)`` rows, NULL counted as not met.
    """
    tests = "".join(f", ({condition}) IS TRUE" for condition in conditions)
    return (f"SELECT {quote('id')}{tests} FROM {table_sql}"
            f" WHERE {quote('id')} IN ({', '.join(['%s'] * count)})")


def statement_limited(sql: str, seconds: float) -> str:
    """``sql`` (a SELECT) run under MariaDB's ``max_statement_time``."""
    if not seconds:
        return sql
    return f"SET STATEMENT max_statement_time={seconds:.6f} FOR {sql}"
