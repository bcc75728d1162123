"""
Tests for :mod:`eventsource.cli`.

Parsing, query building, output formats and exit statuses are tested in
memory with a fake client; then every command runs for real, in this process
(:func:`eventsource.cli.run`) and as ``python -m eventsource`` subprocesses,
against the private redis-server and ``twistd eventsource`` process of
:mod:`tests.test_client`.  The README's command-line examples run too.
"""

import io
import json
import os
import re
import shlex
import subprocess
import sys

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from eventsource import cli, tap
from eventsource.client import (
    NO_STREAM,
    AppendResult,
    Busy,
    EventSourceClient,
    NoServerError,
    PersistResult,
    RecordedEvent,
    RedisConnectionError,
    ReplyTimeout,
    ServerError,
    ServerTooOld,
    StreamTimeout,
    Unavailable,
    WrongExpectedVersion,
)
from eventsource.client.testing import FakeServer, MemoryPubSub
from tests.redis_server import RedisServer
from tests.support import REDIS_HOST, REDIS_PORT, IntegrationTestCase, free_port, unique
from tests.test_client import CHECKOUT, shared_fixture


class FakeStream:
    def __init__(self, rows, error=None):
        self.rows = list(rows)
        self.error = error
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.rows:
            return self.rows.pop(0)
        if self.error is not None:
            raise self.error
        raise StopAsyncIteration

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.closed = True


class FakeClient:
    """Records what the CLI asks; answers with canned rows, results or errors."""

    def __init__(self, rows=(), error=None):
        self.rows = rows
        self.error = error
        self.persisted = []
        self.fetched = []
        self.appended = []
        self.read = []
        self.disconnected = False

    def append(self, pid, events, expected_version="any", *, table=None, timeout=None,
               retry=None):
        self.appended.append((pid, events, expected_version, table, retry))
        if self.error is not None:
            return defer.fail(self.error)
        raw = {"events": [{"eventId": f"id-{i}", "pid": pid, "version": i, "position": 10 + i}
                          for i in range(len(events))], "duplicate": False}
        return defer.succeed(AppendResult.from_message(raw))

    def read_stream(self, pid, from_version=0, *, window=100, table=None, timeout=None):
        self.read.append((pid, from_version, window, table))
        self.stream = FakeStream([RecordedEvent.from_row(row) for row in self.rows], self.error)
        return self.stream

    def persist(self, documents, table=None):
        self.persisted.append((documents, table))
        if self.error is not None:
            return defer.fail(self.error)
        raw = {"fieldCount": 0, "affectedRows": 1, "insertId": 7}
        return defer.succeed(PersistResult.from_message(raw))

    def fetch(self, query, window=1, raw=False):
        self.fetched.append((query, window, raw))
        self.stream = FakeStream(self.rows, self.error)
        return self.stream

    def disconnect(self):
        self.disconnected = True
        return defer.succeed(None)


class TTY(io.StringIO):
    def isatty(self):
        return True


class CommandTestCase(SynchronousTestCase):
    """Runs :func:`cli.run` with a fake client: synchronous, no reactor."""

    def run_cli(self, argv, client=None, stdin=None, connect_error=None, environ=None,
                stderr=None):
        self.client = client or FakeClient()
        self.connected = []

        def connect(**kwargs):
            self.connected.append(kwargs)
            if connect_error is not None:
                return defer.fail(connect_error)
            return defer.succeed(self.client)

        self.stdout, self.stderr = io.StringIO(), stderr or io.StringIO()
        d = Deferred.fromCoroutine(cli.run(
            Clock(), argv, self.stdout, self.stderr, stdin, environ=environ or {},
            connect=connect))
        return self.successResultOf(d)

    def assert_one_line_error(self, code, expected_code, text=None):
        self.assertEqual(code, expected_code, self.stderr.getvalue())
        lines = self.stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("eventsource"), lines[0])
        if text is not None:
            self.assertIn(text, lines[0])


