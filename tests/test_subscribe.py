"""
Subscriptions against the real Redis and MariaDB (docs/PROTOCOL.md,
"Subscriptions"): every event exactly once, in position order, while
clients persist concurrently, whenever the subscription starts (the seam
between history and live events in the middle of a burst), with a second
server appending to the same table, and across a server restart; filters
decided by MariaDB; heartbeats and a client that went away.
"""

import json
import os
import random
import subprocess
import sys
import threading
import time

import pymysql
from twisted.internet import defer, reactor, threads

from eventsource import schema
from eventsource.ids import uuid7
from tests.support import (MYSQL, REDIS_HOST, REDIS_PORT, IntegrationTestCase, WireClient, sleep,
                           sql, unique, wait_until)


class Follower:
    """
    A subscription's client at the wire level: accepts every row at once,
    records rows (their positions), markers and the last words.
    """

    def __init__(self, client, channel=None):
        self.client = client
        self.channel = channel or unique(client.prefix + "sub")
        self.positions = []
        self.rows = []
        self.markers = []
        self.words = []
        self._seen = 0

    @defer.inlineCallbacks
    def start(self, where=None, start="start", window=100):
        yield self.client.subscribe(self.channel)
        self.client._waiters.append(self._on_message)
        select = {} if where is None else {"$where": where}
        yield self.client.request("subscribe", {"v": 2, "channel": self.channel, "from": start,
                                                "window": window, "query": {"$select": select}})
        return self

    def _on_message(self):
        bodies = self.client.messages.get(self.channel, [])
        accepted = 0
        while self._seen < len(bodies):
            message = json.loads(bodies[self._seen])
            self._seen += 1
            if isinstance(message, dict) and "position" in message:
                self.positions.append(message["position"])
                self.rows.append(message)
                accepted += 1
            elif isinstance(message, dict) and "error" not in message:
                self.markers.append(message)
            else:
                self.words.append(message)
        if accepted:
            d = self.client.request("fetch-next", {"channel": self.channel, "accepted": accepted})
            d.addErrback(lambda _: None)
        return False

    @property
    def caught_up(self):
        return next((m["caughtUp"] for m in self.markers if "caughtUp" in m), None)

    def wait(self, check, what="the subscription"):
        return wait_until(check, what=what)

    def wait_rows(self, count):
        return self.wait(lambda: len(self.positions) >= count, f"{count} rows")

    def end(self):
        return self.client.request("fetch-next", {"channel": self.channel, "end": True})


class SubscribeTestCase(IntegrationTestCase):
    def ids(self, where=""):
        return [row[0] for row in sql(f"SELECT id FROM `{self.database}`.`event` {where} "
                                      "ORDER BY id")]

    @defer.inlineCallbacks
    def writers(self, count, prefix=None):
        clients = []
        for _ in range(count):
            client = yield WireClient(prefix or self.prefix).connect()
            self.addCleanup(client.disconnect)
            clients.append(client)
        return clients

    def burst(self, clients, requests, per_request, pid="p"):
        """Every client persists ``requests`` version 2 requests at once; fires when all are answered."""
        sent = []
        for c, client in enumerate(clients):
            for r in range(requests):
                documents = [{"pid": f"{pid}{c}-{r % 7}", "domain": "d", "name": f"n{k % 3}",
                              "data": {"c": c, "r": r, "k": k}} for k in range(per_request)]
                channel = unique(client.prefix + "w")
                sent.append(self._persist(client, channel, documents))
        return defer.gatherResults(sent)

    @defer.inlineCallbacks
    def _persist(self, client, channel, documents):
        yield client.subscribe(channel)
        yield client.request("persist", {"v": 2, "channel": channel,
                                         "query": {"$insert": {"$documents": documents}}})
        yield client.wait_end(channel)
        reply = client.decoded(channel)
        self.assertIn("events", reply[0], reply)
        return reply

    def assertExactlyOnceInOrder(self, follower, expected):
        self.assertEqual(follower.positions, sorted(set(follower.positions)),
                         "rows out of order or repeated")
        self.assertEqual(follower.positions, expected)


