"""
The wire protocol: turning Redis message bodies into requests, and rows and
results into message bodies.

Everything here is pure (no I/O, no reactor).  ``parse_request`` is the one
place a request body is judged; anything it refuses is a :class:`BadRequest`
that carries the reply channel when one could be identified, so the service
can answer ``"error"``, ``"end"`` there, or only log when it cannot.
"""

import datetime
import decimal
import json
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Collection, Dict, List, Optional, Sequence, Tuple, Union

from eventsource.config import REQUEST_CHANNELS

END = "end"
ERROR = "error"
TIMEOUT = "timeout"
ACCEPTED = "accepted"

#: control words as they travel: JSON strings
END_BODY = json.dumps(END)
ERROR_BODY = json.dumps(ERROR)
TIMEOUT_BODY = json.dumps(TIMEOUT)
ACCEPTED_BODY = json.dumps(ACCEPTED)

#: the request channels, by kind (after any channel prefix or tenant namespace)
PERSIST, FETCH, FETCH_NEXT, SUBSCRIBE = REQUEST_CHANNELS

#: longest reply channel name we accept, in characters
MAX_CHANNEL_LENGTH = 512

#: the deepest nesting of arrays and objects a request body may have (no
#: valid request comes near: queries stop at 32 levels, stored data at 31)
MAX_BODY_DEPTH = 64


class BadRequest(Exception):
    """
    A request that cannot be served.

    ``channel`` is the reply channel when the body named a usable one, else
    ``None`` (the request can then only be logged); ``version`` the
    protocol version of the request (how to answer on ``channel``).
    """

    code = "badRequest"

    def __init__(self, reason: str, channel: Optional[str] = None, version: int = 1):
        super().__init__(reason)
        self.reason = reason
        self.channel = channel
        self.version = version


@dataclass(frozen=True)
class PersistRequest:
    """
    ``persist``: append the documents of ``insert`` (the ``$insert`` value).
    Version 2: ``expected`` is ``("expectedVersion", value)`` or
    ``("expectedVersions", value)`` as sent, when the body had either.
    """

    channel: str
    insert: Any
    version: int = 1
    expected: Optional[Tuple[str, Any]] = None


@dataclass(frozen=True)
class FetchRequest:
    """``fetch``: stream the rows of ``select`` (the ``$select`` value)."""

    channel: str
    select: Any
    window: int = 1
    version: int = 1


@dataclass(frozen=True)
class NextRequest:
    """``fetch-next``: accept ``accepted`` rows of the stream on ``channel``, or
    (``end``) stop it: a windowed stream's client says both here."""

    channel: str
    accepted: int = 1
    end: bool = False


#: a subscription's ``from``: the start of the log, or the server's position now
FROM_START, FROM_END = "start", "end"


@dataclass(frozen=True)
class SubscribeRequest:
    """
    ``subscribe`` (version 2 only): the events matching ``select`` (a
    ``$select`` of ``$where`` and ``$from`` only) after ``start`` (a
    position, or :data:`FROM_END`), then every new one as it commits.
    """

    channel: str
    select: Any
    start: Union[int, str]
    window: int = 100
    version: int = 2


