"""
The JSON query language: turns a client's ``$select`` / ``$insert`` into
parameterised SQL for MariaDB.

This is the only place where SQL text is built from client input, so it is
deliberately small and strict:

* identifiers come only from the table's own columns (and, where allowed,
  the query's own aliases), and are always backquoted by us;
* every value becomes a bound ``%s`` parameter, never SQL text;
* anything not understood (unknown ``$keys``, other tables, joins, raw-SQL
  helpers, wrong types) is refused with a :class:`QueryError` whose message
  is a short sentence safe to log and to show to the client;
* the size of a query is bounded by :class:`Limits`.

The module is pure: no reactor, no database driver, no I/O.  The server
compiles a query once into a :class:`SelectPlan` and then asks the plan for
the SQL of each page it fetches.  The syntax is a safe subset of
json-sql-builder2's, which the original Node.js service exposed; see
``docs/QUERY.md`` for the user documentation.
"""

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from eventsource import appends, schema, wire


#: a decoded JSON value from a request (checked where it is used)
JSON = Any

__all__ = [
    "QueryError",
    "QueryRefused",
    "QueryTooLarge",
    "Limits",
    "TableSchema",
    "SelectPlan",
    "InsertPlan",
    "compile_select",
    "compile_insert",
    "compile_append",
    "parse_timestamp",
]


class QueryError(ValueError):
    """
    A refused or malformed query.

    ``str(exc)`` is a short human sentence that is safe to log and to send
    back: quoted input is truncated, containers are described, not dumped.
    ``code`` is the version 2 error code (docs/PROTOCOL.md).
    """

    code = "badRequest"


class QueryRefused(QueryError):
    """A query naming another table, an unknown column or an operator we do not have."""

    code = "refused"


class QueryTooLarge(QueryError):
    """A query or insert over the limits (:class:`Limits`, ``max_documents``)."""

    code = "tooLarge"


@dataclass(frozen=True)
class Limits:
    """Bounds on the size of one query, so no request can make us (or the
    database) do unbounded work."""

    #: nesting depth of ``$where``/``$having`` objects and lists
    max_depth: int = 32
    #: total number of conditions, values and listed columns in a query
    max_terms: int = 1000
    #: maximum length of one ``$in``/``$nin`` list
    max_in_list: int = 1000


# Characters that may never appear in an identifier we emit: the quote
# character itself, pymysql's format character and NUL.
_BAD_IDENTIFIER_CHARS = ("`", "%", "\x00")


@dataclass(frozen=True)
class TableSchema:
    """
    The events table a query may read or write.

    Only these columns can ever appear in SQL; ``default_columns`` is what a
    ``$select`` without ``$columns`` returns (the original service's columns:
    ``id`` only when asked for explicitly); ``datetime_columns`` are the
    columns whose string values are ISO-8601 timestamps.
    """

    database: str
    name: str
    columns: Tuple[str, ...] = schema.V1_COLUMN_NAMES
    default_columns: Tuple[str, ...] = schema.DEFAULT_COLUMNS
    datetime_columns: Tuple[str, ...] = schema.columns_of_kind(schema.DATETIME)
    #: columns compared as numbers; the others (not datetime) are text
    numeric_columns: Tuple[str, ...] = schema.columns_of_kind(schema.NUMBER)
    #: indexes that serve "rows with these columns equal, in id order":
    #: (index name, columns), in the order they are preferred; a one-column
    #: index also serves ``column $in [...]`` (see :func:`_keyset_access`)
    keyset_indexes: Tuple[Tuple[str, Tuple[str, ...]], ...] = tuple((i.name, i.columns) for i in schema.INDEXES if i.keyset)
    #: indexes that serve a range of one column: (index name, column)
    range_indexes: Tuple[Tuple[str, str], ...] = tuple((i.name, i.columns[0]) for i in schema.INDEXES
                                 if not i.keyset and len(i.columns) == 1)
    #: the names whose table column is another: (name, table column)
    renamed: Tuple[Tuple[str, str], ...] = ()
    #: columns of 16-byte UUIDs (UUID text on the wire)
    uuid_columns: Tuple[str, ...] = ()
    #: columns of JSON text sent as the JSON value itself (version 2's ``data``)
    json_columns: Tuple[str, ...] = ()
    #: whether a query on one ``pid`` is read in version order from the
    #: ``pid_version`` key (version 2's stream reads)
    stream_reads: bool = False

    @classmethod
    def version2(cls, database: str, name: str) -> "TableSchema":
        """The table as version 2 queries see it: every column, under version 2's names."""
        def named(columns: Tuple[str, ...]) -> Tuple[str, ...]:
            return tuple(schema.V2_NAMES.get(column, column) for column in columns)

        def of_kind(kind: str) -> Tuple[str, ...]:
            return named(tuple(c.name for c in schema.COLUMNS if c.kind == kind))

        return cls(
            database, name,
            columns=named(schema.COLUMN_NAMES),
            default_columns=schema.V2_DEFAULT_COLUMNS,
            datetime_columns=of_kind(schema.DATETIME),
            numeric_columns=of_kind(schema.NUMBER),
            renamed=tuple((new, old) for old, new in schema.V2_NAMES.items()),
            uuid_columns=of_kind(schema.UUID),
            json_columns=("data",),
            stream_reads=True,
        )

    def __post_init__(self) -> None:
        for ident in (self.database, self.name) + tuple(self.columns):
            if (not isinstance(ident, str) or not ident
                    or any(c in ident for c in _BAD_IDENTIFIER_CHARS)):
                raise ValueError("invalid identifier in table schema: %r" % (ident,))
        if "id" not in (self.table_column(c) for c in self.columns):
            raise ValueError("the events table must have an `id` column")
        for extra in (self.default_columns, self.datetime_columns, self.numeric_columns,
                      self.uuid_columns, self.json_columns):
            if not set(extra) <= set(self.columns):
                raise ValueError("schema names columns the table does not have")

    def table_column(self, name: str) -> str:
        """The table's own name of the column a query calls ``name``."""
        for new, old in self.renamed:
            if new == name:
                return old
        return name

    def column_sql(self, name: str) -> str:
        """The backquoted table column of ``name`` (one of :attr:`columns`)."""
        return _quote_ident(self.table_column(name))

    def reserved_name(self, name: str) -> bool:
        """Whether ``name`` (compared as MariaDB compares names) is a column, by
        the query's name or the table's: no alias may take it."""
        lowered = name.lower()
        return any(lowered == c.lower() or lowered == self.table_column(c).lower()
                   for c in self.columns)

    def matches(self, ref: JSON) -> bool:
        """True when ``ref`` names this table: ``"database.table"`` or the
        bare ``"table"``.  Anything else (other tables, non-strings) is
        False."""
        if not isinstance(ref, str):
            return False
        return ref == self.name or ref == "%s.%s" % (self.database, self.name)

    @property
    def quoted(self) -> str:
        """The fully qualified, backquoted table name for SQL."""
        return "%s.%s" % (_quote_ident(self.database), _quote_ident(self.name))


# --------------------------------------------------------------------------
# small helpers

#: ``$limit``/``$offset`` upper bound: the largest integer a JavaScript
#: client can send exactly.
MAX_COUNT = 2 ** 53 - 1

#: the longest value of an identifier column written by ``$insert``
MAX_FIELD_LENGTH = min(schema.column(name).length or 0 for name in schema.IDENTIFIER_COLUMNS)

_ALIAS = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")

