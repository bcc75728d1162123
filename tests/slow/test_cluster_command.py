"""
``make cluster`` (``python -m tests.clusters``), as a person runs it: started
as a process, it prints how to point clients at the cluster; the settings it
printed, used as printed with the ``eventsource`` command, append an event
and read it back; SIGTERM stops it, and with it every process it started
(the Galera nodes, Redis, the Sentinels, the servers), and removes its files.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid

from twisted.trial.unittest import TestCase

from tests.clusters import CHECKOUT, GaleraCluster, _die_with_parent, wait_for

#: the lines of the instructions that say where the cluster is
EXPORT = re.compile(r"^\s*export (REDIS_[A-Z_]+)=(\S+)\s*$", re.M)
OPTIONS = re.compile(r"^\s*(--redis-sentinels \S+ --redis-master-name \S+)\s*$", re.M)


def descendants(pid):
    """``{pid: start time}`` of every process under ``pid`` (children, theirs, ...)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                parents.setdefault(stat[0], []).append((int(entry), stat[1]))
    found, todo = {}, [pid]
    while todo:
        for child, started in parents.get(todo.pop(), []):
            found[child] = started
            todo.append(child)
    return found


def _stat(pid):
    """``(parent pid, start time)`` of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # (the name may hold spaces)
    if fields[0] == "Z":  # a zombie is gone but for its parent's wait
        return None
    return int(fields[1]), int(fields[19])


def command_line(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def client_environment(extra):
    """This environment without any Redis or eventsource setting, plus ``extra``."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("REDIS_", "MYSQL_", "EVENTSOURCE_"))}
    env.update(extra)
    return env


class ClusterCommandTests(TestCase):
    timeout = 420

    def setUp(self):
        problem = GaleraCluster.missing()
        if problem:
            raise RuntimeError(f"cannot run make cluster here: {problem}")
        self.output = self.mktemp()
        out = open(self.output, "w")
        self.addCleanup(out.close)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.clusters"], cwd=CHECKOUT, stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=client_environment({"PYTHONUNBUFFERED": "1"}), preexec_fn=_die_with_parent)
        self.addCleanup(self.kill)

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def printed(self):
        with open(self.output, errors="replace") as f:
            return f.read()

    def ready(self):
        if self.process.poll() is not None:
            raise AssertionError(f"python -m tests.clusters exited ({self.process.returncode}):"
                                 f"\n{self.printed()[-3000:]}")
        text = self.printed()
        return ("Ctrl-C (or SIGTERM) stops everything" in text and EXPORT.search(text)
                and OPTIONS.search(text))

    def eventsource(self, arguments, env):
        return subprocess.run([sys.executable, "-m", "eventsource"] + arguments, cwd=CHECKOUT,
                              env=env, capture_output=True, text=True, timeout=60)

    def test_printed_settings_serve_and_sigterm_stops_everything(self):
        started = time.monotonic()
        wait_for(self.ready, 300, "the cluster's instructions", step=0.2)
        ready_after = time.monotonic() - started
        text = self.printed()
        exports = dict(EXPORT.findall(text))
        self.assertEqual(set(exports), {"REDIS_SENTINELS", "REDIS_MASTER_NAME"}, text)
        options = shlex.split(OPTIONS.search(text).group(1))

        children = descendants(self.process.pid)
        commands = [command_line(pid) for pid in children]
        self.assertEqual(sum(c.startswith("mariadbd ") for c in commands), 3, commands)
        self.assertEqual(sum(c.startswith("redis-server ") for c in commands), 5, commands)
        self.assertEqual(sum(" -m eventsource serve " in c for c in commands), 3, commands)

        # append with the printed environment, read back with the printed options
        pid = f"cluster-{uuid.uuid4().hex[:8]}"
        appended = self.eventsource(["append", pid, "demo", "tried", '{"n": 1}'],
                                    client_environment(exports))
        self.assertEqual(appended.returncode, 0, appended.stderr)
        result = json.loads(appended.stdout)
        self.assertEqual((result["events"][0]["pid"], result["events"][0]["version"]), (pid, 0))
        read = self.eventsource(["read", pid] + options, client_environment({}))
        self.assertEqual(read.returncode, 0, read.stderr)
        events = [json.loads(line) for line in read.stdout.splitlines()]
        self.assertEqual([(e["eventId"], e["name"], e["data"]) for e in events],
                         [(result["events"][0]["eventId"], "tried", {"n": 1})])
        # the cluster's own Redis, not the machine's: without the settings, no such event
        # (or no server at all on the default Redis)
        bare = self.eventsource(["read", pid, "--timeout", "3"], client_environment({}))
        self.assertNotIn(result["events"][0]["eventId"], bare.stdout)

        folder = re.search(r"files under (\S+?)\)?:", text).group(1)
        self.assertTrue(os.path.isdir(folder), folder)
        os.kill(self.process.pid, signal.SIGTERM)
        stopping = time.monotonic()
        self.assertEqual(self.process.wait(timeout=120), 0, self.printed()[-2000:])
        stopped_after = time.monotonic() - stopping
        self.assertTrue(self.printed().rstrip().endswith("stopped"), self.printed()[-500:])
        left = {p: command_line(p) for p, start in children.items() if _stat(p) is not None
                and _stat(p)[1] == start}
        self.assertEqual(left, {})
        self.assertFalse(os.path.exists(folder), folder)
        print(f"\nmake cluster: instructions printed {ready_after:.1f} s after the start; "
              f"{len(children)} processes, all gone {stopped_after:.1f} s after SIGTERM",
              file=sys.stderr)
