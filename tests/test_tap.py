"""
Tests for L{eventsource.tap}: the whole parsed L{Config} for each way a
setting can arrive, and the sentence each bad value produces.
"""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from twisted.application.service import IService
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from eventsource import tap
from eventsource.config import Config

CHECKOUT = Path(__file__).resolve().parent.parent

#: every setting in the environment, none at its default
ENVIRON = {
    "REDIS_HOST": "redis.example",
    "REDIS_PORT": "6380",
    "REDIS_USER": "es",
    "REDIS_PASS": "redis-secret",
    "REDIS_TLS": "yes",
    "REDIS_TLS_CA": "/tls/redis-ca.pem",
    "REDIS_TLS_CERT": "/tls/redis-cert.pem",
    "REDIS_TLS_KEY": "/tls/redis-key.pem",
    "EVENTSOURCE_CHANNEL_PREFIX": "staging:",
    "EVENTSOURCE_TENANTS": "on",
    "EVENTSOURCE_REPLY_CHANNELS": "staging:*",
    "MYSQL_HOST": "db.example",
    "MYSQL_PORT": "3307",
    "MYSQL_USER": "events",
    "MYSQL_PASS": "mysql-secret",
    "MYSQL_CHAR": "utf8mb3",
    "MYSQL_TLS_CA": "/tls/db-ca.pem",
    "MYSQL_TLS_CERT": "/tls/db-cert.pem",
    "MYSQL_TLS_KEY": "/tls/db-key.pem",
    "MYSQL_TLS_VERIFY": "true",
    "EVENTSOURCE_POOL_SIZE": "4",
    "EVENTSOURCE_TABLE": "store.events$2",
    "EVENTSOURCE_ROW_TIMEOUT": "0.25",
    "EVENTSOURCE_PAGE_SIZE": "500",
    "EVENTSOURCE_MAX_WINDOW": "50",
    "EVENTSOURCE_PAGE_BYTES": "300000",
    "EVENTSOURCE_MAX_WINDOW_BYTES": "400000",
    "EVENTSOURCE_MAX_ECHO_BYTES": "500000",
    "EVENTSOURCE_MAX_BODY_BYTES": "65536",
    "EVENTSOURCE_MAX_STREAMS": "20",
    "EVENTSOURCE_MAX_DOCUMENTS": "30",
    "EVENTSOURCE_MAX_QUERY_DEPTH": "4",
    "EVENTSOURCE_MAX_QUERY_TERMS": "40",
    "EVENTSOURCE_MAX_IN_LIST": "60",
    "EVENTSOURCE_MAX_SUBSCRIPTIONS": "70",
    "EVENTSOURCE_MAX_SUBSCRIPTION_BYTES": "80000",
    "EVENTSOURCE_HEARTBEAT": "9",
    "EVENTSOURCE_TAIL_INTERVAL": "0.05",
    "EVENTSOURCE_READ_ONLY": "1",
    "EVENTSOURCE_REPLICAS": "yes",
    "EVENTSOURCE_CLAIM_TTL": "30",
    "EVENTSOURCE_WRITER_LEASE": "3",
    "REDIS_MAX_DELAY": "0.5",
    "REDIS_TIMEOUT": "4.5",
    "REDIS_SENTINELS": "s1.example:26379, s2.example:26380,[::1]:26381",
    "REDIS_MASTER_NAME": "events",
    "MYSQL_TIMEOUT": "30",
    "EVENTSOURCE_MAX_STATEMENT_TIME": "0",
    "EVENTSOURCE_SHUTDOWN_TIMEOUT": "4",
    "EVENTSOURCE_HTTP_PORT": "9100",
    "EVENTSOURCE_HTTP_INTERFACE": "0.0.0.0",
    "EVENTSOURCE_HTTP_TOKEN": "env-token-0123456789",
    "EVENTSOURCE_LOG_FORMAT": "json",
}

