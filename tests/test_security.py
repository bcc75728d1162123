"""
Security, for real: a private ``redis-server`` with ``requirepass``, with
ACL users (the recipes of docs/OPERATIONS.md), with TLS (CA, server and
client certificates made here); a private TLS-only MariaDB for the MySQL TLS
options; the read-only mode; and secrets kept out of the log, ``repr`` of
the settings and the command line's help.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pymysql
import txredisapi
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from eventsource.bus import RedisRefused
from eventsource.config import Config
from eventsource.store import Store
from eventsource.tap import Options
from tests.redis_server import (
    PrivateRedisTestCase,
    RedisServer,
    make_tls_files,
    tls_supported,
)
from tests.support import (
    MYSQL,
    IntegrationTestCase,
    LogCapture,
    WireClient,
    free_port,
    sleep,
    sql,
    unique,
    wait_until,
)

REDIS_SECRET = "redis-s3cret-Zq8!"
MYSQL_SECRET = "mysql-s3cret-Wx4#"
HTTP_SECRET = "http-t0ken-Kp3_Lm7-Vb"

#: docs/OPERATIONS.md, "Version 1 clients and ACLs": the server's user ...
SERVER_ACL = ("user eventsource on >{password} resetkeys resetchannels &* -@all "
              "+subscribe +unsubscribe +publish +ping")
#: ... and a client's: publish on the request channels and on its own reply
#: channels, subscribe only to its own reply channels
CLIENT_ACL = ("user {user} on >{password} resetkeys resetchannels &reply:{user}:* -@all "
              "+subscribe +unsubscribe +publish +ping "
              "(+publish resetchannels &persist &fetch &fetch-next &subscribe)")


def event(pid="sec"):
    return {"pid": pid, "domain": "security", "name": "checked", "data": {"ok": True}}


@defer.inlineCallbacks
def connect_client(redis, user=None, password=None, tls=None, prefix=""):
    """A :class:`WireClient` for ``redis``, with AUTH and TLS as given."""
    client = WireClient(prefix)

    def endpoint():
        plain = HostnameEndpoint(reactor, redis.host, redis.port)
        if tls is None:
            return plain
        ca = ssl.Certificate.loadPEM(open(tls["ca"], "rb").read())
        mine = ssl.PrivateCertificate.loadPEM(
            open(tls["client_cert"], "rb").read() + open(tls["client_key"], "rb").read())
        return wrapClientTLS(ssl.optionsForClientTLS("127.0.0.1", trustRoot=ca,
                                                     clientCertificate=mine), plain)

    from tests.support import _Subscriber

    client._sub_factory = txredisapi.SubscriberFactory()
    client._sub_factory.protocol = _Subscriber
    client._pub_factory = txredisapi.RedisFactory(None, None, 1, convertNumbers=False)
    for factory in (client._sub_factory, client._pub_factory):
        factory.convertNumbers = False
        factory.password = password
        factory.username = user
        factory.client = client
    # (txredisapi drops factory.deferred once it fired: keep hold of both)
    subscribed, publishing = client._sub_factory.deferred, client._pub_factory.deferred
    client._sub_factory.startConnecting(endpoint())
    client._pub_factory.startConnecting(endpoint())
    client.subscriber = yield subscribed
    client.publisher = yield publishing
    return client


class StartFailed:
    """Why the server did not start (a Failure cannot be the result of a Deferred)."""

    def __init__(self, failure):
        self.failure = failure
        self.value = failure.value

    def trap(self, *types):
        return self.failure.trap(*types)

    def getTraceback(self):
        return self.failure.getTraceback()


class SecuredRedisTestCase(PrivateRedisTestCase):
    """A private redis-server made by :meth:`make_redis`; each test starts the server."""

    start_at_setup = False

    @defer.inlineCallbacks
    def start(self, **settings):
        """Start the server; returns it, or :class:`StartFailed` if it could not start."""
        started = time.monotonic()
        try:
            server = yield self.start_server(redis_port=self.redis.port,
                                             **dict(self.server_settings(), **settings))
        except Exception:
            self.start_took = time.monotonic() - started
            return StartFailed(Failure())
        self.start_took = time.monotonic() - started
        return server

    @defer.inlineCallbacks
    def client(self, **kwargs):
        client = yield connect_client(self.redis, **kwargs)
        self.addCleanup(client.disconnect)
        return client

    @defer.inlineCallbacks
    def round_trip(self, client, reply_prefix=""):
        """Persist an event and fetch it back (acceptance by both means)."""
        reply = yield client.persist(event(), channel=unique(reply_prefix + "p"))
        self.assertEqual(reply[0]["affectedRows"], 1)
        messages = yield client.fetch({"$where": {"pid": "sec"}},
                                      channel=unique(reply_prefix + "f"), accept="mixed")
        self.assertEqual(messages[-1], "end")
        self.assertEqual(messages[0]["pid"], "sec")


class RequirePassTests(SecuredRedisTestCase):
    def make_redis(self):
        return RedisServer(self, password=REDIS_SECRET)

    @defer.inlineCallbacks
    def test_serves_with_the_password(self):
        server = yield self.start(redis_password=REDIS_SECRET)
        self.assertTrue(server.bus.connected)
        client = yield self.client(password=REDIS_SECRET)
        yield self.round_trip(client)

    @defer.inlineCallbacks
    def test_wrong_password_fails_the_start_at_once(self):
        log = LogCapture(self)
        result = yield self.start(redis_password="not-" + REDIS_SECRET)
        self.assertIsInstance(result, StartFailed)
        result.trap(RedisRefused)
        self.assertIn("WRONGPASS", str(result.value))
        self.assertLess(self.start_took, 2)
        self.assertNotIn(REDIS_SECRET, "\n".join(log.details()) + str(result.value))
        self.flushLoggedErrors(RedisRefused)
        # it gave up: no connection left, none coming back
        yield sleep(0.5)
        clients = self.redis.cli("CLIENT", "LIST").splitlines()
        self.assertEqual(len(clients), 1, clients)  # redis-cli itself

    @defer.inlineCallbacks
    def test_no_password_fails_the_start(self):
        result = yield self.start()
        self.assertIsInstance(result, StartFailed)
        self.assertIn("NOAUTH", str(result.value))
        self.flushLoggedErrors(RedisRefused)

    @defer.inlineCallbacks
    def test_password_survives_a_restart(self):
        """AUTH is part of every reconnect, not only the first connection."""
        yield self.start(redis_password=REDIS_SECRET)
        yield self.redis.stop()
        yield self.redis.start()
        client = yield self.client(password=REDIS_SECRET)
        for _ in range(300):
            if self.server.bus.connected:
                break
            yield sleep(0.01)
        yield self.round_trip(client)


class ACLTests(SecuredRedisTestCase):
    """The ACL recipes of docs/OPERATIONS.md, on a Redis whose default user is off."""

    def make_redis(self):
        return RedisServer(self, acl=[
            "user default off",
            SERVER_ACL.format(password="server-pass"),
            CLIENT_ACL.format(user="alice", password="alice-pass"),
            CLIENT_ACL.format(user="bob", password="bob-pass"),
        ])

    def server_settings(self):
        return dict(redis_user="eventsource", redis_password="server-pass")

    @defer.inlineCallbacks
    def test_restricted_clients_can_persist_and_fetch(self):
        yield self.start()
        for user in ("alice", "bob"):
            client = yield self.client(user=user, password=f"{user}-pass")
            yield self.round_trip(client, reply_prefix=f"reply:{user}:")

    @defer.inlineCallbacks
    def test_restricted_client_cannot_go_elsewhere(self):
        yield self.start()
        alice = yield self.client(user="alice", password="alice-pass")
        refused = []
        for attempt in (
            alice.publisher.publish("some-other-channel", "x"),
            alice.publisher.publish("reply:bob:1", '"end"'),   # another client's stream
            alice.publisher.execute_command("SET", "key", "value"),
            alice.publisher.execute_command("PSUBSCRIBE", "*"),
            alice.subscriber.subscribe("persist"),              # eavesdrop on every request
            alice.subscriber.subscribe("reply:bob:1"),
        ):
            try:
                yield attempt
            except txredisapi.ResponseError as error:
                refused.append(str(error))
        self.assertEqual(len(refused), 6, refused)
        self.assertTrue(all("NOPERM" in text for text in refused), refused)
        # still a working client
        alice = yield self.client(user="alice", password="alice-pass")
        yield self.round_trip(alice, reply_prefix="reply:alice:")

    @defer.inlineCallbacks
    def test_server_user_can_do_nothing_else(self):
        yield self.start()
        for command in (["SET", "k", "v"], ["KEYS", "*"], ["CONFIG", "GET", "*"],
                        ["FLUSHALL"], ["PSUBSCRIBE", "*"]):
            self.assertIn("NOPERM", self.redis.cli(*command, user="eventsource",
                                                   password="server-pass"))

    @defer.inlineCallbacks
    def test_server_with_a_client_user_cannot_start(self):
        """A server given a client's user (no SUBSCRIBE on persist) refuses to start."""
        result = yield self.start(redis_user="alice", redis_password="alice-pass")
        self.assertIsInstance(result, StartFailed)
        self.assertIn("NOPERM", str(result.value))
        self.flushLoggedErrors(RedisRefused)

    @defer.inlineCallbacks
    def test_wrong_acl_password(self):
        result = yield self.start(redis_password="wrong")
        self.assertIsInstance(result, StartFailed)
        self.assertIn("WRONGPASS", str(result.value))
        self.flushLoggedErrors(RedisRefused)