class TooDeep(ValueError):
    """JSON text whose arrays and objects nest deeper than allowed."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for every message (json.loads with options builds a new one per call).
_decoder = json.JSONDecoder(parse_constant=_refuse_constant)


def decode_json(body: str) -> Any:
    """Decode strict JSON text (no NaN or Infinity), raising ``ValueError``."""
    return _decoder.decode(body)


#: a client's message bodies: compact, non-ASCII as itself (as ``json.dumps``
#: with those options, checking for cycles)
_body_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_lenient_decoder = json.JSONDecoder()


def encode_body(message: Any) -> str:
    """A message body as a client sends it: compact JSON text (a control
    word becomes a JSON string, as :data:`END_BODY`)."""
    if type(message) is str:
        return _quoted(message)  # (what JSONEncoder.encode does with a str)
    return _encode_message(message)


def decode_body(body: Any) -> Any:
    """
    A message body as a client reads it, leniently: a bare control word
    (``end`` without quotes) or any other text that is not JSON comes back
    unchanged, as do bytes that are not UTF-8 and non-text values.
    """
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            return body
    if not isinstance(body, str):
        return body
    try:
        return _lenient_decoder.decode(body)
    except ValueError:
        return body


#: integers beyond this are not exact in JavaScript (a double); the original
#: stored them rounded, as ``JSON.parse`` then ``JSON.stringify`` leave them
_MAX_SAFE_INTEGER = 2 ** 53

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

#: C-speed encoder for values with nothing JavaScript would print differently
_compact_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"),
                                    check_circular=False)


def _is_array_index(key: str) -> bool:
    # JavaScript objects list "array index" keys (canonical integers below
    # 2**32 - 1) first, in ascending order, whatever the order they came in
    return (key.isdigit() and key.isascii() and (key == "0" or key[0] != "0")
            and int(key) < 4294967295)


def number_text(value: Union[int, float]) -> str:
    """
    A JSON number as JavaScript writes it (``String(n)``, ``JSON.stringify``):
    a double, in its shortest round-tripping digits, in exponent form outside
    1e-7 <= |n| < 1e21.  Raises ``OverflowError`` for a number no double
    holds (and for infinities).
    """
    if isinstance(value, int):
        if -_MAX_SAFE_INTEGER <= value <= _MAX_SAFE_INTEGER:
            return str(value)
        value = float(value)        # (OverflowError past the largest double)
    if value != value or value in (float("inf"), float("-inf")):
        raise OverflowError("not a finite number")
    if value == 0:
        return "0"
    text = repr(value)
    if "e" not in text:
        # Python writes 1e-4 <= |n| < 1e16 in fixed notation, as JavaScript
        # does, with the same shortest digits; only "1.0" is JavaScript's "1"
        return text[:-2] if text.endswith(".0") else text
    # repr gives the shortest digits that read back as the same double, as
    # JavaScript's Number::toString does; only the layout differs
    sign, digit_tuple, exponent = decimal.Decimal(repr(value)).normalize().as_tuple()
    assert isinstance(exponent, int)     # (a finite number)
    digits = "".join(map(str, digit_tuple))
    k = len(digits)
    n = exponent + k            # value = 0.DIGITS * 10**n
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        e = n - 1
        text = digits[0] + ("." + digits[1:] if k > 1 else "") + "e" + ("+" if e > 0 else "-") + str(abs(e))
    return "-" + text if sign else text


def _js_number(value: Union[int, float]) -> str:
    try:
        return number_text(value)
    except OverflowError:
        return "null"       # Infinity, which JSON.stringify writes as null


def _js_string(text: str) -> str:
    encoded = _compact_encoder.encode(text)
    if _LONE_SURROGATE.search(encoded):
        # JSON.stringify escapes lone surrogates (lower-case hex)
        encoded = _LONE_SURROGATE.sub(lambda m: "\\u%04x" % ord(m.group()), encoded)
    return encoded


def _needs_js_layout(value: Any) -> bool:
    """Whether ``value`` holds anything the C encoder prints unlike JavaScript."""
    pending = [value]
    while pending:
        value = pending.pop()
        kind = type(value)
        if kind is dict:
            for key in value:
                if key[:1].isdigit() and _is_array_index(key):
                    return True
                if _LONE_SURROGATE.search(key):
                    return True
            pending.extend(value.values())
        elif kind is list:
            pending.extend(value)
        elif kind is float:
            # the C encoder writes floats with repr: the same text as
            # JavaScript except for integral values ("1.0"), exponent forms
            # and what JSON cannot hold
            if value.is_integer() or not 1e-4 <= abs(value) < 1e16:
                return True
        elif kind is int:
            if not -_MAX_SAFE_INTEGER <= value <= _MAX_SAFE_INTEGER:
                return True
        elif kind is str:
            if _LONE_SURROGATE.search(value):
                return True
    return False


def _js_stringify(value: Any, out: List[str]) -> None:
    kind = type(value)
    if kind is str:
        out.append(_js_string(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif kind is int or kind is float:
        out.append(_js_number(value))
    elif kind is list:
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _js_stringify(item, out)
        out.append("]")
    elif kind is dict:
        indexes = sorted((key for key in value if _is_array_index(key)), key=int)
        keys = indexes + [key for key in value if not _is_array_index(key)] if indexes else value
        out.append("{")
        for i, key in enumerate(keys):
            if i:
                out.append(",")
            out.append(_js_string(key))
            out.append(":")
            _js_stringify(value[key], out)
        out.append("}")
    else:
        raise TypeError(f"{kind.__name__} is not a JSON value")


def json_stringify(value: Any) -> str:
    """
    ``value`` (decoded JSON) as the text JavaScript's ``JSON.stringify``
    makes of the same JSON: compact, keys in the order JavaScript keeps
    them, non-ASCII as itself, numbers as doubles.  The original service
    stored ``data`` this way, and clients compare or hash that text.
    """
    if not _needs_js_layout(value):
        return _compact_encode(value)
    out: List[str] = []
    _js_stringify(value, out)
    return "".join(out)


#: what :func:`parse_request` makes of a request
Request = Union[PersistRequest, FetchRequest, NextRequest, SubscribeRequest]


def truncate(value: Any, limit: int = 200) -> str:
    """A printable, bounded form of ``value`` for log lines."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return text[:limit] + f"... ({len(text)} characters)"