class ParserTests(CommandTestCase):
    def test_every_flag_is_explained(self):
        """--help of every command gives a help text for each flag."""
        parser = cli.build_parser({})
        subparsers = [a for a in parser._actions if hasattr(a, "choices") and a.choices]
        commands = subparsers[0].choices
        self.assertEqual(sorted(commands), ["append", "fetch", "persist", "read", "serve",
                                            "subscribe"])
        for name in ("persist", "fetch", "append", "read", "subscribe"):
            for action in commands[name]._actions:
                self.assertTrue(action.help, f"{name} {action.option_strings} has no help")
            text = commands[name].format_help()
            for flag in ("--redis-host", "--redis-port", "--timeout", "--reply-prefix",
                         "--channel-prefix"):
                self.assertIn(flag, text)

    def test_help_exits_0(self):
        for argv in (["--help"], ["persist", "--help"], ["fetch", "--help"], ["append", "--help"],
                     ["read", "--help"], ["subscribe", "--help"]):
            self.assertEqual(self.run_cli(argv), 0)

    def test_every_exit_status_in_help(self):
        """The top --help lists every exit status the command uses."""
        text = cli.build_parser({}).format_help()
        codes = [value for name, value in vars(cli).items()
                 if name.startswith("EXIT_") and isinstance(value, int)]
        self.assertEqual(sorted(code for code, _ in cli.EXIT_CODES), sorted(codes))
        for code, meaning in cli.EXIT_CODES:
            self.assertIn(f"{code:>3}  {meaning}", text)
        self.assertEqual(len(set(codes)), len(codes))

    def test_every_exit_status_in_the_docs(self):
        """docs/CLIENT.md's table of exit statuses is the command's."""
        with open(os.path.join(CHECKOUT, "docs", "CLIENT.md"), encoding="utf-8") as f:
            text = f.read()
        table = text[text.index("| status | meaning |"):].split("\n\n")[0]
        documented = [int(line.split("|")[1]) for line in table.splitlines()[2:]]
        self.assertEqual(documented, [code for code, _ in cli.EXIT_CODES])

    def test_environment_defaults(self):
        self.run_cli(["persist", "--pid", "p", "--domain", "d", "--name", "n"],
                     environ={"REDIS_HOST": "redis.example", "REDIS_PORT": "6380",
                              "REDIS_PASS": "s3cret", "REDIS_USER": "app",
                              "EVENTSOURCE_REPLY_PREFIX": "app:",
                              "EVENTSOURCE_CHANNEL_PREFIX": "shop:"})
        kwargs = self.connected[0]
        self.assertEqual((kwargs["host"], kwargs["port"], kwargs["password"],
                          kwargs["username"], kwargs["reply_prefix"], kwargs["channel_prefix"]),
                         ("redis.example", 6380, "s3cret", "app", "app:", "shop:"))

    def test_flags_win_over_environment(self):
        self.run_cli(["fetch", "--redis-port", "7000", "--timeout", "2.5",
                      "--redis-endpoint", "unix:path=/tmp/r.sock"],
                     environ={"REDIS_PORT": "6380"})
        kwargs = self.connected[0]
        self.assertEqual((kwargs["port"], kwargs["timeout"], kwargs["endpoint"]),
                         (7000, 2.5, "unix:path=/tmp/r.sock"))

    def test_sentinels(self):
        """Redis behind Sentinel: both options (or variables), given to connect; one alone is refused."""
        self.run_cli(["fetch", "--redis-sentinels", "s1:26380,s2", "--redis-master-name", "m"])
        kwargs = self.connected[0]
        self.assertEqual((kwargs["sentinels"], kwargs["master_name"]),
                         ([("s1", 26380), ("s2", 26379)], "m"))
        self.run_cli(["fetch"], environ={"REDIS_SENTINELS": "[::1]:7", "REDIS_MASTER_NAME": "n"})
        self.assertEqual((self.connected[0]["sentinels"], self.connected[0]["master_name"]),
                         ([("::1", 7)], "n"))
        self.run_cli(["fetch"])
        self.assertNotIn("sentinels", self.connected[0])
        for argv, environ in [(["fetch", "--redis-sentinels", "s1"], {}),
                              (["fetch"], {"REDIS_MASTER_NAME": "m"})]:
            code = self.run_cli(argv, environ=environ)
            self.assert_one_line_error(code, cli.EXIT_USAGE, "go together")
            self.assertEqual(self.connected, [])
        code = self.run_cli(["fetch", "--redis-sentinels", "s1:x", "--redis-master-name", "m"])
        self.assert_one_line_error(code, cli.EXIT_USAGE, "must be HOST:PORT")

    def test_bad_arguments(self):
        cases = [
            (["persist", "--pid", "p", "--domain", "d", "--name", "n", "--data", "{k: 1}"],
             "--data: not valid JSON"),
            (["fetch", "--where", "[1]"], "must be a JSON object"),
            (["fetch", "--where", "{"], "not valid JSON"),
            (["fetch", "--query", "nope"], "not valid JSON"),
            (["fetch", "--window", "0"], "at least 1"),
            (["fetch", "--timeout", "-1"], "greater than 0"),
            (["fetch", "--redis-port", "99999"], "port number"),
            (["fetch", "--format", "xml"], "invalid choice"),
            (["fetch", "--pid", "p", "--where", "{}"], "only one of"),
            (["fetch", "--where", "{}", "--query", "{}"], "only one of"),
            (["fetch", "--query", '{"$select": 1}'], "--query must be"),
            (["fetch", "--query", '{"$select": {}, "$x": 1}'], "--query must be"),
            (["persist", "--pid", "p"], "needs --pid, --domain and --name"),
            (["persist", "--data", "1"], "needs --pid, --domain and --name"),
            (["frobnicate"], "invalid choice"),
            ([], "required"),
            (["append"], "required: PID"),
            (["append", "p", "d"], "needs DOMAIN and NAME"),
            (["append", "p", "d", "n", "{oops"], "DATA: not valid JSON"),
            (["append", "p", "d", "n", "--expected-version", "-1"], "--expected-version: must be"),
            (["append", "p", "d", "n", "--expected-version", "nostream"], "must be a version"),
            (["append", "p", "d", "n", "--expected-version", "1.5"], "must be a version"),
            (["append", "p", "d", "n", "--event-id", "nope"], "--event-id: an eventId is a UUID"),
            (["append", "p", "d", "n", "--retries", "-1"], "--retries: must be an integer"),
            (["append", "p", "--event-id", "01890a5d-ac96-774b-bcce-b302099a8057"],
             "--event-id is for one event"),
            (["read"], "required: PID"),
            (["read", "p", "--from-version", "-1"], "--from-version: must be an integer >= 0"),
            (["read", "p", "--from-version", "²"], "--from-version: must be an integer >= 0"),
            (["read", "p", "--window", "0"], "at least 1"),
        ]
        for argv, text in cases:
            code = self.run_cli(argv)
            self.assert_one_line_error(code, cli.EXIT_USAGE, text)
        self.assertEqual(self.connected, [])

    def test_values_checked_as_the_server_checks_them(self):
        """Ports, counts and seconds: the server's coerce functions, word for word."""
        cases = [
            ("--redis-port", tap.port, ["99999", "0", "http", "6379.5"]),
            ("--window", tap.positive_int, ["0", "-3", "many"]),
            ("--limit", tap.positive_int, ["0", "1.5"]),
            ("--timeout", tap.positive_seconds, ["-1", "0", "inf", "nan", "soon"]),
        ]
        for flag, coerce, values in cases:
            for value in values:
                with self.assertRaises(ValueError) as caught:
                    coerce(value)
                code = self.run_cli(["fetch", flag, value])
                self.assert_one_line_error(code, cli.EXIT_USAGE,
                                           f"argument {flag}: {caught.exception}")
                self.assertEqual(self.connected, [])

    def test_serve_is_not_run_in_process(self):
        self.assertEqual(self.run_cli(["serve"]), cli.EXIT_USAGE)


