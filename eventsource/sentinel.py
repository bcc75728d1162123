"""
Redis behind Sentinel: where the master is now, asked before every connection.

Redis Sentinel watches a master and its replicas, and when the master dies a
quorum of Sentinels promotes a replica.  A client finds the master by asking
a Sentinel ``SENTINEL get-master-addr-by-name NAME``; after connecting, it
checks that the node really is the master (``ROLE``: a Sentinel may still name
a node that was just demoted), and it asks again on every reconnection.

:class:`SentinelResolver` asks the Sentinels in turn, on a short connection
each (plain TCP, no ``AUTH``), and moves the first that answers to the front
of its list, as Redis's guidelines for Sentinel clients advise.
:class:`SentinelEndpoint` is an ``IStreamClientEndpoint`` that resolves the
master before every connection attempt, so the server's bus
(:mod:`eventsource.bus`) and the client (:mod:`eventsource.client`), which
reconnect through their endpoint, follow a failover without knowing of it; it
tells its listeners when the master's address changed, so that a connection
still open to the old master (one a Sentinel did not close, say across a
partition) is dropped and made again.

The reply is parsed with ``hiredis`` (a dependency already), and nothing here
imports the reactor.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import hiredis
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

#: seconds one Sentinel may take to connect and answer before the next is asked
SENTINEL_TIMEOUT = 2.0

#: a Sentinel's address
Address = Tuple[str, int]


class MasterNotFound(ConnectionError):
    """No Sentinel could say where the master is (none answered, or none knows it)."""


class NotMaster(ConnectionError):
    """The node a Sentinel named is not (or no longer) the master: ``ROLE`` said otherwise."""


def parse_address(text: str, default_port: int = 26379) -> Address:
    """
    ``HOST:PORT``, ``HOST`` (the default port), ``[IPV6]:PORT`` or ``[IPV6]``
    as ``(host, port)``; ``ValueError`` with the end of a sentence otherwise.
    """
    text = text.strip()
    port_text: Optional[str] = None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"must be HOST:PORT, not {text!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        raise ValueError(f"must be HOST:PORT (an IPv6 address in brackets), not {text!r}")
    else:
        host = text
    if not host:
        raise ValueError(f"must be HOST:PORT, not {text!r}")
    if port_text is None:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"must be HOST:PORT with a port from 1 to 65535, not {text!r}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"must be HOST:PORT with a port from 1 to 65535, not {text!r}")
    return host, port


def parse_addresses(text: str) -> Tuple[Address, ...]:
    """A comma-separated list of :func:`parse_address` (at least one)."""
    parts = [part for part in text.split(",") if part.strip()]
    if not parts:
        raise ValueError(f"must be HOST:PORT[,HOST:PORT...], not {text!r}")
    return tuple(parse_address(part) for part in parts)


def format_addresses(addresses: Sequence[Address]) -> str:
    """The addresses as ``HOST:PORT,...`` (IPv6 in brackets)."""
    return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses)


def encode_command(*words: str) -> bytes:
    """A Redis command in RESP, as redis-cli would send it."""
    parts = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word.encode("utf-8")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _OneReply(Protocol):
    """Send one command, fire :attr:`reply` with its parsed answer, hang up."""

    def __init__(self, command: bytes) -> None:
        self._command = command
        self._reader = hiredis.Reader()
        self.reply: defer.Deferred[Any] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._command)

    def dataReceived(self, data: bytes) -> None:
        self._reader.feed(data)
        answer = self._reader.gets()
        if answer is False or self.reply.called:
            return
        assert self.transport is not None
        self.transport.loseConnection()
        self.reply.callback(answer)

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        if not self.reply.called:
            self.reply.errback(ConnectionError("the connection closed before the answer"))


def ask(reactor: Any, address: Address, *words: str,
        timeout: float = SENTINEL_TIMEOUT) -> defer.Deferred[Any]:
    """
    One command on a connection of its own: fires with the parsed answer
    (a ``hiredis.ReplyError`` for an error reply); fails after ``timeout``
    seconds, or when the connection fails.
    """
    host, port = address
    endpoint = HostnameEndpoint(reactor, host, port, timeout=max(1, int(timeout)))
    protocol = _OneReply(encode_command(*words))
    factory = Factory.forProtocol(lambda: protocol)
    factory.noisy = False  # (one line per question otherwise)
    connected: defer.Deferred[Any] = endpoint.connect(factory)

    def connected_ok(_: object) -> defer.Deferred[Any]:
        return protocol.reply

    d = connected.addCallback(connected_ok)

    def gave_up(result: Any, _timeout: float) -> Any:
        if protocol.transport is not None:
            protocol.transport.abortConnection()  # type: ignore[attr-defined]
        raise TimeoutError(f"no answer within {timeout:g} s")

    d.addTimeout(timeout, reactor, onTimeoutCancel=gave_up)
    return d


def _describe(error: BaseException) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__


class SentinelResolver:
    """
    Where the master called ``master_name`` is, according to the first of
    ``sentinels`` that knows: each is asked in turn (at most
    ``timeout`` seconds each); the one that answered moves to the front.
    """

    def __init__(self, reactor: Any, sentinels: Sequence[Address], master_name: str,
                 timeout: float = SENTINEL_TIMEOUT) -> None:
        if not sentinels:
            raise ValueError("at least one Sentinel is needed")
        self._reactor = reactor
        self.sentinels: List[Address] = list(sentinels)
        self.master_name = master_name
        self._timeout = timeout

    def describe(self) -> str:
        """How logs name the master: ``master NAME via Sentinels HOST:PORT,...``."""
        return f"master {self.master_name} (Sentinels {format_addresses(self.sentinels)})"

    @defer.inlineCallbacks
    def master(self) -> Any:
        """Fires with the master's ``(host, port)``, or fails with :class:`MasterNotFound`."""
        problems = []
        for sentinel in list(self.sentinels):
            try:
                answer = yield ask(self._reactor, sentinel, "SENTINEL",
                                   "get-master-addr-by-name", self.master_name,
                                   timeout=self._timeout)
            except Exception as error:
                problems.append(f"{format_addresses([sentinel])}: {_describe(error)}")
                continue
            if isinstance(answer, Exception):
                problems.append(f"{format_addresses([sentinel])}: {answer}")
                continue
            if not (isinstance(answer, list) and len(answer) == 2):
                problems.append(f"{format_addresses([sentinel])} does not know the master "
                                f"{self.master_name}")
                continue
            try:
                address = (answer[0].decode("utf-8"), int(answer[1]))
            except (UnicodeDecodeError, ValueError, AttributeError):
                problems.append(f"{format_addresses([sentinel])}: unexpected answer {answer!r}")
                continue
            if sentinel in self.sentinels and self.sentinels[0] != sentinel:
                self.sentinels.remove(sentinel)
                self.sentinels.insert(0, sentinel)
            return address
        raise MasterNotFound(f"no Sentinel could name the master {self.master_name}: "
                             + "; ".join(problems))