class TLSTests(SecuredRedisTestCase):
    """Redis over TLS only, requiring a client certificate (and an ACL user, for good measure)."""

    def make_redis(self):
        if not tls_supported():
            raise SkipTest("this redis-server has no TLS support")
        folder = tempfile.mkdtemp(prefix="es-tls-")
        self.addCleanup(shutil.rmtree, folder, True)
        self.tls = make_tls_files(folder)
        return RedisServer(self, tls=self.tls, tls_auth_clients="yes", acl=[
            "user default off", SERVER_ACL.format(password="server-pass"),
            CLIENT_ACL.format(user="alice", password="alice-pass")])

    def server_settings(self):
        return dict(redis_tls=True, redis_tls_ca=self.tls["ca"],
                    redis_tls_cert=self.tls["client_cert"], redis_tls_key=self.tls["client_key"],
                    redis_user="eventsource", redis_password="server-pass")

    @defer.inlineCallbacks
    def test_serves_over_tls(self):
        server = yield self.start()
        self.assertTrue(server.bus.connected)
        client = yield self.client(user="alice", password="alice-pass", tls=self.tls)
        yield self.round_trip(client, reply_prefix="reply:alice:")

    @defer.inlineCallbacks
    def test_tls_survives_a_restart(self):
        yield self.start()
        yield self.redis.stop()
        yield self.redis.start()
        for _ in range(300):
            if self.server.bus.connected:
                break
            yield sleep(0.01)
        self.assertTrue(self.server.bus.connected)
        client = yield self.client(user="alice", password="alice-pass", tls=self.tls)
        yield self.round_trip(client, reply_prefix="reply:alice:")

    @defer.inlineCallbacks
    def test_untrusted_server_certificate_fails_the_start(self):
        result = yield self.start(redis_tls_ca=self.tls["other_ca"])
        self.assertIsInstance(result, StartFailed)
        self.assertIn("TLS", str(result.value))
        self.assertLess(self.start_took, 5)
        self.flushLoggedErrors(RedisRefused)

    @defer.inlineCallbacks
    def test_without_client_certificate_fails_the_start(self):
        result = yield self.start(redis_tls_cert=None, redis_tls_key=None)
        self.assertIsInstance(result, StartFailed)
        self.assertLess(self.start_took, 5)
        self.flushLoggedErrors(RedisRefused)

    @defer.inlineCallbacks
    def test_plain_connection_to_tls_port_says_so(self):
        """Indistinguishable from a Redis going down mid-handshake: retried, with a warning."""
        log = LogCapture(self)
        self.start(redis_tls=False)
        yield sleep(1.0)
        self.assertFalse(self.server.ready.called)
        self.assertFalse(self.server.bus.connected)
        self.assertTrue([text for text in log.details() if "a TLS port without --redis-tls" in text])