class PersistCommandTests(CommandTestCase):
    def test_flags(self):
        code = self.run_cli(["persist", "--pid", "p", "--domain", "d", "--name", "n",
                             "--data", '{"k": [1, 2]}', "--table", "db.t"])
        self.assertEqual(code, 0)
        self.assertEqual(self.client.persisted, [
            ({"pid": "p", "domain": "d", "name": "n", "data": {"k": [1, 2]}}, "db.t")])
        self.assertEqual(json.loads(self.stdout.getvalue()),
                         {"fieldCount": 0, "affectedRows": 1, "insertId": 7})
        self.assertTrue(self.client.disconnected)

    def test_no_data_is_null(self):
        self.run_cli(["persist", "--pid", "p", "--domain", "d", "--name", "n"])
        self.assertIsNone(self.client.persisted[0][0]["data"])

    def test_json_lines_on_stdin(self):
        stdin = io.StringIO('{"pid": "a", "domain": "d", "name": "x"}\n\n'
                            '{"pid": "b", "domain": "d", "name": "y", "data": 1}\n')
        self.assertEqual(self.run_cli(["persist"], stdin=stdin), 0)
        documents, table = self.client.persisted[0]
        self.assertEqual([d["pid"] for d in documents], ["a", "b"])

    def test_bad_stdin(self):
        for text, message in [("", "no events"), ("{}\nnot json\n", "line 2"),
                              ("[1]\n", "line 1 of standard input is not a JSON object")]:
            code = self.run_cli(["persist"], stdin=io.StringIO(text))
            self.assert_one_line_error(code, cli.EXIT_USAGE, message)

    def test_terminal_stdin_refused(self):
        code = self.run_cli(["persist"], stdin=TTY())
        self.assert_one_line_error(code, cli.EXIT_USAGE, "pipe events")

    def test_exit_codes(self):
        cases = [
            (ServerError("error", "c"), cli.EXIT_SERVER_ERROR, "refused the request"),
            (NoServerError("no eventsource server is listening"), cli.EXIT_NO_SERVER,
             "no eventsource server"),
            (ReplyTimeout("no answer"), cli.EXIT_TIMEOUT, "no answer"),
            (RedisConnectionError("lost"), cli.EXIT_REDIS, "lost"),
        ]
        for error, expected, text in cases:
            code = self.run_cli(["persist", "--pid", "p", "--domain", "d", "--name", "n"],
                                client=FakeClient(error=error))
            self.assert_one_line_error(code, expected, text)
            self.assertTrue(self.client.disconnected)

    def test_redis_unreachable(self):
        code = self.run_cli(["persist", "--pid", "p", "--domain", "d", "--name", "n"],
                            connect_error=RedisConnectionError("cannot connect to Redis"))
        self.assert_one_line_error(code, cli.EXIT_REDIS, "127.0.0.1:6379")


