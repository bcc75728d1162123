"""
The ``twistd eventsource`` command line: options in, a service out.

Every setting comes from, in this order, the command line, the environment,
and the default in :class:`eventsource.config.Config`.  :data:`SETTINGS` is
the one table that ties an option to its environment variable, its coerce
function and its help; :func:`config_from` is the one place the environment
is read, from a mapping passed in, so tests need not touch ``os.environ``.

Nothing here imports the reactor: twistd imports this module to print
``--help`` before it has chosen one.
"""

import math
import os
import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional

from twisted.python import usage

from eventsource.config import Config
from eventsource.schema import APPEND_LOCK_SUFFIX

if TYPE_CHECKING:  # (the service is imported only when it is built)
    from eventsource.service import EventSourceService


# Coerce functions: text in, typed value out, ValueError with the end of a
# sentence ("must be ..., not '...'") for anything else.  Used for values from
# the command line and from the environment alike.

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_IDENTIFIER = re.compile(r"[A-Za-z0-9_$]+")


def _integer(text: str, wanted: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"must be {wanted}, not {text!r}") from None


def port(text: str) -> int:
    """A TCP port number, 1 to 65535."""
    wanted = "a port number from 1 to 65535"
    value = _integer(text, wanted)
    if not 1 <= value <= 65535:
        raise ValueError(f"must be {wanted}, not {text!r}")
    return value


def positive_int(text: str) -> int:
    """A count or a size: an integer of at least 1."""
    wanted = "a whole number of at least 1"
    value = _integer(text, wanted)
    if value < 1:
        raise ValueError(f"must be {wanted}, not {text!r}")
    return value


def _seconds(text: str, wanted: str, zero_allowed: bool) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"must be {wanted}, not {text!r}") from None
    if not (math.isfinite(value) and (value > 0 or (zero_allowed and value == 0))):
        raise ValueError(f"must be {wanted}, not {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """A duration in seconds: a finite number greater than 0."""
    return _seconds(text, "a number of seconds greater than 0", zero_allowed=False)


def seconds_or_off(text: str) -> float:
    """A duration in seconds, or 0 for no limit: a finite number of at least 0."""
    return _seconds(text, "a number of seconds (0 for no limit)", zero_allowed=True)


def lease_seconds(text: str) -> float:
    """The writer lease's seconds: 0 (off), or from 0.5 to 3600."""
    value = _seconds(text, "a number of seconds from 0.5 to 3600, or 0 (off)", zero_allowed=True)
    if value and not 0.5 <= value <= 3600:
        raise ValueError(f"must be a number of seconds from 0.5 to 3600, or 0 (off), not {text!r}")
    return value


def boolean(text: str) -> bool:
    """A yes/no value from the environment: 1/true/yes/on or 0/false/no/off."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"must be one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}, not {text!r}")


def table_name(text: str) -> str:
    """
    The events table as ``database.table``.

    Both parts end up in SQL as identifiers, so only ``[A-Za-z0-9_$]`` is
    allowed: nothing that needs (or could break out of) quoting.
    """
    parts = text.split(".")
    if len(parts) != 2 or not all(_IDENTIFIER.fullmatch(part) for part in parts):
        raise ValueError(
            f"must be database.table, each part made of letters, digits, _ or $, not {text!r}"
        )
    longest = 64 - len(APPEND_LOCK_SUFFIX)
    if len(parts[1]) > longest:
        raise ValueError(f"must name a table of at most {longest} characters (its append lock "
                         f"table adds {APPEND_LOCK_SUFFIX!r}), not {text!r}")
    return text


def glob_pattern(text: str) -> Optional[str]:
    """A Redis glob (``*``, ``?``, ``[...]``, ``\\``); the empty string means none."""
    from eventsource.wire import Glob

    if not text:
        return None
    try:
        Glob(text)
    except ValueError as e:
        raise ValueError(f"must be a Redis glob pattern, but it {e}") from None
    return text


def optional_text(text: str) -> Optional[str]:
    """A string that may be left out: the empty string means none."""
    return text or None


def port_or_any(text: str) -> int:
    """A TCP port to listen on, 1 to 65535, or 0 for any free port."""
    wanted = "a port number from 1 to 65535 (0: any free port)"
    value = _integer(text, wanted)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be {wanted}, not {text!r}")
    return value


def ip_address(text: str) -> str:
    """An IPv4 or IPv6 address to listen on (not a host name)."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(
            f"must be an IP address such as 127.0.0.1, ::1 or 0.0.0.0, not {text!r}") from None


def sentinel_addresses(text: str) -> tuple:
    """Sentinels as ``HOST:PORT[,HOST:PORT...]`` (port 26379 when left out); empty: none."""
    from eventsource.sentinel import parse_addresses

    if not text.strip():
        return ()
    return parse_addresses(text)


