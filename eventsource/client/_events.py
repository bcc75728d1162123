"""
The values of version 2 of the protocol, as the client reads and writes them:
expected versions, the events an append takes (:class:`NewEvent`, or a dict),
what an append returns (:class:`AppendResult`), what a read yields
(:class:`RecordedEvent`), and how an append retries (:class:`RetryPolicy`).
"""

import random
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from eventsource.ids import UUID7

#: the version 2 marker of a request body
VERSION_2 = 2

#: expected version: the stream has no events (the append creates it)
NO_STREAM = "noStream"
#: expected version: the stream has at least one event
STREAM_EXISTS = "streamExists"
#: expected version: no check (the default)
ANY = "any"

#: an expected version: a stream's last version (an int ≥ 0), or one of
#: :data:`NO_STREAM`, :data:`STREAM_EXISTS`, :data:`ANY`
ExpectedVersion = Union[int, str]

#: the fields of an event given to an append (a dict may also carry ``pid``,
#: when it is the stream's)
EVENT_FIELDS = frozenset({"domain", "name", "data", "eventId"})

#: the probe of :meth:`EventSourceClient.server_speaks_v2`: a version 2
#: fetch only a version 2 server answers with a bare ``"end"`` (docs/PROTOCOL.md,
#: "Telling a version 1 server")
PROBE_QUERY: Dict[str, Any] = {"$select": {"$columns": ["position"], "$limit": 0}}

_new_ids = UUID7()


def new_event_id() -> str:
    """A fresh event id: a UUIDv7 (time-ordered), lowercase with hyphens."""
    return str(uuid.UUID(bytes=_new_ids()))


def check_expected(expected: Any) -> ExpectedVersion:
    """``expected`` if it is an expected version, else ``ValueError``."""
    if type(expected) is int and expected >= 0:
        return expected
    if isinstance(expected, str) and expected in (NO_STREAM, STREAM_EXISTS, ANY):
        return expected
    raise ValueError(f"an expected version is an int >= 0, {NO_STREAM!r}, {STREAM_EXISTS!r} "
                     f"or {ANY!r}, not {expected!r}")


def normal_event_id(value: Any) -> str:
    """An event id as the protocol writes it (36 characters, lowercase), from
    a :class:`uuid.UUID` or a UUID string; ``ValueError`` for anything else."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str):
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    raise ValueError(f"an eventId is a UUID, not {value!r:.60}")


@dataclass(frozen=True)
class NewEvent:
    """
    An event to append (a dict with the same keys works as well):
    ``domain`` and ``name`` (non-empty strings), ``data`` (any JSON value:
    a ``str`` is that string), ``event_id`` (a UUID; ``None``: the client
    makes one before sending).
    """

    domain: str
    name: str
    data: Any = None
    event_id: Optional[Union[str, uuid.UUID]] = None


def event_document(pid: str, event: Union[NewEvent, Mapping[str, Any]]) -> Dict[str, Any]:
    """
    The persist document of ``event`` in stream ``pid``, with its event id
    (the given one, or a new one).  ``ValueError`` for an event that is not
    one; ``TypeError`` for data that is not JSON-serialisable comes later,
    from the encoder.
    """
    if isinstance(event, NewEvent):
        fields: Dict[str, Any] = {"domain": event.domain, "name": event.name,
                                  "data": event.data, "eventId": event.event_id}
    elif isinstance(event, Mapping):
        fields = dict(event)
        if "pid" in fields:
            if fields.pop("pid") != pid:
                raise ValueError(f"an event of stream {pid!r} names another pid: "
                                 f"{event.get('pid')!r}")
        unknown = set(fields) - EVENT_FIELDS
        if unknown:
            raise ValueError(f"an event has only {', '.join(sorted(EVENT_FIELDS))} (and pid); "
                             f"not {', '.join(sorted(map(str, unknown)))}")
    else:
        raise ValueError(f"an event is a NewEvent or a dict, not {event!r:.60}")
    for key in ("domain", "name"):
        if not isinstance(fields.get(key), str) or not fields[key]:
            raise ValueError(f"an event needs a non-empty string {key}, not "
                             f"{fields.get(key)!r:.60}")
    event_id = fields.get("eventId")
    return {"pid": pid, "domain": fields["domain"], "name": fields["name"],
            "data": fields.get("data"),
            "eventId": new_event_id() if event_id is None else normal_event_id(event_id)}


def stream_documents(pid: Any, events: Any) -> List[Dict[str, Any]]:
    """The documents of a non-empty list of events of one stream."""
    if not isinstance(pid, str) or not pid:
        raise ValueError(f"a pid is a non-empty string, not {pid!r:.60}")
    if isinstance(events, (NewEvent, Mapping)) or not isinstance(events, Iterable) \
            or isinstance(events, (str, bytes)):
        raise ValueError("events must be a list of events (NewEvent or dict)")
    documents = [event_document(pid, event) for event in events]
    if not documents:
        raise ValueError(f"no events to append to {pid!r}")
    return documents


def check_unique_ids(documents: List[Dict[str, Any]]) -> None:
    """``ValueError`` when two documents share an event id (a bad request)."""
    seen = set()
    for document in documents:
        if document["eventId"] in seen:
            raise ValueError(f"two events of one append have the event id "
                             f"{document['eventId']}")
        seen.add(document["eventId"])


@dataclass(frozen=True)
class AppendedEvent:
    """Where one appended event is: its stream, its version there, its
    position in the whole log, and its id."""

    event_id: str
    pid: str
    version: int
    position: int


@dataclass(frozen=True)
class AppendResult:
    """
    What an append did: one :class:`AppendedEvent` per event, in the order
    given, and ``duplicate``: ``True`` when the server had stored these very
    events before (a repeat, after a lost reply), so nothing was written now
    and these are the original positions.  ``raw`` is the server's object.
    """

    events: Tuple[AppendedEvent, ...]
    duplicate: bool
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @property
    def positions(self) -> Tuple[int, ...]:
        """The events' positions, in the order given."""
        return tuple(event.position for event in self.events)

    @property
    def versions(self) -> Tuple[int, ...]:
        """The events' versions, in the order given."""
        return tuple(event.version for event in self.events)

    def last_version(self, pid: Optional[str] = None) -> int:
        """The version of the last event appended (to stream ``pid``, for an
        append to several): the expected version of a next append."""
        versions = [e.version for e in self.events if pid is None or e.pid == pid]
        if not versions:
            raise KeyError(pid)
        return versions[-1]

    @classmethod
    def from_message(cls, raw: Dict[str, Any]) -> "AppendResult":
        """Read the server's success object; ``ValueError`` if it is not one."""
        events = raw.get("events")
        duplicate = raw.get("duplicate")
        if not isinstance(events, list) or not isinstance(duplicate, bool):
            raise ValueError("not a version 2 persist result")
        appended = []
        for event in events:
            if not isinstance(event, dict):
                raise ValueError("an event of the result is not an object")
            event_id, pid = event.get("eventId"), event.get("pid")
            version, position = event.get("version"), event.get("position")
            if not (isinstance(event_id, str) and isinstance(pid, str)
                    and type(version) is int and type(position) is int):
                raise ValueError(f"an event of the result lacks a field: {event!r:.200}")
            appended.append(AppendedEvent(event_id, pid, version, position))
        return cls(tuple(appended), duplicate, raw)