#: the Config that ENVIRON describes
ENVIRON_CONFIG = Config(
    redis_host="redis.example",
    redis_port=6380,
    redis_user="es",
    redis_password="redis-secret",
    redis_tls=True,
    redis_tls_ca="/tls/redis-ca.pem",
    redis_tls_cert="/tls/redis-cert.pem",
    redis_tls_key="/tls/redis-key.pem",
    channel_prefix="staging:",
    tenants=True,
    reply_channels="staging:*",
    mysql_host="db.example",
    mysql_port=3307,
    mysql_user="events",
    mysql_password="mysql-secret",
    mysql_charset="utf8mb3",
    mysql_tls_ca="/tls/db-ca.pem",
    mysql_tls_cert="/tls/db-cert.pem",
    mysql_tls_key="/tls/db-key.pem",
    mysql_tls_verify=True,
    pool_size=4,
    table="store.events$2",
    row_timeout=0.25,
    page_size=500,
    max_window=50,
    page_bytes=300000,
    max_window_bytes=400000,
    max_echo_bytes=500000,
    max_body_bytes=65536,
    max_streams=20,
    max_documents=30,
    max_query_depth=4,
    max_query_terms=40,
    max_in_list=60,
    max_subscriptions=70,
    max_subscription_bytes=80000,
    heartbeat=9.0,
    tail_interval=0.05,
    read_only=True,
    replicas=True,
    claim_ttl=30.0,
    writer_lease=3.0,
    redis_max_delay=0.5,
    redis_timeout=4.5,
    redis_sentinels=(("s1.example", 26379), ("s2.example", 26380), ("::1", 26381)),
    redis_master_name="events",
    mysql_timeout=30.0,
    max_statement_time=0.0,
    shutdown_timeout=4.0,
    http_port=9100,
    http_interface="0.0.0.0",
    http_token="env-token-0123456789",
    log_format="json",
)

#: every setting on the command line, none at its default nor as in ENVIRON
ARGV = [
    "--redis-host=10.1.1.1",
    "--redis-port=7000",
    "--redis-user=cli",
    "--redis-password=cli-redis",
    "--redis-tls",
    "--redis-tls-ca=ca1",
    "--redis-tls-cert=cert1",
    "--redis-tls-key=key1",
    "--channel-prefix=cli.",
    "--tenants",
    "--reply-channels=cli.reply.[a-z]*",
    "--mysql-host=10.2.2.2",
    "--mysql-port=3310",
    "--mysql-user=writer",
    "--mysql-password=cli-mysql",
    "--mysql-charset=latin1",
    "--mysql-tls-ca=ca2",
    "--mysql-tls-cert=cert2",
    "--mysql-tls-key=key2",
    "--mysql-tls-verify",
    "--pool-size=2",
    "--table=other_db.ev",
    "--row-timeout=12",
    "--page-size=100",
    "--max-window=10",
    "--page-bytes=2000",
    "--max-window-bytes=3000",
    "--max-echo-bytes=4000",
    "--max-body-bytes=1024",
    "--max-streams=3",
    "--max-documents=5",
    "--max-query-depth=6",
    "--max-query-terms=7",
    "--max-in-list=8",
    "--max-subscriptions=9",
    "--max-subscription-bytes=10000",
    "--heartbeat=30",
    "--tail-interval=0.5",
    "--read-only",
    "--replicas",
    "--claim-ttl=2.5",
    "--writer-lease=1.5",
    "--redis-max-delay=1.5",
    "--redis-timeout=2.5",
    "--redis-sentinels=10.3.3.3",
    "--redis-master-name=cli-master",
    "--mysql-timeout=90",
    "--max-statement-time=2.5",
    "--shutdown-timeout=20",
    "--http-port=0",
    "--http-interface=::1",
    "--http-token=cli-token-abcdefghij",
    "--log-format=text",
]

#: the Config that ARGV describes
ARGV_CONFIG = Config(
    redis_host="10.1.1.1",
    redis_port=7000,
    redis_user="cli",
    redis_password="cli-redis",
    redis_tls=True,
    redis_tls_ca="ca1",
    redis_tls_cert="cert1",
    redis_tls_key="key1",
    channel_prefix="cli.",
    tenants=True,
    reply_channels="cli.reply.[a-z]*",
    mysql_host="10.2.2.2",
    mysql_port=3310,
    mysql_user="writer",
    mysql_password="cli-mysql",
    mysql_charset="latin1",
    mysql_tls_ca="ca2",
    mysql_tls_cert="cert2",
    mysql_tls_key="key2",
    mysql_tls_verify=True,
    pool_size=2,
    table="other_db.ev",
    row_timeout=12.0,
    page_size=100,
    max_window=10,
    page_bytes=2000,
    max_window_bytes=3000,
    max_echo_bytes=4000,
    max_body_bytes=1024,
    max_streams=3,
    max_documents=5,
    max_query_depth=6,
    max_query_terms=7,
    max_in_list=8,
    max_subscriptions=9,
    max_subscription_bytes=10000,
    heartbeat=30.0,
    tail_interval=0.5,
    read_only=True,
    replicas=True,
    claim_ttl=2.5,
    writer_lease=1.5,
    redis_max_delay=1.5,
    redis_timeout=2.5,
    redis_sentinels=(("10.3.3.3", 26379),),
    redis_master_name="cli-master",
    mysql_timeout=90.0,
    max_statement_time=2.5,
    shutdown_timeout=20.0,
    http_port=0,
    http_interface="::1",
    http_token="cli-token-abcdefghij",
    log_format="text",
)