_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?"
    r"(?:([Zz])|([+-])(\d{2})(?::?(\d{2}))?)?)?\Z"
)


def _show(value: JSON) -> str:
    """A short, safe rendering of a piece of input for an error message."""
    if isinstance(value, str):
        # readable Unicode, escaped control characters and lone surrogates,
        # at most ~60 characters of it
        text = json.dumps(value[:61], ensure_ascii=False)[1:-1]
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        return '"%s"' % (text[:57] + "..." if len(text) > 60 else text,)
    if value is None or isinstance(value, (bool, int, float)):
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 10 ** 30:
                return "a very large number"
        return json.dumps(value)
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return "a %s" % (type(value).__name__,)


def _quote_ident(name: str) -> str:
    """Backquote an identifier that is already known to be allowed."""
    if any(c in name for c in _BAD_IDENTIFIER_CHARS):
        raise QueryError("identifier %s is not allowed" % (_show(name),))
    return "`%s`" % (name,)


def _is_int(value: JSON) -> bool:
    """A JSON integer (``bool`` is not an integer here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_unicode(text: str) -> bool:
    """Whether MariaDB can store ``text`` (no lone UTF-16 surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(text: str, what: str) -> str:
    """Refuse strings MariaDB cannot store (lone UTF-16 surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise QueryError("%s is not valid Unicode text" % (what,)) from None
    return text


def parse_timestamp(text: JSON, what: str = "timestamp") -> datetime:
    """
    Parse an ISO-8601 timestamp into a naive UTC :class:`datetime`.

    Accepts ``2020-04-06``, ``2020-04-06T11:35``, ``2020-04-06T11:35:18.414Z``
    and the same with ``+02:00``/``+0200``/``+02`` offsets; no zone means
    UTC.  Fractions beyond microseconds are truncated.  Raises QueryError.
    """
    if not isinstance(text, str):
        raise QueryError("%s must be an ISO-8601 string, not %s" % (what, _show(text)))
    match = _TIMESTAMP.match(text)
    if match is None:
        raise QueryError("%s %s is not an ISO-8601 timestamp" % (what, _show(text)))
    (year, month, day, hour, minute, second, fraction,
     _zulu, sign, off_hours, off_minutes) = match.groups()
    try:
        moment = datetime(
            int(year), int(month), int(day),
            int(hour or 0), int(minute or 0), int(second or 0),
            int((fraction or "0")[:6].ljust(6, "0")),
        )
        if sign:
            off_h, off_m = int(off_hours), int(off_minutes or 0)
            if off_h > 23 or off_m > 59:
                raise ValueError("offset out of range")
            offset = timedelta(hours=off_h, minutes=off_m)
            moment = moment - offset if sign == "+" else moment + offset
    except (ValueError, OverflowError):
        raise QueryError("%s %s is not a valid date and time" % (what, _show(text))) from None
    return moment


# --------------------------------------------------------------------------
# conditions: $where and $having

#: value kinds of a referenceable name: values are bound with its type, so
#: MariaDB never casts the column (``name = 0`` would cast every name)
_TEXT, _NUMBER, _DATETIME, _UUID = schema.TEXT, schema.NUMBER, schema.DATETIME, schema.UUID


@dataclass(frozen=True)
class _Ref:
    """Something a condition or an ordering may name: its SQL and the kind
    of values it holds (datetime values get ISO-8601 conversion)."""

    sql: str
    kind: str = _NUMBER


class _Budget:
    """Counts the terms of one query against ``Limits.max_terms``."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.used = 0

    def spend(self, count: int = 1) -> None:
        self.used += count
        if self.used > self.limits.max_terms:
            raise QueryTooLarge(
                "query is too large: more than %d terms" % (self.limits.max_terms,))


class _Conditions:
    """
    Compiles one ``$where`` or ``$having`` tree into SQL text, collecting
    the bound values in ``params`` in the order their ``%s`` appear.
    """

    def __init__(self, clause: str, names: Dict[str, "_Ref"], budget: _Budget) -> None:
        self.clause = clause        # "$where" or "$having", for messages
        self.names = names          # name -> _Ref
        self.budget = budget
        self.limits = budget.limits
        self.params: List[Any] = []

    def compile(self, tree: JSON) -> str:
        """The SQL of the whole tree; the top level is not parenthesised
        (the caller wraps it where it combines it with more conditions)."""
        return self.where_object(tree, 1, top=True)

    # -- structure

    def enter(self, depth: int) -> None:
        if depth > self.limits.max_depth:
            raise QueryTooLarge("%s is nested too deeply (more than %d levels)"
                             % (self.clause, self.limits.max_depth))

    def where_object(self, obj: JSON, depth: int, top: bool = False) -> str:
        """A where-object: its keys are AND-ed."""
        self.enter(depth)
        if not isinstance(obj, dict):
            raise QueryError("%s must be an object, not %s" % (self.clause, _show(obj)))
        if not obj:
            self.budget.spend()
            return "TRUE"
        parts = [self.condition(key, value, depth) for key, value in obj.items()]
        return " AND ".join(parts) if top else _join(parts, "AND")

    def condition(self, key: JSON, value: JSON, depth: int) -> str:
        """One key of a where-object: a logical operator or a column."""
        if not isinstance(key, str):
            raise QueryError("%s keys must be strings" % (self.clause,))
        if key.startswith("$"):
            handler = _LOGICAL_OPERATORS.get(key)
            if handler is None:
                raise _unknown_key(key, self.clause)
            return handler(self, key, value, depth)
        ref = self.resolve(key)
        if isinstance(value, dict):
            self.enter(depth + 1)
            if not value:
                raise QueryError("no operator given for %s" % (_show(key),))
            parts = [self.column_operator(ref, key, op, operand, depth + 1)
                     for op, operand in value.items()]
            return _join(parts, "AND")
        if isinstance(value, list):
            raise QueryError("a list is not a value (use $in) for %s" % (_show(key),))
        return _op_compare(self, ref, key, "$eq", value, depth)

    def column_operator(self, ref: "_Ref", column: str, op: JSON, operand: JSON,
                        depth: int) -> str:
        if not isinstance(op, str):
            raise QueryError("operator names must be strings")
        handler = _COLUMN_OPERATORS.get(op)
        if handler is None:
            raise _unknown_key(op, self.clause)
        if ref.kind == _UUID and op not in _UUID_OPERATORS:
            raise QueryRefused("%s is not an operator of UUID column %s (only %s)"
                               % (op, _show(column), ", ".join(sorted(_UUID_OPERATORS))))
        return handler(self, ref, column, op, operand, depth)

    # -- names and values

    def resolve(self, name: str) -> _Ref:
        found = self.names.get(name)
        if found is None:
            raise QueryRefused("unknown column %s in %s" % (_show(name), self.clause))
        return found

    def bind(self, ref: _Ref, column: str, value: JSON) -> str:
        """Bind one non-null scalar for ``ref`` and return its placeholder."""
        self.params.append(_value(ref, column, value))
        return "%s"


def _join(parts: List[str], word: str) -> str:
    """Join condition fragments with AND/OR, parenthesised when needed."""
    if len(parts) == 1:
        return parts[0]
    return "(" + (" %s " % word).join(parts) + ")"


def _unknown_key(key: str, where: str) -> QueryError:
    """The error for a ``$key`` we do not implement (or refuse on purpose)."""
    if key == "$join" or key.endswith("Join"):
        return QueryRefused("joins are not supported")
    if key.startswith("$__"):
        return QueryRefused("raw SQL helpers such as $__ are not allowed")
    return QueryRefused("unknown key %s in %s" % (_show(key), where))


_DECIMAL_INTEGER = re.compile(r"-?[0-9]{1,64}\Z")

_UUID_TEXT = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")


def parse_uuid(value: JSON, what: str) -> bytes:
    """A UUID in its 36-character text form (either case), as its 16 bytes."""
    if not isinstance(value, str) or not _UUID_TEXT.match(value):
        raise QueryError("%s must be UUIDs (36 characters, such as "
                         "\"0192f7b0-8c4e-7cc1-9f0e-2b6a3c1d5e4f\"), not %s" % (what, _show(value)))
    return bytes.fromhex(value.replace("-", ""))


def _value(ref: _Ref, column: str, value: JSON) -> Any:
    """Validate one JSON scalar value (not null) and convert it to the type
    of what it is compared with: ISO-8601 strings become naive UTC datetimes
    for datetime columns, numbers and booleans become their JavaScript text
    for text columns, and numeric columns take numbers or decimal integer
    strings only."""
    if isinstance(value, (dict, list)):
        raise QueryError("objects and lists are not values (column %s)" % (_show(column),))
    if value is None:
        raise QueryError("null is not allowed here (column %s)" % (_show(column),))
    if ref.kind == _UUID:
        return parse_uuid(value, "values for %s" % (_show(column),))
    if ref.kind == _DATETIME:
        if not isinstance(value, str):
            raise QueryError("values for %s must be ISO-8601 strings, not %s"
                             % (_show(column), _show(value)))
        return parse_timestamp(value, "value for %s" % (_show(column),))
    if isinstance(value, float) and not math.isfinite(value):
        raise QueryError("NaN and Infinity are not values (column %s)" % (_show(column),))
    if isinstance(value, str):
        value = _check_text(value, "a value for %s" % (_show(column),))
        if ref.kind == _NUMBER:
            if not _DECIMAL_INTEGER.match(value):
                raise QueryError("%s is compared with numbers: %s is not a decimal integer"
                                 % (_show(column), _show(value)))
            return int(value)
        return value
    if not isinstance(value, (bool, int, float)):
        raise QueryError("%s is not a JSON value" % (_show(value),))
    if ref.kind == _NUMBER:
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    try:
        return wire.number_text(value)
    except OverflowError:
        raise QueryError("%s is too large a number (column %s)" % (_show(value), _show(column))) from None


# -- logical operators: (conditions, key, operand, depth) -> sql

def _logical_list(ctx: _Conditions, key: str, operand: JSON, depth: int) -> str:
    """``$and`` / ``$or``: a non-empty list of where-objects (an object is
    accepted too, each of its keys being one term)."""
    ctx.enter(depth + 1)
    if isinstance(operand, dict):
        operand = [{k: v} for k, v in operand.items()]
    if not isinstance(operand, list) or not operand:
        raise QueryError("%s needs a non-empty list of conditions" % (key,))
    parts = [ctx.where_object(item, depth + 2) for item in operand]
    return _join(parts, "AND" if key == "$and" else "OR")


def _logical_not(ctx: _Conditions, key: str, operand: JSON, depth: int) -> str:
    """``$not``: negates a where-object."""
    return "NOT (%s)" % (ctx.where_object(operand, depth + 1),)


_LOGICAL_OPERATORS = {
    "$and": _logical_list,
    "$or": _logical_list,
    "$not": _logical_not,
}


# -- column operators: (conditions, ref, column, op, operand, depth) -> sql

_COMPARISONS = {"$eq": "=", "$ne": "<>", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}


def _op_compare(ctx: _Conditions, ref: _Ref, column: str, op: str, operand: JSON,
                depth: int) -> str:
    """``$eq $ne $gt $gte $lt $lte``; ``null`` with $eq/$ne is IS [NOT] NULL."""
    ctx.budget.spend()
    if operand is None:
        if op == "$eq":
            return "%s IS NULL" % (ref.sql,)
        if op == "$ne":
            return "%s IS NOT NULL" % (ref.sql,)
    return "%s %s %s" % (ref.sql, _COMPARISONS[op], ctx.bind(ref, column, operand))


def _op_membership(ctx: _Conditions, ref: _Ref, column: str, op: str, operand: JSON,
                   depth: int) -> str:
    """``$in`` / ``$nin``: a non-empty list of scalars (no nulls)."""
    ctx.enter(depth + 1)
    if not isinstance(operand, list) or not operand:
        raise QueryError("%s needs a non-empty list of values (column %s)" % (op, _show(column)))
    if len(operand) > ctx.limits.max_in_list:
        raise QueryTooLarge("%s list is too long: %d values, at most %d"
                         % (op, len(operand), ctx.limits.max_in_list))
    ctx.budget.spend(len(operand))
    for item in operand:
        if item is None:
            raise QueryError("null is not allowed in %s (use $isNull)" % (op,))
    marks = ", ".join(ctx.bind(ref, column, item) for item in operand)
    return "%s %s (%s)" % (ref.sql, "IN" if op == "$in" else "NOT IN", marks)


def _pattern_operand(column: str, op: str, operand: JSON) -> str:
    if not isinstance(operand, str):
        raise QueryError("%s needs a string (column %s), not %s" % (op, _show(column), _show(operand)))
    return _check_text(operand, "the %s value" % (op,))


def _op_like(ctx: _Conditions, ref: _Ref, column: str, op: str, operand: JSON,
             depth: int) -> str:
    """``$like``: the client's own LIKE pattern (``%``, ``_``, ``\\``)."""
    ctx.budget.spend()
    ctx.params.append(_pattern_operand(column, op, operand))
    return "%s LIKE %%s" % (ref.sql,)


def _escape_like(text: str) -> str:
    """Make ``text`` match itself literally in a LIKE pattern with escape
    character backslash."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


_PATTERN_SHAPES = {
    "$startsWith": "{}%",
    "$endsWith": "%{}",
    "$contains": "%{}%",
}


def _op_pattern(ctx: _Conditions, ref: _Ref, column: str, op: str, operand: JSON,
                depth: int) -> str:
    """``$startsWith $endsWith $contains``: the value matches literally."""
    ctx.budget.spend()
    text = _escape_like(_pattern_operand(column, op, operand))
    ctx.params.append(_PATTERN_SHAPES[op].format(text))
    # SQL text: ... LIKE %s ESCAPE '\\'   (a one-backslash string literal)
    return "%s LIKE %%s ESCAPE '\\\\'" % (ref.sql,)


def _op_between(ctx: _Conditions, ref: _Ref, column: str, op: str, operand: JSON,
                depth: int) -> str:
    """``$between``: ``{"$min": a, "$max": b}``, both bounds inclusive."""
    ctx.enter(depth + 1)
    ctx.budget.spend()
    if not isinstance(operand, dict):
        raise QueryError('$between needs {"$min": ..., "$max": ...} (column %s)' % (_show(column),))
    for key in operand:
        if key not in ("$min", "$max"):
            raise _unknown_key(key, "$between")
    if "$min" not in operand or "$max" not in operand:
        raise QueryError("$between needs both $min and $max (column %s)" % (_show(column),))
    low = ctx.bind(ref, column, operand["$min"])
    high = ctx.bind(ref, column, operand["$max"])
    return "%s BETWEEN %s AND %s" % (ref.sql, low, high)


def _op_is_null(ctx: _Conditions, ref: _Ref, column: str, op: str, operand: JSON,
                depth: int) -> str:
    """``$isNull``: true is IS NULL, false is IS NOT NULL."""
    ctx.budget.spend()
    if not isinstance(operand, bool):
        raise QueryError("$isNull needs true or false (column %s)" % (_show(column),))
    return "%s IS %sNULL" % (ref.sql, "" if operand else "NOT ")


_COLUMN_OPERATORS = {
    **{op: _op_compare for op in _COMPARISONS},
    "$in": _op_membership,
    "$nin": _op_membership,
    "$like": _op_like,
    **{op: _op_pattern for op in _PATTERN_SHAPES},
    "$between": _op_between,
    "$isNull": _op_is_null,
}


# --------------------------------------------------------------------------
# $select

_ASC, _DESC = "ASC", "DESC"

#: the operators of UUID columns: equality only (their order means nothing)
_UUID_OPERATORS = frozenset(("$eq", "$ne", "$in", "$nin", "$isNull"))

_AGGREGATES = {"$count": "COUNT", "$min": "MIN", "$max": "MAX", "$sum": "SUM", "$avg": "AVG"}

_DIRECTIONS = {
    # True looks up as 1 (ASC); False is its own key (0 leaves a column out)
    1: _ASC, -1: _DESC, False: _DESC,
    "ASC": _ASC, "DESC": _DESC, "asc": _ASC, "desc": _DESC,
}

_SELECT_KEYS = frozenset((
    "$columns", "$distinct", "$from", "$where", "$groupBy", "$having",
    "$orderBy", "$limit", "$offset",
))


@dataclass(frozen=True)
class SelectPlan:
    """
    A compiled ``$select``: what it returns and how to fetch it page by page.

    ``columns`` are the output keys in SELECT order.  ``keyset`` plans are
    paged with :meth:`page_sql` (by ``id``, never skipping or repeating a
    row); all others with :meth:`offset_sql`.  Both bound the result by a
    high-water ``id`` taken once per fetch, so paging an append-only table
    sees one stable snapshot.  The fields after ``offset`` are the compiled
    SQL fragments; they are internal.
    """

    columns: Tuple[str, ...]
    keyset: bool
    limit: Optional[int]
    offset: int
    table_sql: str = field(default="", repr=False)
    select_sql: str = field(default="", repr=False)
    distinct: bool = field(default=False, repr=False)
    where_sql: Optional[str] = field(default=None, repr=False)
    where_params: Tuple[Any, ...] = field(default=(), repr=False)
    group_sql: Optional[str] = field(default=None, repr=False)
    having_sql: Optional[str] = field(default=None, repr=False)
    having_params: Tuple[Any, ...] = field(default=(), repr=False)
    order_sql: Optional[str] = field(default=None, repr=False)
    index_hint: str = field(default="", repr=False)
    #: keyset plans over ``column $in [...]``: one index range per value
    #: (see :func:`_keyset_access`)
    union_column: Optional[str] = field(default=None, repr=False)
    union_values: Tuple[Any, ...] = field(default=(), repr=False)
    union_rest_sql: Optional[str] = field(default=None, repr=False)
    union_rest_params: Tuple[Any, ...] = field(default=(), repr=False)
    #: keyset plans: the column pages follow (``id``, or ``version`` for a
    #: version 2 stream read) and the value before its first
    keyset_column: str = field(default="`id`", repr=False)
    keyset_start: int = field(default=0, repr=False)
    #: keyset plans that output the keyset column themselves (version 2's
    #: ``position``; a stream read's ``version``): its place among the
    #: outputs, and the page is read without a ``__keyset`` column of its own
    keyset_index: Optional[int] = field(default=None, repr=False)
    #: how each output column travels (:data:`wire.PLAIN_VALUE`, ``UUID_VALUE``,
    #: ``JSON_VALUE``); empty: all plain (version 1)
    encodings: Tuple[str, ...] = field(default=(), repr=False)

    def row_encoder(self, names: Sequence[str],
                    checked_json: bool = False) -> Callable[[Sequence[Any]], str]:
        """
        Encodes one result row (its values, in ``names`` order) to its message
        body; ``checked_json``: MariaDB checked the JSON columns' text.
        """
        return wire.row_encoder(names, self.encodings, checked_json)

    def _where(self, bounds: str) -> str:
        if self.where_sql is None:
            return " WHERE " + bounds
        return " WHERE (%s) AND %s" % (self.where_sql, bounds)

    def page_sql(self, after_id: int, high_water: int, size: int) -> Tuple[str, Tuple[Any, ...]]:
        """
        Keyset plans only: rows with ``after_id < id <= high_water`` that
        match the query, in ``id`` order, at most ``size`` of them.  The
        last column, ``__keyset``, is the row's id, for the next page; the
        caller strips it.  A plan that outputs the keyset column itself
        (:attr:`keyset_index`) has no ``__keyset``: that output is read.
        """
        if not self.keyset:
            raise ValueError("page_sql() needs a keyset plan; use offset_sql()")
        _check_counts(high_water=high_water, size=size)
        if not _is_int(after_id) or after_id < self.keyset_start:
            raise ValueError("after_id must be an int from %d, not %r" % (self.keyset_start, after_id))
        if self.union_values:
            return self._union_page_sql(after_id, high_water, size)
        key = self.keyset_column
        extra = "" if self.keyset_index is not None else ", " + key + " AS `__keyset`"
        sql = ("SELECT " + self.select_sql + extra + " FROM " + self.table_sql
               + self.index_hint + self._where(key + " > %s AND `id` <= %s")
               + " ORDER BY " + key + " LIMIT %s")
        return sql, self.where_params + (after_id, high_water, size)

    def _union_page_sql(self, after_id: int, high_water: int,
                        size: int) -> Tuple[str, Tuple[Any, ...]]:
        """
        A keyset page of ``column IN (v1, ..., vk) AND rest``: for each
        value, its first ``size`` ids after ``after_id`` from the
        ``(column, id)`` index (a range read that stops at ``size`` rows,
        wherever the stream is), merged and cut to ``size``, then the rows
        themselves by primary key.  A page costs at most ``k * size`` index
        entries, never the stream's history.  ``UNION`` (not ``ALL``) drops
        the ids two values share (values equal under the column's
        collation).  ``rest`` is written once, in the ``__base`` view, which
        MariaDB merges into every branch.
        """
        branch = ("(SELECT `id` FROM `__base` WHERE " + str(self.union_column)
                  + " = %s AND `id` > %s AND `id` <= %s ORDER BY `id` LIMIT %s)")
        sql = ("WITH `__base` AS (SELECT * FROM " + self.table_sql + self.index_hint
               + ("" if self.union_rest_sql is None else " WHERE " + self.union_rest_sql)
               + "), `__page` AS (" + " UNION ".join([branch] * len(self.union_values))
               + " ORDER BY `id` LIMIT %s) SELECT " + self.select_sql
               + ("" if self.keyset_index is not None else ", `id` AS `__keyset`")
               + " FROM `__page` STRAIGHT_JOIN " + self.table_sql
               + " USING (`id`) ORDER BY `id`")
        params = list(self.union_rest_params)
        for value in self.union_values:
            params += (value, after_id, high_water, size)
        params.append(size)
        return sql, tuple(params)

    def offset_sql(self, skip: int, high_water: int, size: int) -> Tuple[str, Tuple[Any, ...]]:
        """
        Any plan: the rows of the query over ``id <= high_water``, in the
        query's order (made total by a tie-breaker, so pages do not
        overlap), skipping ``skip`` rows and returning at most ``size``.
        The caller adds the user's ``$offset`` to ``skip`` and clamps
        ``size`` to the user's ``$limit``.
        """
        _check_counts(skip=skip, high_water=high_water, size=size)
        sql = ("SELECT " + ("DISTINCT " if self.distinct else "") + self.select_sql
               + " FROM " + self.table_sql + self._where("`id` <= %s"))
        if self.group_sql:
            sql += " GROUP BY " + self.group_sql
        if self.having_sql is not None:
            sql += " HAVING " + self.having_sql
        if self.order_sql:
            sql += " ORDER BY " + self.order_sql
        sql += " LIMIT %s OFFSET %s"
        return sql, self.where_params + (high_water,) + self.having_params + (size, skip)


def _check_counts(**counts: int) -> None:
    """Paging arguments come from the server, not the client: a wrong one
    is a programming error."""
    for name, value in counts.items():
        if not _is_int(value) or value < 0:
            raise ValueError("%s must be a non-negative int, not %r" % (name, value))


class _Output:
    """One SELECT list item while compiling ``$columns``."""

    __slots__ = ("name", "sql", "ref", "aggregate", "encoding", "column_sql")

    def __init__(self, name: str, sql: str, ref: _Ref, aggregate: bool,
                 encoding: str = "", column_sql: Optional[str] = None) -> None:
        self.name, self.sql, self.ref, self.aggregate = name, sql, ref, aggregate
        self.encoding = encoding
        #: a plain output: the table column it is, as SQL (None: an aggregate)
        self.column_sql = column_sql


def _alias(name: JSON, schema: TableSchema, column: Optional[str] = None) -> str:
    """Check an output name given by the client: a plain identifier that
    does not shadow another column and is not reserved."""
    if column is not None and name == column:
        return column
    if not isinstance(name, str) or not _ALIAS.match(name) or name.startswith("__"):
        raise QueryError("alias %s is not allowed (letters, digits and _ only)" % (_show(name),))
    if schema.reserved_name(name):
        # MariaDB compares column names and aliases case-insensitively
        raise QueryError("alias %s is the name of a column" % (_show(name),))
    return name


def _column_ref(schema: TableSchema, name: JSON, what: str) -> str:
    """A name that must be one of the table's columns."""
    if not isinstance(name, str):
        raise QueryError("%s must name a column, not %s" % (what, _show(name)))
    if name not in schema.columns:
        raise QueryRefused("unknown column %s in %s" % (_show(name), what))
    return name


