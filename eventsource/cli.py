"""
The ``eventsource`` command: persist and fetch events from a shell, and run
the server without knowing twistd.

    eventsource persist --pid P --domain D --name N --data '{"k": 1}'
    eventsource fetch --pid P
    eventsource append P D N '{"k": 1}' --expected-version 3
    eventsource read P --from-version 4
    eventsource subscribe --domain order --checkpoint order.position
    eventsource serve --table db.events

``persist``, ``fetch``, ``append``, ``read`` and ``subscribe`` (the last
three: version 2 of the protocol) talk to the server through Redis with
:mod:`eventsource.client`, under :func:`twisted.internet.task.react`.  Every
failure ends with one line on standard error and an exit status that says
what went wrong (see :data:`EXIT_CODES`).

:func:`run` is the whole command with its streams and ``connect`` passed in,
so tests drive it without a subprocess.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import textwrap
from typing import IO, Any, Callable, Dict, List, Mapping, NoReturn, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, react

from eventsource import client as client_module
from eventsource import tap
from eventsource.client import (
    ANY,
    DEFAULT_REPLY_PREFIX,
    DEFAULT_TIMEOUT,
    NO_STREAM,
    STREAM_EXISTS,
    TENANT_REPLY_PREFIX,
    EventSourceClient,
    EventSourceError,
    NoServerError,
    RedisConnectionError,
    ReplyTimeout,
    ServerError,
    ServerTooOld,
    StreamTimeout,
    WrongExpectedVersion,
)
from eventsource.client._events import DEFAULT_RETRY, check_expected, normal_event_id
from eventsource.client._subscription import DEFAULT_HEARTBEAT
from eventsource.wire import valid_tenant
from eventsource.sentinel import format_addresses

PROG = "eventsource"

EXIT_OK = 0
EXIT_SERVER_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_SERVER = 3
EXIT_TIMEOUT = 4
EXIT_REDIS = 5
EXIT_CONFLICT = 6
EXIT_TOO_OLD = 7
EXIT_CHECKPOINT = 8
EXIT_INTERRUPTED = 130

#: exit status and meaning, for --help and the docs
EXIT_CODES = (
    (EXIT_OK, "success"),
    (EXIT_SERVER_ERROR, "the server refused or failed the request: \"error\", or a version 2 "
                        "error code (printed) other than those below"),
    (EXIT_USAGE, "bad command line or bad JSON argument/input"),
    (EXIT_NO_SERVER, "no eventsource server is listening on that Redis"),
    (EXIT_TIMEOUT, "no answer within --timeout, or the server's row timeout"),
    (EXIT_REDIS, "Redis cannot be reached, refused us (password, ACL), or the connection "
                 "dropped"),
    (EXIT_CONFLICT, "append: the stream is not at the expected version "
                    "(wrongExpectedVersion); nothing was appended"),
    (EXIT_TOO_OLD, "append, read, subscribe: the server speaks only version 1 of the "
                   "protocol"),
    (EXIT_CHECKPOINT, "subscribe: the --checkpoint file cannot be read (or holds no "
                      "position) or written"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C or SIGTERM); an open fetch, read or subscribe is "
                       "told \"end\" (subscribe writes its checkpoint first)"),
)

#: default --window of fetch: version 1 (window 1) is one round trip per row
DEFAULT_WINDOW = 100
#: a read shows its progress line once it has run this long (seconds)
PROGRESS_DELAY = 1.0
PROGRESS_INTERVAL = 0.5
#: widest cell of --format table before it is cut
TABLE_CELL_WIDTH = 60


class UsageError(Exception):
    """A bad argument or input found after parsing: exit 2 with its message."""


def _error_code(error: BaseException) -> int:
    if isinstance(error, WrongExpectedVersion):
        return EXIT_CONFLICT
    if isinstance(error, ServerTooOld):
        return EXIT_TOO_OLD
    if isinstance(error, NoServerError):
        return EXIT_NO_SERVER
    if isinstance(error, (ReplyTimeout, StreamTimeout)):
        return EXIT_TIMEOUT
    if isinstance(error, RedisConnectionError):
        return EXIT_REDIS
    return EXIT_SERVER_ERROR


# -- argument parsing ------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on standard error, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {_cut(text, 40)}") from None


def _json_object(text: str) -> Dict[str, Any]:
    value = _json_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, not {_cut(text, 40)}")
    return value


def _argument_type(coerce: Callable[[str], Any]) -> Callable[[str], Any]:
    """
    One of :mod:`eventsource.tap`'s coerce functions as an argparse type:
    argparse shows an ``ArgumentTypeError`` as it is but turns a
    ``ValueError`` into "invalid value", so the sentence is passed on.
    """
    def convert(text: str) -> Any:
        try:
            return coerce(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = coerce.__name__
    return convert


_positive_int = _argument_type(tap.positive_int)


_DIGITS = re.compile(r"\s*[0-9]+\s*")


def _non_negative_int(text: str) -> int:
    if not _DIGITS.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, not {text!r}")
    return int(text)


def _expected_version(text: str) -> Any:
    if _DIGITS.fullmatch(text):
        return int(text)
    try:
        return check_expected(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a version (an integer >= 0), {NO_STREAM}, {STREAM_EXISTS} or {ANY}, "
            f"not {text!r}") from None


def _event_id(text: str) -> str:
    try:
        return normal_event_id(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
_seconds = _argument_type(tap.positive_seconds)
_port = _argument_type(tap.port)
_sentinels = _argument_type(tap.sentinel_addresses)


def _start(text: str) -> Any:
    if text in ("start", "end"):
        return text
    if _DIGITS.fullmatch(text):
        return int(text)
    raise argparse.ArgumentTypeError(f"must be start, end or a position (an integer >= 0), "
                                     f"not {text!r}")


def _tenant(text: str) -> str:
    if not valid_tenant(text):
        raise argparse.ArgumentTypeError(
            f"must be 1 to 64 letters, digits, '_', '.' or '-', not {text!r}")
    return text


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _para(text: str) -> str:
    return textwrap.fill(text, 79)


def build_parser(environ: Optional[Mapping[str, str]] = None) -> argparse.ArgumentParser:
    """
    The parser of every command.  Connection defaults come from ``environ``
    (``os.environ`` when ``None``): the variables the server reads too.
    """
    environ = os.environ if environ is None else environ
    exit_codes = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES)
    parser = _Parser(
        prog=PROG,
        description="Persist and fetch events of an eventsource server through Redis "
                    "(persist, fetch), append to and read streams and follow the log with "
                    "version 2 of the protocol (append, read, subscribe), or run the server "
                    "(serve).",
        epilog=f"Exit status:\n{exit_codes}\n\nRun '{PROG} COMMAND --help' for the flags "
               "of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    connection = _Parser(add_help=False)
    group = connection.add_argument_group(
        "connection", "Where the server listens: the Redis it uses.")
    group.add_argument(
        "--redis-host", default=environ.get("REDIS_HOST") or "127.0.0.1", metavar="HOST",
        help="Redis host name or address [env REDIS_HOST; default: 127.0.0.1].")
    group.add_argument(
        "--redis-port", type=_port, default=environ.get("REDIS_PORT") or "6379",
        metavar="PORT", help="Redis port [env REDIS_PORT; default: 6379].")
    group.add_argument(
        "--redis-user", default=environ.get("REDIS_USER") or None, metavar="USER",
        help="Redis ACL user name [env REDIS_USER; default: none].")
    group.add_argument(
        "--redis-password", default=environ.get("REDIS_PASS") or None, metavar="PASSWORD",
        help="Redis password [env REDIS_PASS; default: none].")
    group.add_argument(
        "--redis-endpoint", default=None, metavar="ENDPOINT",
        help="A Twisted client endpoint string used instead of host and port, e.g. "
             "'unix:path=/run/redis.sock' or 'tls:redis.example:6380'.")
    group.add_argument(
        "--redis-sentinels", type=_sentinels, default=environ.get("REDIS_SENTINELS") or None,
        metavar="HOST:PORT,...",
        help="Redis behind Sentinel: the Sentinels, asked where the master named by "
             "--redis-master-name is (instead of --redis-host and --redis-port) "
             "[env REDIS_SENTINELS; default: none].")
    group.add_argument(
        "--redis-master-name", default=environ.get("REDIS_MASTER_NAME") or None,
        metavar="NAME",
        help="The name the Sentinels know the master by [env REDIS_MASTER_NAME; "
             "default: none].")
    group.add_argument(
        "--channel-prefix", default=environ.get("EVENTSOURCE_CHANNEL_PREFIX") or "",
        metavar="PREFIX",
        help="The server's --channel-prefix: prepended to the request channels persist, "
             "fetch, fetch-next and subscribe [env EVENTSOURCE_CHANNEL_PREFIX; default: "
             "empty].")
    group.add_argument(
        "--tenant", type=_tenant, default=environ.get("EVENTSOURCE_TENANT") or None,
        metavar="TENANT",
        help="This client's tenant, for a server run with --tenants: requests go to "
             "<prefix>TENANT:persist (and :fetch, :fetch-next), replies come on "
             "<prefix>TENANT:<reply prefix><id> [env EVENTSOURCE_TENANT; default: none].")
    group.add_argument(
        "--reply-prefix", default=environ.get("EVENTSOURCE_REPLY_PREFIX") or None,
        metavar="PREFIX",
        help="Start of the reply channel names, for Redis ACLs that allow clients only "
             "some channels (after <prefix>TENANT: with --tenant) [env "
             f"EVENTSOURCE_REPLY_PREFIX; default: {DEFAULT_REPLY_PREFIX}, or "
             f"{TENANT_REPLY_PREFIX} with --tenant].")
    group.add_argument(
        "--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
        help="Seconds to wait for Redis, and for each answer of the server "
             f"[default: {DEFAULT_TIMEOUT:g}].")

    persist = commands.add_parser(
        "persist", parents=[connection], help="append events",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_para("Append one event given by flags, or many given as JSON lines "
                    "(one object per line) on standard input, appended together in one "
                    "request (all or nothing).  Prints the server's result as one JSON "
                    "line: affectedRows, insertId, ..."),
        epilog="examples:\n"
               f"  {PROG} persist --pid order-1 --domain order --name created "
               "--data '{\"total\": 12}'\n"
               f"  printf '%s\\n' '{{\"pid\": \"p\", \"domain\": \"d\", \"name\": \"a\"}}' "
               f"| {PROG} persist")
    persist.add_argument("--pid", help="Process (aggregate) id of the event.")
    persist.add_argument("--domain", help="Domain of the event.")
    persist.add_argument("--name", help="Name of the event.")
    persist.add_argument("--data", type=_json_value, metavar="JSON",
                         help="Payload of the event: any JSON value [default: null].")
    persist.add_argument("--table", metavar="DB.TABLE",
                         help="Events table [default: the server's].")

    fetch = commands.add_parser(
        "fetch", parents=[connection], help="read events",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_para("Read events, in the order they were appended unless the query says "
                    "otherwise.  Filter with --pid/--domain/--name (combined), or give a "
                    "$where object, or a whole {\"$select\": ...} query.  Prints one JSON "
                    "object per row, with data decoded, or a table."),
        epilog="examples:\n"
               f"  {PROG} fetch --pid order-1\n"
               f"  {PROG} fetch --where '{{\"domain\": \"order\", \"name\": "
               "{\"$in\": [\"created\", \"paid\"]}}'\n"
               f"  {PROG} fetch --query '{{\"$select\": {{\"$columns\": [\"pid\"], "
               "\"$distinct\": true}}' --format table")
    what = fetch.add_argument_group("what to read")
    what.add_argument("--pid", help="Only events of this process (aggregate) id.")
    what.add_argument("--domain", help="Only events of this domain.")
    what.add_argument("--name", help="Only events of this name.")
    what.add_argument("--where", type=_json_object, metavar="JSON",
                      help="A $where object of the query language, e.g. "
                           "'{\"pid\": {\"$startsWith\": \"order-\"}}'.")
    what.add_argument("--query", type=_json_object, metavar="JSON",
                      help="A whole query: '{\"$select\": {...}}' ($columns, $where, $orderBy, "
                           "$limit, ...).")
    what.add_argument("--table", metavar="DB.TABLE",
                      help="Events table to read [default: the server's].")
    what.add_argument("--limit", type=_positive_int, metavar="N",
                      help="At most N rows.")
    out = fetch.add_argument_group("output")
    out.add_argument("--format", choices=("json", "table"), default="json",
                     help="json: one JSON object per line (default); table: aligned "
                          "columns, for people (reads every row first).")
    out.add_argument("--raw", action="store_true",
                     help="Print rows exactly as the server sends them (data as JSON text).")
    out.add_argument("--window", type=_positive_int, default=DEFAULT_WINDOW, metavar="N",
                     help="Rows the server may send ahead of acceptances; 1 is the original "
                          f"protocol, one round trip per row [default: {DEFAULT_WINDOW}; "
                          "the server caps it].")
    out.add_argument("--no-progress", dest="progress", action="store_false",
                     help="No progress line on standard error (shown only when it is a "
                          "terminal and the read takes over a second).")

    append = commands.add_parser(
        "append", parents=[connection], help="append events to a stream (version 2)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_para("Append events to the stream PID, atomically and exactly once, "
                          "with version 2 of the protocol: one event given as DOMAIN NAME "
                          "[DATA], or many as JSON lines on standard input (one object per "
                          "line: domain, name, optional data and eventId), appended together "
                          "in one request (all or nothing).  Every event gets an id before "
                          "it is sent; an attempt whose outcome is unknown (no answer, "
                          "\"unavailable\", Redis lost) is sent again with the same ids, so "
                          "the events are stored once.  Prints the result as one JSON line: "
                          "each event's eventId, pid, version and position, and duplicate "
                          "(true: these events were stored before, by an earlier attempt, "
                          "and nothing was written now).")
        + "\n\n" + _para(f"With --expected-version, the append happens only if the stream is "
                          f"in that state; otherwise nothing is appended and the exit status "
                          f"is {EXIT_CONFLICT}, with the stream's actual version in the "
                          "message.  Needs a server that speaks version 2 (exit status "
                          f"{EXIT_TOO_OLD} otherwise)."),
        epilog="examples:\n"
               f"  {PROG} append order-1 order created '{{\"total\": 12}}' "
               f"--expected-version {NO_STREAM}\n"
               f"  {PROG} append order-1 order paid '{{\"amount\": 12}}' --expected-version 0\n"
               f"  printf '%s\\n' '{{\"domain\": \"order\", \"name\": \"shipped\"}}' "
               f"| {PROG} append order-1")
    append.add_argument("pid", metavar="PID", help="The stream: the events' process "
                                                    "(aggregate) id.")
    append.add_argument("domain", metavar="DOMAIN", nargs="?",
                        help="Domain of the one event (without DOMAIN and NAME: JSON lines "
                             "on standard input).")
    append.add_argument("name", metavar="NAME", nargs="?", help="Name of the one event.")
    append.add_argument("data", metavar="DATA", nargs="?", type=_json_value,
                        help="Payload of the one event: any JSON value [default: null].")
    append.add_argument("--expected-version", type=_expected_version, default=ANY,
                        metavar="N|noStream|streamExists|any",
                        help="The stream's state before the append: N, its last version (it "
                             f"has N + 1 events); {NO_STREAM}: it has no events; "
                             f"{STREAM_EXISTS}: it has some; {ANY}: no check [default: {ANY}].")
    append.add_argument("--event-id", type=_event_id, metavar="UUID",
                        help="The one event's id [default: a new UUIDv7].  Appending again "
                             "with the same id is answered with the first append's result "
                             "and duplicate: true.")
    append.add_argument("--table", metavar="DB.TABLE",
                        help="Events table [default: the server's].")
    append.add_argument("--retries", type=_non_negative_int, default=DEFAULT_RETRY.retries, metavar="N",
                        help="Attempts after the first whose outcome is unknown, at most "
                             f"[default: {DEFAULT_RETRY.retries}; 0: none].")

    read = commands.add_parser(
        "read", parents=[connection], help="read one stream from a version (version 2)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_para("Read the events of the stream PID in version order, from "
                          "--from-version on, with version 2 of the protocol.  Prints one JSON "
                          "object per event: position, eventId, pid, version, domain, name, "
                          "timestamp and data.  Needs a server that speaks version 2 (exit "
                          f"status {EXIT_TOO_OLD} otherwise)."),
        epilog="examples:\n"
               f"  {PROG} read order-1\n"
               f"  {PROG} read order-1 --from-version 4")
    read.add_argument("pid", metavar="PID", help="The stream: a process (aggregate) id.")
    read.add_argument("--from-version", type=_non_negative_int, default=0, metavar="N",
                      help="The first version to read [default: 0, the first event].")
    read.add_argument("--table", metavar="DB.TABLE",
                      help="Events table to read [default: the server's].")
    read.add_argument("--window", type=_positive_int, default=DEFAULT_WINDOW, metavar="N",
                      help="Events the server may send ahead of acceptances "
                           f"[default: {DEFAULT_WINDOW}; the server caps it].")
    read.add_argument("--no-progress", dest="progress", action="store_false",
                      help="No progress line on standard error (shown only when it is a "
                           "terminal and the read takes over a second).")

    subscribe = commands.add_parser(
        "subscribe", parents=[connection],
        help="follow the log: history, then new events as they commit (version 2)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_para("Print the events matching a filter (--pid/--domain/--name, "
                          "combined, or a --where object) after a position, in position "
                          "order, then every new one as it is committed, like 'tail -f': "
                          "one JSON object per event (position, eventId, pid, version, "
                          "domain, name, timestamp, data).  It runs until it is stopped "
                          "(Ctrl-C, SIGTERM, the reader of its output leaving), subscribing "
                          "again by itself after a server restart or a Redis outage, and "
                          "prints each event once.  With --checkpoint FILE it keeps the "
                          "position of the last event printed in FILE and resumes after "
                          "it: a pipeline can be stopped and started again without losing "
                          "or repeating an event.  Needs a server that speaks version 2 "
                          f"(exit status {EXIT_TOO_OLD} otherwise)."),
        epilog="examples:\n"
               f"  {PROG} subscribe --domain order\n"
               f"  {PROG} subscribe --where '{{\"name\": {{\"$in\": [\"paid\", "
               "\"shipped\"]}}}' --from end\n"
               f"  {PROG} subscribe --pid order-1 --checkpoint order-1.position | ./project\n"
               f"  {PROG} subscribe --domain order --until-caught-up > orders.jsonl")
    what = subscribe.add_argument_group("what to follow")
    what.add_argument("--pid", help="Only events of this process (aggregate) id.")
    what.add_argument("--domain", help="Only events of this domain.")
    what.add_argument("--name", help="Only events of this name.")
    what.add_argument("--where", type=_json_object, metavar="JSON",
                      help="A $where object of the query language, with version 2's column "
                           "names (position, eventId, pid, version, domain, name, timestamp, "
                           "data), e.g. '{\"pid\": {\"$startsWith\": \"order-\"}}'.")
    what.add_argument("--table", metavar="DB.TABLE",
                      help="Events table [default: the server's].")
    where = subscribe.add_argument_group("where to start and stop")
    where.add_argument("--from", dest="start", type=_start, default="start",
                       metavar="start|end|POSITION",
                       help="start: every matching event; end: only events committed from "
                            "now on; POSITION: the events after that position [default: "
                            "start].  A --checkpoint file that holds a position overrides it.")
    where.add_argument("--checkpoint", metavar="FILE",
                       help="Keep the position of the last event printed in FILE (its "
                            "decimal digits; replaced atomically, synced to disk, after each "
                            "batch of events printed and flushed, and when stopped), and "
                            "start after the position FILE holds when it exists and is not "
                            "empty, instead of --from.")
    where.add_argument("--until-caught-up", action="store_true",
                       help="Stop once every matching event committed when the subscription "
                            "started is printed, instead of following (exit status 0).")
    tuning = subscribe.add_argument_group("tuning")
    tuning.add_argument("--window", type=_positive_int, default=DEFAULT_WINDOW, metavar="N",
                        help="Events the server may send ahead of acceptances "
                             f"[default: {DEFAULT_WINDOW}; the server caps it].")
    tuning.add_argument("--heartbeat", type=_seconds, default=DEFAULT_HEARTBEAT,
                        metavar="SECONDS",
                        help="The server's --heartbeat: after twice this long without a "
                             "word from the server, subscribe again "
                             f"[default: {DEFAULT_HEARTBEAT:g}].")

    commands.add_parser(
        "serve", add_help=False, help="run the server: twistd -n eventsource ...",
        description=_para("Run the eventsource server in the foreground: the same as "
                    "'twistd -n --pidfile= eventsource [OPTIONS]'.  '--help' lists the "
                    "server's options."))
    return parser


# -- commands ---------------------------------------------------------------------


def _documents(args: argparse.Namespace, stdin: Optional[IO[str]]) -> Any:
    flags = [args.pid, args.domain, args.name]
    if any(flag is not None for flag in flags) or args.data is not None:
        if not all(flags):
            raise UsageError("persist needs --pid, --domain and --name (or JSON lines on "
                             "standard input, without those flags)")
        return {"pid": args.pid, "domain": args.domain, "name": args.name, "data": args.data}
    return _json_lines(stdin, "give --pid, --domain and --name, or pipe events as JSON lines "
                              "into standard input")


def _json_lines(stdin: Optional[IO[str]], no_input: str) -> List[Dict[str, Any]]:
    """The JSON objects of ``stdin``, one a line; ``no_input``: the usage error of a terminal."""
    if stdin is None or (hasattr(stdin, "isatty") and stdin.isatty()):
        raise UsageError(no_input)
    objects = []
    for number, line in enumerate(stdin, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as e:
            raise UsageError(f"line {number} of standard input is not valid JSON ({e})") \
                from None
        if not isinstance(value, dict):
            raise UsageError(f"line {number} of standard input is not a JSON object")
        objects.append(value)
    if not objects:
        raise UsageError("no events on standard input (one JSON object per line)")
    return objects


def _events(args: argparse.Namespace, stdin: Optional[IO[str]]) -> List[Dict[str, Any]]:
    """The events ``append`` appends: from its arguments, or JSON lines on ``stdin``."""
    if args.domain is not None:
        if args.name is None:
            raise UsageError("append needs DOMAIN and NAME (or JSON lines on standard input, "
                             "without them)")
        event = {"domain": args.domain, "name": args.name, "data": args.data}
        if args.event_id is not None:
            event["eventId"] = args.event_id
        return [event]
    if args.event_id is not None:
        raise UsageError("--event-id is for one event given as DOMAIN NAME [DATA]; give each "
                         "event of standard input its own eventId")
    return _json_lines(stdin, "give DOMAIN and NAME, or pipe events as JSON lines into "
                              "standard input")


def fetch_query(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``{"$select": ...}`` query the fetch flags describe."""
    simple = {key: value for key, value in
              (("pid", args.pid), ("domain", args.domain), ("name", args.name))
              if value is not None}
    given = [name for name, value in (("--where", args.where), ("--query", args.query))
             if value is not None]
    if simple:
        given.insert(0, "/".join(f"--{k}" for k in simple))
    if len(given) > 1:
        raise UsageError(f"give only one of {' and '.join(given)}")
    if args.query is not None:
        query = args.query
        if "$select" not in query:
            query = {"$select": query}
        if set(query) != {"$select"} or not isinstance(query["$select"], dict):
            raise UsageError("--query must be {\"$select\": {...}}")
        select = dict(query["$select"])
    else:
        select = {}
        where = args.where if args.where is not None else simple
        if where:
            select["$where"] = where
    if args.table is not None:
        select["$from"] = args.table
    if args.limit is not None:
        select["$limit"] = args.limit
    return {"$select": select}