class TailingTests(SubscribeTestCase):
    @defer.inlineCallbacks
    def test_tailing_subscription_sees_a_concurrent_burst_exactly_once(self):
        """3 clients persist 3,000 events at once; a live subscription gets each once, in order."""
        follower = yield Follower(self.client).start()
        yield follower.wait(lambda: follower.caught_up is not None, "caughtUp")
        clients = yield self.writers(3)
        yield self.burst(clients, requests=100, per_request=10)
        expected = self.ids()
        self.assertEqual(len(expected), 3000)
        yield follower.wait_rows(3000)
        yield sleep(0.2)
        self.assertExactlyOnceInOrder(follower, expected)
        self.assertEqual(follower.caught_up, 0)
        self.assertEqual(follower.words, [])

    @defer.inlineCallbacks
    def test_subscriptions_started_in_the_middle_of_a_burst(self):
        """The seam between history and live events falls in the burst: still once, in order."""
        rng = random.Random()
        seed = int(os.environ.get("SUBSCRIBE_SEED") or rng.randrange(10 ** 6))
        rng.seed(seed)
        clients = yield self.writers(3)
        burst = self.burst(clients, requests=100, per_request=10)
        followers = []
        for _ in range(4):
            yield sleep(rng.uniform(0, 0.15))
            start = rng.choice(["start", "end", "position"])
            if start == "position":
                # (COALESCE of a BIGINT UNSIGNED and 0 is a DECIMAL: randint takes ints only)
                top = int(sql(f"SELECT COALESCE(MAX(id), 0) FROM `{self.database}`.`event`")[0][0])
                start = rng.randint(0, top)
            follower = yield Follower(self.client).start(start=start, window=rng.choice([1, 7, 100]))
            followers.append((start, follower))
        yield burst
        everything = self.ids()
        self.assertEqual(len(everything), 3000)
        for start, follower in followers:
            try:
                yield follower.wait(lambda f=follower: f.caught_up is not None
                                    and max([f.caught_up] + f.positions[-1:]) >= everything[-1]
                                    or f.words, f"the last event (seed {seed})")
            except AssertionError:
                raise AssertionError(
                    f"seed {seed}: from {start}: {len(follower.positions)} rows, the last "
                    f"{follower.positions[-3:]}, markers {follower.markers[:3]}, words "
                    f"{follower.words}, {self.server.subscriptions.get(follower.channel)!r}, "
                    f"tailer at {self.server.tailer.position}") from None
            if start == "end":
                # (its caughtUp marker says where "end" was: every event after it follows)
                expected = [p for p in everything if p > follower.caught_up]
            else:
                expected = [p for p in everything if p > (0 if start == "start" else start)]
            self.assertExactlyOnceInOrder(follower, expected)
            self.assertEqual(follower.words, [], f"seed {seed}")

    @defer.inlineCallbacks
    def test_a_filter_mariadb_decides(self):
        """$like and data conditions are decided by MariaDB, one statement per read."""
        follower = yield Follower(self.client).start(
            where={"name": {"$like": "n_"}, "pid": {"$startsWith": "q0"}}, start="end")
        plain = yield Follower(self.client).start(where={"name": "n1"}, start="end")
        yield follower.wait(lambda: follower.caught_up is not None and plain.caught_up is not None)
        clients = yield self.writers(1)
        yield self.burst(clients, requests=20, per_request=5, pid="q")
        expected = self.ids("WHERE name LIKE 'n_' AND pid LIKE 'q0%'")
        yield follower.wait_rows(len(expected))
        yield plain.wait_rows(len(self.ids("WHERE name = 'n1'")))
        self.assertExactlyOnceInOrder(follower, expected)
        self.assertExactlyOnceInOrder(plain, self.ids("WHERE name = 'n1'"))
        self.assertGreater(self.server.tailer.sql_checks, 0)