def _kind(schema: TableSchema, column: str) -> str:
    if column in schema.datetime_columns:
        return _DATETIME
    if column in schema.uuid_columns:
        return _UUID
    return _NUMBER if column in schema.numeric_columns else _TEXT


def _encoding(schema: TableSchema, column: str) -> str:
    """How a row carries the values of ``column``: see :attr:`SelectPlan.encodings`."""
    if column in schema.uuid_columns:
        return wire.UUID_VALUE
    return wire.JSON_VALUE if column in schema.json_columns else wire.PLAIN_VALUE


def _plain_output(schema: TableSchema, column: str, alias: str) -> _Output:
    column_sql = schema.column_sql(column)
    sql = column_sql
    if alias != schema.table_column(column):
        sql += " AS " + _quote_ident(alias)
    return _Output(alias, sql, _Ref(_quote_ident(alias), _kind(schema, column)), False,
                   _encoding(schema, column), column_sql)


def _aggregate_output(schema: TableSchema, alias: str, spec: JSON) -> _Output:
    """``{"alias": {"$count": "*"|col}}`` and ``$min $max $sum $avg`` over a column."""
    alias = _alias(alias, schema)
    if not isinstance(spec, dict) or len(spec) != 1:
        raise QueryError("column %s needs exactly one of %s"
                         % (_show(alias), ", ".join(sorted(_AGGREGATES))))
    (op, arg), = spec.items()
    function = _AGGREGATES.get(op) if isinstance(op, str) else None
    if function is None:
        raise _unknown_key(op if isinstance(op, str) else "?", "$columns")
    encoding = wire.PLAIN_VALUE
    if op == "$count" and arg == "*":
        inner, kind = "*", _NUMBER
    else:
        column = _column_ref(schema, arg, op)
        inner = schema.column_sql(column)
        kind = _kind(schema, column) if op in ("$min", "$max") else _NUMBER
        if op in ("$min", "$max"):
            encoding = _encoding(schema, column)
    sql = "%s(%s) AS %s" % (function, inner, _quote_ident(alias))
    return _Output(alias, sql, _Ref(_quote_ident(alias), kind), True, encoding)