class AppendCommandTests(CommandTestCase):
    def test_one_event_from_arguments(self):
        event_id = "01890A5D-AC96-774B-BCCE-B302099A8057"
        code = self.run_cli(["append", "order-1", "order", "paid", '{"amount": 12}',
                             "--expected-version", "3", "--event-id", event_id,
                             "--table", "db.t", "--retries", "2"])
        self.assertEqual(code, 0, self.stderr.getvalue())
        [(pid, events, expected, table, retry)] = self.client.appended
        self.assertEqual((pid, expected, table, retry.retries), ("order-1", 3, "db.t", 2))
        self.assertEqual(events, [{"domain": "order", "name": "paid", "data": {"amount": 12},
                                   "eventId": event_id.lower()}])
        self.assertEqual(json.loads(self.stdout.getvalue()), {"events": [
            {"eventId": "id-0", "pid": "order-1", "version": 0, "position": 10}],
            "duplicate": False})
        self.assertEqual(self.stdout.getvalue().count("\n"), 1)
        self.assertTrue(self.client.disconnected)

    def test_defaults(self):
        self.run_cli(["append", "p", "d", "n"])
        [(_, events, expected, table, retry)] = self.client.appended
        self.assertEqual((events, expected, table), ([{"domain": "d", "name": "n", "data": None}],
                                                     "any", None))
        self.assertEqual(retry.retries, 5)

    def test_expected_version_names(self):
        for name in ("noStream", "streamExists", "any"):
            self.run_cli(["append", "p", "d", "n", "--expected-version", name])
            self.assertEqual(self.client.appended[0][2], name)

    def test_json_lines_on_stdin(self):
        stdin = io.StringIO('{"domain": "d", "name": "x"}\n\n'
                            '{"domain": "d", "name": "y", "data": 1, '
                            '"eventId": "01890a5d-ac96-774b-bcce-b302099a8057"}\n')
        self.assertEqual(self.run_cli(["append", "p", "--expected-version", "noStream"],
                                      stdin=stdin), 0)
        [(pid, events, expected, _, _)] = self.client.appended
        self.assertEqual([e["name"] for e in events], ["x", "y"])
        self.assertEqual((pid, expected), ("p", NO_STREAM))
        self.assertEqual(len(json.loads(self.stdout.getvalue())["events"]), 2)

    def test_bad_stdin(self):
        for text, message in [("", "no events"), ("{}\nnot json\n", "line 2"),
                              ("[1]\n", "line 1 of standard input is not a JSON object")]:
            code = self.run_cli(["append", "p"], stdin=io.StringIO(text))
            self.assert_one_line_error(code, cli.EXIT_USAGE, message)
        code = self.run_cli(["append", "p"], stdin=TTY())
        self.assert_one_line_error(code, cli.EXIT_USAGE, "pipe events")

    def test_event_the_client_refuses(self):
        """An event of standard input the client refuses (no name) is a usage error."""
        client = FakeClient()
        client.append = lambda *a, **k: (_ for _ in ()).throw(
            ValueError("an event needs a non-empty string name, not None"))
        code = self.run_cli(["append", "p"], client=client,
                            stdin=io.StringIO('{"domain": "d"}\n'))
        self.assert_one_line_error(code, cli.EXIT_USAGE, "needs a non-empty string name")

    def test_exit_codes(self):
        conflict = WrongExpectedVersion(
            'stream "p" is at version 4, not 3', "c", code="wrongExpectedVersion",
            details={"pid": "p", "expected": 3, "actual": 4})
        cases = [
            (conflict, cli.EXIT_CONFLICT,
             'error: wrongExpectedVersion: stream "p" is at version 4, not 3'),
            (ServerTooOld("the server speaks only version 1"), cli.EXIT_TOO_OLD,
             "speaks only version 1"),
            (Busy("too many open streams", "c", code="busy"), cli.EXIT_SERVER_ERROR,
             "error: busy: too many open streams"),
            (Unavailable("the database is away", "c", code="unavailable"),
             cli.EXIT_SERVER_ERROR, "unavailable: the database is away"),
            (ServerError("error", "c"), cli.EXIT_SERVER_ERROR, "refused the request"),
            (NoServerError("no eventsource server is listening"), cli.EXIT_NO_SERVER,
             "no eventsource server"),
            (ReplyTimeout("no answer"), cli.EXIT_TIMEOUT, "no answer"),
            (RedisConnectionError("lost"), cli.EXIT_REDIS, "lost"),
        ]
        for error, expected, text in cases:
            code = self.run_cli(["append", "p", "d", "n"], client=FakeClient(error=error))
            self.assert_one_line_error(code, expected, text)
            self.assertTrue(self.client.disconnected)
            self.assertEqual(self.stdout.getvalue(), "")


class ReadCommandTests(CommandTestCase):
    ROWS = [{"position": 7, "eventId": "e0", "pid": "p", "version": 3, "domain": "d",
             "name": "a", "timestamp": "2026-11-29T10:00:00.123Z", "data": "text"},
            {"position": 9, "eventId": "e1", "pid": "p", "version": 4, "domain": "d",
             "name": "b", "timestamp": "2026-11-29T10:00:00.124Z", "data": {"k": [1]}}]

    def test_json_lines(self):
        code = self.run_cli(["read", "p", "--from-version", "3", "--window", "7",
                             "--table", "db.t"], FakeClient(self.ROWS))
        self.assertEqual(code, 0, self.stderr.getvalue())
        self.assertEqual(self.client.read, [("p", 3, 7, "db.t")])
        self.assertEqual([json.loads(line) for line in self.stdout.getvalue().splitlines()],
                         self.ROWS)
        self.assertTrue(self.client.stream.closed)

    def test_defaults(self):
        self.run_cli(["read", "p"], FakeClient(self.ROWS))
        self.assertEqual(self.client.read, [("p", 0, cli.DEFAULT_WINDOW, None)])

    def test_errors(self):
        for error, expected in [(ServerTooOld("speaks only version 1"), cli.EXIT_TOO_OLD),
                                (StreamTimeout("a row was not accepted"), cli.EXIT_TIMEOUT)]:
            code = self.run_cli(["read", "p"], FakeClient(self.ROWS, error))
            self.assert_one_line_error(code, expected)
            self.assertEqual(len(self.stdout.getvalue().splitlines()), 2)


