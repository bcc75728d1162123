"""
Clusters for the slow tests, on free loopback ports: a 3-node MariaDB Galera
cluster (:class:`GaleraCluster`), a Redis master with a replica watched by
three Sentinels (:class:`SentinelSetup`), ``eventsource serve`` processes
(:class:`ServerReplica`), and the three together (:class:`Topology`: servers
run with ``--replicas``, each on its own node, all through the Sentinels).
``python -m tests.clusters`` (``make cluster``, :func:`main`) runs a
:class:`Topology` in the foreground for people who want to try it.

Each process runs in a process group of its own (``start_new_session``) and
is killed with its group (SST scripts and their ``rsync`` daemons included)
when the cluster is stopped, when the test process exits (``atexit``), and,
through ``PR_SET_PDEATHSIG``, when the test process dies without exiting
(``kill -9``): no server outlives a test run.  Start clusters and nodes from
the main thread (the death signal follows the thread that started a process).

Starting a cluster takes seconds, so a test module shares one: :func:`shared`
starts it on first use and keeps it until the process exits (trial has no
class-level set-up).  The methods block (they are called between tests or
from a thread, ``deferToThread``), never the reactor's work itself.

``mariadbd`` runs as the ``mysql`` user where there is one (``rsync``'s SST
daemon, started as root, would drop to ``nobody``); each node's root has no
password on TCP, as the machine's MariaDB.  ``wsrep_sst_method=rsync`` needs
``rsync`` (``.ci/run`` installs it with ``galera-4``).
"""

import atexit
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pymysql

from tests.support import free_port, sql_on

#: where Debian's galera-4 puts the wsrep provider
GALERA_PROVIDERS = ("/usr/lib/galera/libgalera_smm.so", "/usr/lib/libgalera_smm.so")

_PR_SET_PDEATHSIG = 1