#: options whose value must be a whole number of at least 1
POSITIVE_INTS = [s for s in tap.SETTINGS if s.coerce is tap.positive_int]
PORTS = [s for s in tap.SETTINGS if s.coerce is tap.port]
FLAGS = [s for s in tap.SETTINGS if s.flag]


def parse(argv=(), environ=None):
    """Parse C{argv} against C{environ} (empty by default); return the Config."""
    options = tap.Options(environ={} if environ is None else environ)
    options.parseOptions(list(argv))
    return options.config


class ConfigTests(SynchronousTestCase):
    """
    L{tap.Options} builds the whole L{Config} from the command line, the
    environment and the defaults, in that order of precedence.
    """

    def test_fixtures_cover_every_setting(self):
        """
        ENVIRON and ARGV set every setting, each to a value that is neither
        the default nor the other's, so the tests below can see precedence.
        """
        self.assertEqual(set(ENVIRON), {s.env for s in tap.SETTINGS})
        self.assertEqual({arg[2:].split("=")[0] for arg in ARGV}, {s.option for s in tap.SETTINGS})
        for setting in tap.SETTINGS:
            values = [getattr(c, setting.field) for c in (Config(), ENVIRON_CONFIG, ARGV_CONFIG)]
            if setting.flag:
                self.assertEqual(values, [False, True, True], setting.option)
            elif setting.coerce is tap.log_format:  # (two values only)
                self.assertEqual(values, ["text", "json", "text"], setting.option)
            else:
                self.assertEqual(len(set(values)), 3, setting.option)

    def test_defaults(self):
        """With nothing given, every setting is the Config default."""
        self.assertEqual(parse(), Config())

    def test_environment(self):
        """Every setting can come from its environment variable."""
        self.assertEqual(parse(environ=ENVIRON), ENVIRON_CONFIG)

    def test_command_line(self):
        """Every setting can come from its option."""
        self.assertEqual(parse(ARGV), ARGV_CONFIG)

    def test_command_line_over_environment(self):
        """An option given on the command line wins over its variable."""
        self.assertEqual(parse(ARGV, ENVIRON), ARGV_CONFIG)

    def test_mixed(self):
        """Settings not on the command line still come from the environment."""
        config = parse(["--redis-port=7000", "--table=a.b"], ENVIRON)
        self.assertEqual(config, replace(ENVIRON_CONFIG, redis_port=7000, table="a.b"))

    def test_flag_over_false_environment(self):
        """A flag given on the command line wins over a variable saying no."""
        environ = {s.env: "no" for s in FLAGS}
        argv = [f"--{s.option}" for s in FLAGS]
        self.assertEqual(parse(environ=environ), Config())
        self.assertEqual(
            parse(argv, environ),
            Config(redis_tls=True, mysql_tls_verify=True, read_only=True, tenants=True,
                   replicas=True),
        )

    def test_boolean_words(self):
        """Flag variables take 1/true/yes/on and 0/false/no/off, in any case."""
        for word in ["1", "true", "YES", "On", " yes "]:
            self.assertEqual(parse(environ={"EVENTSOURCE_READ_ONLY": word}).read_only, True)
        for word in ["0", "false", "No", "OFF"]:
            self.assertEqual(parse(environ={"EVENTSOURCE_READ_ONLY": word}).read_only, False)

    def test_empty_variable_is_unset(self):
        """A variable set to the empty string leaves the default."""
        self.assertEqual(parse(environ={name: "" for name in ENVIRON}), Config())

    def test_empty_optional_option_is_none(self):
        """An empty value for a setting that may be left out means none."""
        config = parse(["--redis-user=", "--redis-password="], {"REDIS_USER": "env"})
        self.assertEqual(config, Config())

    def test_os_environ(self):
        """Without an C{environ} argument, the process environment is read."""
        self.patch(os, "environ", {"REDIS_PORT": "6390", "EVENTSOURCE_TABLE": "x.y"})
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options.config, Config(redis_port=6390, table="x.y"))

    def test_unknown_variables_ignored(self):
        """Variables that name no setting change nothing."""
        self.assertEqual(parse(environ={"EVENTSOURCE_NOPE": "1", "PATH": "/bin"}), Config())

    def test_every_config_field_is_a_setting(self):
        """
        Each setting fills a distinct Config field, and every field has a
        setting but the Redis reconnect bound: a new field needs an option.
        """
        config_fields = set(vars(Config()))
        setting_fields = [s.field for s in tap.SETTINGS]
        self.assertEqual(len(setting_fields), len(set(setting_fields)))
        self.assertEqual(config_fields - set(setting_fields), set())
        self.assertEqual(set(setting_fields) - config_fields, set())

    def test_arguments_refused(self):
        """Words that are not options are an error, not silently ignored."""
        self.assertRaises(UsageError, parse, ["stray"])