class FetchCommandTests(CommandTestCase):
    ROWS = [{"pid": "p", "name": "a", "data": {"k": 1}}, {"pid": "p", "name": "b", "data": None}]

    def test_query_from_flags(self):
        def query(*argv):
            return cli.fetch_query(cli.build_parser({}).parse_args(["fetch", *argv]))

        self.assertEqual(query(), {"$select": {}})
        self.assertEqual(query("--pid", "p"), {"$select": {"$where": {"pid": "p"}}})
        self.assertEqual(query("--domain", "d", "--name", "n", "--limit", "5", "--table", "a.b"),
                         {"$select": {"$where": {"domain": "d", "name": "n"}, "$from": "a.b",
                                      "$limit": 5}})
        self.assertEqual(query("--where", '{"pid": {"$in": ["a"]}}'),
                         {"$select": {"$where": {"pid": {"$in": ["a"]}}}})
        self.assertEqual(query("--query", '{"$select": {"$columns": ["pid"]}}'),
                         {"$select": {"$columns": ["pid"]}})
        self.assertEqual(query("--query", '{"$columns": ["pid"]}', "--limit", "1"),
                         {"$select": {"$columns": ["pid"], "$limit": 1}})

    def test_json_lines(self):
        self.assertEqual(self.run_cli(["fetch", "--pid", "p"], FakeClient(self.ROWS)), 0)
        lines = self.stdout.getvalue().splitlines()
        self.assertEqual([json.loads(line) for line in lines], self.ROWS)
        self.assertEqual(self.client.fetched[0][1:], (cli.DEFAULT_WINDOW, False))
        self.assertTrue(self.client.stream.closed)

    def test_raw_and_window(self):
        self.run_cli(["fetch", "--raw", "--window", "1"], FakeClient(self.ROWS))
        self.assertEqual(self.client.fetched[0][1:], (1, True))

    def test_table(self):
        self.run_cli(["fetch", "--format", "table"], FakeClient(self.ROWS))
        self.assertEqual(self.stdout.getvalue().splitlines(), [
            "pid  name  data",
            "---  ----  -------",
            "p    a     {\"k\":1}",
            "p    b     null",
            "(2 rows)",
        ])

    def test_table_shapes(self):
        text = cli.format_table([{"a": "x" * 100}, {"b": "y\nz"}])
        lines = text.splitlines()
        self.assertEqual(len(lines[2]), cli.TABLE_CELL_WIDTH)
        self.assertTrue(lines[2].endswith("…"))
        self.assertIn("y z", lines[3])
        self.assertEqual(cli.format_table([]).splitlines()[-1], "(0 rows)")

    def test_error_after_rows(self):
        client = FakeClient(self.ROWS, StreamTimeout("a row was not accepted"))
        code = self.run_cli(["fetch"], client)
        self.assert_one_line_error(code, cli.EXIT_TIMEOUT, "not accepted")
        self.assertEqual(len(self.stdout.getvalue().splitlines()), 2)

    def test_no_progress_without_terminal(self):
        self.run_cli(["fetch"], FakeClient(self.ROWS))
        self.assertEqual(self.stderr.getvalue(), "")

    def test_progress_line(self):
        clock = Clock()
        err = TTY()
        progress = cli.Progress(clock, err)
        progress.rows = 100
        clock.advance(0.5)
        self.assertEqual(err.getvalue(), "", "quiet for short reads")
        progress.rows = 3000
        clock.advance(0.5)
        self.assertEqual(err.getvalue(), "\r3000 rows, 3000 rows/s, 1.0 s\x1b[K")
        progress.rows = 4000
        clock.advance(1)
        progress.stop()
        self.assertTrue(err.getvalue().endswith("\r4000 rows, 2000 rows/s, 2.0 s\x1b[K\n"))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_progress_quiet_when_short(self):
        clock = Clock()
        err = TTY()
        progress = cli.Progress(clock, err)
        clock.advance(0.5)
        progress.stop()
        self.assertEqual(err.getvalue(), "")

    def test_progress_only_on_terminal(self):
        self.run_cli(["fetch", "--no-progress"], FakeClient(self.ROWS), stderr=TTY())
        self.assertEqual(self.stderr.getvalue(), "")