def _column_entry(schema: TableSchema, key: JSON, value: JSON) -> List[_Output]:
    """One entry of the object form ``{"col": true|1|false|0|"alias"}`` or
    ``{"alias": {"$count": ...}}``; returns zero or one outputs."""
    if not isinstance(key, str):
        raise QueryError("$columns keys must be strings")
    if key.startswith("$"):
        raise _unknown_key(key, "$columns")
    if isinstance(value, dict):
        return [_aggregate_output(schema, key, value)]
    column = _column_ref(schema, key, "$columns")
    if value is True or (_is_int(value) and value == 1):
        return [_plain_output(schema, column, column)]
    if value is False or (_is_int(value) and value == 0):
        return []
    if isinstance(value, str):
        return [_plain_output(schema, column, _alias(value, schema, column))]
    raise QueryError("$columns entry %s must be true, false, an alias or an aggregate"
                     % (_show(key),))


def _columns(schema: TableSchema, spec: JSON, budget: _Budget) -> List[_Output]:
    """``$columns``: a list of names / single-key objects, an object, a
    single name, or absent (the default columns).  ``"*"`` means the
    default columns."""
    if spec is None:
        return [_plain_output(schema, c, c) for c in schema.default_columns]
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, dict):
        spec = [{key: value} for key, value in spec.items()]
    if not isinstance(spec, list):
        raise QueryError("$columns must be a list of columns, not %s" % (_show(spec),))
    outputs: List[_Output] = []
    for item in spec:
        if item == "*":
            budget.spend()
            outputs.extend(_plain_output(schema, c, c) for c in schema.default_columns)
        elif isinstance(item, str):
            budget.spend()
            column = _column_ref(schema, item, "$columns")
            outputs.append(_plain_output(schema, column, column))
        elif isinstance(item, dict):
            # every key is a term: one list item may hold any number of them
            budget.spend(max(1, len(item)))
            for key, value in item.items():
                outputs.extend(_column_entry(schema, key, value))
        else:
            raise QueryError("$columns items must be names or objects, not %s" % (_show(item),))
    if not outputs:
        raise QueryError("$columns selects no column")
    seen = set()
    for output in outputs:
        if output.name.lower() in seen:
            raise QueryError("%s is selected twice" % (_show(output.name),))
        seen.add(output.name.lower())
    return outputs


