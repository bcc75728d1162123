"""The failures of the client's requests, one class per thing that can go wrong."""

from typing import Any, Dict, Optional, Type


class EventSourceError(Exception):
    """
    Base of every failure of a request made through this module.

    ``channel`` is the reply channel of the request (``None`` when the failure
    is not about one request), handy when reading the server's log.
    """

    def __init__(self, message: str, channel: Optional[str] = None):
        super().__init__(message)
        self.channel = channel


class ServerError(EventSourceError):
    """
    The server refused the request, or failed serving it.

    A version 1 request gets ``"error"`` and no reason (``code`` is ``None``;
    the server logs the reason).  A version 2 request gets an error object
    ``{"code": ..., "message": ...}``: it is raised as the subclass of its
    code (:class:`WrongExpectedVersion`, :class:`BadRequest`, ...), with
    ``code``, ``message`` (the server's sentence, safe to show a user) and
    ``details`` (the whole error object).  A code this client does not know
    is raised as a plain :class:`ServerError` with that ``code``.
    """

    #: the protocol's error code of the class (``None``: version 1's ``"error"``)
    code: Optional[str] = None
    #: whether repeating the same request (with the same event ids) may succeed
    retryable = False

    def __init__(self, message: str, channel: Optional[str] = None, *,
                 code: Optional[str] = None, details: Optional[Dict[str, Any]] = None):
        super().__init__(message, channel)
        self.message = message
        if code is not None:
            self.code = code
        self.details: Dict[str, Any] = {} if details is None else details


class BadRequest(ServerError):
    """``badRequest``: a malformed body, field or query, or an unknown field."""

    code = "badRequest"


class Refused(ServerError):
    """``refused``: the query names another table, an unknown column or an
    operator the query language does not have."""

    code = "refused"


class WrongExpectedVersion(ServerError):
    """
    ``wrongExpectedVersion``: a stream was not at the version the append
    expected.  ``pid`` is the stream, ``expected`` the expectation as sent
    (an int, ``"noStream"``, ``"streamExists"``), ``actual`` the stream's last
    version (``None`` when it has no events).  Read the stream again, decide
    again, and append with the new expectation.
    """

    code = "wrongExpectedVersion"

    def __init__(self, message: str, channel: Optional[str] = None, *,
                 code: Optional[str] = None, details: Optional[Dict[str, Any]] = None):
        super().__init__(message, channel, code=code, details=details)
        self.pid: Optional[str] = self.details.get("pid")
        self.expected: Any = self.details.get("expected")
        self.actual: Optional[int] = self.details.get("actual")


class IdempotencyConflict(ServerError):
    """``idempotencyConflict``: some of the append's event ids are stored
    already, or stored for other streams or in another order: the request
    is not a repeat of an earlier one.  ``event_id`` is one of those ids."""

    code = "idempotencyConflict"

    def __init__(self, message: str, channel: Optional[str] = None, *,
                 code: Optional[str] = None, details: Optional[Dict[str, Any]] = None):
        super().__init__(message, channel, code=code, details=details)
        self.event_id: Optional[str] = self.details.get("eventId")


class TooLarge(ServerError):
    """``tooLarge``: more documents than the server takes in one request, a
    query over its limits, or a query that ran past its time limit."""

    code = "tooLarge"


class ReadOnly(ServerError):
    """``readOnly``: the server was started ``--read-only``."""

    code = "readOnly"


class Unavailable(ServerError):
    """``unavailable``: the server could not reach its database, or is
    shutting down; a persist's outcome is unknown.  Safe to repeat with the
    same event ids (:meth:`EventSourceClient.append` does, see its retries)."""

    code = "unavailable"
    retryable = True


class Busy(ServerError):
    """``busy``: a limit of the moment (too many open streams, versions taken
    by other writers again and again).  Try again later."""

    code = "busy"
    retryable = True


class InternalError(ServerError):
    """``internal``: a fault of the server (its log has the traceback)."""

    code = "internal"


#: the class each version 2 error code is raised as
ERROR_CLASSES: Dict[str, Type[ServerError]] = {
    cls.code: cls for cls in (BadRequest, Refused, WrongExpectedVersion, IdempotencyConflict,
                              TooLarge, ReadOnly, Unavailable, Busy, InternalError)
    if cls.code is not None}


def error_from_object(error: Any, channel: Optional[str] = None) -> ServerError:
    """
    The exception of a version 2 error object (the value of the reply's
    ``"error"``): the class of its code, with its message and fields.
    """
    if not isinstance(error, dict):
        return ServerError(f"the server answered with an error object the client cannot "
                           f"read: {error!r:.200}", channel)
    code = error.get("code")
    message = error.get("message")
    if not isinstance(message, str) or not message:
        message = f"the server refused the request ({code})"
    cls = ERROR_CLASSES.get(code, ServerError) if isinstance(code, str) else ServerError
    return cls(message, channel, code=code if isinstance(code, str) else None, details=error)


class StreamTimeout(EventSourceError):
    """The server answered ``"timeout"``: a row was not accepted within its
    row timeout (the consumer was too slow), and the stream is over."""


class NoServerError(EventSourceError):
    """No eventsource server listens: the request reached 0 subscribers."""


class ReplyTimeout(EventSourceError):
    """The server did not answer within the client's timeout."""


class RedisConnectionError(EventSourceError):
    """Redis cannot be reached, or the connection dropped while the request
    was open (a persist may or may not have been applied)."""


class BadReply(EventSourceError):
    """The server sent something the protocol does not allow here."""


class ServerTooOld(EventSourceError):
    """
    The server speaks only version 1 of the protocol (the original, or an
    earlier release of this one), so it cannot check an expected version,
    keep an append idempotent or serve a version 2 read.  Found out by the
    client's probe before its first version 2 request, or from a version 1
    answer to a version 2 persist (then the events *were* appended, without
    the checks: the message says so).
    """
