"""
``--log-format json`` (:mod:`eventsource.logs`): each event as one JSON line
with its structured fields, secrets kept out; chosen through twistd's own
``--logger`` hook; and for real, ``twistd eventsource`` in a subprocess
writing nothing but JSON lines, its HTTP port found from them.
"""

import io
import json
import os
import signal
import subprocess
import sys
import tempfile

from twisted.internet import defer, reactor
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody

from eventsource import logs, tap
from tests.support import MYSQL, REDIS_HOST, REDIS_PORT, WAIT, sql, unique, wait_until

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def captured(emit):
    """The events ``emit()`` logs, as they reach observers."""
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        emit()
    finally:
        globalLogPublisher.removeObserver(events.append)
    return events


class EventAsJSONTests(SynchronousTestCase):
    def line(self, emit):
        (event,) = captured(emit)
        text = logs.event_as_json(event)
        self.assertNotIn("\n", text)
        return json.loads(text)

    def test_envelope_and_fields(self):
        log = Logger(namespace="eventsource.service")
        record = self.line(lambda: log.info("stream {channel} ended after {rows} rows",
                                            channel="r1", rows=3))
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "eventsource.service")
        self.assertEqual(record["message"], "stream r1 ended after 3 rows")
        self.assertEqual(record["format"], "stream {channel} ended after {rows} rows")
        self.assertEqual((record["channel"], record["rows"]), ("r1", 3))
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
        self.assertFalse([key for key in record if key.startswith("log_")])

    def test_levels(self):
        log = Logger()
        for level in (LogLevel.debug, LogLevel.warn, LogLevel.error, LogLevel.critical):
            record = self.line(lambda level=level: log.emit(level, "x"))
            self.assertEqual(record["level"], level.name)

    def test_failure_has_its_traceback(self):
        log = Logger()

        def emit():
            try:
                raise ZeroDivisionError("division by zero")
            except ZeroDivisionError:
                log.failure("persist for {channel} failed", channel="r9")

        record = self.line(emit)
        self.flushLoggedErrors(ZeroDivisionError)
        self.assertEqual(record["message"], "persist for r9 failed")
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertEqual(record["level"], "critical")

    def test_values_that_are_not_json(self):
        log = Logger()
        record = self.line(lambda: log.info("x", error=ValueError("bad"), items=(1, "a"),
                                            mapping={1: object}, number=float("nan")))
        self.assertEqual(record["error"], "ValueError('bad')")
        self.assertEqual(record["items"], [1, "a"])
        self.assertEqual(record["mapping"], {"1": repr(object)})
        self.assertEqual(record["number"], "nan")

    def test_secret_fields_and_envelope_names(self):
        log = Logger()
        record = self.line(lambda: log.info("connecting", password="hunter2-x",
                                            redis_password="p-2", http_token="t-3",
                                            namespace="a field", time=5))
        self.assertEqual((record["password"], record["redis_password"], record["http_token"]),
                         ("***", "***", "***"))
        self.assertNotIn("hunter2", json.dumps(record))
        self.assertEqual(record["message"], "connecting")
        self.assertEqual((record["field_namespace"], record["field_time"]), ("a field", 5))

    def test_legacy_log_events(self):
        """adbapi and Twisted's older parts log through twisted.python.log."""
        record = self.line(lambda: legacy_log.msg("Rollback failed", system="adbapi"))
        self.assertEqual(record["message"], "Rollback failed")
        self.assertEqual(record["system"], "adbapi")

    def test_an_event_that_cannot_be_written_is_still_a_line(self):
        class Unprintable:
            def __repr__(self):
                raise RuntimeError("no repr")

        (event,) = captured(lambda: Logger().info("x", thing=Unprintable()))
        record = json.loads(logs._line(event))
        self.assertEqual(record["level"], "error")
        self.assertIn("could not write a log event as JSON", record["message"])