# -- MySQL TLS ------------------------------------------------------------------


class PrivateMariaDB:
    """A throw-away ``mariadbd`` that accepts TLS connections only."""

    def __init__(self, testcase, tls):
        self.folder = tempfile.mkdtemp(prefix="es-mariadb-")
        testcase.addCleanup(shutil.rmtree, self.folder, True)
        testcase.addCleanup(self.stop)
        self.port = free_port()
        self.tls = tls
        self.process = None

    def start(self):
        data = os.path.join(self.folder, "data")
        # (temporary tables in a folder of its own: two of these, or a Galera
        # node, installing at once in /tmp collided on #sql-temptable names)
        scratch = os.path.join(self.folder, "tmp")
        os.makedirs(scratch, exist_ok=True)
        out = subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db",
             f"--tmpdir={scratch}"],
            capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise SkipTest(f"mariadb-install-db failed: {out.stderr[-500:]}")
        self.log = os.path.join(self.folder, "error.log")
        self.process = subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--datadir={data}", "--user=root",
             f"--tmpdir={scratch}", f"--port={self.port}", "--bind-address=127.0.0.1",
             f"--socket={os.path.join(self.folder, 'sock')}",
             f"--pid-file={os.path.join(self.folder, 'pid')}", f"--log-error={self.log}",
             f"--ssl-ca={self.tls['ca']}", f"--ssl-cert={self.tls['server_cert']}",
             f"--ssl-key={self.tls['server_key']}", "--require-secure-transport=ON",
             "--innodb-buffer-pool-size=16M", "--skip-log-bin"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SkipTest(f"mariadbd exited: {open(self.log).read()[-800:]}")
            if os.path.exists(self.log) and "ready for connections" in open(self.log).read():
                return
            time.sleep(0.05)
        raise RuntimeError("mariadbd did not start")

    def stop(self):
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def sql(self, statement):
        connection = pymysql.connect(host="127.0.0.1", port=self.port, user="root",
                                     ssl_ca=self.tls["ca"], autocommit=True)
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement)
                return cursor.fetchall()
        finally:
            connection.close()