class SubscribeCommandTests(SynchronousTestCase):
    """subscribe, with the real client over the in-memory server, on a Clock."""

    def setUp(self):
        self.clock = Clock()
        self.pubsub = MemoryPubSub()
        self.server = FakeServer(self.pubsub)
        self.folder = self.mktemp()
        os.mkdir(self.folder)
        self.checkpoint = os.path.join(self.folder, "position")
        for i in range(5):
            self.server.add_event("p1" if i % 2 == 0 else "p2", "d", f"n{i}", {"i": i})

    def start(self, *argv, stdout=None):
        self.stdout, self.stderr = stdout or io.StringIO(), io.StringIO()

        def connect(**kwargs):
            return defer.succeed(EventSourceClient(self.pubsub, self.clock))

        return Deferred.fromCoroutine(cli.run(self.clock, ["subscribe", *argv], self.stdout,
                                              self.stderr, None, environ={}, connect=connect))

    def run_cli(self, *argv):
        return self.successResultOf(self.start(*argv))

    def printed(self):
        return [json.loads(line)["position"] for line in self.stdout.getvalue().splitlines()]

    def requests(self):
        return [r for r in self.server.requests if "from" in r]

    def kept(self):
        with open(self.checkpoint) as f:
            return f.read()

    def test_until_caught_up(self):
        """JSON lines of the version 2 rows, the filter from the flags, then exit 0."""
        self.assertEqual(self.run_cli("--pid", "p1", "--until-caught-up"), 0,
                         self.stderr.getvalue())
        self.assertEqual(self.printed(), [1, 3, 5])
        first = json.loads(self.stdout.getvalue().splitlines()[0])
        self.assertEqual(list(first), ["position", "eventId", "pid", "version", "domain",
                                       "name", "timestamp", "data"])
        self.assertEqual(first["data"], {"i": 0})
        [request] = self.requests()
        self.assertEqual((request["query"], request["from"], request["window"]),
                         ({"$select": {"$where": {"pid": "p1"}}}, "start", 100))
        self.assertEqual(self.server.subscriptions, {})

    def test_where_from_and_window(self):
        self.assertEqual(self.run_cli("--where", '{"name": {"$in": ["n1", "n4"]}}', "--from",
                                      "1", "--window", "7", "--until-caught-up"), 0)
        self.assertEqual(self.printed(), [2, 5])
        [request] = self.requests()
        self.assertEqual((request["from"], request["window"]), (1, 7))
        self.run_cli("--from", "end", "--until-caught-up", "--table", "a.b")
        self.assertEqual(self.printed(), [])
        self.assertEqual(self.requests()[-1]["query"], {"$select": {"$from": "a.b"}})

    def test_follows_and_keeps_the_checkpoint(self):
        """Live events are printed as they come; after each batch, standard output
        is flushed and the checkpoint holds the last position printed."""
        d = self.start("--checkpoint", self.checkpoint)
        self.assertEqual(self.printed(), [1, 2, 3, 4, 5])
        self.assertFalse(os.path.exists(self.checkpoint))
        self.clock.advance(0)
        self.assertEqual(self.kept(), "5\n")
        self.server.add_event("p1", "d", "late")
        self.server.add_event("p1", "d", "later")
        self.assertEqual(self.printed(), [1, 2, 3, 4, 5, 6, 7])
        self.clock.advance(0)
        self.assertEqual(self.kept(), "7\n")
        self.assertEqual(os.listdir(self.folder), ["position"])
        self.server.add_event("p1", "d", "last")
        # stopped (Ctrl-C) before the next turn: the checkpoint is written on the way out
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.kept(), "8\n")
        self.assertEqual(self.server.subscriptions, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_resumes_after_the_checkpoint(self):
        with open(self.checkpoint, "w") as f:
            f.write("3\n")
        self.assertEqual(self.run_cli("--checkpoint", self.checkpoint, "--from", "end",
                                      "--until-caught-up"), 0)
        self.assertEqual(self.printed(), [4, 5])
        self.assertEqual(self.requests()[0]["from"], 3)
        self.assertEqual(self.kept(), "5\n")

    def test_checkpoint_moves_to_caught_up(self):
        """With nothing printed, the caughtUp position is kept: a restart misses nothing."""
        self.assertEqual(self.run_cli("--checkpoint", self.checkpoint, "--from", "end",
                                      "--until-caught-up"), 0)
        self.assertEqual((self.printed(), self.kept()), ([], "5\n"))

    def test_empty_checkpoint_is_none(self):
        open(self.checkpoint, "w").close()
        self.assertEqual(self.run_cli("--checkpoint", self.checkpoint, "--from", "4",
                                      "--until-caught-up"), 0)
        self.assertEqual(self.printed(), [5])

    def test_checkpoint_trouble(self):
        with open(self.checkpoint, "w") as f:
            f.write("yesterday\n")
        code = self.run_cli("--checkpoint", self.checkpoint)
        self.assertEqual(code, cli.EXIT_CHECKPOINT)
        self.assertIn("holds no position", self.stderr.getvalue())
        self.assertEqual(len(self.stderr.getvalue().splitlines()), 1)
        self.assertEqual(self.requests(), [])

        missing = os.path.join(self.folder, "no", "such", "folder")
        code = self.run_cli("--checkpoint", missing, "--until-caught-up")
        self.assertEqual(code, cli.EXIT_CHECKPOINT, self.stderr.getvalue())
        self.assertIn("cannot write the checkpoint", self.stderr.getvalue())
        self.assertEqual(self.server.subscriptions, {})

    def test_checkpoint_failing_while_following(self):
        """A checkpoint that cannot be written ends the subscription: exit 8."""
        d = self.start("--checkpoint", os.path.join(self.folder, "gone", "position"))
        self.assertEqual(self.printed(), [1, 2, 3, 4, 5])
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), cli.EXIT_CHECKPOINT)
        self.assertEqual(self.server.subscriptions, {})

    def test_checkpoint_never_ahead_of_the_output(self):
        """Standard output is flushed before the checkpoint moves: when the reader
        left (a broken pipe), the checkpoint keeps the last batch that got out."""
        flushed = []

        class Pipe(io.StringIO):
            def flush(pipe):
                if flushed:
                    raise BrokenPipeError()
                flushed.append(pipe.getvalue())

        d = self.start("--checkpoint", self.checkpoint, stdout=Pipe())
        self.clock.advance(0)
        self.assertEqual(self.kept(), "5\n")
        self.server.add_event("p1", "d", "unread")
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.kept(), "5\n")
        self.assertEqual(self.server.subscriptions, {})

    def test_errors(self):
        for argv, text in [(["--pid", "p", "--where", "{}"], "only one of"),
                           (["--from", "later"], "--from: must be start, end or a position"),
                           (["--from", "-1"], "--from: must be"),
                           (["--window", "0"], "at least 1"),
                           (["--heartbeat", "0"], "greater than 0")]:
            self.assertEqual(self.run_cli(*argv), cli.EXIT_USAGE, argv)
            self.assertIn(text, self.stderr.getvalue())
        self.assertEqual(self.requests(), [])
        self.assertEqual(self.run_cli("--where", '{"nope": 1}'), cli.EXIT_SERVER_ERROR)
        self.assertIn("refused", self.stderr.getvalue())
        del self.pubsub.handlers["subscribe"]
        self.assertEqual(self.run_cli(), cli.EXIT_NO_SERVER)
        self.pubsub = MemoryPubSub()
        FakeServer(self.pubsub, version=1)
        self.assertEqual(self.run_cli(), cli.EXIT_TOO_OLD)
        self.assertEqual(len(self.stderr.getvalue().splitlines()), 1)