_INVALID = object()


def _order_direction(flag: JSON) -> object:
    """An ``$orderBy`` value: 1/true/"ASC"/"asc" or -1/false/"DESC"/"desc";
    0 leaves the column out (as in json-sql-builder2)."""
    if _is_int(flag) and flag == 0:
        return None
    if isinstance(flag, (str, bool, int)):
        return _DIRECTIONS.get(flag, _INVALID)
    return _INVALID


def _group_flag(flag: JSON) -> object:
    """A ``$groupBy`` object value: true/1 groups by the column, false/0
    leaves it out."""
    if flag is True or (_is_int(flag) and flag == 1):
        return _ASC
    if flag is False or (_is_int(flag) and flag == 0):
        return None
    return _INVALID


def _name_list(spec: JSON, what: str, budget: _Budget,
               meaning: Callable[[JSON], Any]) -> List[Tuple[str, Any]]:
    """
    The shared shape of ``$groupBy`` and ``$orderBy``: a name, a list of
    names or single-key objects, or an object ``{name: flag}`` whose flags
    ``meaning`` interprets.  Returns ``[(name, direction)]`` in order.
    """
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, dict):
        spec = [{key: value} for key, value in spec.items()]
    if not isinstance(spec, list):
        raise QueryError("%s must be a list or an object, not %s" % (what, _show(spec)))
    entries, seen = [], set()
    for item in spec:
        if isinstance(item, dict):
            # every key is a term: one list item may hold any number of them
            budget.spend(max(1, len(item)))
            pairs = [(name, meaning(flag)) for name, flag in item.items()]
        else:
            budget.spend()
            pairs = [(item, _ASC)]
        for name, direction in pairs:
            if not isinstance(name, str):
                raise QueryError("%s items must be names, not %s" % (what, _show(name)))
            if name.startswith("$"):
                raise _unknown_key(name, what)
            if direction is _INVALID:
                raise QueryError("%s has an invalid value for %s" % (what, _show(name)))
            if direction is None:
                continue
            if name in seen:
                raise QueryError("%s lists %s twice" % (what, _show(name)))
            seen.add(name)
            entries.append((name, direction))
    return entries