class MySQLTLSTests(SecuredRedisTestCase):
    """
    The server's MySQL TLS options against a private MariaDB that refuses
    anything but TLS, with a user that must present a client certificate.
    """

    @defer.inlineCallbacks
    def setUp(self):
        if shutil.which("mariadbd") is None or shutil.which("mariadb-install-db") is None:
            raise SkipTest("no mariadbd here")
        yield super().setUp()
        folder = tempfile.mkdtemp(prefix="es-mysql-tls-")
        self.addCleanup(shutil.rmtree, folder, True)
        self.tls = make_tls_files(folder)
        self.mariadb = PrivateMariaDB(self, self.tls)
        self.mariadb.start()
        self.mariadb.sql(f"CREATE USER 'es'@'%' IDENTIFIED BY '{MYSQL_SECRET}' REQUIRE X509")
        self.mariadb.sql("GRANT ALL ON *.* TO 'es'@'%'")
        self.mariadb.sql("CREATE USER 'es'@'localhost' IDENTIFIED BY "
                         f"'{MYSQL_SECRET}' REQUIRE X509")
        self.mariadb.sql("GRANT ALL ON *.* TO 'es'@'localhost'")

    def server_settings(self):
        return dict(mysql_host="127.0.0.1", mysql_port=self.mariadb.port, mysql_user="es",
                    mysql_password=MYSQL_SECRET, mysql_tls_ca=self.tls["ca"],
                    mysql_tls_cert=self.tls["client_cert"], mysql_tls_key=self.tls["client_key"],
                    mysql_tls_verify=True)

    @defer.inlineCallbacks
    def test_verified_tls_with_client_certificate(self):
        yield self.start()
        client = yield self.client()
        yield self.round_trip(client)

    @defer.inlineCallbacks
    def test_untrusted_server_certificate_is_refused(self):
        result = yield self.start(mysql_tls_ca=self.tls["other_ca"])
        self.assertIsInstance(result, StartFailed)
        self.assertIn("CERTIFICATE_VERIFY_FAILED", str(result.value))
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_unverified_tls_still_encrypts(self):
        """Without --mysql-tls-verify the certificate is not checked, but TLS is used."""
        yield self.start(mysql_tls_ca=self.tls["other_ca"], mysql_tls_verify=False)
        client = yield self.client()
        yield self.round_trip(client)

    @defer.inlineCallbacks
    def test_without_client_certificate_is_refused(self):
        result = yield self.start(mysql_tls_cert=None, mysql_tls_key=None)
        self.assertIsInstance(result, StartFailed)
        self.assertNotIn(MYSQL_SECRET, str(result.value))
        self.flushLoggedErrors()