def _body_too_large(body: str, max_bytes: int) -> bool:
    # len(str) <= len(utf-8 bytes) <= 4 * len(str): encode only when unsure
    if len(body) > max_bytes:
        return True
    if len(body) * 4 <= max_bytes:
        return False
    return len(body.encode("utf-8", "surrogatepass")) > max_bytes


def deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest deeper than ``limit`` in decoded JSON (iteratively)."""
    containers = (dict, list)
    pending = [(value, 1)] if type(value) in containers else []
    while pending:
        value, depth = pending.pop()
        if depth > limit:
            return True
        children = value.values() if type(value) is dict else value
        pending.extend((child, depth + 1) for child in children if type(child) in containers)
    return False


def decode_nested(text: str, limit: int) -> Any:
    """
    Decode JSON ``text`` whose arrays and objects may nest at most ``limit``
    levels; raises ``ValueError``, or :class:`TooDeep`.  Every step is
    linear in the text (the C decoder, a C count, one walk of the value),
    whatever its shape, and the answer does not depend on the Python
    version's recursion limit.
    """
    try:
        value = _decoder.decode(text)
    except RecursionError:
        raise TooDeep(limit) from None
    if text.count("[") + text.count("{") > limit and deeper_than(value, limit):
        raise TooDeep(limit)
    return value


#: what a tenant may be called: no ``:`` (so a tenant's request channel
#: ``<prefix>T:fetch`` has one reading) and none of Redis' glob characters
TENANT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def valid_tenant(name: Any) -> bool:
    """Whether ``name`` may be a tenant's name (see :data:`TENANT_NAME`)."""
    return isinstance(name, str) and TENANT_NAME.fullmatch(name) is not None


def tenant_request_channel(channel: str, prefix: str) -> Optional[Tuple[str, str]]:
    """
    ``(kind, tenant)`` when ``channel`` has the shape of a tenant's request
    channel, ``<prefix><tenant>:<kind>`` (what the server's patterns
    ``<prefix>*:<kind>`` deliver), else ``None``.  The tenant is returned as
    it is: the caller checks it with :func:`valid_tenant`.
    """
    if not channel.startswith(prefix):
        return None
    tenant, colon, kind = channel[len(prefix):].rpartition(":")
    if not colon or kind not in REQUEST_CHANNELS:
        return None
    return kind, tenant


#: one token of a compiled glob: ``"*"``, ``"?"``, a byte, or a byte set
#: ``(negated, ((low, high), ...))``
_ByteSet = Tuple[bool, Tuple[Tuple[int, int], ...]]
_Token = Union[str, int, _ByteSet]