#: ``$limit``/``$offset`` may be decimal strings, as the original took them
_DECIMAL = re.compile(r"[0-9]{1,16}\Z")


def _count(value: JSON, what: str) -> int:
    if isinstance(value, str) and _DECIMAL.match(value):
        value = int(value)
    if not _is_int(value) or value < 0:
        raise QueryError("%s must be a non-negative integer, not %s" % (what, _show(value)))
    if value > MAX_COUNT:
        raise QueryError("%s is too large" % (what,))
    return int(value)


def compile_select(select: JSON, schema: TableSchema, limits: Limits = Limits()) -> SelectPlan:
    """
    Compile the JSON value of ``"$select"`` for ``schema``'s table.

    Raises :class:`QueryError` for anything refused or malformed; no other
    exception escapes for any JSON input.
    """
    try:
        return _compile_select(select, schema, limits)
    except RecursionError:
        raise QueryTooLarge("query is nested too deeply") from None


def _compile_select(select: JSON, schema: TableSchema, limits: Limits) -> SelectPlan:
    if not isinstance(select, dict):
        raise QueryError("$select must be an object, not %s" % (_show(select),))
    for key in select:
        if key not in _SELECT_KEYS:
            if isinstance(key, str) and key.startswith("$"):
                raise _unknown_key(key, "$select")
            raise QueryError("unknown key %s in $select" % (_show(key),))
    budget = _Budget(limits)

    if "$from" in select and not schema.matches(select["$from"]):
        raise QueryRefused("table %s is not available" % (_show(select["$from"]),))

    distinct = select.get("$distinct", False)
    if not isinstance(distinct, bool):
        raise QueryError("$distinct must be true or false")

    outputs = _columns(schema, select.get("$columns"), budget)
    aggregated = any(output.aggregate for output in outputs)

    column_refs = {c: _Ref(schema.column_sql(c), _kind(schema, c)) for c in schema.columns}
    where_sql, where_params = None, ()
    if "$where" in select:
        where = _Conditions("$where", column_refs, budget)
        where_sql, where_params = where.compile(select["$where"]), tuple(where.params)

    groups = [_column_ref(schema, name, "$groupBy")
              for name, _ in _name_list(select.get("$groupBy", []), "$groupBy", budget, _group_flag)]

    # $having and $orderBy may name the outputs (aliases) and the columns
    aliases = {o.name: o.ref for o in outputs if o.name not in schema.columns}
    having_sql, having_params = None, ()
    if "$having" in select:
        visible = {o.name: o.ref for o in outputs}
        visible.update((g, column_refs[g]) for g in groups)
        having = _Conditions("$having", visible, budget)
        having_sql, having_params = having.compile(select["$having"]), tuple(having.params)

    orderable = dict(column_refs, **aliases)
    order = []
    for name, direction in _name_list(select.get("$orderBy", []), "$orderBy", budget, _order_direction):
        if name not in orderable:
            raise QueryRefused("unknown column %s in $orderBy" % (_show(name),))
        order.append((orderable[name].sql, direction))

    limit = None if select.get("$limit") is None else _count(select["$limit"], "$limit")
    offset = 0 if select.get("$offset") is None else _count(select["$offset"], "$offset")

    plain = not distinct and not groups and having_sql is None and not aggregated and offset == 0
    keyset = plain and order in ([], [("`id`", _ASC)])
    # A version 2 read of one stream: in version order, from the pid_version key.
    stream_read = (schema.stream_reads and plain and order in ([], [("`version`", _ASC)])
                   and "pid" in _equal_columns(select.get("$where")))

    # A total order, so that offset pages neither overlap nor skip: the rows
    # are unique by id, distinct rows by their outputs, groups by their keys.
    if distinct:
        tie_breakers = [o.ref.sql for o in outputs]
    elif groups:
        tie_breakers = [schema.column_sql(g) for g in groups]
    elif aggregated:
        tie_breakers = []            # a single row
    else:
        tie_breakers = ["`id`"]
    ordered = [sql for sql, _ in order]
    if tie_breakers == ["`id`"] and "`id`" in ordered:
        order = order[:ordered.index("`id`") + 1]   # nothing after a unique key matters
    else:
        seen = set(ordered)                           # (linear in the number of outputs)
        order += [(sql, _ASC) for sql in tie_breakers if sql not in seen]

    access: Dict[str, Any] = {}
    if stream_read:
        keyset = True
        access = {"index_hint": " FORCE INDEX (`pid_version`)", "keyset_column": "`version`",
                  "keyset_start": -1}
    elif keyset:
        access = _keyset_access(select.get("$where"), schema, column_refs, limits)
    if keyset:
        key = access.get("keyset_column", "`id`")
        access["keyset_index"] = next(
            (i for i, o in enumerate(outputs) if o.column_sql == key), None)
    return SelectPlan(
        columns=tuple(o.name for o in outputs),
        keyset=keyset,
        limit=limit,
        offset=offset,
        table_sql=schema.quoted,
        select_sql=", ".join(o.sql for o in outputs),
        distinct=distinct,
        where_sql=where_sql,
        where_params=where_params,
        group_sql=", ".join(schema.column_sql(g) for g in groups) or None,
        having_sql=having_sql,
        having_params=having_params,
        order_sql=", ".join("%s %s" % pair for pair in order) or None,
        encodings=tuple(o.encoding for o in outputs) if schema.json_columns or schema.uuid_columns else (),
        **access,
    )


def bound_value(schema: TableSchema, column: str, value: JSON) -> Any:
    """
    The value a query binds for ``value`` compared with ``column`` (as
    :func:`compile_select` binds it: a text column's number as JavaScript
    prints it, a datetime, 16 UUID bytes...), for deciding a condition
    without the database (:mod:`eventsource.matcher`).  Raises QueryError.
    """
    return _value(_Ref("", _kind(schema, column)), column, value)