def subscribe_where(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """The ``$where`` the subscribe flags describe (``None``: every event)."""
    simple = {key: value for key, value in
              (("pid", args.pid), ("domain", args.domain), ("name", args.name))
              if value is not None}
    if simple and args.where is not None:
        raise UsageError(f"give only one of {'/'.join(f'--{k}' for k in simple)} and --where")
    where = args.where if args.where is not None else simple
    return where or None


class CheckpointError(Exception):
    """The --checkpoint file cannot be read, holds no position, or cannot be written."""


class Checkpoint:
    """
    The ``--checkpoint`` file of ``subscribe``: the position of the last
    event printed, as decimal digits and a newline.  Each write goes to a
    temporary file beside it, synced to disk, then replaces the file
    (``os.replace``), so the file always holds a whole position, the old or
    the new one, whenever the process or the machine stops.
    """

    def __init__(self, path: str):
        self.path = path
        self.position: Optional[int] = None

    def read(self) -> Optional[int]:
        """The position the file holds; ``None`` when it does not exist or is empty."""
        try:
            with open(self.path, encoding="ascii") as f:
                text = f.read(100)
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read the checkpoint {self.path}: "
                                  f"{getattr(e, 'strerror', None) or e}") from None
        if not text.strip():
            return None
        if not _DIGITS.fullmatch(text):
            raise CheckpointError(f"the checkpoint {self.path} holds no position (decimal "
                                  f"digits), but {_cut(text.strip(), 30)!r}")
        self.position = int(text)
        return self.position

    def write(self, position: int) -> None:
        """Keep ``position``, atomically and durably (a no-op when it is kept already)."""
        if position == self.position:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        temporary = os.path.join(folder, f".{os.path.basename(self.path)}.{os.getpid()}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, f"{position}\n".encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise CheckpointError(f"cannot write the checkpoint {self.path}: "
                                  f"{e.strerror or e}") from None
        self.position = position