class Glob:
    """
    A Redis glob pattern (``*``, ``?``, ``[abc]``, ``[^a-z]``, ``\\`` escapes),
    matched as Redis does, on the UTF-8 bytes of a name, but without
    backtracking blow-up: at most the product of the pattern's and the
    name's lengths, whatever a client names.

    :raises ValueError: for an unterminated ``[`` or a trailing ``\\``
        (which Redis reads in ways nobody means).
    """

    def __init__(self, pattern: str):
        self.pattern = pattern
        raw = pattern.encode("utf-8", "surrogatepass")
        self._tokens: List[_Token] = []
        i = 0
        while i < len(raw):
            byte = raw[i]
            if byte == 0x2A:  # *
                if not self._tokens or self._tokens[-1] != "*":
                    self._tokens.append("*")
            elif byte == 0x3F:  # ?
                self._tokens.append("?")
            elif byte == 0x5B:  # [
                i, token = self._set(raw, i + 1)
                self._tokens.append(token)
            elif byte == 0x5C:  # backslash
                i += 1
                if i == len(raw):
                    raise ValueError(f"ends with a lone backslash: {pattern!r}")
                self._tokens.append(raw[i])
            else:
                self._tokens.append(byte)
            i += 1

    @staticmethod
    def _set(raw: bytes, i: int) -> Tuple[int, _ByteSet]:
        negate = i < len(raw) and raw[i] == 0x5E  # ^
        if negate:
            i += 1
        ranges: List[Tuple[int, int]] = []
        while i < len(raw) and raw[i] != 0x5D:  # ]
            if raw[i] == 0x5C and i + 1 < len(raw):
                i += 1
                ranges.append((raw[i], raw[i]))
            elif i + 2 < len(raw) and raw[i + 1] == 0x2D:  # a-z (as Redis: even a-])
                low, high = sorted((raw[i], raw[i + 2]))
                ranges.append((low, high))
                i += 2
            else:
                ranges.append((raw[i], raw[i]))
            i += 1
        if i >= len(raw):
            raise ValueError(
                f"has an unterminated '[': {raw.decode('utf-8', 'surrogatepass')!r}")
        return i, (negate, tuple(ranges))

    @staticmethod
    def _one(token: "_Token", byte: int) -> bool:
        if token == "?":
            return True
        if isinstance(token, int):
            return token == byte
        assert isinstance(token, tuple)
        negate, ranges = token
        return any(low <= byte <= high for low, high in ranges) != negate

    def matches(self, name: str) -> bool:
        """Whether ``name`` matches the whole pattern (case-sensitive, as Redis)."""
        text = name.encode("utf-8", "surrogatepass")
        tokens = self._tokens
        t = p = 0
        star = star_text = -1
        while t < len(text):
            if p < len(tokens) and tokens[p] == "*":
                star, star_text = p, t
                p += 1
            elif p < len(tokens) and self._one(tokens[p], text[t]):
                p += 1
                t += 1
            elif star >= 0:
                # let the last star take one more byte, and go on from there
                star_text += 1
                t = star_text
                p = star + 1
            else:
                return False
        while p < len(tokens) and tokens[p] == "*":
            p += 1
        return p == len(tokens)


@dataclass(frozen=True)
class ReplyRules:
    """
    Where replies may go, beyond version 1's rules: ``pattern`` (the
    server's ``--reply-channels``), ``namespace`` (in tenant mode, the
    tenant's ``<prefix>T:``) and ``request_prefix`` (in tenant mode, the
    prefix under which names shaped like a request channel are refused).
    """

    pattern: Optional[Glob] = None
    namespace: Optional[str] = None
    request_prefix: Optional[str] = None


def check_reply_channel(channel: str, rules: Optional[ReplyRules]) -> None:
    """
    Refuse a reply or acknowledged channel the rules forbid.  The refusal
    names no channel: a client must not make the server publish anywhere
    outside what it may use, not even ``"error"``.
    """
    if rules is None:
        return
    if rules.namespace is not None and not channel.startswith(rules.namespace):
        raise BadRequest(f"the reply channel {truncate(channel, 80)!r} is outside the "
                         f"tenant's namespace {rules.namespace!r}")
    if (rules.request_prefix is not None
            and tenant_request_channel(channel, rules.request_prefix) is not None):
        raise BadRequest(f"the reply channel {truncate(channel, 80)!r} has the shape of a "
                         f"request channel")
    if rules.pattern is not None and not rules.pattern.matches(channel):
        raise BadRequest(f"the reply channel {truncate(channel, 80)!r} does not match "
                         f"--reply-channels {rules.pattern.pattern!r}")


def _reply_channel(message: Dict[str, Any], reserved: Collection[str],
                   rules: Optional[ReplyRules] = None) -> str:
    channel = message.get("channel")
    if not isinstance(channel, str) or not channel:
        raise BadRequest("the request has no \"channel\" string")
    if len(channel) > MAX_CHANNEL_LENGTH:
        raise BadRequest(f"the reply channel is longer than {MAX_CHANNEL_LENGTH} characters")
    if _LONE_SURROGATE.search(channel):
        # (a JSON escape such as "\udfff": no Redis channel can carry it)
        raise BadRequest("the reply channel is not valid Unicode text")
    if channel in reserved:
        raise BadRequest(f"the reply channel cannot be the request channel {channel!r}")
    check_reply_channel(channel, rules)
    return channel


