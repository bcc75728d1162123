"""
The server's settings, as one immutable value.

``eventsource.tap`` builds a :class:`Config` from the command line and the
environment; everything else only reads it.  Keeping the settings in one
plain value means the service can be built in tests without twistd.
"""

from dataclasses import dataclass, field
from typing import Optional, Tuple


#: the request kinds, each served on a channel of its own (``subscribe``:
#: version 2 only, docs/PROTOCOL.md "Subscriptions")
REQUEST_CHANNELS = ("persist", "fetch", "fetch-next", "subscribe")


def glob_escape(text: str) -> str:
    """``text`` as a Redis glob that matches only itself."""
    return "".join("\\" + char if char in "*?[]\\^" else char for char in text)


@dataclass(frozen=True)
class Config:
    """Every setting of the server, with the defaults the README documents."""

    # Redis
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_user: Optional[str] = None
    redis_password: Optional[str] = field(default=None, repr=False)
    redis_tls: bool = False
    redis_tls_ca: Optional[str] = None
    redis_tls_cert: Optional[str] = None
    redis_tls_key: Optional[str] = None
    #: upper bound of the reconnect backoff, seconds
    redis_max_delay: float = 2.0
    #: seconds Redis may take to answer the server's ``PING`` (sent on the
    #: publisher connection every third of it) before both connections are
    #: given up and made again (a silent network partition, a hung Redis)
    redis_timeout: float = 3.0
    #: Redis behind Sentinel: the Sentinels' ``(host, port)``, asked for the
    #: master :attr:`redis_master_name` before every connection (then
    #: :attr:`redis_host` and :attr:`redis_port` are not used); empty: no Sentinel
    redis_sentinels: Tuple[Tuple[str, int], ...] = ()
    redis_master_name: Optional[str] = None

    # MySQL / MariaDB
    mysql_host: str = "127.0.0.1"
    mysql_port: int = 3306
    mysql_user: str = "root"
    mysql_password: str = field(default="", repr=False)
    mysql_charset: str = "utf8mb4"
    mysql_tls_ca: Optional[str] = None
    mysql_tls_cert: Optional[str] = None
    mysql_tls_key: Optional[str] = None
    mysql_tls_verify: bool = False
    pool_size: int = 10
    #: seconds a MySQL read or write may block before the connection is
    #: given up (so a silent network cannot hang the server or its shutdown)
    mysql_timeout: float = 60.0
    #: seconds MariaDB may spend on one SELECT run for a client before it
    #: stops it (``max_statement_time``); 0 turns the limit off
    max_statement_time: float = 30.0

    # the events table, ``database.table``
    table: str = "eventsource.event"

    # streaming
    row_timeout: float = 5.0
    page_size: int = 1000
    #: bytes of rows one page may hold (plus one row, so a larger row still flows)
    page_bytes: int = 1024 * 1024
    max_window: int = 1000
    #: bytes one stream may have published and not yet accepted (one row always goes)
    max_window_bytes: int = 2 * 1024 * 1024
    #: bytes published and not yet accepted on all version 1 streams together:
    #: the server listens on their reply channels, so Redis echoes those rows
    #: to its subscriber connection (see docs/OPERATIONS.md)
    max_echo_bytes: int = 2 * 1024 * 1024

    # limits
    max_body_bytes: int = 4 * 1024 * 1024
    max_streams: int = 10000
    max_documents: int = 10000
    max_query_depth: int = 32
    max_query_terms: int = 1000
    max_in_list: int = 1000

    # subscriptions (docs/PROTOCOL.md, "Subscriptions")
    #: subscriptions served at once (beside ``max_streams``: they are long-lived)
    max_subscriptions: int = 10000
    #: bytes of new events one subscription holds while it reads history or
    #: its client is behind; past it they are dropped and read again from the table
    max_subscription_bytes: int = 1024 * 1024
    #: seconds between heartbeats of an idle live subscription (and checks
    #: that its client still listens)
    heartbeat: float = 15.0
    #: seconds between reads of the table's new rows (the server's own
    #: commits are read at once; this finds other processes' appends)
    tail_interval: float = 0.1

    read_only: bool = False

    #: replica mode: several servers on the same Redis and table serve each
    #: request once (a claim per request in Redis; docs/OPERATIONS.md "Replicas")
    replicas: bool = False
    #: seconds a replica's claim on a request is kept in Redis: an identical
    #: request (same channel, same body) within it is not served again
    claim_ttl: float = 60.0
    #: replica mode: seconds of the writer lease (renewed every quarter of
    #: it): only its holder claims persists, so one replica writes at a time
    #: (docs/OPERATIONS.md "The writer lease"); 0: off, every replica writes
    writer_lease: float = 2.0

    #: seconds shutdown waits for persists in flight before closing anyway
    shutdown_timeout: float = 10.0

    #: prepended to the request channels (``persist`` becomes
    #: ``<prefix>persist``), so several deployments can share one Redis;
    #: empty (version 1 clients' channels) by default
    channel_prefix: str = ""

    #: tenant mode: tenant ``T`` publishes its requests on
    #: ``<prefix>T:persist``, ``<prefix>T:fetch``, ``<prefix>T:fetch-next``
    #: and names reply channels under ``<prefix>T:`` only, so a Redis ACL of
    #: ``&<prefix>T:*`` keeps tenants apart; the version 1 channels are not served
    tenants: bool = False

    #: a Redis glob every reply channel must match (anything when ``None``)
    reply_channels: Optional[str] = None

    #: the HTTP port of /metrics and /health (see :mod:`eventsource.http`);
    #: ``None``: no HTTP at all, 0: any free port (tests)
    http_port: Optional[int] = None
    #: the address the HTTP port listens on: loopback unless asked
    http_interface: str = "127.0.0.1"
    #: the bearer token every HTTP route but /health/* requires (none: no check)
    http_token: Optional[str] = field(default=None, repr=False)

    #: ``text`` (twistd's lines) or ``json`` (one JSON object per line, see
    #: :mod:`eventsource.logs`)
    log_format: str = "text"

    @property
    def redis_where(self) -> str:
        """How logs name the Redis the server uses."""
        if self.redis_sentinels:
            from eventsource.sentinel import format_addresses

            return (f"master {self.redis_master_name} "
                    f"(Sentinels {format_addresses(self.redis_sentinels)})")
        return f"{self.redis_host}:{self.redis_port}"

    @property
    def request_channels(self) -> dict:
        """The Redis channel of each request kind, prefix applied."""
        return {kind: self.channel_prefix + kind for kind in REQUEST_CHANNELS}

    @property
    def request_patterns(self) -> dict:
        """Tenant mode: the Redis pattern of each request kind, ``<prefix>*:<kind>``."""
        prefix = glob_escape(self.channel_prefix)
        return {kind: f"{prefix}*:{kind}" for kind in REQUEST_CHANNELS}

    @property
    def database(self) -> str:
        """The database part of :attr:`table`."""
        return self.table.split(".", 1)[0]

    @property
    def table_name(self) -> str:
        """The table part of :attr:`table`."""
        return self.table.split(".", 1)[1]