class ErrorTests(SynchronousTestCase):
    """
    A bad value raises L{UsageError} with one sentence naming the option,
    and the variable when the value came from the environment.
    """

    def assert_message(self, argv, environ, expected):
        error = self.assertRaises(UsageError, parse, argv, environ)
        self.assertEqual(str(error), expected)
        self.assertNotIn("\n", str(error))

    def assert_bad(self, setting, text):
        """
        C{text} is refused for C{setting} from both sources, naming each (an
        empty variable counts as unset, so only the option is tried with it).
        """
        error = self.assertRaises(UsageError, parse, [f"--{setting.option}={text}"])
        self.assertTrue(str(error).startswith(f"--{setting.option} must be "), str(error))
        self.assertIn(repr(text), str(error))
        if not text:
            return
        error = self.assertRaises(UsageError, parse, [], {setting.env: text})
        self.assertTrue(
            str(error).startswith(f"{setting.env} (for --{setting.option}) must be "),
            str(error),
        )

    def test_reply_channels_pattern(self):
        """--reply-channels takes a Redis glob: a malformed one is refused at start."""
        setting = next(s for s in tap.SETTINGS if s.option == "reply-channels")
        for text in ["app[", "app\\", "[^a"]:
            self.assert_bad(setting, text)
        self.assert_message(
            ["--reply-channels=x["], {},
            "--reply-channels must be a Redis glob pattern, but it has an unterminated '[': "
            "'x['.")
        self.assertEqual(parse(["--reply-channels=es:\\*[a-z]?*"]).reply_channels, "es:\\*[a-z]?*")
        self.assertEqual(parse(["--reply-channels="]).reply_channels, None)

    def test_port_messages(self):
        """The whole sentence for a bad port, from each source."""
        self.assert_message(
            ["--redis-port=http"],
            {},
            "--redis-port must be a port number from 1 to 65535, not 'http'.",
        )
        self.assert_message(
            [],
            {"MYSQL_PORT": "70000"},
            "MYSQL_PORT (for --mysql-port) must be a port number from 1 to 65535, not '70000'.",
        )

    def test_ports(self):
        """Ports are whole numbers from 1 to 65535."""
        self.assertEqual(len(PORTS), 2)
        for setting in PORTS:
            for text in ["", "abc", "0", "-1", "65536", "1.5", "6379x"]:
                self.assert_bad(setting, text)
        self.assertEqual(
            parse(["--redis-port=1", "--mysql-port=65535"]), Config(redis_port=1, mysql_port=65535)
        )

    def test_positive_ints(self):
        """Sizes and counts are whole numbers of at least 1."""
        self.assertEqual(len(POSITIVE_INTS), 14)
        for setting in POSITIVE_INTS:
            for text in ["", "x", "0", "-3", "2.5", "1e3"]:
                self.assert_bad(setting, text)
        self.assert_message(
            ["--page-size=0"], {}, "--page-size must be a whole number of at least 1, not '0'."
        )

    def test_row_timeout(self):
        """The row timeout is a finite number of seconds greater than 0."""
        setting = next(s for s in tap.SETTINGS if s.option == "row-timeout")
        for text in ["", "soon", "0", "-1", "nan", "inf", "-inf"]:
            self.assert_bad(setting, text)
        self.assert_message(
            [],
            {"EVENTSOURCE_ROW_TIMEOUT": "0"},
            "EVENTSOURCE_ROW_TIMEOUT (for --row-timeout) must be a number of seconds "
            "greater than 0, not '0'.",
        )
        self.assertEqual(parse(["--row-timeout=0.001"]).row_timeout, 0.001)

    def test_max_statement_time(self):
        """The statement time limit is a finite number of seconds; 0 turns it off."""
        setting = next(s for s in tap.SETTINGS if s.option == "max-statement-time")
        for text in ["", "soon", "-1", "-0.5", "nan", "inf", "-inf"]:
            self.assert_bad(setting, text)
        self.assert_message(
            ["--max-statement-time=-1"], {},
            "--max-statement-time must be a number of seconds (0 for no limit), not '-1'.",
        )
        self.assertEqual(parse([]).max_statement_time, 30.0)
        self.assertEqual(parse(["--max-statement-time=0"]).max_statement_time, 0.0)
        self.assertEqual(parse(["--max-statement-time=0.001"]).max_statement_time, 0.001)

    def test_table(self):
        """The table is database.table, each part of safe identifier characters."""
        setting = next(s for s in tap.SETTINGS if s.option == "table")
        for text in [
            "",
            "events",
            "db.",
            ".t",
            "a.b.c",
            "db.ta-ble",
            "db.t;drop",
            "db.`t`",
            "db .t",
            "d\u00e9.t",
        ]:
            self.assert_bad(setting, text)
        self.assert_message(
            ["--table=events"],
            {},
            "--table must be database.table, each part made of letters, digits, _ or $, "
            "not 'events'.",
        )
        self.assertEqual(parse(["--table=A_1.$b9"]).table, "A_1.$b9")

    def test_http_port(self):
        """The HTTP port is off by default; 0 takes any free port."""
        setting = next(s for s in tap.SETTINGS if s.option == "http-port")
        for text in ["", "http", "-1", "65536", "1.5"]:
            self.assert_bad(setting, text)
        self.assertIsNone(parse([]).http_port)
        self.assertEqual(parse(["--http-port=0"]).http_port, 0)
        self.assertEqual(parse([], {"EVENTSOURCE_HTTP_PORT": "9464"}).http_port, 9464)

    def test_http_interface(self):
        """Loopback by default; an IP address, not a name."""
        setting = next(s for s in tap.SETTINGS if s.option == "http-interface")
        for text in ["", "localhost", "1.2.3", "::g", "127.0.0.1:80"]:
            self.assert_bad(setting, text)
        self.assertEqual(parse([]).http_interface, "127.0.0.1")
        self.assertEqual(parse(["--http-interface= ::1 "]).http_interface, "::1")

    def test_http_token(self):
        """A token long enough not to be guessed, of the characters a header carries as they are."""
        setting = next(s for s in tap.SETTINGS if s.option == "http-token")
        for text in ["short-token", "has spaces in it 0123", "quote\"0123456789abcdef",
                     "\u00e9" * 20]:
            error = self.assertRaises(UsageError, parse, [f"--http-token={text}"])
            self.assertTrue(str(error).startswith("--http-token must be at least 16 "))
            self.assertNotIn(text, str(error))  # (the value is a secret, even when wrong)
            error = self.assertRaises(UsageError, parse, [], {setting.env: text})
            self.assertNotIn(text, str(error))
        self.assertIsNone(parse([]).http_token)
        token = "Abc-._~+/0123456789=="
        self.assertEqual(parse([f"--http-token={token}"]).http_token, token)
        self.assertIsNone(parse(["--http-token="]).http_token)

    def test_redis_sentinels(self):
        """
        Sentinels are HOST:PORT (port 26379 when left out; IPv6 in brackets),
        separated by commas; they come with the master's name, or not at all.
        """
        setting = next(s for s in tap.SETTINGS if s.option == "redis-sentinels")
        for text in ["a:b", "a:0", "a:65536", ":26379", "::1:26379", "[::1", "[::1]x", ","]:
            self.assert_bad(setting, text)
        name = ["--redis-master-name=m"]
        self.assertEqual(parse(["--redis-sentinels=a,b:1,[::1]"] + name).redis_sentinels,
                         (("a", 26379), ("b", 1), ("::1", 26379)))
        self.assertEqual(parse([]).redis_sentinels, ())
        for argv, environ in [(["--redis-sentinels=a:1"], {}), (name, {}),
                              ([], {"REDIS_MASTER_NAME": "m"}),
                              ([], {"REDIS_SENTINELS": "a:1"}),
                              (["--redis-sentinels="], {"REDIS_MASTER_NAME": "m"})]:
            self.assert_message(
                argv, environ,
                "--redis-sentinels and --redis-master-name go together: give both (Redis "
                "behind Sentinel) or neither.")
        config = parse([], {"REDIS_SENTINELS": "a:1", "REDIS_MASTER_NAME": "m"})
        self.assertEqual(config.redis_where, "master m (Sentinels a:1)")

    def test_writer_lease(self):
        """--writer-lease: 0 (off) or 0.5 to 3600 seconds, and only with --replicas."""
        setting = next(s for s in tap.SETTINGS if s.option == "writer-lease")
        for text in ["-1", "0.1", "0.49", "3601", "nan", "inf", "x", ""]:
            self.assert_bad(setting, text)
        self.assertEqual(parse([]).writer_lease, 2.0)
        self.assertEqual(parse(["--replicas", "--writer-lease=0.5"]).writer_lease, 0.5)
        self.assertEqual(parse(["--writer-lease=0"]).writer_lease, 0.0)
        self.assertEqual(parse(["--replicas"], {"EVENTSOURCE_WRITER_LEASE": "2"}).writer_lease,
                         2.0)
        message = ("--writer-lease is a setting of replica mode: give --replicas too (on "
                   "every replica).")
        self.assert_message(["--writer-lease=2"], {}, message)
        self.assert_message([], {"EVENTSOURCE_WRITER_LEASE": "2"}, message)

    def test_bad_boolean_variable(self):
        """A flag variable that is neither yes nor no is an error naming it."""
        for setting in FLAGS:
            self.assert_message(
                [],
                {setting.env: "maybe"},
                f"{setting.env} (for --{setting.option}) must be one of 1/true/yes/on "
                "or 0/false/no/off, not 'maybe'.",
            )

    def test_flag_takes_no_value(self):
        """A flag on the command line takes no value."""
        self.assertRaises(UsageError, parse, ["--read-only=no"])


