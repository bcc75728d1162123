"""The failures of the client's requests, one class per thing that can go wrong."""

from typing import Optional


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
    """The server answered ``"error"``: a bad query, a refused table or
    column, or a database failure.  The server logs the reason."""


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