@implementer(IStreamClientEndpoint)
class SentinelEndpoint:
    """
    An endpoint to whichever node the Sentinels name as master at each
    connection attempt.

    :param resolver: the :class:`SentinelResolver`.
    :param endpoint_to: builds the endpoint to a resolved ``(host, port)``
        (plain TCP, or TLS checked against that host).
    :param on_master_changed: called with the new address when a resolution
        differs from the one before (not at the first).
    """

    def __init__(self, resolver: SentinelResolver,
                 endpoint_to: Callable[[str, int], IStreamClientEndpoint],
                 on_master_changed: Optional[Callable[[Address], object]] = None) -> None:
        self.resolver = resolver
        self._endpoint_to = endpoint_to
        self._listeners: List[Callable[[Address], object]] = []
        if on_master_changed is not None:
            self._listeners.append(on_master_changed)
        #: the master's address at the last resolution
        self.master: Optional[Address] = None

    def add_listener(self, on_master_changed: Callable[[Address], object]) -> None:
        """Also call ``on_master_changed(address)`` when the master moves."""
        self._listeners.append(on_master_changed)

    def connect(self, protocolFactory: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = self.resolver.master()
        d.addCallback(self._resolved, protocolFactory)
        return d

    def _resolved(self, address: Address, protocol_factory: Any) -> defer.Deferred[Any]:
        previous, self.master = self.master, address
        if previous is not None and previous != address:
            log.info("Sentinel: the master {name} moved from {old} to {new}",
                     name=self.resolver.master_name, old=format_addresses([previous]),
                     new=format_addresses([address]))
            for listener in list(self._listeners):
                try:
                    listener(address)
                except Exception:
                    log.failure("unhandled error telling of a new master")
        d: defer.Deferred[Any] = self._endpoint_to(*address).connect(protocol_factory)
        return d


def check_role(reply: Any, where: str) -> None:
    """Raise :class:`NotMaster` unless ``reply`` (to ``ROLE``) says master."""
    role = reply[0] if isinstance(reply, (list, tuple)) and reply else reply
    if isinstance(role, bytes):
        role = role.decode("utf-8", "replace")
    if role != "master":
        raise NotMaster(f"Redis {where} is not the master (ROLE says {role!r}); a failover "
                        "is under way or just ended")