def _is_value(value: JSON) -> bool:
    return isinstance(value, (str, int, float))          # (bool is an int)


def _conjuncts(where: JSON, out: List[Tuple[str, JSON]]) -> List[Tuple[str, JSON]]:
    """``(column, condition)`` for every condition that each matching row
    satisfies: the top-level keys and those of top-level ``$and``s.  Runs
    on an already compiled ``$where``, so its depth is bounded."""
    if isinstance(where, dict):
        for key, value in where.items():
            if key == "$and":
                for item in (value if isinstance(value, list) else [{k: v} for k, v in value.items()]):
                    _conjuncts(item, out)
            elif not key.startswith("$"):
                out.append((key, value))
    return out


def _equal_columns(where: JSON) -> Set[str]:
    """The columns that every row matching ``where`` has equal to one value."""
    return {column for column, condition in _conjuncts(where, []) if _is_equality(condition)}


def _is_equality(condition: JSON) -> bool:
    """``"x"``, ``{"$eq": "x", ...}`` or ``{"$in": ["x"]}``: the column
    equals one non-null value."""
    if isinstance(condition, dict):
        if _is_value(condition.get("$eq")):
            return True
        values = condition.get("$in")
        return isinstance(values, list) and len(values) == 1
    return _is_value(condition)


_RANGE_OPERATORS = frozenset(("$eq", "$gt", "$gte", "$lt", "$lte", "$between", "$in"))


def _is_range(condition: JSON) -> bool:
    """A condition that bounds the column's values from below or above."""
    if isinstance(condition, dict):
        return any(op in _RANGE_OPERATORS and condition[op] is not None for op in condition)
    return _is_value(condition)


#: the longest ``$in`` list read as one index range per value
MAX_MERGED_RANGES = 16


def _keyset_access(where: JSON, schema: TableSchema, column_refs: Dict[str, _Ref],
                   limits: Limits) -> Dict[str, Any]:
    """
    How a keyset page reads the table: the :class:`SelectPlan` fields of
    the index to use, chosen from the conditions every row must meet.

    * An equality on the columns of a ``(columns..., id)`` index: that
      index, forced.  MariaDB would otherwise pick ``ref`` access on
      ``(pid, id)`` for ``pid = ? AND id > ?`` and then scan every earlier
      row of that pid on each page (quadratic over a long stream); forced,
      it is a range read starting at the last id.
    * ``column $in [...]`` at the top level, for a one-column index: with
      up to :data:`MAX_MERGED_RANGES` values, one such range per value,
      merged (:meth:`SelectPlan._union_page_sql`): a page reads at most
      ``size`` entries per value, however sparse those values' rows are
      in the table.  Longer lists pay a subquery per value and usually
      cover much of the table: the primary key or one range of the whole
      list (ordered by id afterwards), whichever MariaDB estimates cheaper.
    * A range of ``timestamp``: the primary key or the ``(timestamp, id)``
      index, whichever MariaDB estimates cheaper for the page: the range
      when it holds few rows, the primary key (in id order, stopping at the
      page) when it holds many.  Both are correct whatever the order of
      timestamps; the primary key is only quick where timestamps grow with
      ids, as the server's own ``NOW(6)`` does.
    * Otherwise the primary key, from the last id.
    """
    conjuncts = _conjuncts(where, [])
    equal = _equal_columns(where)
    lists = {}
    if isinstance(where, dict):
        for column, condition in where.items():
            if (column in schema.columns and isinstance(condition, dict)
                    and list(condition) == ["$in"] and len(condition["$in"]) > 1):
                lists[column] = condition["$in"]
    for name, columns in schema.keyset_indexes:
        if set(columns) <= equal:
            return {"index_hint": " FORCE INDEX (%s)" % (_quote_ident(name),)}
        if len(columns) == 1 and columns[0] in lists:
            if len(lists[columns[0]]) <= MAX_MERGED_RANGES:
                return _union_access(where, name, columns[0], lists[columns[0]], column_refs, limits)
            return {"index_hint": " FORCE INDEX (PRIMARY, %s)" % (_quote_ident(name),)}
    ranged = {column for column, condition in conjuncts if _is_range(condition)}
    for name, column in schema.range_indexes:
        if column in ranged:
            return {"index_hint": " FORCE INDEX (PRIMARY, %s)" % (_quote_ident(name),)}
    return {"index_hint": " FORCE INDEX (PRIMARY)"}


def _union_access(where: Dict[str, JSON], index: str, column: str, values: List[JSON],
                  column_refs: Dict[str, _Ref], limits: Limits) -> Dict[str, Any]:
    """The plan fields of a keyset page over ``column $in values`` and the
    rest of ``where`` (already compiled once: compiling it again is linear
    and cannot fail)."""
    ref = column_refs[column]
    rest = {key: value for key, value in where.items() if key != column}
    rest_sql, rest_params = None, ()
    if rest:
        conditions = _Conditions("$where", column_refs, _Budget(limits))
        rest_sql, rest_params = conditions.compile(rest), tuple(conditions.params)
    return {
        "index_hint": " FORCE INDEX (%s)" % (_quote_ident(index),),
        "union_column": ref.sql,
        "union_values": tuple(_value(ref, column, value) for value in values),
        "union_rest_sql": rest_sql,
        "union_rest_params": rest_params,
    }


# --------------------------------------------------------------------------
# $insert

_INSERT_KEYS = frozenset(("$table", "$documents"))
_REQUIRED_FIELDS = schema.IDENTIFIER_COLUMNS
#: the document fields that are written; every other field (``timestamp``,
#: ``id``, anything else) is ignored, as the original ignored it: the append
#: time and position are always the server's
_WRITTEN_FIELDS = frozenset(schema.WRITTEN_COLUMNS)


@dataclass(frozen=True)
class InsertPlan:
    """
    A validated ``$insert``: one tuple per document,
    ``(pid, domain, name, data_json_text)``; the append time is the column
    default, ``NOW(6)``.  ``ignored`` names the fields that were left out,
    per document index, for the log.
    """

    rows: Tuple[Tuple[str, ...], ...]
    ignored: Tuple[Tuple[int, Tuple[str, ...]], ...] = ()
    #: version 2: the client's event ids (None: the server makes them) and
    #: the expected versions to check
    event_ids: Optional[Tuple[bytes, ...]] = None
    expected: Tuple[appends.Expectation, ...] = ()

    def append(self, detailed: bool) -> appends.Append:
        """What the writer is to do: ``detailed`` for a version 2 answer."""
        return appends.Append(self.rows, self.event_ids, self.expected, detailed)


#: the deepest nesting of arrays and objects MariaDB's JSON_VALID accepts
MAX_DATA_DEPTH = 31


def _too_deep(index: int) -> QueryError:
    return QueryError("document %d: data is nested deeper than %d levels, MariaDB's limit "
                      "for JSON" % (index, MAX_DATA_DEPTH))


def _data_text(data: JSON, index: int, text_is_json: bool = True) -> str:
    """
    The JSON text stored for a document's ``data``: what JavaScript's
    ``JSON.stringify`` makes of it, as the original stored it.  In version 1
    (``text_is_json``) a string is JSON text already (the original's own
    clients send ``data`` that way): the value it encodes is stored, not a
    JSON string.  In version 2 a string is a string.
    """
    if text_is_json and isinstance(data, str):
        try:
            data = wire.decode_nested(data, MAX_DATA_DEPTH)
        except wire.TooDeep:
            raise _too_deep(index) from None
        except ValueError:
            raise QueryError("document %d: data is a string, but not JSON text" % (index,)) from None
    try:
        text = wire.json_stringify(data)
    except RecursionError:
        raise _too_deep(index) from None
    except TypeError:
        raise QueryError("document %d: data is not a JSON value" % (index,)) from None
    # (C-speed count first: the walk runs only for data with many brackets)
    if text.count("[") + text.count("{") > MAX_DATA_DEPTH and wire.deeper_than(data, MAX_DATA_DEPTH):
        raise _too_deep(index)
    return text