class MySQLTLSOptionsTests(SynchronousTestCase):
    """What the options become in pymysql's TLS context (no server needed)."""

    def setUp(self):
        folder = tempfile.mkdtemp(prefix="es-tls-")
        self.addCleanup(shutil.rmtree, folder, True)
        self.tls = make_tls_files(folder)

    def context(self, **settings):
        import ssl as stdlib_ssl

        kwargs = Store(Config(**settings), None)._connect_kwargs()
        connection = pymysql.connections.Connection(defer_connect=True, **kwargs)
        self.assertTrue(connection.ssl)
        return connection.ctx, stdlib_ssl

    def test_verify(self):
        ctx, stdlib_ssl = self.context(mysql_tls_ca=self.tls["ca"], mysql_tls_verify=True)
        self.assertEqual(ctx.verify_mode, stdlib_ssl.CERT_REQUIRED)
        self.assertTrue(ctx.check_hostname)
        self.assertEqual(len(ctx.get_ca_certs()), 1)  # our CA, not the system's

    def test_no_verify(self):
        ctx, stdlib_ssl = self.context(mysql_tls_ca=self.tls["ca"])
        self.assertEqual(ctx.verify_mode, stdlib_ssl.CERT_NONE)
        self.assertFalse(ctx.check_hostname)

    def test_verify_with_the_system_trust_store(self):
        ctx, stdlib_ssl = self.context(mysql_tls_verify=True)
        self.assertEqual(ctx.verify_mode, stdlib_ssl.CERT_REQUIRED)
        self.assertTrue(ctx.check_hostname)

    def test_no_tls_options_no_tls_required(self):
        kwargs = Store(Config(), None)._connect_kwargs()
        self.assertNotIn("ssl", kwargs)


# -- read-only --------------------------------------------------------------------