class HelpTests(SynchronousTestCase):
    """The help and the README tell each option's variable and default."""

    def test_help_names_variables(self):
        """C{--help} text names every option and its variable."""
        text = str(tap.Options())
        for setting in tap.SETTINGS:
            self.assertIn(f"--{setting.option}", text)
            self.assertIn(setting.env, " ".join(text.split()))

    def test_readme_table(self):
        """
        The README's configuration table is L{tap.settings_table}; regenerate
        it with C{make config-table} after changing a setting.
        """
        readme = (CHECKOUT / "README.md").read_text(encoding="utf-8")
        self.assertIn(tap.settings_table(), readme)


class MakeServiceTests(SynchronousTestCase):
    """L{tap.makeService} builds the service from the parsed Config."""

    def test_make_service(self):
        """The result is an unstarted L{EventSourceService}."""
        from eventsource.service import EventSourceService

        options = tap.Options(environ={})
        options.parseOptions(["--redis-port=7001"])
        service = tap.makeService(options)
        self.assertIsInstance(service, EventSourceService)
        self.assertTrue(verifyObject(IService, service))
        self.assertFalse(service.running)


class ImportTests(SynchronousTestCase):
    """Importing the command line side has no side effects."""

    def test_no_reactor(self):
        """
        Neither the drop-in nor L{eventsource.tap} installs a reactor: twistd
        imports both before it picks one.
        """
        code = (
            "import sys\n"
            "import twisted.plugins.eventsource_plugin as p\n"
            "p.EventSource.options(environ={}).parseOptions([])\n"
            "assert 'twisted.internet.reactor' not in sys.modules, 'reactor imported'\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=CHECKOUT,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(CHECKOUT)},
        )
        self.assertEqual(result.returncode, 0, result.stderr)


class SecretTests(SynchronousTestCase):
    def test_repr_of_parsed_options_hides_passwords(self):
        options = tap.Options(environ={"REDIS_PASS": "env-redis-secret",
                                       "EVENTSOURCE_HTTP_TOKEN": "env-http-token-0123"})
        options.parseOptions(["--mysql-password=cli-mysql-secret"])
        text = repr(options) + repr(options.config) + str(options)
        self.assertNotIn("env-redis-secret", text)
        self.assertNotIn("cli-mysql-secret", text)
        self.assertNotIn("env-http-token-0123", text)
        self.assertEqual(options.config.http_token, "env-http-token-0123")
        options = tap.Options(environ={})
        options.parseOptions(["--http-token=cli-http-token-0123"])
        self.assertNotIn("cli-http-token-0123", repr(options) + repr(options.config))
        self.assertIn("mysql-password", repr(options))