def _field_error(where: str, name: str, value: object) -> QueryError:
    if not isinstance(value, str) or not value:
        return QueryError("%s needs %s as a non-empty string" % (where, name))
    if len(value) > MAX_FIELD_LENGTH:
        return QueryError("%s: %s is longer than %d characters" % (where, name, MAX_FIELD_LENGTH))
    return QueryError("%s: %s is not valid Unicode text" % (where, name))


def _identifiers(doc: JSON, index: int) -> List[str]:
    """A document's ``pid``, ``domain`` and ``name``, checked (the document an object)."""
    if not isinstance(doc, dict):
        raise QueryError("document %d must be an object, not %s" % (index, _show(doc)))
    values = []
    for name in _REQUIRED_FIELDS:
        value = doc.get(name)
        # (messages are built only on failure: this runs for every event)
        if (type(value) is not str or not value or len(value) > MAX_FIELD_LENGTH
                or not (value.isascii() or _is_unicode(value))):
            raise _field_error("document %d" % (index,), name, value)
        values.append(value)
    return values


def _document(doc: JSON, index: int,
              ignored: List[Tuple[int, Tuple[str, ...]]]) -> Tuple[str, ...]:
    """Validate one document into its row tuple; ``ignored`` collects skipped fields."""
    values = _identifiers(doc, index)
    values.append(_data_text(doc.get("data"), index))
    if len(doc) > len(_WRITTEN_FIELDS) or not _WRITTEN_FIELDS.issuperset(doc):
        extra = [key for key in doc if key not in _WRITTEN_FIELDS]
        if extra:
            ignored.append((index, tuple(extra)))
    return tuple(values)


def compile_insert(insert: JSON, schema: TableSchema, max_documents: int = 10000) -> InsertPlan:
    """
    Validate the JSON value of ``"$insert"``:
    ``{"$table": optional, "$documents": object | non-empty list}``.

    Raises :class:`QueryError` for anything refused or malformed.
    """
    documents = _documents(insert, schema, max_documents)
    ignored: List[Tuple[int, Tuple[str, ...]]] = []
    rows = tuple(_document(doc, i, ignored) for i, doc in enumerate(documents))
    return InsertPlan(rows=rows, ignored=tuple(ignored))


def _documents(insert: JSON, schema: TableSchema, max_documents: int) -> List[JSON]:
    """The documents of an ``$insert`` (not yet checked one by one)."""
    if not isinstance(insert, dict):
        raise QueryError("$insert must be an object, not %s" % (_show(insert),))
    for key in insert:
        if key not in _INSERT_KEYS:
            if isinstance(key, str) and key.startswith("$"):
                raise _unknown_key(key, "$insert")
            raise QueryError("unknown key %s in $insert" % (_show(key),))
    if "$table" in insert and not schema.matches(insert["$table"]):
        raise QueryRefused("table %s is not available" % (_show(insert["$table"]),))
    if "$documents" not in insert:
        raise QueryError("$insert needs $documents")
    documents = insert["$documents"]
    if isinstance(documents, dict):
        documents = [documents]
    if not isinstance(documents, list) or not documents:
        raise QueryError("$documents must be an object or a non-empty list of objects")
    if len(documents) > max_documents:
        raise QueryTooLarge("too many documents: %d, at most %d" % (len(documents), max_documents))
    return documents


#: the fields of a version 2 document
_V2_DOCUMENT_FIELDS = frozenset(_WRITTEN_FIELDS | {"eventId"})
_ABSENT = object()


def _spec(value: JSON, what: str) -> appends.Spec:
    """An expected version as sent: a last version, or one of the named states."""
    if _is_int(value) and 0 <= value <= MAX_COUNT:
        return int(value)
    if value in (appends.NO_STREAM, appends.STREAM_EXISTS, appends.ANY) and isinstance(value, str):
        return str(value)
    raise QueryError("%s must be a version (an integer from 0), \"noStream\", "
                     "\"streamExists\" or \"any\", not %s" % (what, _show(value)))


def _expectations(expected: Optional[Tuple[str, JSON]],
                  rows: Tuple[Tuple[str, ...], ...]) -> Tuple[appends.Expectation, ...]:
    """The checks of a version 2 persist (``"any"`` dropped: it checks nothing)."""
    if expected is None:
        return ()
    field_name, value = expected
    streams = {appends.stream_of(row[0]) for row in rows}
    if field_name == "expectedVersion":
        if len(streams) > 1:
            raise QueryError("expectedVersion needs every document on one pid; these append "
                             "to %d streams (give expectedVersions, one per pid)" % (len(streams),))
        spec = _spec(value, "expectedVersion")
        return () if spec == appends.ANY else (appends.Expectation(rows[0][0], spec),)
    if not isinstance(value, dict) or not value:
        raise QueryError("expectedVersions must be an object of pid: expected version")
    found: List[appends.Expectation] = []
    seen = set()
    for pid, spec in value.items():
        stream = appends.stream_of(pid)
        if stream in seen:
            raise QueryError("expectedVersions names the stream %s twice" % (_show(pid),))
        seen.add(stream)
        if stream not in streams:
            raise QueryError("expectedVersions names %s, which no document appends to" % (_show(pid),))
        checked = _spec(spec, "expectedVersions[%s]" % (_show(pid),))
        if checked != appends.ANY:
            found.append(appends.Expectation(pid, checked))
    return tuple(found)


def compile_append(insert: JSON, schema: TableSchema, max_documents: int = 10000,
                   expected: Optional[Tuple[str, JSON]] = None) -> InsertPlan:
    """
    Validate a version 2 persist: its ``$insert`` (documents of
    ``pid``, ``domain``, ``name``, ``data``, ``eventId`` only; ``data`` the
    value itself) and its ``expected`` (``("expectedVersion", v)`` or
    ``("expectedVersions", {pid: v})`` as sent).  Raises :class:`QueryError`.
    """
    documents = _documents(insert, schema, max_documents)
    rows = []
    event_ids: List[bytes] = []
    for index, doc in enumerate(documents):
        values = _identifiers(doc, index)
        extra = [key for key in doc if key not in _V2_DOCUMENT_FIELDS]
        if extra:
            raise QueryError("document %d: unknown field %s (a version 2 document has %s)"
                             % (index, _show(extra[0]), ", ".join(sorted(_V2_DOCUMENT_FIELDS))))
        values.append(_data_text(doc.get("data"), index, text_is_json=False))
        rows.append(tuple(values))
        if "eventId" in doc:
            event_ids.append(parse_uuid(doc["eventId"], "document %d: eventId" % (index,)))
    if event_ids and len(event_ids) != len(rows):
        raise QueryError("either every document of a persist has an eventId or none has")
    if len(set(event_ids)) != len(event_ids):
        raise QueryError("two documents of the persist have the same eventId")
    frozen = tuple(rows)
    return InsertPlan(rows=frozen, event_ids=tuple(event_ids) or None,
                      expected=_expectations(expected, frozen))