def _query(message: Dict[str, Any], channel: str, key: str) -> Any:
    query = message.get("query")
    if not isinstance(query, dict):
        raise BadRequest("\"query\" must be an object", channel)
    if set(query) != {key}:
        raise BadRequest(f"\"query\" must hold exactly one key, {key!r}", channel)
    return query[key]


def _positive_int(message: Dict[str, Any], field: str, channel: str, default: int) -> int:
    value = message.get(field, default)
    if type(value) is not int or value < 1:
        raise BadRequest(f"{field!r} must be an integer of at least 1", channel)
    return value


def parse_request(request_channel: str, body: Any, max_body_bytes: int,
                  reserved: Collection[str] = REQUEST_CHANNELS,
                  rules: Optional[ReplyRules] = None) -> "Request":
    """
    Judge one message that arrived on a request channel: ``request_channel``
    is its kind (``persist``, ``fetch`` or ``fetch-next``); ``reserved`` the
    channel names no reply may use; ``rules`` what else limits the reply
    channel (see :func:`check_reply_channel`).

    Returns a :class:`PersistRequest`, :class:`FetchRequest` or
    :class:`NextRequest`; raises :class:`BadRequest` otherwise.
    """
    if not isinstance(body, str):
        raise BadRequest("the body is not text")
    if _body_too_large(body, max_body_bytes):
        # Not decoded, so the reply channel is unknown: only a log line.
        raise BadRequest(f"the body is larger than {max_body_bytes} bytes")
    try:
        message = decode_nested(body, MAX_BODY_DEPTH)
    except TooDeep:
        raise BadRequest(f"the body nests deeper than {MAX_BODY_DEPTH} levels") from None
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    if not isinstance(message, dict):
        raise BadRequest("the body is not a JSON object")
    if request_channel == SUBSCRIBE:
        return _parse_subscribe(message, reserved, rules)
    if request_channel != "fetch-next" and is_version2(message):
        return _parse_version2(request_channel, message, reserved, rules)
    # Other fields are ignored, as the original ignored them (a client's
    # request id or debug field must not cost it its request or its stream).
    channel = _reply_channel(message, reserved, rules)
    if request_channel == "persist":
        return PersistRequest(channel, _query(message, channel, "$insert"))
    if request_channel == "fetch":
        window = _positive_int(message, "window", channel, 1)
        return FetchRequest(channel, _query(message, channel, "$select"), window)
    if message.get("end") is True:
        # (extension 1: a windowed stream's client ends it here; any other
        # value of "end" is ignored, as other fields are)
        return NextRequest(channel, end=True)
    return NextRequest(channel, _positive_int(message, "accepted", channel, 1))


def is_version2(message: Dict[str, Any]) -> bool:
    """Whether a decoded request says ``"v": 2`` (the number: ``2`` or ``2.0``)."""
    version = message.get("v")
    return type(version) in (int, float) and version == 2


#: the body fields of each version 2 request
_V2_FIELDS = {
    "persist": frozenset(("v", "channel", "query", "expectedVersion", "expectedVersions")),
    "fetch": frozenset(("v", "channel", "query", "window")),
}


def _parse_version2(request_channel: str, message: Dict[str, Any], reserved: Collection[str],
                    rules: Optional[ReplyRules]) -> "Request":
    """A version 2 ``persist`` or ``fetch``: version 1's fields and a few more, and no others."""
    # (the refusals of a version 2 request are answered as version 2 error
    # objects; a try, not a context manager, which costs 2 us a request)
    try:
        return _version2_fields(request_channel, message, reserved, rules)
    except BadRequest as bad:
        bad.version = 2
        raise