def _die_with_parent():
    """In the child, before exec: be killed when the test process dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: atexit still covers a normal exit
        pass


def spawn(command, logfile, cwd=None, user=None, env=None):
    """
    A process in a group of its own, its output in ``logfile``, killed with
    the tests.  ``PR_SET_PDEATHSIG`` fires when the *thread* that started the
    process ends, so only a process started from the main thread gets it (trial
    stops the reactor's thread pool after each test: a cluster started from
    ``deferToThread`` would die with it); atexit covers the others.  A change
    of user clears it, so a process that must run as another ``user`` is
    started as that user (before the signal is set), not left to switch.
    ``env``: its environment (this process's when None).
    """
    in_main = threading.current_thread() is threading.main_thread()
    account = None
    if user is not None and os.geteuid() == 0:
        import pwd

        account = pwd.getpwnam(user)

    def prepare():
        if account is not None:
            os.setgroups([])
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
        if in_main:
            _die_with_parent()

    with open(logfile, "ab") as out:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True, preexec_fn=prepare)


def kill_group(process, sig=signal.SIGKILL, wait=20):
    """Send ``sig`` to ``process``'s whole group; wait for the process itself to exit."""
    if process is None:
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    if sig != signal.SIGKILL:
        try:  # what the group's leader left behind (an SST script's children)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(check, timeout, what, step=0.1):
    """Poll ``check()`` until it returns something true; returns it. Blocking."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


_shared = {}


def shared(key, make):
    """
    The cluster ``make()`` started once for this process under ``key`` (a
    test module's name): tests of a module share it, and it is stopped when
    the process exits.  A cluster that failed to start is not kept.
    """
    if key not in _shared:
        cluster = make()
        atexit.register(cluster.stop)
        try:
            cluster.start()
        except BaseException:
            cluster.stop()
            raise
        _shared[key] = cluster
    return _shared[key]


def _user_exists(name):
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


# -- Galera ------------------------------------------------------------------

class LoggedProcess:
    """A process of a test's own that writes its log to ``logfile``."""

    logfile: str
    #: lines of the log :meth:`log_tail` shows
    tail_lines = 40

    def log_tail(self, lines=None):
        """The end of its log, for a failure's message."""
        try:
            with open(self.logfile, errors="replace") as f:
                return "".join(f.readlines()[-(lines or self.tail_lines):])
        except OSError:
            return "(no log)"


class GaleraNode(LoggedProcess):
    """One ``mariadbd`` of a :class:`GaleraCluster`."""

    def __init__(self, cluster, index):
        self.cluster = cluster
        self.index = index
        self.name = f"node{index + 1}"
        self.port = free_port()
        self.wsrep_port = free_port()
        self.ist_port = free_port()
        self.sst_port = free_port()
        self.folder = os.path.join(cluster.folder, self.name)
        self.datadir = os.path.join(self.folder, "data")
        self.process = None
        self.starts = 0

    @property
    def host(self):
        return "127.0.0.1"

    @property
    def logfile(self):
        return os.path.join(self.folder, "error.log")

    def config_text(self):
        cluster = self.cluster
        members = ",".join(f"127.0.0.1:{node.wsrep_port}" for node in cluster.nodes)
        return "\n".join([
            "[mariadbd]",
            f"datadir={self.datadir}",
            f"socket={os.path.join(self.folder, 'mariadbd.sock')}",
            f"pid-file={os.path.join(self.folder, 'mariadbd.pid')}",
            f"tmpdir={os.path.join(self.folder, 'tmp')}",
            f"log-error={self.logfile}",
            f"port={self.port}",
            "bind-address=127.0.0.1",
            f"user={cluster.user}",
            "skip-log-bin",
            "binlog_format=ROW",
            "default_storage_engine=InnoDB",
            "innodb_autoinc_lock_mode=2",
            "innodb_buffer_pool_size=32M",
            "innodb_log_file_size=16M",
            "innodb_flush_log_at_trx_commit=2",
            "performance_schema=OFF",
            "max_connections=200",
            "wsrep_on=ON",
            f"wsrep_provider={cluster.provider}",
            f"wsrep_cluster_name={cluster.name}",
            f"wsrep_cluster_address=gcomm://{members}",
            f"wsrep_node_name={self.name}",
            f"wsrep_node_address=127.0.0.1:{self.wsrep_port}",
            f"wsrep_sst_receive_address=127.0.0.1:{self.sst_port}",
            f"wsrep_sst_method={cluster.sst_method}",
            f'wsrep_provider_options="base_port={self.wsrep_port};'
            f'ist.recv_addr=127.0.0.1:{self.ist_port};gcache.size=64M;'
            'evs.inactive_timeout=PT3S;evs.suspect_timeout=PT2S;'
            'evs.keepalive_period=PT0.5S;evs.inactive_check_period=PT0.5S"',
            "",
        ])

    def prepare(self, template):
        """Write the configuration; the first start copies the initial datadir."""
        os.makedirs(os.path.join(self.folder, "tmp"), exist_ok=True)
        shutil.copytree(template, self.datadir, symlinks=True)
        with open(os.path.join(self.folder, "my.cnf"), "w") as f:
            f.write(self.config_text())

    def spawn(self, new_cluster=False):
        """Start ``mariadbd`` (without waiting for it to join)."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.starts += 1
        command = ["mariadbd", f"--defaults-file={os.path.join(self.folder, 'my.cnf')}"]
        if new_cluster:
            command.append("--wsrep-new-cluster")
        self.process = spawn(command, os.path.join(self.folder, "stdout.log"),
                             cwd=self.folder, user=self.cluster.user)

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def connect(self, database=None, **kwargs):
        """A PyMySQL connection to this node (autocommit), as root without a password."""
        return pymysql.connect(host=self.host, port=self.port, user="root", password="",
                               database=database, charset="utf8mb4", autocommit=True,
                               connect_timeout=5, **kwargs)

    def sql(self, statement, params=None, database=None):
        """Run one statement; all its rows."""
        return sql_on(self.connect(database), statement, params)

    def status(self, name):
        """A ``wsrep`` status variable, or None while the node does not answer."""
        try:
            rows = self.sql("SHOW GLOBAL STATUS LIKE %s", (name,))
        except pymysql.err.MySQLError:
            return None
        return rows[0][1] if rows else None

    def synced(self, size):
        """Whether this node is ready and sees a cluster of ``size`` nodes."""
        if not self.running:
            raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n"
                               f"{self.log_tail()}")
        return (self.status("wsrep_ready") == "ON"
                and self.status("wsrep_cluster_size") == str(size)
                and self.status("wsrep_local_state_comment") == "Synced")


    def kill(self):
        """``kill -9``: as abrupt as a crash."""
        kill_group(self.process, signal.SIGKILL)

    def terminate(self):
        """A clean shutdown (SIGTERM), then whatever is left of its group."""
        kill_group(self.process, signal.SIGTERM, wait=60)


class GaleraCluster:
    """
    ``n`` ``mariadbd`` with ``wsrep_on`` and the ``galera-4`` provider, each
    with its own datadir, port and group-communication port (the cluster
    address lists them all), the first bootstrapped with
    ``--wsrep-new-cluster``, the others joining by state transfer.

    Its files are in a new temporary folder (made in ``parent`` when given).
    :meth:`start` blocks until every node says ``wsrep_ready = ON``,
    ``Synced``, and a cluster size of ``n``; :attr:`start_seconds` says how
    long it took.  :meth:`kill` and :meth:`restart` crash and bring back one
    node (it rejoins by IST or SST); :meth:`stop` stops them all.
    """

    def __init__(self, n=3, sst_method="rsync", name="es_galera", parent=None):
        self.provider = next((p for p in GALERA_PROVIDERS if os.path.exists(p)), None)
        self.folder = tempfile.mkdtemp(prefix="es-galera-", dir=parent)
        self.sst_method = sst_method
        self.name = name
        self.nodes = [GaleraNode(self, i) for i in range(n)]
        self.start_seconds = None
        # rsync's SST daemon, started by root, would run as nobody: run the
        # nodes as the mysql user where there is one
        self.user = "mysql" if _user_exists("mysql") else "root"

    @staticmethod
    def missing():
        """What this machine lacks to run a cluster (a sentence), or None."""
        if not any(os.path.exists(p) for p in GALERA_PROVIDERS):
            return "the galera-4 package (the wsrep provider libgalera_smm.so) is not installed"
        for program in ("mariadbd", "mariadb-install-db", "rsync"):
            if shutil.which(program) is None:
                return f"{program} is not installed"
        return None

    def start(self, timeout=120):
        problem = self.missing()
        if problem:
            raise RuntimeError(f"cannot start a Galera cluster: {problem}")
        started = time.monotonic()
        template = os.path.join(self.folder, "template")
        # (temporary files of its own: not /tmp's, where a server of another
        # test run, in another PID namespace, may use the same names)
        scratch = os.path.join(self.folder, "install-tmp")
        os.makedirs(scratch)
        self._chown()
        out = subprocess.run(
            ["mariadb-install-db", f"--user={self.user}", f"--datadir={template}",
             "--auth-root-authentication-method=normal", "--skip-test-db",
             "--skip-name-resolve", "--no-defaults", f"--tmpdir={scratch}"],
            capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed:\n{out.stdout}{out.stderr}")
        for node in self.nodes:
            node.prepare(template)
        self._chown()
        first, others = self.nodes[0], self.nodes[1:]
        first.spawn(new_cluster=True)
        wait_for(lambda: first.synced(1), timeout, f"{first.name} to bootstrap the cluster")
        # root over TCP from 127.0.0.1, replicated to the joiners by their SST
        first.sql("CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'")
        first.sql("GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION")
        for node in others:
            # one joiner at a time: the donor serves one SST at once
            node.spawn()
            wait_for(lambda node=node: node.synced(self.nodes.index(node) + 1), timeout,
                     f"{node.name} to join")
        self.wait_synced(timeout)
        self.start_seconds = time.monotonic() - started
        return self

    def _chown(self):
        """Give the nodes' user everything under the cluster's folder."""
        if self.user == "root":
            return
        shutil.chown(self.folder, self.user, self.user)
        for root, folders, files in os.walk(self.folder):
            for name in folders + files:
                shutil.chown(os.path.join(root, name), self.user, self.user)

    def wait_synced(self, timeout=120):
        """Block until every running node is Synced in a cluster of all running nodes."""
        running = [node for node in self.nodes if node.running]
        wait_for(lambda: all(node.synced(len(running)) for node in running), timeout,
                 f"{len(running)} nodes to be Synced")

    def kill(self, index):
        """``kill -9`` node ``index``; returns once the others see the cluster shrink."""
        node = self.nodes[index]
        node.kill()
        self.wait_synced(60)

    def restart(self, index, timeout=120):
        """Start node ``index`` again; returns the seconds until it is Synced in the full cluster."""
        started = time.monotonic()
        node = self.nodes[index]
        node.spawn()
        self.wait_synced(timeout)
        return time.monotonic() - started

    def stop(self):
        """Stop every node (kill -9: their data is thrown away) and remove the folder."""
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


# -- Redis and Sentinel ----------------------------------------------------

def redis_cli(port, *args, timeout=10, host="127.0.0.1"):
    """``redis-cli`` on a port (of ``host``): what it printed; raises if it could not run."""
    out = subprocess.run(["redis-cli", "-h", host, "-p", str(port)] + list(args),
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"redis-cli {args} failed: {out.stderr}")
    return out.stdout.strip()


class RedisProcess(LoggedProcess):
    """
    One ``redis-server`` (a data node or a Sentinel) of a :class:`SentinelSetup`,
    or the partition tests' Redis (``host``: the address it binds, loopback
    by default; see :mod:`tests.netns`).
    """

    def __init__(self, folder, name, sentinel=False, host="127.0.0.1"):
        self.name = name
        self.host = host
        self.folder = os.path.join(folder, name)
        os.makedirs(self.folder)
        self.port = free_port()
        self.sentinel = sentinel
        self.process = None
        self.extra = []

    @property
    def address(self):
        return (self.host, self.port)

    @property
    def logfile(self):
        return os.path.join(self.folder, "redis.log")

    def write_config(self, lines):
        self.config = os.path.join(self.folder, "redis.conf")
        with open(self.config, "w") as f:
            f.write("\n".join([
                f"bind {self.host}",
                f"port {self.port}",
                f"dir {self.folder}",
                f"logfile {self.logfile}",
                "loglevel notice",
            ] + list(lines)) + "\n")

    def spawn(self):
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        command = ["redis-server", self.config]
        if self.sentinel:
            command.append("--sentinel")
        self.process = spawn(command, os.path.join(self.folder, "stdout.log"))
        wait_for(self._answers, 10, f"{self.name} to answer")

    def _answers(self):
        if not self.running:
            raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
        try:
            return self.cli("PING") == "PONG"
        except RuntimeError:
            return False

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def cli(self, *args):
        return redis_cli(self.port, *args, host=self.host)


    def kill(self):
        kill_group(self.process, signal.SIGKILL)


class SentinelSetup:
    """
    A Redis master, one replica of it (``replicaof``), and three
    ``redis-server --sentinel`` watching the master as :attr:`master_name`
    (quorum 2, ``down-after-milliseconds`` :attr:`down_after_ms`, a short
    failover timeout), all on free loopback ports, without persistence.

    Its files are in a new temporary folder (made in ``parent`` when given).
    :meth:`kill_master` kills the current master with ``kill -9`` and
    :meth:`wait_promotion` waits until the Sentinels name another one (and
    it says ``role:master``); :meth:`restart_old_master` brings the killed
    one back (the Sentinels make it a replica of the new master).
    """

    def __init__(self, master_name="es-master", down_after_ms=1000, failover_timeout_ms=5000,
                 parent=None):
        self.folder = tempfile.mkdtemp(prefix="es-sentinel-", dir=parent)
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.data = [RedisProcess(self.folder, "redis-a"), RedisProcess(self.folder, "redis-b")]
        self.sentinels = [RedisProcess(self.folder, f"sentinel-{i + 1}", sentinel=True)
                          for i in range(3)]
        self.start_seconds = None
        self.killed = None

    @property
    def sentinel_addresses(self):
        """``[(host, port), ...]`` of the three Sentinels."""
        return [s.address for s in self.sentinels]

    def start(self):
        started = time.monotonic()
        master, replica = self.data
        for node in self.data:
            # the replica's data is thrown away at each resync: no files needed
            node.write_config(['save ""', "appendonly no", "repl-diskless-sync yes",
                               "repl-diskless-sync-delay 0", "repl-diskless-load swapdb"])
        master.spawn()
        replica.spawn()
        replica.cli("REPLICAOF", "127.0.0.1", str(master.port))
        wait_for(lambda: "master_link_status:up" in replica.cli("INFO", "replication"), 20,
                 "the replica to sync")
        for sentinel in self.sentinels:
            sentinel.write_config([
                f"sentinel monitor {self.master_name} 127.0.0.1 {master.port} 2",
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {self.master_name} 1",
            ])
            sentinel.spawn()
        # every Sentinel knows the replica and the two other Sentinels
        wait_for(lambda: all(self._sees_all(s) for s in self.sentinels), 30,
                 "the Sentinels to find each other and the replica")
        self.start_seconds = time.monotonic() - started
        return self

    def _sees_all(self, sentinel):
        lines = sentinel.cli("SENTINEL", "MASTER", self.master_name).splitlines()
        info = dict(zip(lines[::2], lines[1::2]))
        return info.get("num-slaves") == "1" and info.get("num-other-sentinels") == "2"

    def master_address(self, sentinel=None):
        """What a Sentinel (the first by default) says the master's address is."""
        sentinel = sentinel or self.sentinels[0]
        lines = sentinel.cli("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name).split()
        return (lines[0], int(lines[1])) if len(lines) == 2 else None

    def node_at(self, address):
        return next(node for node in self.data if node.address == tuple(address))

    @property
    def master(self):
        """The data node the Sentinels name as master now."""
        return self.node_at(self.master_address())

    def kill_master(self):
        """``kill -9`` the current master; returns it (its address is the old master's)."""
        self.killed = self.master
        self.killed.kill()
        self.killed_at = time.monotonic()
        return self.killed

    def wait_promotion(self, old, timeout=30):
        """
        Block until every Sentinel names another master than ``old`` and
        that node says ``role:master``; returns the new master node and the
        moment (``time.monotonic()``) this was first seen.
        """
        def promoted():
            try:
                addresses = {self.master_address(s) for s in self.sentinels if s.running}
            except RuntimeError:
                return None
            if len(addresses) != 1 or old.address in addresses or None in addresses:
                return None
            node = self.node_at(addresses.pop())
            return node if "role:master" in node.cli("INFO", "replication") else None
        node = wait_for(promoted, timeout, "a Sentinel failover", step=0.02)
        return node, time.monotonic()

    def restart_old_master(self):
        """Bring the killed master back, empty; the Sentinels turn it into a replica."""
        node, self.killed = self.killed, None
        node.spawn()
        return node

    def stop(self):
        for node in self.sentinels + self.data:
            node.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


# -- Server replicas and the whole topology -----------------------------------

#: the checkout (tests/..): servers run with it on their path, as the tests do
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def server_environment():
    """This process's environment without the settings the server reads (options say all)."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("REDIS_", "MYSQL_", "EVENTSOURCE_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [CHECKOUT, os.environ.get("PYTHONPATH")]))
    return env


class ServerReplica:
    """
    One ``eventsource serve`` process (``twistd -n eventsource``, this
    Python) with ``arguments``, its HTTP port (``/metrics``) on a free
    loopback port, its output in ``server.log`` of its folder.

    :meth:`spawn` starts it without waiting; :meth:`serving` says whether
    it logged "eventsource serving" since (so a test polls it from the
    reactor, and :meth:`wait_serving` blocks on it); :meth:`kill` is
    ``kill -9``, :meth:`terminate` a SIGTERM shutdown.
    """

    def __init__(self, folder, name, arguments):
        self.name = name
        self.folder = os.path.join(folder, name)
        os.makedirs(self.folder, exist_ok=True)
        self.http_port = free_port()
        self.arguments = list(arguments) + ["--http-port", str(self.http_port),
                                            "--http-interface", "127.0.0.1"]
        self.process = None
        self._log_start = 0

    @property
    def logfile(self):
        return os.path.join(self.folder, "server.log")

    @property
    def command(self):
        return [sys.executable, "-m", "eventsource", "serve"] + self.arguments

    def spawn(self):
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self._log_start = os.path.getsize(self.logfile) if os.path.exists(self.logfile) else 0
        self.process = spawn(self.command, self.logfile, cwd=CHECKOUT, env=server_environment())

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self):
        return None if self.process is None else self.process.pid

    def log_text(self):
        """What it logged since its last start."""
        try:
            with open(self.logfile, errors="replace") as f:
                f.seek(self._log_start)
                return f.read()
        except OSError:
            return ""

    def serving(self):
        """Whether it said it serves since its last start; raises if it exited."""
        if not self.running:
            raise RuntimeError(f"{self.name} exited ({self.process and self.process.returncode})"
                               f":\n{self.log_text()[-3000:]}")
        return "eventsource serving" in self.log_text()

    def wait_serving(self, timeout=60):
        wait_for(self.serving, timeout, f"{self.name} to serve")

    def metrics(self):
        """``{(name, labels as a sorted tuple): value}`` of its ``/metrics`` (blocking)."""
        from urllib.request import urlopen

        from prometheus_client.parser import text_string_to_metric_families

        with urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    def kill(self):
        """``kill -9``."""
        kill_group(self.process, signal.SIGKILL)

    def terminate(self, wait=20):
        """SIGTERM (the server's shutdown), then SIGKILL after ``wait`` seconds."""
        self.send(signal.SIGTERM)
        self.reap(wait)

    def send(self, sig):
        """``sig`` to its process group, if there is one."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def reap(self, wait=20):
        """Wait for it to exit (SIGKILL after ``wait`` seconds), then kill what it left."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.send(signal.SIGKILL)


class Topology:
    """
    Everything at once, as one would deploy it: a :class:`GaleraCluster` of
    3 nodes, a :class:`SentinelSetup` (Redis master, replica, 3 Sentinels)
    and ``servers`` :class:`ServerReplica` run with ``--replicas``, replica
    ``i`` on Galera node ``i`` (modulo the nodes), all finding Redis through
    the Sentinels; ``server_arguments`` are added to each server's options.
    Its files are under :attr:`folder` (a new temporary folder, removed by
    :meth:`stop`).

    :meth:`start` blocks until every server serves (the first one alone
    first: it makes the database and the table).
    """

    def __init__(self, servers=3, table="eventsource.event", server_arguments=(),
                 master_name="es-master"):
        self.folder = tempfile.mkdtemp(prefix="es-cluster-")
        # the nodes' user (mysql) goes through it to its own folder
        os.chmod(self.folder, 0o755)
        self.table = table
        self.galera = GaleraCluster(parent=self.folder)
        self.sentinel = SentinelSetup(master_name=master_name, parent=self.folder)
        self.server_count = servers
        self.server_arguments = list(server_arguments)
        self.servers = []
        self.start_seconds = None

    @property
    def master_name(self):
        return self.sentinel.master_name

    @property
    def sentinels_option(self):
        """The Sentinels as ``--redis-sentinels`` and ``REDIS_SENTINELS`` take them."""
        return ",".join(f"{host}:{port}" for host, port in self.sentinel.sentinel_addresses)

    def node_of(self, server):
        """The Galera node ``server`` writes to."""
        return self.galera.nodes[self.servers.index(server) % len(self.galera.nodes)]

    def start(self):
        started = time.monotonic()
        self.galera.start()
        self.sentinel.start()
        for index in range(self.server_count):
            node = self.galera.nodes[index % len(self.galera.nodes)]
            self.servers.append(ServerReplica(self.folder, f"server{index + 1}", [
                "--replicas", "--table", self.table,
                "--mysql-host", node.host, "--mysql-port", str(node.port),
                "--mysql-user", "root",
                "--redis-sentinels", self.sentinels_option,
                "--redis-master-name", self.master_name,
            ] + self.server_arguments))
        first, others = self.servers[0], self.servers[1:]
        first.spawn()
        first.wait_serving()
        for server in others:
            server.spawn()
        for server in others:
            server.wait_serving()
        self.start_seconds = time.monotonic() - started
        return self

    def processes(self):
        """The ``Popen`` of every server, Redis, Sentinel and node started and not reaped."""
        return [p.process for p in self.servers + self.sentinel.data + self.sentinel.sentinels
                + self.galera.nodes if p.process is not None]

    def stop(self):
        """Servers first (SIGTERM: they answer what they took), then Redis, then the nodes."""
        try:
            for server in self.servers:  # (all at once, then each waited for)
                if server.running:
                    server.send(signal.SIGTERM)
            for server in self.servers:
                server.reap()
        finally:
            self.sentinel.stop()
            self.galera.stop()
            shutil.rmtree(self.folder, ignore_errors=True)


# -- python -m tests.clusters (make cluster) ----------------------------------

def instructions(topology):
    """What :func:`main` prints once everything serves: what runs where, and how to use it."""
    sentinels = topology.sentinels_option
    name = topology.master_name
    master = topology.sentinel.master
    replica = next(node for node in topology.sentinel.data if node is not master)
    lines = [
        f"eventsource cluster serving (started in {topology.start_seconds:.0f} s; "
        f"files under {topology.folder}):",
        "",
        f"  MariaDB Galera, 3 nodes (user root, no password; table {topology.table}):",
    ]
    lines += [f"    {node.name}  127.0.0.1:{node.port}  pid {node.process.pid}   "
              f"mariadb -h 127.0.0.1 -P {node.port} -u root" for node in topology.galera.nodes]
    lines += [
        f"  Redis: master 127.0.0.1:{master.port} (pid {master.process.pid}), replica "
        f"127.0.0.1:{replica.port} (pid {replica.process.pid}); Sentinels {sentinels} "
        f"(pids {', '.join(str(s.process.pid) for s in topology.sentinel.sentinels)}), "
        f"master name {name}",
        "  eventsource servers, run with --replicas (each request served by one of them):",
    ]
    lines += [f"    {server.name}  on {topology.node_of(server).name}, pid {server.pid}, "
              f"page and /metrics at http://127.0.0.1:{server.http_port}/"
              for server in topology.servers]
    lines += [
        "",
        "Point clients at it through the Sentinels. In the environment (the eventsource",
        "command and the server read these):",
        "",
        f"  export REDIS_SENTINELS={sentinels}",
        f"  export REDIS_MASTER_NAME={name}",
        "",
        "or as options of the eventsource command:",
        "",
        f"  --redis-sentinels {sentinels} --redis-master-name {name}",
        "",
        "for example:",
        "",
        f"  eventsource append order-1 order created '{{\"total\": 12}}' "
        f"--redis-sentinels {sentinels} --redis-master-name {name}",
        f"  eventsource read order-1 --redis-sentinels {sentinels} --redis-master-name {name}",
        "",
        "From Python (eventsource.client):",
        "",
        f"  client = await connect(sentinels={sentinels.split(',')!r}, master_name={name!r})",
        "",
        "Try a failure: kill -9 one of the pids above (a server, a node, the Redis master)",
        "and watch the others go on. Ctrl-C (or SIGTERM) stops everything and removes the files.",
    ]
    return "\n".join(lines)


def main(argv=None):
    """
    ``python -m tests.clusters`` (``make cluster``): start a :class:`Topology`
    in the foreground, print :func:`instructions`, and stop it all on Ctrl-C
    or SIGTERM.  Returns the exit status.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tests.clusters",
        description="Start, on free loopback ports, a 3-node MariaDB Galera cluster, a Redis "
                    "master with a replica and 3 Sentinels, and eventsource servers run with "
                    "--replicas (each on its own Galera node, all through the Sentinels); print "
                    "how to point clients at it; stop everything on Ctrl-C or SIGTERM.")
    parser.add_argument("--servers", type=int, default=3, metavar="N",
                        help="server replicas to run [default: 3]")
    parser.add_argument("--table", default="eventsource.event", metavar="DB.TABLE",
                        help="the servers' events table [default: eventsource.event]")
    args = parser.parse_args(argv)
    problem = GaleraCluster.missing()
    if problem is None and shutil.which("redis-server") is None:
        problem = "redis-server is not installed"
    if problem:
        print(f"cannot start the cluster: {problem}", file=sys.stderr)
        return 1

    def stop_signal(signum, frame):
        raise KeyboardInterrupt

    # (SIGINT too: a shell that starts a job in the background has it ignored)
    signal.signal(signal.SIGINT, stop_signal)
    signal.signal(signal.SIGTERM, stop_signal)
    topology = Topology(servers=args.servers, table=args.table)
    print(f"starting the cluster under {topology.folder} (about half a minute) ...", flush=True)
    try:
        topology.start()
        print(instructions(topology), flush=True)
        reported = set()
        while True:
            for process in topology.processes():
                if process.poll() is not None and process.pid not in reported:
                    reported.add(process.pid)
                    print(f"pid {process.pid} exited ({process.returncode})", flush=True)
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stopping the cluster ...", flush=True)
        topology.stop()
        print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
