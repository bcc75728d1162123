"""
Network partitions for the slow tests, made with network namespaces
(``ip netns``) and veth pairs: a process started in a :class:`Namespace`
reaches the host only through the namespace's :class:`Link` s, and a link
is cut (:meth:`Link.cut`) by setting its host end down.

A cut link is a silent partition, as a pulled cable or a dropped route:
packets from the namespace are dropped (no reset, no ICMP), so an open TCP
connection simply stops hearing from the other side, and a new one hangs in
``SYN_SENT`` until its connect timeout.  The host end keeps its address (the
kernel keeps the local route of a link that is down), so the host's own
processes still reach a server bound to it.  :meth:`Link.heal` brings the end
up again; TCP connections that survived resume on their next retransmission.

:class:`PartitionRig` is what tests/slow/test_partition.py runs on: a
namespace with three links (``redis``, ``mysql``, ``control``), a
``redis-server`` and a ``mariadbd`` of the rig's own, each bound to the host
end of its link (the machine's shared services listen on 127.0.0.1, which a
namespace cannot reach), and the ``control`` link, never cut, for the test to
reach the servers in the namespace (their HTTP port).

Names are unique per run (``es-part-<pid>-<random>``, interfaces
``es<random><link>h``/``...n``), so parallel runs do not collide; addresses
come from a /24 of 10.200.0.0–10.254.255.0 that no interface of the host
uses.  Deleting a namespace destroys its veth pairs.  A namespace left behind
by a run that was killed (its pid gone) is deleted by the next run.  Needs
root (``CAP_NET_ADMIN``): :func:`problem` says why not otherwise.
"""

import ipaddress
import os
import random
import re
import secrets
import shutil
import subprocess
import tempfile
import time

import pymysql

from tests.clusters import LoggedProcess, RedisProcess, _user_exists, kill_group, spawn, wait_for
from tests.support import free_port, sql_on

#: every namespace of these tests is named so
PREFIX = "es-part-"


def ip(*args, namespace=None, check=True):
    """Run ``ip ARGS`` (inside ``namespace`` when given); its output."""
    command = ["ip"] + list(args)
    if namespace is not None:
        command = ["ip", "netns", "exec", namespace] + command
    out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {out.stderr.strip()}")
    return out.stdout