#: RFC 6750's b64token: what an ``Authorization: Bearer`` header can carry as it is
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

#: the shortest token taken: anything shorter can be guessed
MIN_TOKEN_LENGTH = 16


def bearer_token(text: str) -> Optional[str]:
    """
    A bearer token of at least :data:`MIN_TOKEN_LENGTH` characters of
    ``A-Z a-z 0-9 - . _ ~ + /`` (then ``=`` padding); the empty string means none.
    The value itself never appears in an error.
    """
    if not text:
        return None
    if len(text) < MIN_TOKEN_LENGTH or not _BEARER_TOKEN.fullmatch(text):
        raise ValueError(
            f"must be at least {MIN_TOKEN_LENGTH} characters of A-Z, a-z, 0-9, -, ., _, ~, +, / "
            "(such as the output of python3 -c 'import secrets; print(secrets.token_urlsafe(32))'),"
            f" not a value of {len(text)} characters")
    return text


LOG_FORMATS = ("text", "json")


def log_format(text: str) -> str:
    """``text`` or ``json``."""
    word = text.strip().lower()
    if word not in LOG_FORMATS:
        raise ValueError(f"must be {' or '.join(LOG_FORMATS)}, not {text!r}")
    return word


@dataclass(frozen=True)
class Setting:
    """One setting: its option, environment variable, coerce function and help."""

    #: the long option, without ``--``; the Config field is the same with ``_``
    option: str
    env: str
    coerce: Callable[[str], Any]
    help: str
    #: a flag takes no value on the command line; its variable is a yes/no
    flag: bool = False

    @property
    def field(self) -> str:
        """The name of the :class:`Config` field this setting fills."""
        return self.option.replace("-", "_")


def _limit(option: str, help: str) -> Setting:
    return Setting(option, "EVENTSOURCE_" + option.upper().replace("-", "_"), positive_int, help)