# -- for real ---------------------------------------------------------------------


class IntegrationTests(TestCase):
    """Every command against the real server, in process and as a subprocess."""

    timeout = 30

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.fixture = shared_fixture()
        self.environ = {"REDIS_PORT": str(self.fixture.redis_port),
                        "EVENTSOURCE_CHANNEL_PREFIX": self.fixture.channel_prefix}
        self.pid = unique("cli")

    async def run_cli(self, *argv, stdin=None, environ=None):
        out, err = io.StringIO(), io.StringIO()
        code = await cli.run(self.reactor, list(argv), out, err, stdin,
                             environ=self.environ if environ is None else environ)
        return code, out.getvalue(), err.getvalue()

    def subprocess(self, *argv, stdin="", environ=None):
        env = dict(self.fixture.env)
        env.update(self.environ if environ is None else environ)
        return subprocess.run([sys.executable, "-m", "eventsource", *argv], input=stdin,
                              capture_output=True, text=True, env=env, timeout=30,
                              cwd=self.fixture.folder)

    def test_persist_and_fetch(self):
        async def go():
            code, out, err = await self.run_cli(
                "persist", "--pid", self.pid, "--domain", "order", "--name", "created",
                "--data", '{"total": 12, "note": "é"}')
            self.assertEqual((code, err), (0, ""))
            self.assertEqual(json.loads(out)["affectedRows"], 1)
            lines = "".join(json.dumps({"pid": self.pid, "domain": "order", "name": f"n{i}",
                                        "data": i}) + "\n" for i in range(3))
            code, out, err = await self.run_cli("persist", stdin=io.StringIO(lines))
            self.assertEqual((code, json.loads(out)["affectedRows"]), (0, 3))

            code, out, err = await self.run_cli("fetch", "--pid", self.pid)
            self.assertEqual((code, err), (0, ""))
            rows = [json.loads(line) for line in out.splitlines()]
            self.assertEqual([r["name"] for r in rows], ["created", "n0", "n1", "n2"])
            self.assertEqual(rows[0]["data"], {"total": 12, "note": "é"})

            code, out, _ = await self.run_cli("fetch", "--pid", self.pid, "--raw", "--window",
                                              "1", "--limit", "1")
            self.assertEqual(json.loads(json.loads(out)["data"]), {"total": 12, "note": "é"})

            code, out, _ = await self.run_cli(
                "fetch", "--where", json.dumps({"pid": self.pid, "name": {"$in": ["n1"]}}))
            self.assertEqual([json.loads(line)["data"] for line in out.splitlines()], [1])

            code, out, _ = await self.run_cli("fetch", "--query", json.dumps(
                {"$select": {"$columns": ["name"], "$where": {"pid": self.pid},
                             "$orderBy": {"name": -1}}}), "--format", "table")
            self.assertEqual(code, 0)
            self.assertEqual(out.splitlines(), [
                "name", "-------", "n2", "n1", "n0", "created", "(4 rows)"])

        return Deferred.fromCoroutine(go())

    def test_failures(self):
        async def go():
            code, _, err = await self.run_cli("fetch", "--query",
                                              '{"$select": {"$from": "mysql.user"}}')
            self.assertEqual(code, cli.EXIT_SERVER_ERROR, err)
            self.assertEqual(len(err.splitlines()), 1)

            code, _, err = await self.run_cli("persist", "--pid", "p", "--domain", "d",
                                              "--name", "n", "--timeout", "2",
                                              environ={"REDIS_PORT": str(free_port())})
            self.assertEqual(code, cli.EXIT_REDIS, err)
            self.assertIn("cannot connect to Redis", err)

            lonely = await RedisServer(self).start()
            environ = {"REDIS_PORT": str(lonely.port)}
            code, _, err = await self.run_cli("fetch", "--pid", "p", environ=environ)
            self.assertEqual(code, cli.EXIT_NO_SERVER, err)

            # something hears fetch requests but never answers
            from eventsource.client import connect

            mute = await connect(port=lonely.port, reactor=self.reactor)
            self.addCleanup(mute.disconnect)
            await mute.subscribe("fetch")
            code, _, err = await self.run_cli("fetch", "--timeout", "0.3", environ=environ)
            self.assertEqual(code, cli.EXIT_TIMEOUT, err)
            self.assertIn("no answer", err)

        return Deferred.fromCoroutine(go())

    def test_subprocess_append_and_read(self):
        """python -m eventsource append / read, and the conflict's exit status, for real."""
        result = self.subprocess("append", self.pid, "order", "created", '{"total": 12}',
                                 "--expected-version", "noStream")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(json.loads(result.stdout)["events"][0]["version"], 0)
        result = self.subprocess("append", self.pid, "order", "created",
                                 "--expected-version", "noStream")
        self.assertEqual(result.returncode, cli.EXIT_CONFLICT, result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        result = self.subprocess("read", self.pid)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["data"], {"total": 12})

    def test_subprocess_exit_codes(self):
        """python -m eventsource: exit statuses and one-line messages, for real."""
        result = self.subprocess("persist", "--pid", self.pid, "--domain", "d", "--name", "n",
                                 "--data", "[1, 2]")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(json.loads(result.stdout)["affectedRows"], 1)

        result = self.subprocess("fetch", "--pid", self.pid, "--format", "table")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("[1,2]", result.stdout)

        result = self.subprocess("fetch", "--where", "{oops")
        self.assertEqual(result.returncode, cli.EXIT_USAGE)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)

        result = self.subprocess("persist", stdin="not json\n")
        self.assertEqual(result.returncode, cli.EXIT_USAGE)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)

        lonely = RedisServer(self).start_now()
        result = self.subprocess("fetch", "--pid", "p", environ={"REDIS_PORT": str(lonely.port)})
        self.assertEqual(result.returncode, cli.EXIT_NO_SERVER)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)

        for command in ("persist", "fetch", "append", "read", "subscribe", "serve"):
            result = self.subprocess(command, "--help")
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn("usage:", result.stdout)
        self.assertIn("--row-timeout", result.stdout)

        result = self.subprocess("serve", "--no-such-option")
        self.assertEqual(result.returncode, cli.EXIT_USAGE)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)

    def test_readme_commands(self):
        """Every `$ eventsource ...` line of the README's CLI section runs and exits 0."""
        commands = readme_commands()

        async def go():
            for line in commands:
                stdin = None
                if " | eventsource " in line:
                    producer, line = line.split(" | ", 1)
                    stdin = io.StringIO(subprocess.run(
                        producer, shell=True, capture_output=True, text=True,
                        check=True).stdout)
                argv = shlex.split(line)
                self.assertEqual(argv[0], "eventsource")
                if argv[1] == "serve":
                    continue
                code, out, err = await self.run_cli(*argv[1:], stdin=stdin)
                self.assertEqual(code, 0, f"{line}\n{err}")
                self.assertTrue(out, line)

        return Deferred.fromCoroutine(go())


