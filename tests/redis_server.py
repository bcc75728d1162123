"""
A private ``redis-server`` for the tests, and the test case that serves on one.

Each :class:`RedisServer` runs its own ``redis-server`` on a free loopback
port, with no persistence (``--save "" --appendonly no``) and its files in a
temporary folder, so a test may stop it, restart it on the same port, give
it a password, ACL users or TLS, without touching the machine's Redis.
Made for a test, it is stopped in the test's cleanups; made for a whole test
process (``testcase=None``), when the process exits: a server is never left
running.  :class:`PrivateRedisTestCase` is :class:`IntegrationTestCase` on
such a server.
"""

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time

from twisted.internet import defer

from tests.support import IntegrationTestCase, WireClient, free_port, sleep, unique

#: the line redis-server logs once it accepts connections
READY = "Ready to accept connections"


def tls_supported():
    """Whether this ``redis-server`` was built with TLS (``--tls-port``)."""
    try:
        out = subprocess.run(
            ["redis-server", "--port", "0", "--tls-port", str(free_port()),
             "--tls-cert-file", "/nonexistent", "--tls-key-file", "/nonexistent",
             "--tls-auth-clients", "no", "--save", "", "--appendonly", "no"],
            capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    text = out.stdout + out.stderr
    # Built without TLS, redis-server refuses the option itself; built with
    # it, it gets as far as trying to load the (missing) certificate.
    return "TLS" in text and "Bad directive" not in text and "not supported" not in text


def make_tls_files(folder, hostname="localhost"):
    """
    Write a CA, a server certificate (for ``hostname`` and 127.0.0.1) and a
    client certificate, each signed by the CA, into ``folder``.

    Returns a dict of paths: ``ca``, ``server_cert``, ``server_key``,
    ``client_cert``, ``client_key``, and ``other_ca`` (a CA that signed nothing).
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write(filename, data):
        path = os.path.join(folder, filename)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def key_pem(key):
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())

    def make_ca(common):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(name(common)).issuer_name(name(common))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                             False, False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        return key, cert

    def issue(ca_key, ca_cert, common, usage, alt_names=None):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(name(common)).issuer_name(ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = make_ca("eventsource test CA")
    server_key, server_cert = issue(
        ca_key, ca_cert, hostname, ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_key, client_cert = issue(ca_key, ca_cert, "eventsource", ExtendedKeyUsageOID.CLIENT_AUTH)
    _, other_ca = make_ca("some other CA")
    pem = serialization.Encoding.PEM
    return dict(
        ca=write("ca.pem", ca_cert.public_bytes(pem)),
        server_cert=write("server.pem", server_cert.public_bytes(pem)),
        server_key=write("server.key", key_pem(server_key)),
        client_cert=write("client.pem", client_cert.public_bytes(pem)),
        client_key=write("client.key", key_pem(client_key)),
        other_ca=write("other-ca.pem", other_ca.public_bytes(pem)),
    )


class RedisServer:
    """
    One private ``redis-server``.

    :param testcase: the trial test; the server is stopped and its folder
        removed in the test's cleanup (``None``: when the process exits).
    :param password: ``requirepass`` (the ``default`` user's password).
    :param acl: lines of ACL rules, one user each (``"user alice on >pw ..."``),
        written to the server's configuration file.
    :param tls: a dict from :func:`make_tls_files`: serve TLS only on
        :attr:`port`; ``tls_auth_clients`` says whether a client certificate
        is required.
    :param extra: more lines for the configuration file.
    """

    def __init__(self, testcase=None, password=None, acl=(), tls=None, tls_auth_clients="no",
                 extra=()):
        self.folder = tempfile.mkdtemp(prefix="es-redis-")
        self.port = free_port()
        self.password = password
        self.acl = list(acl)
        self.tls = tls
        self.tls_auth_clients = tls_auth_clients
        self.extra = list(extra)
        self.process = None
        self._starts = 0
        if testcase is None:
            atexit.register(shutil.rmtree, self.folder, True)
            atexit.register(self.kill)
        else:
            testcase.addCleanup(shutil.rmtree, self.folder, True)
            testcase.addCleanup(self.kill)

    @property
    def host(self):
        return "127.0.0.1"

    def _config_text(self):
        lines = [
            "bind 127.0.0.1",
            'save ""',
            "appendonly no",
            f"dir {self.folder}",
            "loglevel notice",
        ]
        if self.tls:
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {self.tls['server_cert']}",
                f"tls-key-file {self.tls['server_key']}",
                f"tls-ca-cert-file {self.tls['ca']}",
                f"tls-auth-clients {self.tls_auth_clients}",
            ]
        else:
            lines.append(f"port {self.port}")
        if self.password is not None:
            lines.append(f"requirepass {self.password}")
        lines += self.acl
        lines += self.extra
        return "\n".join(lines) + "\n"

    def start(self):
        """Start (or restart) the server on its port; fires once it accepts connections."""
        self._spawn()
        return self._wait_ready(time.monotonic() + 10)

    def start_now(self):
        """:meth:`start`, blocking until it accepts connections (outside a running reactor)."""
        self._spawn()
        deadline = time.monotonic() + 10
        while not self._ready(deadline):
            time.sleep(0.005)
        return self

    def _spawn(self):
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("redis-server is already running")
        self._starts += 1
        config = os.path.join(self.folder, "redis.conf")
        with open(config, "w") as f:
            f.write(self._config_text())
        self.logfile = os.path.join(self.folder, f"redis-{self._starts}.log")
        with open(self.logfile, "w"):
            pass
        self.process = subprocess.Popen(
            ["redis-server", config, "--logfile", self.logfile],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def log_text(self):
        """What the server logged since it was last started."""
        with open(self.logfile, errors="replace") as f:
            return f.read()

    _log = log_text

    def _ready(self, deadline):
        """Whether it accepts connections yet; raises if it exited or the deadline passed."""
        if READY in self._log():
            # the moment the server is back, for the tests that measure recovery
            self.ready_at = time.monotonic()
            return True
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited ({self.process.returncode}):\n{self._log()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not start:\n{self._log()}")
        return False

    def _wait_ready(self, deadline):
        if self._ready(deadline):
            return sleep(0).addCallback(lambda _: self)
        return sleep(0.005).addCallback(lambda _: self._wait_ready(deadline))

    def stop(self, sig=signal.SIGTERM):
        """
        Stop the server (SIGTERM: clients see their connections closed; SIGKILL
        is as abrupt as a crash); fires once the process is gone.
        """
        process = self.process
        if process is None or process.poll() is not None:
            return sleep(0)
        process.send_signal(sig)
        return self._wait_exit(process, time.monotonic() + 10)

    def _wait_exit(self, process, deadline):
        if process.poll() is not None:
            return sleep(0)
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            return sleep(0)
        return sleep(0.005).addCallback(lambda _: self._wait_exit(process, deadline))

    def kill(self):
        """Cleanup: make sure the process is gone (blocking; at most a few seconds)."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)

    def cli(self, *args, user=None, password=None):
        """
        Run ``redis-cli`` against this server; returns what it printed (Redis
        errors such as ``NOPERM`` included); raises if it could not run.
        """
        command = ["redis-cli", "-h", self.host, "-p", str(self.port), "--no-auth-warning"]
        if user is not None:
            command += ["--user", user]
        if password is not None:
            command += ["--pass", password]
        elif self.password is not None and user is None:
            command += ["--pass", self.password]
        if self.tls:
            command += ["--tls", "--cacert", self.tls["ca"],
                        "--cert", self.tls["client_cert"], "--key", self.tls["client_key"]]
        out = subprocess.run(command + list(args), capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli {args} failed: {out.stderr}")
        return (out.stdout + out.stderr).strip()


class PrivateRedisTestCase(IntegrationTestCase):
    """
    :class:`IntegrationTestCase` on a private ``redis-server``: the server of
    this process and a :class:`WireClient` on it, a database of their own.

    Subclasses choose the Redis (:meth:`make_redis`), the server's settings
    (:meth:`server_settings`), a request prefix of the test's own
    (:attr:`unique_prefix`; else none) and whether setUp starts the server and
    the client (:attr:`start_at_setup`; else the test does, with
    :meth:`start_server` and :meth:`connect_client`).
    """

    start_at_setup = True
    unique_prefix = False

    def make_redis(self):
        return RedisServer(self)

    def server_settings(self):
        return dict(self.server_config)

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = self.make_redis()
        yield self.redis.start()
        self.database = unique("es_test")
        self.table = f"{self.database}.event"
        self.prefix = unique("t") + ":" if self.unique_prefix else ""
        if self.start_at_setup:
            yield self.start_server(redis_port=self.redis.port, **self.server_settings())
            self.client = yield self.connect_client()

    @defer.inlineCallbacks
    def connect_client(self):
        client = yield WireClient(self.prefix).connect(port=self.redis.port)
        self.addCleanup(client.disconnect)
        return client