def problem():
    """Why this machine cannot make network namespaces (a sentence), or None."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    name = f"{PREFIX}{os.getpid()}-probe{secrets.token_hex(2)}"
    out = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if out.returncode != 0:
        return f"`ip netns add` is not permitted here: {out.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale():
    """Delete the namespaces of runs that are gone (killed before they cleaned up)."""
    for line in ip("netns", "list", check=False).splitlines():
        match = re.match(re.escape(PREFIX) + r"(\d+)-\S+", line)
        if match and not _alive(int(match.group(1))):
            ip("netns", "del", match.group(0), check=False)


def free_subnet():
    """A /24 of 10.200.0.0/16–10.254.255.0/24 that no interface of the host is on."""
    used = [ipaddress.ip_interface(word).network
            for word in ip("-4", "-o", "addr", "show").split() if re.match(r"\d+\.\d+\.\d+\.\d+/", word)]
    for _ in range(1000):
        subnet = ipaddress.ip_network(f"10.{random.randint(200, 254)}.{random.randint(0, 255)}.0/24")
        if not any(subnet.overlaps(network) for network in used):
            return subnet
    raise RuntimeError("no free 10.x.y.0/24 subnet for the test links")


class Link:
    """
    A veth pair between the host and a :class:`Namespace`, a /30 of its
    own: :attr:`host_ip` on the host end, :attr:`ns_ip` on the namespace's.
    """

    def __init__(self, namespace, tag, network):
        self.namespace = namespace
        self.tag = tag
        self.host_if = f"es{namespace.token}{tag[0]}h"
        self.ns_if = f"es{namespace.token}{tag[0]}n"
        host, peer = list(network.hosts())[:2]
        self.host_ip, self.ns_ip = str(host), str(peer)
        self.prefix = network.prefixlen
        self.is_cut = False

    def create(self):
        name = self.namespace.name
        ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if,
           "netns", name)
        ip("addr", "add", f"{self.host_ip}/{self.prefix}", "dev", self.host_if)
        ip("link", "set", self.host_if, "up")
        ip("addr", "add", f"{self.ns_ip}/{self.prefix}", "dev", self.ns_if, namespace=name)
        ip("link", "set", self.ns_if, "up", namespace=name)

    def cut(self):
        """Partition: the host end goes down; packets from either side are dropped."""
        ip("link", "set", self.host_if, "down")
        self.is_cut = True
        return time.monotonic()

    def heal(self):
        """End the partition; returns the moment (``time.monotonic()``) it ended."""
        ip("link", "set", self.host_if, "up")
        self.is_cut = False
        return time.monotonic()

    def __repr__(self):
        return f"<Link {self.tag} {self.host_ip} <-> {self.ns_ip}{' cut' if self.is_cut else ''}>"


class Namespace:
    """A network namespace of its own (only ``lo`` and the links given to it)."""

    def __init__(self):
        self.token = secrets.token_hex(3)
        self.name = f"{PREFIX}{os.getpid()}-{self.token}"
        self.links = {}
        self.subnet = None
        self.created = False

    def create(self, tags):
        """Make the namespace and one :class:`Link` per tag (a /30 each)."""
        remove_stale()
        self.subnet = free_subnet()
        ip("netns", "add", self.name)
        self.created = True
        ip("link", "set", "lo", "up", namespace=self.name)
        for tag, network in zip(tags, self.subnet.subnets(new_prefix=30)):
            link = Link(self, tag, network)
            link.create()
            self.links[tag] = link
        return self

    def command(self, args):
        """``args`` run inside the namespace (``ip netns exec``)."""
        return ["ip", "netns", "exec", self.name] + list(args)

    def heal_all(self):
        for link in self.links.values():
            if link.is_cut:
                link.heal()

    def delete(self):
        """Delete the namespace (its veth pairs go with it)."""
        if self.created:
            ip("netns", "del", self.name, check=False)
            self.created = False
        for link in self.links.values():  # (gone with the namespace, normally)
            ip("link", "del", link.host_if, check=False)


class LocalMariaDB(LoggedProcess):
    """
    One plain ``mariadbd`` (no Galera), its own datadir, bound to ``host``
    on a free port; ``root`` without a password from any address (it is the
    test's, on a test address).  Runs as the ``mysql`` user where there is one.
    """

    def __init__(self, folder, host):
        self.folder = folder
        self.host = host
        self.port = free_port()
        self.datadir = os.path.join(folder, "data")
        self.socket = os.path.join(folder, "mariadbd.sock")
        self.logfile = os.path.join(folder, "error.log")
        self.user = "mysql" if _user_exists("mysql") else "root"
        self.process = None

    def start(self, timeout=60):
        out = subprocess.run(
            ["mariadb-install-db", f"--user={self.user}", f"--datadir={self.datadir}",
             "--auth-root-authentication-method=normal", "--skip-test-db",
             "--skip-name-resolve", "--no-defaults"],
            capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed:\n{out.stdout}{out.stderr}")
        config = os.path.join(self.folder, "my.cnf")
        with open(config, "w") as f:
            f.write("\n".join([
                "[mariadbd]",
                f"datadir={self.datadir}",
                f"socket={self.socket}",
                f"pid-file={os.path.join(self.folder, 'mariadbd.pid')}",
                f"log-error={self.logfile}",
                f"port={self.port}",
                f"bind-address={self.host}",
                f"user={self.user}",
                "skip-name-resolve",
                "skip-log-bin",
                "innodb_buffer_pool_size=32M",
                "innodb_log_file_size=16M",
                "innodb_flush_log_at_trx_commit=2",
                "performance_schema=OFF",
                "max_connections=200",
                "",
            ]))
        if self.user != "root":
            for root, _folders, files in os.walk(self.folder):
                shutil.chown(root, self.user, self.user)
                for name in files:
                    shutil.chown(os.path.join(root, name), self.user, self.user)
        self.process = spawn(["mariadbd", f"--defaults-file={config}"],
                             os.path.join(self.folder, "stdout.log"), cwd=self.folder,
                             user=self.user)
        wait_for(self._answers, timeout, "mariadbd to answer on its socket")
        connection = pymysql.connect(unix_socket=self.socket, user="root", password="",
                                     autocommit=True)
        try:
            with connection.cursor() as cursor:
                cursor.execute("CREATE USER IF NOT EXISTS 'root'@'%'")
                cursor.execute("GRANT ALL PRIVILEGES ON *.* TO 'root'@'%' WITH GRANT OPTION")
        finally:
            connection.close()
        return self

    def _answers(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"mariadbd exited ({self.process.returncode}):\n{self.log_tail()}")
        try:
            pymysql.connect(unix_socket=self.socket, user="root", password="",
                            connect_timeout=2).close()
        except pymysql.err.MySQLError:
            return False
        return True

    def sql(self, statement, params=None):
        """One statement over TCP (the host's own route to ``host``); all its rows."""
        return sql_on(pymysql.connect(host=self.host, port=self.port, user="root", password="",
                                      autocommit=True, connect_timeout=5, charset="utf8mb4"),
                      statement, params)


    def stop(self):
        kill_group(self.process)


class PartitionRig:
    """
    A :class:`Namespace` with the links ``redis``, ``mysql`` and ``control``;
    a ``redis-server`` bound to the host end of ``redis`` and a ``mariadbd``
    bound to the host end of ``mysql``.  A process in the namespace reaches
    Redis at :attr:`redis_address` and MariaDB at :attr:`mysql_address` only
    through their links; the host reaches both at the same addresses,
    whatever the links' state.  The namespace's end of ``control``
    (:attr:`control_ip`) is where the test reaches the namespace's servers.
    """

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="es-partition-")
        os.chmod(self.folder, 0o755)  # (mariadbd's user walks into it)
        self.namespace = Namespace()
        self.redis = None
        self.mariadb = None
        self.start_seconds = None

    @staticmethod
    def missing():
        """What this machine lacks for the rig (a sentence), or None."""
        for program in ("redis-server", "redis-cli", "mariadbd", "mariadb-install-db"):
            if shutil.which(program) is None:
                return f"{program} is not installed"
        return problem()

    @property
    def links(self):
        return self.namespace.links

    @property
    def redis_address(self):
        return self.redis.address

    @property
    def mysql_address(self):
        return (self.mariadb.host, self.mariadb.port)

    @property
    def control_ip(self):
        return self.links["control"].ns_ip

    def start(self):
        started = time.monotonic()
        self.namespace.create(["redis", "mysql", "control"])
        self.redis = RedisProcess(self.folder, "redis", host=self.links["redis"].host_ip)
        # (protected mode refuses every address but loopback when there is
        # no password: this one is a test address on a veth)
        self.redis.write_config(['save ""', "appendonly no", "protected-mode no"])
        self.redis.spawn()
        mysql_folder = os.path.join(self.folder, "mariadb")
        os.makedirs(mysql_folder)
        self.mariadb = LocalMariaDB(mysql_folder, self.links["mysql"].host_ip).start()
        self.start_seconds = time.monotonic() - started
        return self

    def in_namespace(self, args):
        return self.namespace.command(args)

    def stop(self):
        self.namespace.heal_all()
        if self.redis is not None:
            self.redis.kill()
        if self.mariadb is not None:
            self.mariadb.stop()
        self.namespace.delete()
        shutil.rmtree(self.folder, ignore_errors=True)