class Progress:
    """
    ``12345 rows, 6789 rows/s`` on one rewritten line of standard error,
    for reads that take longer than :data:`PROGRESS_DELAY`.
    """

    def __init__(self, clock: IReactorTime, stream: IO[str], delay: float = PROGRESS_DELAY,
                 interval: float = PROGRESS_INTERVAL):
        self._clock = clock
        self._stream = stream
        self._delay = delay
        self._started = clock.seconds()
        self._shown = False
        self.rows = 0
        self._loop = LoopingCall(self._show)
        self._loop.clock = clock
        self._loop.start(interval, now=False)

    def _line(self) -> str:
        elapsed = max(self._clock.seconds() - self._started, 1e-9)
        return f"{self.rows} rows, {self.rows / elapsed:.0f} rows/s, {elapsed:.1f} s"

    def _show(self) -> None:
        if self._clock.seconds() - self._started < self._delay:
            return
        self._shown = True
        self._stream.write("\r" + self._line() + "\x1b[K")
        self._stream.flush()

    def stop(self) -> None:
        """Stop; a read long enough to have shown progress leaves its total."""
        if self._loop.running:
            self._loop.stop()
        if self._shown:
            self._stream.write("\r" + self._line() + "\x1b[K\n")
            self._stream.flush()


def _cell(value: Any) -> str:
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    text = text.replace("\n", " ")
    return _cut(text, TABLE_CELL_WIDTH)