SETTINGS = (
    Setting("redis-host", "REDIS_HOST", str, "Redis host name or address."),
    Setting("redis-port", "REDIS_PORT", port, "Redis port."),
    Setting("redis-user", "REDIS_USER", optional_text, "Redis ACL user name."),
    Setting("redis-password", "REDIS_PASS", optional_text, "Redis password."),
    Setting("redis-tls", "REDIS_TLS", boolean, "Connect to Redis over TLS.", flag=True),
    Setting("redis-tls-ca", "REDIS_TLS_CA", optional_text, "CA certificate file for Redis TLS."),
    Setting("redis-tls-cert", "REDIS_TLS_CERT", optional_text, "Client certificate for Redis TLS."),
    Setting("redis-tls-key", "REDIS_TLS_KEY", optional_text, "Client key file for Redis TLS."),
    Setting(
        "redis-max-delay",
        "REDIS_MAX_DELAY",
        positive_seconds,
        "Longest wait, in seconds, between attempts to reconnect to Redis.",
    ),
    Setting(
        "redis-timeout",
        "REDIS_TIMEOUT",
        positive_seconds,
        "Seconds Redis may take to answer a PING (sent every third of it) before the "
        "server drops its connections and reconnects.",
    ),
    Setting(
        "redis-sentinels",
        "REDIS_SENTINELS",
        sentinel_addresses,
        "Redis behind Sentinel: the Sentinels as HOST:PORT[,HOST:PORT...], asked for the "
        "master named by --redis-master-name before every connection (--redis-host and "
        "--redis-port are then not used); none: no Sentinel.",
    ),
    Setting(
        "redis-master-name",
        "REDIS_MASTER_NAME",
        optional_text,
        "The name the Sentinels know the master by (with --redis-sentinels).",
    ),
    Setting(
        "channel-prefix",
        "EVENTSOURCE_CHANNEL_PREFIX",
        str,
        "Prepended to the request channels' names, so that several servers can share one Redis.",
    ),
    Setting(
        "tenants",
        "EVENTSOURCE_TENANTS",
        boolean,
        "Tenant mode: tenant T sends requests on <prefix>T:persist, <prefix>T:fetch and "
        "<prefix>T:fetch-next and names reply channels under <prefix>T: only; the plain "
        "request channels are not served.",
        flag=True,
    ),
    Setting(
        "reply-channels",
        "EVENTSOURCE_REPLY_CHANNELS",
        glob_pattern,
        "Redis glob pattern every reply channel must match (other requests are refused "
        "unanswered), such as <prefix>*; none: any channel.",
    ),
    Setting("mysql-host", "MYSQL_HOST", str, "MariaDB/MySQL host name or address."),
    Setting("mysql-port", "MYSQL_PORT", port, "MariaDB/MySQL port."),
    Setting("mysql-user", "MYSQL_USER", str, "MariaDB/MySQL user."),
    Setting("mysql-password", "MYSQL_PASS", str, "MariaDB/MySQL password."),
    Setting("mysql-charset", "MYSQL_CHAR", str, "Connection character set."),
    Setting("mysql-tls-ca", "MYSQL_TLS_CA", optional_text, "CA certificate file for MySQL TLS."),
    Setting("mysql-tls-cert", "MYSQL_TLS_CERT", optional_text, "Client certificate for MySQL TLS."),
    Setting("mysql-tls-key", "MYSQL_TLS_KEY", optional_text, "Client key file for MySQL TLS."),
    Setting(
        "mysql-tls-verify",
        "MYSQL_TLS_VERIFY",
        boolean,
        "Check the MySQL server's certificate and host name.",
        flag=True,
    ),
    Setting(
        "pool-size", "EVENTSOURCE_POOL_SIZE", positive_int, "Database connections (and threads)."
    ),
    Setting(
        "mysql-timeout",
        "MYSQL_TIMEOUT",
        positive_seconds,
        "Seconds a MySQL read or write may block before the connection is given up.",
    ),
    Setting(
        "max-statement-time",
        "EVENTSOURCE_MAX_STATEMENT_TIME",
        seconds_or_off,
        "Seconds MariaDB may run one query of a fetch before stopping it (0: no limit).",
    ),
    Setting("table", "EVENTSOURCE_TABLE", table_name, "The events table, as database.table."),
    Setting(
        "row-timeout",
        "EVENTSOURCE_ROW_TIMEOUT",
        positive_seconds,
        "Seconds to wait for a client to accept a row before ending its stream.",
    ),
    _limit("page-size", "Rows read from the database per query while streaming."),
    _limit("page-bytes", "Most bytes of rows read from the database per query while streaming "
           "(a single larger row is still read)."),
    _limit("max-window", "Most rows sent to a client ahead of its acknowledgements."),
    _limit("max-window-bytes", "Most bytes of rows sent to a client ahead of its "
           "acknowledgements (a single larger row still goes)."),
    _limit("max-echo-bytes", "Most bytes of rows sent and not yet accepted on all version 1 "
           "streams together (Redis sends them back to the server, which listens on their "
           "reply channels)."),
    _limit("max-body-bytes", "Largest request message, in bytes."),
    _limit("max-streams", "Most streams served at once."),
    _limit("max-documents", "Most events in one persist request."),
    _limit("max-query-depth", "Deepest nesting of a fetch query."),
    _limit("max-query-terms", "Most terms in one fetch query."),
    _limit("max-in-list", "Most values in one query list."),
    _limit("max-subscriptions", "Most subscriptions served at once (apart from --max-streams)."),
    _limit("max-subscription-bytes", "Most bytes of new events one subscription holds while it "
           "catches up or its client is behind (beyond, they are read from the table again)."),
    Setting(
        "heartbeat",
        "EVENTSOURCE_HEARTBEAT",
        positive_seconds,
        "Seconds between heartbeats of an idle live subscription; a subscription whose "
        "client stopped listening is ended at its next heartbeat.",
    ),
    Setting(
        "tail-interval",
        "EVENTSOURCE_TAIL_INTERVAL",
        positive_seconds,
        "Seconds between reads of the events appended by other processes, for "
        "subscriptions (this server's own appends are read at once).",
    ),
    Setting(
        "read-only",
        "EVENTSOURCE_READ_ONLY",
        boolean,
        "Refuse persist requests; serve fetches only.",
        flag=True,
    ),
    Setting(
        "replicas",
        "EVENTSOURCE_REPLICAS",
        boolean,
        "Replica mode: each request is served by only one of the servers on the same "
        "channels (a claim in Redis per request); every replica must run with it.",
        flag=True,
    ),
    Setting(
        "claim-ttl",
        "EVENTSOURCE_CLAIM_TTL",
        positive_seconds,
        "Replica mode: seconds a claim is kept in Redis; the same request body (reply "
        "channel included) sent again within it is not served again.",
    ),
    Setting(
        "writer-lease",
        "EVENTSOURCE_WRITER_LEASE",
        lease_seconds,
        "Replica mode: one replica at a time (the holder of a lease in Redis, kept this many "
        "seconds and renewed) serves the persists, so group commits stay whole; the others "
        "serve fetches. 0: off, every replica writes (and they take turns on the append lock).",
    ),
    Setting(
        "shutdown-timeout",
        "EVENTSOURCE_SHUTDOWN_TIMEOUT",
        positive_seconds,
        "Seconds shutdown waits for persists in flight before closing anyway.",
    ),
    Setting(
        "http-port",
        "EVENTSOURCE_HTTP_PORT",
        port_or_any,
        "Serve the page (/) and its /api, /metrics (Prometheus) and /health/live, "
        "/health/ready over HTTP on this port (0: any free port); none: no HTTP.",
    ),
    Setting(
        "http-interface",
        "EVENTSOURCE_HTTP_INTERFACE",
        ip_address,
        "The IP address the HTTP port listens on.",
    ),
    Setting(
        "http-token",
        "EVENTSOURCE_HTTP_TOKEN",
        bearer_token,
        "Bearer token every HTTP route but /health/* and the page's own files requires "
        "(Authorization: Bearer TOKEN); none: no check.",
    ),
    Setting(
        "log-format",
        "EVENTSOURCE_LOG_FORMAT",
        log_format,
        "text: twistd's log lines; json: one JSON object per line, for log shippers.",
    ),
)