class ReadOnlyTests(IntegrationTestCase):
    server_config = {"read_only": True}

    @defer.inlineCallbacks
    def test_persist_refused_fetch_served(self):
        self.insert_events(3, pid="ro")
        reply = yield self.client.persist(event())
        self.assertEqual(reply, ["error", "end"])
        reply = yield self.client.persist([event(), event()])
        self.assertEqual(reply, ["error", "end"])
        self.assertEqual(len(self.rows(where="WHERE pid = 'sec'")), 0)
        messages = yield self.client.fetch({"$where": {"pid": "ro"}})
        self.assertEqual(len(messages), 4)
        self.assertEqual(messages[-1], "end")

    @defer.inlineCallbacks
    def test_with_a_select_only_database_user(self):
        """A read-only server may run as a MariaDB user that can only SELECT."""
        self.insert_events(2, pid="ro")
        user = unique("es_ro")[:32]
        for host in ("%", "localhost"):
            sql(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY 'ro-pass'")
            sql(f"GRANT SELECT ON `{self.database}`.* TO '{user}'@'{host}'")
            self.addCleanup(sql, f"DROP USER IF EXISTS '{user}'@'{host}'")
        yield self.server.stopService()
        yield self.start_server(read_only=True, mysql_user=user, mysql_password="ro-pass")
        messages = yield self.client.fetch({"$where": {"pid": "ro"}})
        self.assertEqual(len(messages), 3)
        reply = yield self.client.persist(event())
        self.assertEqual(reply, ["error", "end"])


# -- secrets ----------------------------------------------------------------------


class SecretsTests(SecuredRedisTestCase):
    """Passwords never reach the log, ``repr`` of the settings or the help."""

    def make_redis(self):
        return RedisServer(self, password=REDIS_SECRET)

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.user = unique("es_sec")[:32]
        for host in ("%", "localhost"):
            sql(f"CREATE USER '{self.user}'@'{host}' IDENTIFIED BY '{MYSQL_SECRET}'")
            sql(f"GRANT ALL ON `{self.database}`.* TO '{self.user}'@'{host}'")
            self.addCleanup(sql, f"DROP USER IF EXISTS '{self.user}'@'{host}'")

    def server_settings(self):
        return dict(redis_password=REDIS_SECRET, mysql_user=self.user,
                    mysql_password=MYSQL_SECRET, http_port=0, http_token=HTTP_SECRET)

    def assertNoSecret(self, text):
        self.assertNotIn(REDIS_SECRET, text)
        self.assertNotIn(MYSQL_SECRET, text)
        self.assertNotIn(HTTP_SECRET, text)

    @defer.inlineCallbacks
    def scrape(self, port, token):
        from tests.test_http import http_request

        status, _, body = yield http_request(port, "/metrics",
                                             headers={"Authorization": f"Bearer {token}"})
        return status, body.decode()

    @defer.inlineCallbacks
    def test_start_serve_restart_and_stop_log_no_secret(self):
        log = LogCapture(self)
        server = yield self.start()
        client = yield self.client(password=REDIS_SECRET)
        yield self.round_trip(client)
        port = server.getServiceNamed("http").port
        for token in (HTTP_SECRET, "wrong-" + HTTP_SECRET):
            status, metrics = yield self.scrape(port, token)
            self.assertNoSecret(metrics)
        self.assertEqual(status, 401)
        yield self.redis.stop()
        yield self.redis.start()
        for _ in range(300):
            if server.bus.connected:
                break
            yield sleep(0.01)
        yield server.stopService()
        self.assertGreater(len(log), 5)
        self.assertTrue(any("serving" in text for text in log.details()))
        self.assertNoSecret("\n".join(log.details()))

    @defer.inlineCallbacks
    def test_failed_starts_log_no_secret(self):
        log = LogCapture(self)
        for settings in (dict(redis_password="wrong-" + REDIS_SECRET),
                         dict(mysql_password="wrong-" + MYSQL_SECRET)):
            result = yield self.start(**settings)
            self.assertIsInstance(result, StartFailed)
            self.assertNoSecret(str(result.value))
            self.assertNoSecret(result.getTraceback())
        self.assertNoSecret("\n".join(log.details()))
        self.flushLoggedErrors()

    def test_repr_of_settings(self):
        config = Config(redis_password=REDIS_SECRET, mysql_password=MYSQL_SECRET)
        self.assertNoSecret(repr(config))
        self.assertNoSecret(str(config))
        self.assertEqual(config.redis_password, REDIS_SECRET)

    @defer.inlineCallbacks
    def test_json_log_of_twistd_holds_no_secret(self):
        """``twistd eventsource --log-format json``, every secret on its command line."""
        output = os.path.join(self.redis.folder, "twistd.json")
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(("REDIS_", "MYSQL_", "EVENTSOURCE_"))}
        command = [__import__("sys").executable, "-c",
                   "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
                   "eventsource", "--log-format", "json", "--table", self.table,
                   "--redis-port", str(self.redis.port), "--redis-password", REDIS_SECRET,
                   "--mysql-host", MYSQL["host"], "--mysql-port", str(MYSQL["port"]),
                   "--mysql-user", self.user, "--mysql-password", MYSQL_SECRET,
                   "--http-port", "0", "--http-token", HTTP_SECRET]
        with open(output, "w") as out:
            process = subprocess.Popen(command, cwd=here, env=dict(env, PYTHONPATH=here),
                                       stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        self.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait()))

        def records():
            with open(output) as f:
                return [json.loads(line) for line in f if line.strip()]

        yield wait_until(lambda: process.poll() is not None or any(
            r["message"].startswith("eventsource serving") for r in records()),
            what="twistd to serve")
        self.assertIsNone(process.poll())
        client = yield self.client(password=REDIS_SECRET)
        yield self.round_trip(client)
        (http,) = [r for r in records() if r.get("namespace") == "eventsource.http"]
        port = int(http["address"].rsplit(":", 1)[1])
        status, metrics = yield self.scrape(port, HTTP_SECRET)
        self.assertEqual(status, 200)
        self.assertIn("eventsource_events_written_total 1.0", metrics)
        status, _ = yield self.scrape(port, "wrong-" + HTTP_SECRET)
        self.assertEqual(status, 401)
        process.send_signal(signal.SIGTERM)
        yield wait_until(lambda: process.poll() is not None, what="twistd to exit")
        self.assertEqual(process.returncode, 0)
        found = records()
        self.assertGreater(len(found), 5)
        with open(output) as f:
            self.assertNoSecret(f.read())

    def test_options_and_help(self):
        environ = {"REDIS_PASS": REDIS_SECRET, "MYSQL_PASS": MYSQL_SECRET,
                   "EVENTSOURCE_HTTP_TOKEN": HTTP_SECRET}
        options = Options(environ=environ)
        options.parseOptions([])
        self.assertEqual(options.config.redis_password, REDIS_SECRET)
        self.assertNoSecret(repr(options.config))
        self.assertNoSecret(str(options))  # the help text
        options = Options(environ={})
        options.parseOptions(["--redis-password", REDIS_SECRET, "--mysql-password",
                              MYSQL_SECRET, "--http-token", HTTP_SECRET])
        self.assertNoSecret(repr(options.config))
        self.assertNoSecret(str(options))
        out = subprocess.run(
            [__import__("sys").executable, "-c",
             "from twisted.scripts.twistd import run; run()", "eventsource", "--help"],
            capture_output=True, text=True, timeout=60,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(
                os.path.abspath(__file__))), **environ))
        self.assertIn("--redis-password", out.stdout)
        self.assertNoSecret(out.stdout + out.stderr)