@dataclass(frozen=True)
class RecordedEvent:
    """
    One stored event, as a version 2 read yields it: ``position`` (in the
    whole log), ``version`` (in its stream), ``event_id``, ``pid``,
    ``domain``, ``name``, ``timestamp`` (UTC, ``2026-11-29T10:00:00.123Z``)
    and ``data`` (the JSON value itself).  ``raw`` is the row as sent.
    """

    position: int
    version: int
    event_id: str
    pid: str
    domain: str
    name: str
    timestamp: str
    data: Any
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_row(cls, row: Dict[str, Any]) -> "RecordedEvent":
        """A row of a version 2 fetch without ``$columns`` (all eight)."""
        def get(key: str) -> Any:
            return row.get(key)  # (None for a column the row lacks)

        return cls(get("position"), get("version"), get("eventId"), get("pid"), get("domain"),
                   get("name"), get("timestamp"), get("data"), row)


@dataclass(frozen=True)
class RetryPolicy:
    """
    How :meth:`EventSourceClient.append` repeats an attempt whose outcome
    is unknown (an ``unavailable`` answer, no answer within the timeout, the
    Redis connection lost while waiting), always with the same body and
    event ids: at most ``retries`` more attempts, the n-th (from 0) after
    ``min(max_delay, initial_delay * multiplier ** n)`` seconds, less up to
    ``jitter`` of it at random (so that clients that failed together do not
    retry together).  ``RetryPolicy(retries=0)`` never retries.
    """

    retries: int = 5
    initial_delay: float = 0.1
    max_delay: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if type(self.retries) is not int or self.retries < 0:
            raise ValueError("retries must be an int >= 0")
        if not (self.initial_delay >= 0 and self.max_delay >= 0 and self.multiplier >= 1
                and 0 <= self.jitter <= 1):
            raise ValueError("delays must be >= 0, the multiplier >= 1, the jitter in [0, 1]")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first)."""
        nominal = min(self.max_delay, self.initial_delay * self.multiplier ** min(retry, 64))
        return nominal * (1 - self.jitter * random.random())


#: the retries of a client made without a policy of its own
DEFAULT_RETRY = RetryPolicy()