_DEFAULTS = {f.name: f.default for f in fields(Config)}


def default_text(setting: Setting) -> str:
    """The default of a setting as a person reads it (in help and the README)."""
    value = _DEFAULTS[setting.field]
    if value is None or value == ():
        return "none"
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _help(setting: Setting) -> str:
    return f"{setting.help} [env {setting.env}; default: {default_text(setting)}]"


def config_from(given: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    """
    Build the :class:`Config` from parsed options and an environment.

    ``given`` maps long option names to what the command line gave: the raw
    text, ``None`` for an option not given, or 1/0 for a flag.  A variable
    set to the empty string counts as unset.  Settings given nowhere keep
    their :class:`Config` default.

    @raise usage.UsageError: naming the option, and the variable when the
        bad value came from the environment.
    """
    values: Dict[str, Any] = {}
    for setting in SETTINGS:
        given_value = given.get(setting.option)
        if setting.flag and given_value:
            values[setting.field] = True
        elif not setting.flag and given_value is not None:
            values[setting.field] = _coerce(setting, given_value, f"--{setting.option}")
        elif environ.get(setting.env):
            source = f"{setting.env} (for --{setting.option})"
            values[setting.field] = _coerce(setting, environ[setting.env], source)
    if bool(values.get("redis_sentinels")) != bool(values.get("redis_master_name")):
        raise usage.UsageError(
            "--redis-sentinels and --redis-master-name go together: give both (Redis behind "
            "Sentinel) or neither.")
    if values.get("writer_lease") and not values.get("replicas"):
        raise usage.UsageError("--writer-lease is a setting of replica mode: give --replicas "
                               "too (on every replica).")
    return Config(**values)


def _coerce(setting: Setting, text: str, source: str) -> Any:
    try:
        return setting.coerce(text)
    except ValueError as e:
        raise usage.UsageError(f"{source} {e}.") from None


def settings_table() -> str:
    """The settings as a Markdown table, for the README's configuration section."""
    lines = [
        "| option | environment | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for setting in SETTINGS:
        lines.append(
            f"| `--{setting.option}` | `{setting.env}` | {default_text(setting)} | {setting.help} |"
        )
    return "\n".join(lines)


class Options(usage.Options):
    """
    ``twistd eventsource`` options.

    After :meth:`parseOptions`, :attr:`config` holds the resulting
    :class:`Config`.
    """

    synopsis = "[options]"
    longdesc = (
        "Serve an event store over Redis pub/sub, kept in MariaDB/MySQL. "
        "Each option may also come from the environment variable named in its "
        "help; the command line wins over the environment."
    )

    optFlags = [[s.option, None, _help(s)] for s in SETTINGS if s.flag]
    optParameters = [[s.option, None, None, _help(s)] for s in SETTINGS if not s.flag]

    #: the parsed settings, set by :meth:`postOptions`
    config: Config

    def __init__(self, environ: Optional[Mapping[str, str]] = None):
        """
        @param environ: the environment to read; ``os.environ`` when ``None``.
        """
        super().__init__()
        self._environ = environ

    def __repr__(self) -> str:
        # A dict at heart: keep the passwords and the token out of any log or traceback.
        shown = {key: ("***" if ("password" in key or "token" in key) and value else value)
                 for key, value in self.items()}
        return f"<{type(self).__name__} {shown!r}>"

    def postOptions(self) -> None:
        """Combine the command line, the environment and the defaults."""
        environ = os.environ if self._environ is None else self._environ
        self.config = config_from(self, environ)
        twistd_options = getattr(self, "parent", None)
        if self.config.log_format == "json" and twistd_options is not None:
            # (twistd makes its log observer from its own options, which it
            # finishes parsing after ours: see eventsource.logs)
            from eventsource.logs import use_json_under_twistd

            use_json_under_twistd(twistd_options)


def makeService(options: Options) -> "EventSourceService":
    """Build the server's service tree from parsed :class:`Options`."""
    # Imported here so that ``twistd eventsource --help`` needs none of it.
    from eventsource.service import make_server

    return make_server(options.config)