def format_table(rows: List[Dict[str, Any]]) -> str:
    """Rows as aligned text columns, the columns in the order they first appear."""
    columns: List[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    cells = [[_cell(row.get(column, "")) if column in row else "" for column in columns]
             for row in rows]
    widths = [max([len(column)] + [len(line[i]) for line in cells])
              for i, column in enumerate(columns)]

    def line(values: List[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    lines = [line(columns), line(["-" * w for w in widths])]
    lines += [line(values) for values in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


async def _persist(client: EventSourceClient, args: argparse.Namespace, stdout: IO[str],
                   documents: Any) -> int:
    result = await client.persist(documents, table=args.table)
    stdout.write(json.dumps(result.raw, separators=(",", ":")) + "\n")
    stdout.flush()
    return EXIT_OK


async def _append(client: EventSourceClient, args: argparse.Namespace, stdout: IO[str],
                  events: List[Dict[str, Any]]) -> int:
    retry = dataclasses.replace(DEFAULT_RETRY, retries=args.retries)
    try:
        result = await client.append(args.pid, events, args.expected_version, table=args.table,
                                     retry=retry)
    except ValueError as e:  # an event of standard input that is not one
        raise UsageError(str(e)) from None
    stdout.write(json.dumps(result.raw, ensure_ascii=False, separators=(",", ":")) + "\n")
    stdout.flush()
    return EXIT_OK


async def _read(client: EventSourceClient, args: argparse.Namespace, stdout: IO[str],
                stderr: IO[str], clock: IReactorTime, holder: List[Any]) -> int:
    stream = client.read_stream(args.pid, args.from_version, window=args.window,
                                table=args.table)
    holder.append(stream)
    progress = None
    if args.progress and hasattr(stderr, "isatty") and stderr.isatty():
        progress = Progress(clock, stderr)
    try:
        async with stream:
            async for event in stream:
                if progress is not None:
                    progress.rows += 1
                stdout.write(json.dumps(event.raw, ensure_ascii=False) + "\n")
        stdout.flush()
    finally:
        if progress is not None:
            progress.stop()
    return EXIT_OK


async def _fetch(client: EventSourceClient, args: argparse.Namespace, stdout: IO[str],
                 stderr: IO[str], clock: IReactorTime, query: Dict[str, Any],
                 holder: List[Any]) -> int:
    stream = client.fetch(query, window=args.window, raw=args.raw)
    holder.append(stream)
    progress = None
    if args.progress and hasattr(stderr, "isatty") and stderr.isatty():
        progress = Progress(clock, stderr)
    rows = []
    try:
        async with stream:
            async for row in stream:
                if progress is not None:
                    progress.rows += 1
                if args.format == "table":
                    rows.append(row)
                else:
                    stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        if args.format == "table":
            if progress is not None:
                progress.stop()
                progress = None
            stdout.write(format_table(rows) + "\n")
        stdout.flush()
    finally:
        if progress is not None:
            progress.stop()
    return EXIT_OK


class _Follower:
    """
    What ``subscribe`` printed, and its checkpoint: events are written to
    standard output as they come; once per turn of the reactor in which
    some were written (so, after each batch Redis delivered together),
    standard output is flushed and then the position of the last of them
    goes to the checkpoint: it never holds a position whose event was not
    printed and flushed.  A flush or a checkpoint that fails ends the
    subscription, and :meth:`check` raises that error.
    """

    def __init__(self, clock: IReactorTime, stdout: IO[str],
                 checkpoint: Optional[Checkpoint]):
        self._clock = clock
        self._stdout = stdout
        self._checkpoint = checkpoint
        #: the position of the last event (or marker) written to standard output
        self.written: Optional[int] = None
        self._call: Any = None
        #: the error of a commit made on a later turn
        self.error: Optional[BaseException] = None
        #: what to close when a commit fails
        self.subscription: Any = None

    def wrote(self, position: Optional[int]) -> None:
        """Everything up to ``position`` is written; commit it on the next turn."""
        self.written = position
        if self._call is None and self.error is None:
            self._call = self._clock.callLater(0, self._commit_later)

    def _commit_later(self) -> None:
        self._call = None
        try:
            self.commit()
        except (CheckpointError, OSError) as e:  # (OSError: a broken pipe too)
            self.error = e
            if self.subscription is not None:
                self.subscription.aclose()

    def commit(self) -> None:
        """Flush standard output, then keep the position of what it holds."""
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        if self.error is not None:
            return
        self._stdout.flush()
        if self._checkpoint is not None and self.written is not None:
            self._checkpoint.write(self.written)

    def check(self) -> None:
        """Raise the error of a failed commit, if one failed."""
        if self.error is not None:
            raise self.error


async def _subscribe(client: EventSourceClient, args: argparse.Namespace, stdout: IO[str],
                     clock: IReactorTime, where: Optional[Dict[str, Any]],
                     checkpoint: Optional[Checkpoint], holder: List[Any]) -> int:
    start = args.start
    if checkpoint is not None and checkpoint.position is not None:
        start = checkpoint.position
    follower = _Follower(clock, stdout, checkpoint)
    subscription = client.subscribe(
        where, start, window=args.window, table=args.table, heartbeat=args.heartbeat,
        until_caught_up=args.until_caught_up, on_caught_up=follower.wrote)
    follower.subscription = subscription
    holder.append(subscription)
    try:
        async with subscription:
            async for event in subscription:
                stdout.write(json.dumps(event.raw, ensure_ascii=False) + "\n")
                follower.wrote(event.position)
        follower.check()
    finally:
        # what was written so far, when stopped (also by Ctrl-C or SIGTERM)
        follower.commit()
    return EXIT_OK


async def execute(reactor: Any, args: argparse.Namespace, stdout: IO[str], stderr: IO[str],
                  stdin: Optional[IO[str]] = None,
                  connect: Optional[Callable[..., Any]] = None,
                  holder: Optional[List[Any]] = None) -> int:
    """
    Run a parsed ``persist``, ``fetch``, ``append``, ``read`` or ``subscribe``;
    returns the exit status.

    ``connect`` replaces :func:`eventsource.client.connect` (in tests);
    ``holder`` collects the open fetch stream, so an interrupt can end it.
    """
    connect = connect or client_module.connect
    holder = [] if holder is None else holder
    prog = f"{PROG} {args.command}"
    try:
        if args.command == "persist":
            documents = _documents(args, stdin)
        elif args.command == "append":
            events = _events(args, stdin)
        elif args.command == "fetch":
            query = fetch_query(args)
        elif args.command == "subscribe":
            event_filter = subscribe_where(args)
            checkpoint = None
            if args.checkpoint is not None:
                checkpoint = Checkpoint(args.checkpoint)
                checkpoint.read()
    except UsageError as e:
        stderr.write(f"{prog}: error: {e}\n")
        return EXIT_USAGE
    except CheckpointError as e:
        stderr.write(f"{prog}: error: {e}\n")
        return EXIT_CHECKPOINT
    if bool(args.redis_sentinels) != bool(args.redis_master_name):
        stderr.write(f"{prog}: error: --redis-sentinels and --redis-master-name go together: "
                     "give both (Redis behind Sentinel) or neither\n")
        return EXIT_USAGE
    sentinel = {}
    if args.redis_sentinels:
        sentinel = dict(sentinels=list(args.redis_sentinels), master_name=args.redis_master_name)
    try:
        client = await connect(
            host=args.redis_host, port=args.redis_port, password=args.redis_password,
            username=args.redis_user, endpoint=args.redis_endpoint, reactor=reactor,
            timeout=args.timeout, connect_timeout=args.timeout,
            reply_prefix=args.reply_prefix, channel_prefix=args.channel_prefix,
            tenant=args.tenant, **sentinel)
    except EventSourceError as e:
        where = args.redis_endpoint or f"{args.redis_host}:{args.redis_port}"
        if args.redis_sentinels:
            where = (f"master {args.redis_master_name} via Sentinels "
                     f"{format_addresses(args.redis_sentinels)}")
        stderr.write(f"{prog}: error: {e} ({where})\n")
        return _error_code(e)
    try:
        if args.command == "persist":
            return await _persist(client, args, stdout, documents)
        if args.command == "append":
            return await _append(client, args, stdout, events)
        if args.command == "read":
            return await _read(client, args, stdout, stderr, reactor, holder)
        if args.command == "subscribe":
            return await _subscribe(client, args, stdout, reactor, event_filter,
                                    checkpoint, holder)
        return await _fetch(client, args, stdout, stderr, reactor, query, holder)
    except UsageError as e:
        stderr.write(f"{prog}: error: {e}\n")
        return EXIT_USAGE
    except CheckpointError as e:
        stderr.write(f"{prog}: error: {e}\n")
        return EXIT_CHECKPOINT
    except ServerError as e:
        if e.code is not None:
            stderr.write(f"{prog}: error: {e.code}: {e.message}\n")
        else:
            stderr.write(f"{prog}: error: the server refused the request (answered "
                         f"\"error\"); its log says why, under reply channel {e.channel}\n")
        return _error_code(e)
    except EventSourceError as e:
        stderr.write(f"{prog}: error: {e}\n")
        return _error_code(e)
    except BrokenPipeError:
        # `eventsource fetch ... | head`: the reader left; the stream was ended
        _silence_stdout(stdout)
        return EXIT_OK
    finally:
        await client.disconnect()


def _silence_stdout(stdout: IO[str]) -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


async def run(reactor: Any, argv: List[str], stdout: IO[str], stderr: IO[str],
              stdin: Optional[IO[str]] = None, environ: Optional[Mapping[str, str]] = None,
              connect: Optional[Callable[..., Any]] = None) -> int:
    """The whole ``eventsource`` command for ``argv`` (without the program name)."""
    parser = build_parser(environ)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command == "serve":
        stderr.write(f"{PROG} serve: not available here; run it from a shell\n")
        return EXIT_USAGE
    return await execute(reactor, args, stdout, stderr, stdin, connect)


async def _react_main(reactor: Any, args: argparse.Namespace) -> None:
    """Under react: run the command; Ctrl-C ends an open fetch with "end" first."""
    holder: List[Any] = []
    finished: Deferred[None] = Deferred()
    work = Deferred.fromCoroutine(execute(reactor, args, sys.stdout, sys.stderr, sys.stdin,
                                          holder=holder))
    def done(result: Any) -> Any:
        finished.callback(None)
        return result

    work.addBoth(done)

    def interrupted() -> Optional[Deferred[None]]:
        if finished.called:
            return None
        work.cancel()
        waiting: Deferred[None] = Deferred()
        finished.addBoth(lambda _: waiting.callback(None) if not waiting.called else None)
        return waiting.addTimeout(2, reactor).addErrback(lambda _: None)

    reactor.addSystemEventTrigger("before", "shutdown", interrupted)
    try:
        code = await work
    except defer.CancelledError:
        sys.stderr.write(f"{PROG} {args.command}: interrupted\n")
        code = EXIT_INTERRUPTED
    if code:
        raise SystemExit(code)


def serve(arguments: List[str]) -> int:
    """``twistd -n --pidfile= eventsource ARGUMENTS``, in this process."""
    if "--help" in arguments or "-h" in arguments:
        print(f"usage: {PROG} serve [OPTIONS]\n\nRuns 'twistd -n --pidfile= eventsource "
              "[OPTIONS]': the server, in the foreground, logging to standard output.  "
              "Stop it with Ctrl-C (or SIGTERM).  Its options:\n", flush=True)
        arguments = ["--help" if a == "-h" else a for a in arguments]
    else:
        # the server's own options, checked first for a one-line error
        from twisted.python import usage

        from eventsource.tap import Options

        try:
            Options().parseOptions(arguments)
        except usage.UsageError as e:
            sys.stderr.write(f"{PROG} serve: error: {e} (see {PROG} serve --help)\n")
            return EXIT_USAGE
    from twisted.scripts.twistd import run as twistd

    sys.argv = ["twistd", "-n", "--pidfile=", "eventsource", *arguments]
    twistd()
    return EXIT_OK


def main(argv: Optional[List[str]] = None) -> None:
    """The console script: ``eventsource COMMAND ...``; exits with the status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        sys.exit(serve(argv[1:]))
    args = build_parser().parse_args(argv)
    react(_react_main, (args,))
