"""
Which new events a subscription's ``$where`` matches, decided as MariaDB
would decide it.

A :class:`Matcher` is made once per subscription from its ``$where`` (already
checked by :func:`eventsource.query.compile_select`).  It has

* an **index key**: a column among ``pid``, ``name`` and ``domain`` that
  every matching event has equal to one of a few values (``"pid": "x"``,
  ``{"$eq": ...}``, ``{"$in": [...]}`` at the top level or in a top-level
  ``$and``), so that the tailer finds the subscriptions an event may match
  with one dictionary lookup per column (:class:`MatcherIndex`), and a commit
  costs nothing for the subscriptions it cannot match;
* a **predicate** deciding the whole ``$where`` in Python, when every
  condition in it is one this module decides exactly (``None`` when the index
  key alone decides: ``{"pid": "x"}``);
* or, when some condition is not (``$like``, conditions on ``data``, pattern
  operators on numbers or times, integers beyond 64 bits), ``sql``: MariaDB
  decides it, one statement per poll for all such candidate subscriptions
  (:meth:`eventsource.store.Store.match_rows`).

What "exactly" means (checked against MariaDB by ``tests/test_matcher.py``):
the columns a predicate reads are NOT NULL, so conditions are two-valued;
``pid``, ``domain`` and ``name`` are ``utf8mb4_bin`` with PAD SPACE (equal
when equal after trailing spaces are stripped; ordered by code point, the
shorter padded with spaces), while ``LIKE`` (``$startsWith``, ``$endsWith``,
``$contains``) compares character by character without padding; numbers
compare exactly with integers and as doubles with floating-point values;
times to the microsecond; event ids byte for byte.

The module is pure: no reactor, no database.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Set, Tuple

from eventsource import query

JSON = Any

#: an event as the tailer hands it over: these fields, in this order
#: (``event_id``: 16 bytes; ``timestamp``: a naive UTC datetime)
EVENT_FIELDS = ("position", "eventId", "pid", "version", "domain", "name", "timestamp")
POSITION, EVENT_ID, PID, VERSION, DOMAIN, NAME, TIMESTAMP = range(len(EVENT_FIELDS))
_FIELD = {name: i for i, name in enumerate(EVENT_FIELDS)}

#: the columns subscriptions are indexed by, in the order they are preferred
INDEXED = ("pid", "name", "domain")
_TEXT = frozenset(("pid", "domain", "name"))
_NUMBERS = frozenset(("position", "version"))

#: integers compared in Python (beyond, MariaDB's DECIMAL arithmetic decides)
_LARGEST = 2 ** 63

Event = Tuple[Any, ...]
Predicate = Callable[[Event], bool]


class NeedsSql(Exception):
    """A condition this module does not decide exactly: MariaDB decides it."""


def pad_key(text: str) -> str:
    """The key under which ``utf8mb4_bin`` (PAD SPACE) finds ``text`` equal to others."""
    return text.rstrip(" ")


def _text_order(a: str, b: str) -> int:
    """-1, 0 or 1 as ``utf8mb4_bin`` orders ``a`` and ``b`` (the shorter padded with spaces)."""
    a, b = a.rstrip(" "), b.rstrip(" ")
    if a == b:
        return 0
    width = max(len(a), len(b))
    return -1 if a.ljust(width) < b.ljust(width) else 1


@dataclass(frozen=True)
class Matcher:
    """How the tailer decides a subscription's events (see the module's text)."""

    #: ``(column, keys)``: every matching event's ``column``, as :func:`pad_key`, is in ``keys``
    index: Optional[Tuple[str, FrozenSet[str]]] = None
    #: decides the whole ``$where``; ``None``: every candidate matches (or ``sql``)
    predicate: Optional[Predicate] = field(default=None, compare=False)
    #: MariaDB decides (the subscription's compiled ``$where``)
    sql: bool = False

    def matches(self, event: Event) -> bool:
        """Whether ``event`` matches (for a candidate of a Python-decided subscription)."""
        return self.predicate is None or self.predicate(event)


def compile_matcher(where: JSON, schema: query.TableSchema) -> Matcher:
    """
    The :class:`Matcher` of a ``$where`` (``None``: no ``$where``) that
    :func:`eventsource.query.compile_select` accepted for ``schema`` (the
    version 2 table).
    """
    if where is None:
        return Matcher()
    index = _index_key(where, schema)
    predicate: Optional[Predicate]
    try:
        predicate = _Compiler(schema).where_object(where)
    except NeedsSql:
        return Matcher(index=index, sql=True)
    if index is not None and _only_the_key(where, index[0]):
        predicate = None
    elif where == {}:
        predicate = None
    return Matcher(index=index, predicate=predicate)


# -- the index key ------------------------------------------------------


def _conjuncts(where: JSON) -> Iterator[Tuple[str, JSON]]:
    """``(column, condition)`` of the top-level keys and those of top-level ``$and``s."""
    if isinstance(where, dict):
        for key, value in where.items():
            if key == "$and":
                items = value if isinstance(value, list) else [{k: v} for k, v in value.items()]
                for item in items:
                    yield from _conjuncts(item)
            elif not key.startswith("$"):
                yield key, value


def _equal_values(condition: JSON) -> Optional[List[JSON]]:
    """The values a condition requires its column to equal one of, if it does."""
    if isinstance(condition, dict):
        if "$eq" in condition and condition["$eq"] is not None:
            return [condition["$eq"]]
        if isinstance(condition.get("$in"), list):
            return list(condition["$in"])
        return None
    if isinstance(condition, list):
        return None
    return [condition]


def _index_key(where: JSON, schema: query.TableSchema) -> Optional[Tuple[str, FrozenSet[str]]]:
    found: Dict[str, FrozenSet[str]] = {}
    for column, condition in _conjuncts(where):
        if column in INDEXED and column not in found:
            values = _equal_values(condition)
            if values is not None:
                keys = frozenset(pad_key(query.bound_value(schema, column, v)) for v in values)
                found[column] = keys
    for column in INDEXED:
        if column in found:
            return column, found[column]
    return None


def _only_the_key(where: JSON, column: str) -> bool:
    """Whether ``where`` says nothing but that its key column equals one of some values."""
    if not isinstance(where, dict) or list(where) != [column]:
        return False
    condition = where[column]
    if isinstance(condition, dict):
        return len(condition) == 1 and ("$eq" in condition or "$in" in condition)
    return True


# -- predicates ---------------------------------------------------------


class _Compiler:
    """Builds a predicate from a ``$where`` as :class:`eventsource.query._Conditions` reads it."""

    def __init__(self, schema: query.TableSchema) -> None:
        self.schema = schema

    def where_object(self, obj: JSON) -> Predicate:
        if not isinstance(obj, dict):
            raise NeedsSql("not an object")
        parts = [self.condition(key, value) for key, value in obj.items()]
        return _all(parts)

    def condition(self, key: str, value: JSON) -> Predicate:
        if key in ("$and", "$or"):
            items = value if isinstance(value, list) else [{k: v} for k, v in value.items()]
            parts = [self.where_object(item) for item in items]
            return _all(parts) if key == "$and" else _any(parts)
        if key == "$not":
            inner = self.where_object(value)
            return lambda event: not inner(event)
        if key.startswith("$") or key not in _FIELD:
            raise NeedsSql(key)  # (data, or anything new)
        if isinstance(value, dict):
            return _all([self.operator(key, op, operand) for op, operand in value.items()])
        return self.operator(key, "$eq", value)

    def value(self, column: str, value: JSON) -> Any:
        bound = query.bound_value(self.schema, column, value)
        if isinstance(bound, int) and not isinstance(bound, bool) and abs(bound) >= _LARGEST:
            raise NeedsSql("a very large integer")
        return bound

    def operator(self, column: str, op: str, operand: JSON) -> Predicate:
        i = _FIELD[column]
        if op in ("$eq", "$ne") and operand is None:
            # IS NULL / IS NOT NULL of a NOT NULL column
            return _constant(op == "$ne")
        if op == "$isNull":
            return _constant(not operand)
        if op in _ORDERS:
            return self.compare(column, i, _ORDERS[op], self.value(column, operand))
        if op in ("$in", "$nin"):
            member = self.member(column, i, [self.value(column, v) for v in operand])
            if op == "$in":
                return member
            return lambda event: not member(event)
        if op == "$between":
            low = self.compare(column, i, (1, 0), self.value(column, operand["$min"]))
            high = self.compare(column, i, (-1, 0), self.value(column, operand["$max"]))
            return lambda event: low(event) and high(event)
        if op in _PATTERNS and column in _TEXT:
            text = operand
            test = _PATTERNS[op]
            return lambda event: test(event[i], text)
        raise NeedsSql(op)

    def member(self, column: str, i: int, values: List[Any]) -> Predicate:
        if column in _TEXT:
            keys: Set[Any] = {pad_key(v) for v in values}
            return lambda event: pad_key(event[i]) in keys
        if column in _NUMBERS and any(isinstance(v, float) for v in values):
            tests = [self.compare(column, i, (0,), v) for v in values]
            return _any(tests)
        exact = set(values)
        return lambda event: event[i] in exact

    def compare(self, column: str, i: int, outcomes: Tuple[int, ...], value: Any) -> Predicate:
        """True when the column compares with ``value`` as one of ``outcomes`` (-1, 0, 1)."""
        if column in _TEXT:
            return lambda event: _text_order(event[i], value) in outcomes
        if column in _NUMBERS and isinstance(value, float):
            # (MariaDB compares an integer column with a double as doubles)
            return lambda event: _order(float(event[i]), value) in outcomes
        if column == "eventId" and outcomes != (0,) and outcomes != (-1, 1):
            raise NeedsSql("an order of event ids")
        return lambda event: _order(event[i], value) in outcomes


#: the comparisons, as the outcomes of an order that make them true
_ORDERS: Dict[str, Tuple[int, ...]] = {
    "$eq": (0,), "$ne": (-1, 1), "$gt": (1,), "$gte": (1, 0), "$lt": (-1,), "$lte": (-1, 0)}

_PATTERNS: Dict[str, Callable[[str, str], bool]] = {
    "$startsWith": str.startswith,
    "$endsWith": str.endswith,
    "$contains": lambda text, part: part in text,
}


def _order(a: Any, b: Any) -> int:
    return int(a > b) - int(a < b)


def _constant(value: bool) -> Predicate:
    return lambda event: value


def _all(parts: List[Predicate]) -> Predicate:
    if not parts:
        return _constant(True)
    if len(parts) == 1:
        return parts[0]
    return lambda event: all(part(event) for part in parts)


def _any(parts: List[Predicate]) -> Predicate:
    if len(parts) == 1:
        return parts[0]
    return lambda event: any(part(event) for part in parts)


class MatcherIndex:
    """
    The subscriptions of a tailer, found by an event's ``pid``, ``name`` and
    ``domain`` (one dictionary lookup each) or kept in the broad list of those
    without an index key: :meth:`candidates` never visits a subscription an
    event cannot match by its key.
    """

    def __init__(self) -> None:
        self._keyed: Dict[str, Dict[str, Dict[Any, None]]] = {column: {} for column in INDEXED}
        #: the subscriptions without an index key (insertion-ordered)
        self.broad: Dict[Any, None] = {}
        self._matchers: Dict[Any, Matcher] = {}

    def __len__(self) -> int:
        return len(self._matchers)

    def __contains__(self, member: object) -> bool:
        return member in self._matchers

    def add(self, member: Any, matcher: Matcher) -> None:
        self._matchers[member] = matcher
        if matcher.index is None:
            self.broad[member] = None
            return
        column, keys = matcher.index
        buckets = self._keyed[column]
        for key in keys:
            buckets.setdefault(key, {})[member] = None

    def remove(self, member: Any) -> None:
        matcher = self._matchers.pop(member, None)
        if matcher is None:
            return
        if matcher.index is None:
            self.broad.pop(member, None)
            return
        column, keys = matcher.index
        buckets = self._keyed[column]
        for key in keys:
            bucket = buckets.get(key)
            if bucket is not None:
                bucket.pop(member, None)
                if not bucket:
                    del buckets[key]

    def matcher(self, member: Any) -> Matcher:
        return self._matchers[member]

    def candidates(self, event: Event) -> Iterator[Tuple[Any, Matcher]]:
        """Each subscription ``event`` may match, once, with its matcher."""
        matchers = self._matchers
        for column, i in (("pid", PID), ("name", NAME), ("domain", DOMAIN)):
            buckets = self._keyed[column]
            if buckets:
                bucket = buckets.get(pad_key(event[i]))
                if bucket:
                    for member in bucket:
                        yield member, matchers[member]
        for member in self.broad:
            yield member, matchers[member]