def _version2_fields(request_channel: str, message: Dict[str, Any], reserved: Collection[str],
                     rules: Optional[ReplyRules]) -> "Request":
    channel = _reply_channel(message, reserved, rules)
    unknown = [key for key in message if key not in _V2_FIELDS[request_channel]]
    if unknown:
        raise BadRequest(f"unknown field {truncate(unknown[0], 80)!r} in a version 2 "
                         f"{request_channel} request", channel)
    if request_channel == "fetch":
        window = _positive_int(message, "window", channel, 1)
        return FetchRequest(channel, _query(message, channel, "$select"), window, version=2)
    if "expectedVersion" in message and "expectedVersions" in message:
        raise BadRequest("a persist has expectedVersion or expectedVersions, not both", channel)
    expected: Optional[Tuple[str, Any]] = None
    if "expectedVersion" in message:
        expected = ("expectedVersion", message["expectedVersion"])
    elif "expectedVersions" in message:
        expected = ("expectedVersions", message["expectedVersions"])
    return PersistRequest(channel, _query(message, channel, "$insert"), version=2,
                          expected=expected)


#: the body fields of a subscription, and the keys of its ``$select``
_SUBSCRIBE_FIELDS = frozenset(("v", "channel", "query", "from", "window"))
_SUBSCRIBE_SELECT_KEYS = frozenset(("$where", "$from"))

#: the largest position a subscription may start after (an ``id`` is a BIGINT UNSIGNED)
MAX_POSITION = 2 ** 64 - 1


def _parse_subscribe(message: Dict[str, Any], reserved: Collection[str],
                     rules: Optional[ReplyRules]) -> SubscribeRequest:
    """
    A ``subscribe`` request: version 2 only (every refusal is a version 2
    error object), the fields of :data:`_SUBSCRIBE_FIELDS`, a ``$select``
    of ``$where`` and ``$from`` only.
    """
    try:
        return _subscribe_fields(message, reserved, rules)
    except BadRequest as bad:
        bad.version = 2
        raise


def _subscribe_fields(message: Dict[str, Any], reserved: Collection[str],
                      rules: Optional[ReplyRules]) -> SubscribeRequest:
    channel = _reply_channel(message, reserved, rules)
    if not is_version2(message):
        raise BadRequest("subscribe is a version 2 request: the body needs \"v\": 2", channel)
    unknown = [key for key in message if key not in _SUBSCRIBE_FIELDS]
    if unknown:
        raise BadRequest(f"unknown field {truncate(unknown[0], 80)!r} in a subscribe request",
                         channel)
    select = _query(message, channel, "$select")
    if not isinstance(select, dict):
        raise BadRequest("\"$select\" must be an object", channel)
    extra = [key for key in select if key not in _SUBSCRIBE_SELECT_KEYS]
    if extra:
        raise BadRequest(f"a subscription's $select takes $where and $from only, not "
                         f"{truncate(extra[0], 80)!r}", channel)
    start = message.get("from", FROM_START)
    if start == FROM_START:
        start = 0
    elif start != FROM_END and (type(start) is not int or not 0 <= start <= MAX_POSITION):
        raise BadRequest("\"from\" must be \"start\", \"end\" or a position (an integer "
                         "of at least 0)", channel)
    window = _positive_int(message, "window", channel, 100)
    return SubscribeRequest(channel, select, start, window)


def parse_control(body: Any) -> Optional[str]:
    """
    What a message on a reply channel means to the server: ``"accepted"``,
    ``"end"``, or ``None`` for anything else (the echoes of our own rows and
    control words, and noise).
    """
    if body == ACCEPTED_BODY:
        return ACCEPTED
    if body == END_BODY:
        return END
    return None


def encode_next(request: NextRequest) -> str:
    """
    The ``fetch-next`` body a client sends for ``request``, as
    :func:`parse_request` reads it back: ``{"channel": c}`` accepts one row,
    ``"accepted": k`` more, ``"end": true`` ends a windowed stream.
    """
    message: dict[str, Any] = {"channel": request.channel}
    if request.end:
        message["end"] = True
    elif request.accepted != 1:
        message["accepted"] = request.accepted
    return encode_body(message)


def _encode_value(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return format_timestamp(value)
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    raise TypeError(f"cannot encode {type(value).__name__}")


_row_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_encode_value)


