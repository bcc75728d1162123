"""
What an append asks and what it gets: expected versions, idempotency by
event id, and the outcome of each request.

Pure (no I/O): the MySQL writer (:mod:`eventsource.store`) and the in-memory
store of the tests (:mod:`eventsource.testing`) both decide with these
functions, so they cannot disagree on what an expected version or a repeated
event id means.  See docs/PROTOCOL.md, "Version 2".
"""

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

#: the expected-version specs that are not a number (``"any"`` is never stored)
NO_STREAM, STREAM_EXISTS, ANY = "noStream", "streamExists", "any"

#: an expected version: a last version (int), :data:`NO_STREAM` or :data:`STREAM_EXISTS`
Spec = Union[int, str]

#: the written values of one event: ``(pid, domain, name, data_text)``
Row = Tuple[Any, ...]


def stream_of(pid: str) -> str:
    """
    The stream of ``pid`` as the ``pid_version`` key compares it: MariaDB's
    collations ignore trailing spaces (PAD SPACE), so ``"a "`` is ``"a"``.
    """
    return pid.rstrip(" ")


def format_event_id(raw: bytes) -> str:
    """A stored 16-byte event id as the wire writes it: lowercase, with hyphens."""
    if len(raw) != 16:
        raise ValueError(f"an event id is 16 bytes, not {len(raw)}")
    text = bytes(raw).hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


@dataclass(frozen=True)
class Expectation:
    """One stream's expected state: ``pid`` as the client wrote it, ``spec`` as it sent it."""

    pid: str
    spec: Spec

    @property
    def stream(self) -> str:
        return stream_of(self.pid)


@dataclass(frozen=True)
class Append:
    """
    One persist as the writer takes it: its rows, the client's event ids
    (``None``: the server makes them), the expectations to check first, and
    whether the caller wants every event's place (version 2) or only the
    version 1 ``(affected_rows, insert_id)``.
    """

    rows: Tuple[Row, ...]
    event_ids: Optional[Tuple[bytes, ...]] = None
    expected: Tuple[Expectation, ...] = ()
    detailed: bool = False


@dataclass(frozen=True)
class Event:
    """Where one event was stored: its id, pid, version and position."""

    event_id: bytes
    pid: str
    version: int
    position: int


@dataclass(frozen=True)
class Appended:
    """A version 2 append's success: its events in request order, and whether it was a repeat."""

    events: Tuple[Event, ...]
    duplicate: bool = False


class AppendRefused(Exception):
    """An append that was not written, for a reason its client must hear."""

    code = "internal"


class WrongExpectedVersion(AppendRefused):
    """A stream was not in the state the request expected."""

    code = "wrongExpectedVersion"

    def __init__(self, pid: str, expected: Spec, actual: Optional[int]) -> None:
        self.pid, self.expected, self.actual = pid, expected, actual
        if actual is None:
            state = "has no events"
        else:
            state = f"is at version {actual}"
        if expected == NO_STREAM:
            wanted = "no events"
        elif expected == STREAM_EXISTS:
            wanted = "at least one event"
        else:
            wanted = f"version {expected}"
        super().__init__(f"stream {json.dumps(pid, ensure_ascii=False)} {state}, not {wanted}")


class IdempotencyConflict(AppendRefused):
    """Some event ids of the request are stored, but not as this request would store them."""

    code = "idempotencyConflict"

    def __init__(self, event_id: bytes, reason: str) -> None:
        self.event_id = event_id
        super().__init__(f"event id {format_event_id(event_id)} {reason}")


def check(expected: Sequence[Expectation], last: Mapping[str, int]) -> Optional[WrongExpectedVersion]:
    """
    The first expectation that ``last`` (stream -> last version, absent for
    a stream without events) does not meet, as the error; None when all hold.
    """
    for expectation in expected:
        actual = last.get(expectation.stream)
        spec = expectation.spec
        if spec == NO_STREAM:
            held = actual is None
        elif spec == STREAM_EXISTS:
            held = actual is not None
        else:
            held = actual == spec
        if not held:
            return WrongExpectedVersion(expectation.pid, spec, actual)
    return None


#: a stored event found by its id: ``(pid, version, position)``
Stored = Tuple[str, int, int]


def repeated(append: Append, stored: Mapping[bytes, Stored]) -> Union[None, Appended, IdempotencyConflict]:
    """
    What the stored events ``stored`` (event id -> where it is) say of
    ``append``, which carries the client's event ids: None when none of
    them is stored (a new append); the original success, marked duplicate,
    when all of them are, for the same streams, each stream's events at
    consecutive versions in request order; an :class:`IdempotencyConflict`
    otherwise.
    """
    event_ids = append.event_ids or ()
    found = [stored.get(event_id) for event_id in event_ids]
    if all(place is None for place in found):
        return None
    missing = [event_id for event_id, place in zip(event_ids, found) if place is None]
    if missing:
        some = next(event_id for event_id, place in zip(event_ids, found) if place is not None)
        return IdempotencyConflict(
            some, f"is stored already, but {len(missing)} other event ids of the request are "
                  "not: a request must repeat an earlier one whole or use new ids")
    events: List[Event] = []
    next_version: Dict[str, int] = {}
    last_position = 0
    for row, event_id, place in zip(append.rows, event_ids, found):
        assert place is not None
        pid, version, position = place
        stream = stream_of(row[0])
        if stream_of(pid) != stream:
            return IdempotencyConflict(event_id, f"is stored for another stream, {pid!r}")
        if (stream in next_version and next_version[stream] != version) or position <= last_position:
            return IdempotencyConflict(
                event_id, "is stored, but not in the order of this request's events")
        next_version[stream] = version + 1
        last_position = position
        events.append(Event(event_id, pid, version, position))
    return Appended(tuple(events), duplicate=True)