class TwistdHookTests(SynchronousTestCase):
    """The format is chosen by naming our observer as twistd's --logger."""

    def setUp(self):
        self.patch(logs, "_twistd_options", None)

    def parse(self, argv, environ=None, parent=None):
        options = tap.Options(environ=environ or {})
        options.parent = {} if parent is None else parent
        options.parseOptions(argv)
        return options

    def test_json_names_our_observer(self):
        for argv, environ in ((["--log-format", "json"], {}),
                              ([], {"EVENTSOURCE_LOG_FORMAT": "JSON"})):
            options = self.parse(argv, environ)
            self.assertEqual(options.parent["logger"], logs.OBSERVER_NAME)
            self.assertIs(logs._twistd_options, options.parent)

    def test_text_leaves_twistd_alone(self):
        options = self.parse(["--log-format", "text"], {"EVENTSOURCE_LOG_FORMAT": "json"})
        self.assertEqual(options.parent, {})
        self.assertEqual(self.parse([]).parent, {})

    def test_conflicts(self):
        error = self.assertRaises(UsageError, self.parse, ["--log-format=json"],
                                  parent={"syslog": True})
        self.assertIn("syslog", str(error))
        error = self.assertRaises(UsageError, self.parse, ["--log-format=json"],
                                  parent={"logger": "my.observer"})
        self.assertIn("--logger", str(error))

    def test_bad_format(self):
        error = self.assertRaises(UsageError, self.parse, ["--log-format=xml"])
        self.assertEqual(str(error), "--log-format must be text or json, not 'xml'.")

    def test_twistd_resolves_the_name(self):
        """twistd's own option parsing turns the name into the factory."""
        from twisted.scripts.twistd import ServerOptions

        options = ServerOptions()
        options.parseOptions(["-n", "eventsource", "--log-format", "json"])
        self.assertIs(options["logger"], logs.json_observer)

    def test_where_the_lines_go(self):
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(logs, "_twistd_options", {"nodaemon": True, "logfile": None})
        observer = logs.json_observer()
        observer({"log_format": "hello {who}", "who": "stdout", "log_level": LogLevel.info,
                  "log_time": 0.0, "log_namespace": "t"})
        self.assertEqual(json.loads(out.getvalue())["message"], "hello stdout")
        folder = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, folder)
        path = os.path.join(folder, "server.log")
        self.patch(logs, "_twistd_options", {"nodaemon": False, "logfile": path})
        self.patch(signal, "signal", lambda *args: None)  # (no handler left behind)
        observer = logs.json_observer()
        observer({"log_format": "to a file", "log_level": LogLevel.warn, "log_time": 0.0})
        with open(path) as f:
            self.assertEqual(json.loads(f.read())["level"], "warn")
        self.patch(logs, "_twistd_options", {"nodaemon": False, "logfile": "-"})
        self.assertRaises(SystemExit, logs.json_observer)


class TwistdJSONLogTests(TestCase):
    """The real command writes JSON lines only, from its first line to its last."""

    timeout = 60

    @defer.inlineCallbacks
    def test_twistd_writes_json_lines(self):
        database = unique("es_test")
        self.addCleanup(sql, f"DROP DATABASE IF EXISTS `{database}`")
        output = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.addCleanup(os.unlink, output.name)
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(("REDIS_", "MYSQL_", "EVENTSOURCE_"))}
        env.update(PYTHONPATH=HERE, EVENTSOURCE_LOG_FORMAT="json", EVENTSOURCE_HTTP_PORT="0")
        command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                   "-n", "--pidfile=", "eventsource", "--table", f"{database}.event",
                   "--channel-prefix", unique("t") + ":",
                   "--redis-host", REDIS_HOST, "--redis-port", str(REDIS_PORT),
                   "--mysql-host", MYSQL["host"], "--mysql-port", str(MYSQL["port"]),
                   "--mysql-user", MYSQL["user"]]
        process = subprocess.Popen(command, cwd=HERE, env=env, stdout=output,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def kill():
            if process.poll() is None:
                process.kill()
                process.wait()

        self.addCleanup(kill)

        def records():
            with open(output.name) as f:
                return [json.loads(line) for line in f if line.strip()]

        def serving():
            return process.poll() is not None or any(
                record["message"].startswith("eventsource serving") for record in records())

        yield wait_until(serving, timeout=WAIT, what="twistd to serve")
        self.assertIsNone(process.poll(), open(output.name).read())
        (http,) = [r for r in records() if r.get("namespace") == "eventsource.http"]
        port = int(http["address"].rsplit(":", 1)[1])
        response = yield Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{port}/health/ready".encode())
        self.assertEqual((response.code, (yield readBody(response))), (200, b"ready\n"))
        process.send_signal(signal.SIGTERM)
        yield wait_until(lambda: process.poll() is not None, what="twistd to exit")
        self.assertEqual(process.returncode, 0)
        found = records()  # (every line is JSON, or this raises)
        self.assertEqual(found[0]["namespace"], "twisted.scripts._twistd_unix.UnixAppLogger")
        self.assertEqual(found[-1]["message"], "Server Shut Down.")
        (start,) = [r for r in found if r["message"].startswith("eventsource serving")]
        self.assertEqual((start["table"], start["redis_port"]), (f"{database}.event", REDIS_PORT))
        self.assertEqual(start["format"].split(" on ")[0], "eventsource serving {table}")
        levels = {r["level"] for r in found}
        self.assertLessEqual(levels, {"debug", "info", "warn", "error", "critical"})