def _one_shot(encoder: json.JSONEncoder) -> Callable[[Any], str]:
    """
    ``encoder.encode`` without its set-up on every call: the C encoder that
    ``JSONEncoder.encode`` makes afresh for each object (about 60 % of the
    time of a row's encoding) is made once.  It is made without the check
    for circular references, which the values of a row (scalars read from
    the database) cannot have; the text is the same.  Where the C encoder
    is missing (another Python), the encoder's own ``encode``.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None or encoder.indent is not None:
        return encoder.encode
    c_encode = make(None, encoder.default,
                    json.encoder.encode_basestring_ascii if encoder.ensure_ascii
                    else json.encoder.encode_basestring,
                    None, encoder.key_separator, encoder.item_separator, encoder.sort_keys,
                    encoder.skipkeys, encoder.allow_nan)
    join = "".join

    def encode(value: Any) -> str:
        return join(c_encode(value, 0))
    return encode


#: ``_row_encoder.encode``, the C encoder made once (see :func:`_one_shot`)
_encode = _one_shot(_row_encoder)
#: ``_body_encoder.encode``, the same way (:func:`encode_body`)
_encode_message = _one_shot(_body_encoder)
#: ``_compact_encoder.encode``, the same way (:func:`json_stringify`: every persist's ``data``)
_compact_encode = _one_shot(_compact_encoder)


def format_timestamp(value: datetime.datetime) -> str:
    """UTC ISO-8601 with milliseconds and ``Z``, as JavaScript's ``Date`` prints."""
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def format_mysql_datetime(text: Union[str, bytes, bytearray]) -> str:
    """
    MySQL's DATETIME text (``2020-04-06 11:35:18.414123``, fraction optional)
    in the wire form ``2020-04-06T11:35:18.414Z``, without building a
    ``datetime`` first: this runs for every row of every stream.
    """
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("ascii")
    if len(text) < 19:
        return text
    return text[:10] + "T" + text[11:19] + "." + (text[20:23] + "000")[:3] + "Z"


def encode_row(names: Sequence[str], values: Sequence[Any]) -> str:
    """One row as the JSON object the original sent, keys in SELECT order."""
    return _encode(dict(zip(names, values)))


#: how a row carries a column's values (see :func:`row_encoder`)
PLAIN_VALUE, UUID_VALUE, JSON_VALUE = "", "uuid", "json"


def _uuid_text(value: Any) -> Optional[str]:
    if value is None:
        return None
    text = bytes(value).hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def _json_text(value: Any) -> str:
    """Stored JSON text, to be written into a row as the value itself."""
    if value is None:
        return "null"
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    try:
        _decoder.decode(value)
    except (ValueError, TypeError):
        # (never from a table with MariaDB's JSON check: sent as a string)
        return _encode(value)
    return str(value)


def _checked_json_text(value: Any) -> str:
    """JSON text MariaDB checked at INSERT (its ``json_valid`` constraint): as it is."""
    if value is None:
        return "null"
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    return str(value)


def row_encoder(names: Sequence[str], encodings: Sequence[str] = (),
                checked_json: bool = False) -> Callable[[Sequence[Any]], str]:
    """
    The encoder of the rows of one result: a function from a row's values
    (in ``names`` order) to its message body, the JSON object of the names
    and values.  ``encodings`` (empty: all plain, version 1) says how each
    column travels: :data:`UUID_VALUE` columns hold 16 bytes sent as UUID
    text; :data:`JSON_VALUE` columns hold JSON text sent as the value it is
    (version 2's ``data``), exactly as stored.
    """
    if not any(encodings):
        return partial(encode_row, names)
    uuids = [i for i, encoding in enumerate(encodings) if encoding == UUID_VALUE]
    spliced = [i for i, encoding in enumerate(encodings) if encoding == JSON_VALUE]
    if not spliced:
        def encode_uuids(values: Sequence[Any]) -> str:
            values = list(values)
            for i in uuids:
                values[i] = _uuid_text(values[i])
            return encode_row(names, values)
        return encode_uuids
    # The JSON columns' stored text goes in as it is, never decoded and
    # encoded again (which could change its numbers).
    keys = [_row_encoder.encode(name) for name in names]
    json_text = _checked_json_text if checked_json else _json_text
    last = len(names) - 1
    if tuple(names) == _V2_DEFAULT_NAMES and tuple(encodings) == _V2_DEFAULT_ENCODINGS:
        return partial(_encode_v2_default, json_text,
                       _spliced_encoder(names, uuids, keys, json_text, last))
    if spliced == [last] and last > 0 and len(set(names)) == len(names):
        return _spliced_encoder(names, uuids, keys, json_text, last)

    def encode(values: Sequence[Any]) -> str:
        parts = []
        for i, value in enumerate(values):
            encoding = encodings[i]
            if encoding == JSON_VALUE:
                text = json_text(value)
            elif encoding == UUID_VALUE:
                text = _encode(_uuid_text(value))
            else:
                text = _encode(value)
            parts.append(keys[i] + ":" + text)
        return "{" + ",".join(parts) + "}"
    return encode