def readme_commands():
    """The ``$ eventsource ...`` lines of the README's "## Command line" section."""
    path = os.path.join(CHECKOUT, "README.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"^## Command line\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        raise AssertionError("the README has no '## Command line' section")
    commands = [line[2:] for line in match.group(1).splitlines()
                if line.startswith("$ ") and "eventsource " in line]
    if not commands:
        raise AssertionError("the README's command-line section has no commands")
    return commands


class AppendReadIntegrationTests(IntegrationTestCase):
    """append and read against a version 2 server of this process (real Redis, MariaDB)."""

    async def run_cli(self, *argv, stdin=None):
        from twisted.internet import reactor

        out, err = io.StringIO(), io.StringIO()
        environ = {"REDIS_HOST": REDIS_HOST, "REDIS_PORT": str(REDIS_PORT),
                   "EVENTSOURCE_CHANNEL_PREFIX": self.prefix}
        code = await cli.run(reactor, list(argv), out, err, stdin, environ=environ)
        return code, out.getvalue(), err.getvalue()

    def test_append_conflict_and_read(self):
        async def go():
            pid = unique("order")
            code, out, err = await self.run_cli("append", pid, "order", "created",
                                                '{"total": 12, "note": "é"}',
                                                "--expected-version", "noStream")
            self.assertEqual((code, err), (0, ""))
            result = json.loads(out)
            self.assertEqual(result["duplicate"], False)
            [event] = result["events"]
            self.assertEqual((event["pid"], event["version"]), (pid, 0))

            lines = "".join(json.dumps({"domain": "order", "name": f"n{i}", "data": i}) + "\n"
                            for i in range(3))
            code, out, err = await self.run_cli("append", pid, "--expected-version", "0",
                                                stdin=io.StringIO(lines))
            self.assertEqual((code, err), (0, ""))
            self.assertEqual([e["version"] for e in json.loads(out)["events"]], [1, 2, 3])

            code, out, err = await self.run_cli("append", pid, "order", "late",
                                                "--expected-version", "2")
            self.assertEqual(code, cli.EXIT_CONFLICT, err)
            self.assertEqual(out, "")
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertIn("wrongExpectedVersion", err)
            self.assertIn("3", err)

            code, out, err = await self.run_cli("read", pid, "--from-version", "1")
            self.assertEqual((code, err), (0, ""))
            rows = [json.loads(line) for line in out.splitlines()]
            self.assertEqual([(r["version"], r["name"], r["data"]) for r in rows],
                             [(1, "n0", 0), (2, "n1", 1), (3, "n2", 2)])
            self.assertEqual(list(rows[0]), ["position", "eventId", "pid", "version", "domain",
                                             "name", "timestamp", "data"])
            code, out, _ = await self.run_cli("read", pid)
            self.assertEqual(json.loads(out.splitlines()[0])["data"], {"total": 12, "note": "é"})

        return Deferred.fromCoroutine(go())

    def test_same_event_id_twice(self):
        async def go():
            pid = unique("order")
            event_id = "01890a5d-ac96-774b-bcce-b302099a8057"
            first = await self.run_cli("append", pid, "d", "n", "--event-id", event_id)
            again = await self.run_cli("append", pid, "d", "n", "--event-id", event_id,
                                       "--expected-version", "noStream")
            self.assertEqual((first[0], again[0]), (0, 0), again[2])
            self.assertEqual(json.loads(again[1])["events"], json.loads(first[1])["events"])
            self.assertEqual(json.loads(again[1])["duplicate"], True)
            self.assertEqual(len(self.rows()), 1)

        return Deferred.fromCoroutine(go())