class SecondServerTests(SubscribeTestCase):
    @defer.inlineCallbacks
    def test_events_of_another_server_on_the_same_table(self):
        """A second server (its own prefix, the same table) appends meanwhile: nothing is missed."""
        own = self.server
        other_prefix = unique("t2") + ":"
        self.prefix_2 = other_prefix
        yield self.start_server(channel_prefix=other_prefix)
        self.server = own
        follower = yield Follower(self.client).start()
        yield follower.wait(lambda: follower.caught_up is not None, "caughtUp")
        mine = yield self.writers(2)
        theirs = yield self.writers(2, prefix=other_prefix)
        yield defer.gatherResults([self.burst(mine, requests=60, per_request=5, pid="m"),
                                   self.burst(theirs, requests=60, per_request=5, pid="t")])
        expected = self.ids()
        self.assertEqual(len(expected), 1200)
        yield follower.wait_rows(1200)
        yield sleep(0.3)
        self.assertExactlyOnceInOrder(follower, expected)


    @defer.inlineCallbacks
    def test_events_of_a_twistd_process_on_the_same_table(self):
        """The same with a real ``twistd eventsource`` process as the other server."""
        other_prefix = unique("t3") + ":"
        output = self.mktemp()
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(("REDIS_", "MYSQL_", "EVENTSOURCE_"))}
        env["PYTHONPATH"] = here
        command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                   "-n", "--pidfile=", "eventsource", "--table", self.table,
                   "--channel-prefix", other_prefix,
                   "--redis-host", REDIS_HOST, "--redis-port", str(REDIS_PORT),
                   "--mysql-host", MYSQL["host"], "--mysql-port", str(MYSQL["port"]),
                   "--mysql-user", MYSQL["user"]]
        with open(output, "w") as out:
            process = subprocess.Popen(command, cwd=here, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def stop():
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

        self.addCleanup(stop)

        def serving():
            with open(output, errors="replace") as f:
                return "eventsource serving" in f.read() or process.poll() is not None

        yield wait_until(serving, timeout=60, what="twistd to serve")
        self.assertIsNone(process.poll(), open(output).read()[-2000:])
        follower = yield Follower(self.client).start()
        yield follower.wait(lambda: follower.caught_up is not None, "caughtUp")
        mine = yield self.writers(2)
        theirs = yield self.writers(2, prefix=other_prefix)
        yield defer.gatherResults([self.burst(mine, requests=50, per_request=5, pid="m"),
                                   self.burst(theirs, requests=50, per_request=5, pid="t")])
        expected = self.ids()
        self.assertEqual(len(expected), 1000)
        yield follower.wait_rows(1000)
        yield sleep(0.3)
        self.assertExactlyOnceInOrder(follower, expected)

    @defer.inlineCallbacks
    def slow_writer_meanwhile(self, take_lock):
        """
        Another writer's transaction inserts an event and commits only 0.5 s
        later while the server persists 10 events; the subscription must see
        all 11 in order.  The server's appends wait for the append lock that
        writer holds; without it they would commit later positions first, and
        the tailer, having read past the slow event, would never send it.
        """
        follower = yield Follower(self.client).start()
        yield follower.wait(lambda: follower.caught_up is not None, "caughtUp")
        inserted = threading.Event()

        def slow_writer():
            connection = pymysql.connect(autocommit=False, **MYSQL)
            try:
                with connection.cursor() as cursor:
                    if take_lock:
                        cursor.execute(take_lock)
                    cursor.execute(f"INSERT INTO `{self.database}`.`event` (pid, domain, name,"
                                   " data, version, event_id) VALUES ('slow', 'd', 'n', 'null',"
                                   " 0, %s)", (uuid7(),))
                    inserted.set()
                    time.sleep(0.5)
                connection.commit()
            finally:
                connection.close()

        writing = threads.deferToThreadPool(reactor, reactor.getThreadPool(), slow_writer)
        yield wait_until(inserted.is_set, what="the slow insert")
        clients = yield self.writers(1)
        yield defer.gatherResults([self.burst(clients, requests=5, per_request=2), writing])
        expected = self.ids()
        self.assertEqual(len(expected), 11)
        yield sleep(0.3)
        self.assertExactlyOnceInOrder(follower, expected)

    def test_a_slow_writer_holding_the_append_lock(self):
        """A writer that takes the lock first, as docs/OPERATIONS.md asks tooling to."""
        return self.slow_writer_meanwhile(
            take_lock=schema.lock_append_sql(f"`{self.database}`.`event_append_lock`"))

    def test_a_slow_writer_of_the_release_before(self):
        """
        Its ``SELECT ... FOR UPDATE`` of the lock row still excludes this
        release's ``UPDATE`` of it on one MariaDB (docs/OPERATIONS.md: the two
        may run side by side during an upgrade; not on Galera).
        """
        return self.slow_writer_meanwhile(
            take_lock=f"SELECT id FROM `{self.database}`.`event_append_lock` WHERE id = 1"
                      " FOR UPDATE")

    def test_the_documented_trigger_takes_the_lock_for_a_plain_insert(self):
        """docs/OPERATIONS.md's trigger, for writers that cannot be changed."""
        with open(os.path.join(os.path.dirname(__file__), "..", "docs", "OPERATIONS.md")) as f:
            text = f.read()
        trigger = text[text.index("CREATE TRIGGER"):]
        trigger = trigger[:trigger.index("```")].strip()
        sql(trigger.replace("eventsource.", f"`{self.database}`."))
        return self.slow_writer_meanwhile(take_lock=None)


class RestartTests(SubscribeTestCase):
    @defer.inlineCallbacks
    def test_restart_ends_it_and_a_resubscription_continues_exactly(self):
        follower = yield Follower(self.client).start()
        clients = yield self.writers(2)
        yield self.burst(clients, requests=20, per_request=5)
        yield follower.wait_rows(200)
        yield self.server.stopService()
        yield follower.wait(lambda: follower.words == [{"error": follower.words[0]["error"]}, "end"]
                            if follower.words else False, "the error and end")
        self.assertEqual(follower.words[0]["error"]["code"], "unavailable")
        yield self.start_server()
        writing = self.burst(clients, requests=20, per_request=5)
        again = yield Follower(self.client).start(start=follower.positions[-1])
        yield writing
        expected = self.ids()
        self.assertEqual(len(expected), 400)
        yield again.wait_rows(400 - len(follower.positions))
        self.assertEqual(follower.positions + again.positions, expected)


class LivenessTests(SubscribeTestCase):
    server_config = {"heartbeat": 0.2}

    @defer.inlineCallbacks
    def test_heartbeats_and_a_client_gone(self):
        follower = yield Follower(self.client).start(where={"pid": "nobody"})
        yield follower.wait(lambda: sum("heartbeat" in m for m in follower.markers) >= 2,
                            "two heartbeats")
        self.assertEqual(len(self.server.subscriptions), 1)
        yield self.client.subscriber.unsubscribe(follower.channel)
        yield wait_until(lambda: not self.server.subscriptions, what="the subscription freed")
        self.assertEqual(len(self.server.tailer), 0)