def _spliced_encoder(names: Sequence[str], uuids: List[int], keys: List[str],
                     json_text: Callable[[Any], str], last: int) -> Callable[[Sequence[Any]], str]:
    """
    The usual row (the JSON column last, names unique): the other columns
    in one C-speed encoding, the JSON text after them.
    """
    head = names[:last]
    tail = "," + keys[last] + ":"

    def encode_spliced(values: Sequence[Any]) -> str:
        front = list(values[:last])
        for i in uuids:
            front[i] = _uuid_text(front[i])
        return _encode(dict(zip(head, front)))[:-1] + tail + json_text(values[last]) + "}"
    return encode_spliced


#: version 2's default columns, as a row of them is read (see :func:`_encode_v2_default`)
_V2_DEFAULT_NAMES = ("position", "eventId", "pid", "version", "domain", "name", "timestamp",
                     "data")
_V2_DEFAULT_ENCODINGS = (PLAIN_VALUE, UUID_VALUE, PLAIN_VALUE, PLAIN_VALUE, PLAIN_VALUE,
                         PLAIN_VALUE, PLAIN_VALUE, JSON_VALUE)
_V2_DEFAULT_ROW = ('{"position":%d,"eventId":"%s","pid":%s,"version":%d,"domain":%s,'
                   '"name":%s,"timestamp":%s,"data":%s}')
_quoted = json.encoder.encode_basestring  # (C: json.dumps of a str, ensure_ascii off)


def _encode_v2_default(json_text: Callable[[Any], str], general: Callable[[Sequence[Any]], str],
                       values: Sequence[Any]) -> str:
    """
    A row of version 2's default columns, the commonest row of all, by one
    format: the same text as ``general`` (the spliced encoder, which takes
    any row whose values are not the usual types: a NULL, bytes, ...) for a
    third of its time.
    """
    position, event_id, pid, version, domain, name, timestamp, data = values
    if (type(position) is int and type(version) is int and type(event_id) is bytes
            and len(event_id) == 16 and type(pid) is str and type(domain) is str
            and type(name) is str and type(timestamp) is str):
        text = event_id.hex()
        return _V2_DEFAULT_ROW % (
            position, f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}",
            _quoted(pid), version, _quoted(domain), _quoted(name), _quoted(timestamp),
            json_text(data))
    return general(values)


def encode_error(code: str, message: str, **fields: Any) -> str:
    """A version 2 refusal: ``{"error": {"code", "message", ...fields}}``."""
    return encode_body({"error": dict(code=code, message=message, **fields)})


_APPENDED_EVENT = '{"eventId":%s,"pid":%s,"version":%d,"position":%d}'


def encode_appended(events: Sequence[Tuple[str, str, int, int]], duplicate: bool) -> str:
    """A version 2 append's success, from ``(event_id, pid, version, position)`` per event."""
    # (by format: a third of the encoder's time, the same text; values of
    # other types take the encoder)
    if type(duplicate) is bool and all(type(version) is int and type(position) is int
                                       for _, _, version, position in events):
        try:
            return '{"events":[%s],"duplicate":%s}' % (",".join([
                _APPENDED_EVENT % (_quoted(event_id), _quoted(pid), version, position)
                for event_id, pid, version, position in events]),
                "true" if duplicate else "false")
        except TypeError:
            pass  # (an id or pid that is not a str)
    return encode_body({
        "events": [{"eventId": event_id, "pid": pid, "version": version, "position": position}
                   for event_id, pid, version, position in events],
        "duplicate": duplicate,
    })


def encode_ok_packet(affected_rows: int, insert_id: int) -> str:
    """The persist result, shaped exactly like the Node ``mysql`` driver's OkPacket."""
    return (
        '{"fieldCount":0,"affectedRows":%d,"insertId":%d,"serverStatus":2,'
        '"warningCount":0,"message":"","protocol41":true,"changedRows":0}'
        % (affected_rows, insert_id)
    )
