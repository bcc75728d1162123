"""
Clients cannot act on each other's streams (issue 9, point 5).

Unit tests (service with in-memory doubles and a Clock, the Redis glob, the
client's channel naming) for tenant mode (``--tenants``) and the reply-channel
pattern (``--reply-channels``); then, for real, a private ``redis-server``
with the ACL users of docs/OPERATIONS.md's tenant recipe: tenants ``app1``
and ``app2`` each confined to ``<prefix>T:*``, and ``app1`` trying every route
it had to end, accept, read or forge ``app2``'s streams or to make the
server publish outside its own namespace.
"""

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from eventsource import cli, wire
from eventsource.bus import RedisRefused
from eventsource.client import EventSourceClient, connect
from eventsource.client.testing import FakeServer, MemoryPubSub
from eventsource.config import Config
from eventsource.service import EventSourceService
from eventsource.testing import MemoryBus, MemoryStore
from tests.redis_server import RedisServer
from tests.support import IntegrationTestCase, LogCapture, WireClient, sleep, unique
from tests.test_cli import CommandTestCase
from tests.test_security import SecuredRedisTestCase, StartFailed, connect_client


def persist_body(channel):
    return json.dumps({"channel": channel, "query": {"$insert": {"$documents": {
        "pid": "p", "domain": "d", "name": "n", "data": {"k": 1}}}}})


def fetch_body(channel, select=None, **extra):
    return json.dumps({"channel": channel, "query": {"$select": select or {}}, **extra})


class GlobTests(SynchronousTestCase):
    """``--reply-channels`` patterns match as Redis' glob does."""

    def test_matches_as_redis(self):
        cases = [
            ("es:*", "es:reply:1", True),
            ("es:*", "es:", True),
            ("es:*", "e", False),
            ("es:*", "other:es:1", False),
            ("a?c", "abc", True),
            ("a?c", "ac", False),
            ("[abc]x", "bx", True),
            ("[^abc]x", "bx", False),
            ("[^abc]x", "dx", True),
            ("[a-c]x", "cx", True),
            ("[c-a]x", "bx", True),       # Redis swaps a reversed range
            ("a\\*", "a*", True),
            ("a\\*", "ab", False),
            ("[\\]]", "]", True),
            ("*:reply:*", "app1:reply:9", True),
            ("*", "", True),
            ("", "x", False),
            ("ES:*", "es:1", False),      # case-sensitive
        ]
        for pattern, name, expected in cases:
            self.assertEqual(wire.Glob(pattern).matches(name), expected, (pattern, name))

    def test_malformed_patterns_are_refused(self):
        for pattern in ("a[", "[^", "a\\", "[a-]"):
            self.assertRaises(ValueError, wire.Glob, pattern)

    def test_no_backtracking_blow_up(self):
        """Many stars against a long name that never matches: the product of the lengths."""
        glob = wire.Glob("*a*a*a*a*a*a*a*a*b")
        self.assertFalse(glob.matches("a" * wire.MAX_CHANNEL_LENGTH))

    def test_escaped_prefix_matches_only_itself(self):
        config = Config(channel_prefix="a*[x]?\\:")
        pattern = config.request_patterns["fetch"]
        self.assertTrue(wire.Glob(pattern).matches("a*[x]?\\:app1:fetch"))
        self.assertFalse(wire.Glob(pattern).matches("abx?\\:app1:fetch"))


class GlobAgainstRedisTests(IntegrationTestCase):
    """The same names and patterns, matched by a real Redis (``KEYS``, its glob) and by us."""

    NAMES = ["es:reply:1", "es:", "e", "abc", "ac", "a*", "ab", "]", "a-", "a]", "^x", "\\",
             "a\\b", "x:fetch", "[", "a[b", "-", "é", "éa", "aé", "ÿ", "app1:reply:9", "A"]
    PATTERNS = ["es:*", "a?c", "[abc]", "[^abc]*", "[a-c]*", "[c-a]*", "a\\*", "[\\]]", "*",
                "a[-]", "[]a]*", "\\[*", "*\\\\*", "?", "[^]]*", "a[^b]", "?a", "a?",
                "[^a]", "*:reply:*", "[a-]]", "[\\-]", "[é]*", "[^a-z]", "a*b*", "*[ab]",
                "[A-Z]", "[]", ""]

    def setUp(self):
        self.redis = RedisServer(self)
        return self.redis.start()

    @defer.inlineCallbacks
    def test_same_matches_as_redis(self):
        client = yield connect_client(self.redis)
        self.addCleanup(client.disconnect)
        for index, name in enumerate(self.NAMES):
            yield client.publisher.execute_command("SET", name, str(index))
        for pattern in self.PATTERNS:
            found = yield client.publisher.execute_command("KEYS", pattern)
            found = {key.decode("utf-8") if isinstance(key, bytes) else key for key in found}
            glob = wire.Glob(pattern)
            ours = {name for name in self.NAMES if glob.matches(name)}
            self.assertEqual(ours, found, pattern)


class TenantChannelTests(SynchronousTestCase):
    def test_request_channel_shapes(self):
        self.assertEqual(wire.tenant_request_channel("es:app1:fetch-next", "es:"),
                         ("fetch-next", "app1"))
        self.assertEqual(wire.tenant_request_channel("es:a:b:fetch", "es:"), ("fetch", "a:b"))
        self.assertIsNone(wire.tenant_request_channel("es:app1:reply:1", "es:"))
        self.assertIsNone(wire.tenant_request_channel("es:fetch", "es:"))
        self.assertIsNone(wire.tenant_request_channel("other:app1:fetch", "es:"))

    def test_tenant_names(self):
        for good in ("app1", "A-b_c.9", "x" * 64):
            self.assertTrue(wire.valid_tenant(good), good)
        for bad in ("", "a:b", "a*", "a?", "a[1]", "a\\", "a b", "x" * 65, "é", "a\n", None):
            self.assertFalse(wire.valid_tenant(bad), bad)


class ServiceTestCase(SynchronousTestCase):
    def make(self, **config):
        self.clock = Clock()
        self.bus = MemoryBus()
        self.store = MemoryStore()
        self.service = EventSourceService(Config(**config), self.clock,
                                          bus=self.bus.attach, store=self.store)
        self.service.startService()
        self.successResultOf(self.service.ready)
        self.log = LogCapture(self)
        return self.service

    def send(self, channel, body):
        self.service.message_received(channel, body)

    def out(self, channel):
        return self.bus.messages(channel)

    def open_stream(self, request_channel, reply):
        """A stream of three rows, one sent and waiting for its acceptance."""
        for _ in range(3):
            self.store.add()
        self.send(request_channel, fetch_body(reply))
        self.assertEqual(len(self.out(reply)), 1)
        self.assertIn(reply, self.service.streams)

    def warnings(self):
        return [wire.truncate(e.get("reason") or e.get("log_format"), 300) for e in self.log]


class TenantServiceTests(ServiceTestCase):
    """``--tenants``: the tenant is the request channel's, and replies stay in its namespace."""

    def test_tenant_is_served_on_its_own_channels(self):
        self.make(channel_prefix="es:", tenants=True)
        self.open_stream("es:app1:fetch", "es:app1:reply:2")
        self.send("es:app1:persist", persist_body("es:app1:reply:1"))
        self.assertEqual(self.out("es:app1:reply:1")[1:], ["end"])
        self.assertEqual(self.out("es:app1:reply:1")[0]["affectedRows"], 1)
        self.send("es:app1:fetch-next", json.dumps({"channel": "es:app1:reply:2"}))
        self.assertEqual(len(self.out("es:app1:reply:2")), 2)
        self.send("es:app1:reply:2", '"accepted"')
        self.send("es:app1:reply:2", '"accepted"')
        self.assertEqual(len(self.out("es:app1:reply:2")), 4)  # three rows, then "end"
        self.assertEqual(self.out("es:app1:reply:2")[-1], "end")

    def test_first_event_hint_names_a_tenants_channels(self):
        self.make(channel_prefix="es:", tenants=True)
        hint = self.service._first_event_hint()
        self.assertIn("PUBLISH es:TENANT:persist", hint)
        self.assertIn('"channel": "es:TENANT:reply-1"', hint)

    def test_version_1_channels_are_not_served(self):
        self.make(channel_prefix="es:", tenants=True)
        for kind in ("persist", "fetch", "fetch-next"):
            body = (persist_body("r") if kind == "persist" else fetch_body("r")
                    if kind == "fetch" else json.dumps({"channel": "r"}))
            self.send("es:" + kind, body)
        self.assertEqual(self.bus.published, [])
        self.assertEqual(self.store.events, [])

    def test_reply_channel_outside_the_namespace_is_refused_unanswered(self):
        """
        app1 names app2's channel, an unrelated service's channel, a version 1
        reply channel, a channel under the bare prefix: nothing is published anywhere.
        """
        self.make(channel_prefix="es:", tenants=True)
        for reply in ("es:app2:reply:1", "es:app10:reply:1", "unrelated-service", "reply-1",
                      "es:reply:1", "es:app1"):
            self.send("es:app1:persist", persist_body(reply))
            self.send("es:app1:fetch", fetch_body(reply))
            self.send("es:app1:fetch-next", json.dumps({"channel": reply}))
        self.assertEqual(self.bus.published, [])
        self.assertEqual(self.bus.subscribed, set())
        self.assertEqual(self.store.events, [])
        refusals = [e for e in self.log if "outside the tenant's namespace" in
                    str(e.get("reason"))]
        self.assertEqual(len(refusals), 18)
        self.assertEqual(refusals[0]["request_channel"], "es:app1:persist")

    def test_a_bad_acknowledgement_is_never_answered(self):
        """As outside tenant mode: no stream behind it, no reply (no ping-pong)."""
        self.make(channel_prefix="es:", tenants=True)
        for body in ({"channel": "es:app1:reply:9", "accepted": -1},
                     {"channel": "es:app1:reply:9", "accepted": "x"}):
            self.send("es:app1:fetch-next", json.dumps(body))
        self.assertEqual(self.bus.published, [])
        ignored = [e for e in self.log if "ignored a bad fetch-next" in str(e.get("log_format"))]
        self.assertEqual(len(ignored), 2)

    def test_another_tenants_stream_cannot_be_ended_accepted_or_forged(self):
        self.make(channel_prefix="es:", tenants=True)
        self.open_stream("es:app2:fetch", "es:app2:reply:1")
        before = list(self.bus.published)
        # a busy reply channel used to end that stream with "error"; an
        # acceptance used to move it on; a persist used to publish there
        self.send("es:app1:fetch", fetch_body("es:app2:reply:1"))
        self.send("es:app1:persist", persist_body("es:app2:reply:1"))
        self.send("es:app1:fetch-next", json.dumps({"channel": "es:app2:reply:1"}))
        self.send("es:app1:fetch-next", json.dumps({"channel": "es:app2:reply:1",
                                                    "accepted": 2}))
        self.assertEqual(self.bus.published, before)
        stream = self.service.streams["es:app2:reply:1"]
        self.assertEqual((stream.is_live, stream.rows_sent), (True, 1))
        # app2 itself carries on
        for _ in range(3):
            self.send("es:app2:fetch-next", json.dumps({"channel": "es:app2:reply:1"}))
        self.assertEqual(len(self.out("es:app2:reply:1")), 4)
        self.assertEqual(self.out("es:app2:reply:1")[-1], "end")

    def test_reply_channel_shaped_like_a_request_channel_is_refused(self):
        """Inside its namespace too: ``es:app1:fetch`` is a request channel, not a reply."""
        self.make(channel_prefix="es:", tenants=True)
        for reply in ("es:app1:fetch", "es:app1:x:persist", "es:app1:fetch-next"):
            self.send("es:app1:fetch", fetch_body(reply))
            self.send("es:app1:persist", persist_body(reply))
        self.assertEqual(self.bus.published, [])
        self.assertEqual(self.store.events, [])

    def test_tenant_names_are_strict(self):
        """A request on a channel whose tenant part is not a tenant name is only logged."""
        self.make(channel_prefix="es:", tenants=True)
        for channel in ("es:a:b:persist", "es:a*:persist", "es::persist", "es:a[1]:persist"):
            tenant = channel[3:-len(":persist")]
            self.send(channel, persist_body(f"es:{tenant}:reply:1"))
        self.assertEqual(self.bus.published, [])
        self.assertEqual(self.store.events, [])
        ignored = [e for e in self.log if "is not a tenant name" in e.get("log_format", "")]
        self.assertEqual(len(ignored), 4)

    def test_other_failures_are_answered_inside_the_namespace(self):
        self.make(channel_prefix="es:", tenants=True)
        self.send("es:app1:fetch", fetch_body("es:app1:reply:1", {"$where": {"nope": 1}}))
        self.assertEqual(self.out("es:app1:reply:1"), ["error", "end"])

    def test_rows_shaped_like_protocol_messages_are_not_control_words(self):
        """A row is a JSON object: even one keyed "accepted" or "end" never moves a stream."""
        self.make(channel_prefix="es:", tenants=True)
        self.open_stream("es:app1:fetch", "es:app1:reply:1")
        for echo in ('{"accepted":1}', '{"end":"end"}', '["accepted"]', '"accepted" ', "accepted"):
            self.send("es:app1:reply:1", echo)
        self.assertEqual(self.service.streams["es:app1:reply:1"].rows_sent, 1)

    def test_with_an_empty_prefix(self):
        self.make(tenants=True)
        self.send("app1:persist", persist_body("app1:reply:1"))
        self.send("app1:persist", persist_body("app2:reply:1"))
        self.send("persist", persist_body("app1:reply:2"))
        self.assertEqual([channel for channel, _ in self.bus.published],
                         ["app1:reply:1", "app1:reply:1"])


#: channel names built from the characters that matter here
_NAME = st.lists(st.sampled_from(list("ab1:*?[]^\\-.é") + [
    "persist", "fetch", "fetch-next", "es:", "app1", "app2", "reply"]), max_size=8).map("".join)


class TenantPropertyTests(ServiceTestCase):
    """Whatever channel a request arrives on and whatever it names, replies stay in its namespace."""

    @settings(max_examples=500, derandomize=True, database=None, deadline=None)
    @given(request_kind=st.sampled_from(["persist", "fetch", "fetch-next"]),
           tenant=_NAME, reply=_NAME, stream_first=st.booleans())
    def test_nothing_published_outside_the_senders_namespace(self, request_kind, tenant,
                                                             reply, stream_first):
        self.make(channel_prefix="es:", tenants=True)
        if stream_first:
            self.open_stream("es:app2:fetch", "es:app2:reply:1")
        before = len(self.bus.published)
        channel = f"es:{tenant}:{request_kind}"
        body = (persist_body(reply) if request_kind == "persist" else fetch_body(reply)
                if request_kind == "fetch" else json.dumps({"channel": reply}))
        self.send(channel, body)
        self.send(channel, body.replace(reply, "es:app2:reply:1", 1) if reply else body)
        published = {name for name, _ in self.bus.published[before:]}
        if wire.valid_tenant(tenant):
            for name in published | self.bus.subscribed - {"es:app2:reply:1"}:
                self.assertTrue(name.startswith(f"es:{tenant}:"), (channel, name))
                self.assertIsNone(wire.tenant_request_channel(name, "es:"), name)
        else:
            self.assertEqual(published, set())
        if stream_first:
            stream = self.service.streams.get("es:app2:reply:1")
            if tenant != "app2":
                self.assertEqual((stream.is_live, stream.rows_sent), (True, 1))
        self.service.stopService()


class ReplyPatternTests(ServiceTestCase):
    """``--reply-channels``, without tenants: nothing is published outside the pattern."""

    def test_reply_channel_outside_the_pattern_is_refused_unanswered(self):
        self.make(channel_prefix="d1:", reply_channels="d1:*")
        self.send("d1:persist", persist_body("d2:reply:1"))
        self.send("d1:fetch", fetch_body("unrelated-service"))
        self.send("d1:fetch-next", json.dumps({"channel": "d2:reply:1"}))
        self.assertEqual(self.bus.published, [])
        self.assertEqual(self.bus.subscribed, set())
        refusals = [e for e in self.log if "does not match --reply-channels" in
                    str(e.get("reason"))]
        self.assertEqual(len(refusals), 3)

    def test_reply_channel_inside_the_pattern_is_served(self):
        self.make(channel_prefix="d1:", reply_channels="d1:*")
        self.send("d1:persist", persist_body("d1:reply:1"))
        self.assertEqual(self.out("d1:reply:1")[-1], "end")
        self.open_stream("d1:fetch", "d1:reply:2")

    def test_default_is_any_channel(self):
        self.make()
        self.send("persist", persist_body("anything:at-all"))
        self.assertEqual(self.out("anything:at-all")[-1], "end")

    def test_pattern_and_tenants_combine(self):
        self.make(channel_prefix="es:", tenants=True, reply_channels="es:*:reply:*")
        self.send("es:app1:persist", persist_body("es:app1:other"))
        self.assertEqual(self.bus.published, [])
        self.send("es:app1:persist", persist_body("es:app1:reply:1"))
        self.assertEqual(self.out("es:app1:reply:1")[-1], "end")


class ClientTenantTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.pubsub = MemoryPubSub()

    def test_tenant_channels(self):
        self.server = FakeServer(self.pubsub, prefix="es:app1:")
        client = EventSourceClient(self.pubsub, self.clock, channel_prefix="es:", tenant="app1")
        self.assertEqual(client.request_channel("fetch-next"), "es:app1:fetch-next")
        self.successResultOf(client.persist({"pid": "p", "domain": "d", "name": "n"}))
        self.assertRegex(self.server.requests[0]["channel"], r"^es:app1:reply:[0-9a-f]{32}$")
        self.assertEqual({c[1] for c in self.pubsub.calls if c[0] == "publish"},
                         {"es:app1:persist"})

    def test_reply_prefix_goes_inside_the_namespace(self):
        self.server = FakeServer(self.pubsub, prefix="app1:")
        client = EventSourceClient(self.pubsub, self.clock, tenant="app1", reply_prefix="r.")
        self.successResultOf(client.persist({"pid": "p", "domain": "d", "name": "n"}))
        self.assertRegex(self.server.requests[0]["channel"], r"^app1:r\.[0-9a-f]{32}$")

    def test_bad_tenant(self):
        for bad in ("", "a:b", "a*", "x" * 65):
            self.assertRaises(ValueError, EventSourceClient, self.pubsub, self.clock, tenant=bad)


class CommandLineTenantTests(CommandTestCase):
    PERSIST = ["persist", "--pid", "p", "--domain", "d", "--name", "n"]

    def test_each_source(self):
        for argv, environ, expected in [
            (["--tenant", "app1"], {}, "app1"),
            ([], {"EVENTSOURCE_TENANT": "app2"}, "app2"),
            (["--tenant=app3"], {"EVENTSOURCE_TENANT": "app2"}, "app3"),
            ([], {}, None),
        ]:
            self.assertEqual(self.run_cli(self.PERSIST + argv, environ=environ), 0)
            self.assertEqual(self.connected[0]["tenant"], expected)
            self.assertEqual(self.connected[0]["reply_prefix"], None)

    def test_bad_tenant_is_a_usage_error(self):
        for argv, environ in ((["--tenant", "a:b"], {}), ([], {"EVENTSOURCE_TENANT": "a*"})):
            code = self.run_cli(self.PERSIST + argv, environ=environ)
            self.assert_one_line_error(code, cli.EXIT_USAGE, "--tenant")
        self.assertEqual(self.connected, [])


# -- for real: ACL users on a private redis-server -------------------------------------

PREFIX = "es:"
CHECKOUT = Path(__file__).resolve().parent.parent

#: docs/OPERATIONS.md, "Tenants": the server's user may PSUBSCRIBE exactly the
#: four request patterns (Redis compares a PSUBSCRIBE pattern literally with
#: the user's channel rules) and publish/subscribe anywhere under the prefix ...
SERVER_ACL = ("user eventsource on >{password} resetkeys resetchannels "
              "&{prefix}* &{prefix}*:persist &{prefix}*:fetch &{prefix}*:fetch-next "
              "&{prefix}*:subscribe "
              "-@all +subscribe +unsubscribe +psubscribe +punsubscribe +publish +ping")
#: ... and tenant T's user everything under <prefix>T: and nothing else
TENANT_ACL = ("user {tenant} on >{password} resetkeys resetchannels &{prefix}{tenant}:* "
              "-@all +subscribe +unsubscribe +publish +ping")
#: the tests' own observer, which hears every channel
WATCHER_ACL = ("user watcher on >watcher-pass resetkeys resetchannels &* -@all "
               "+subscribe +psubscribe +unsubscribe +punsubscribe +ping +pubsub")


def event(pid="tenant", name="n"):
    return {"pid": pid, "domain": "tenants", "name": name, "data": {"ok": True}}


class TenantACLTests(SecuredRedisTestCase):
    """Tenants app1 and app2 with the recipe's ACL users; app1 tries every way into app2's streams."""

    def make_redis(self):
        return RedisServer(self, acl=[
            "user default off",
            SERVER_ACL.format(password="server-pass", prefix=PREFIX),
            TENANT_ACL.format(tenant="app1", password="app1-pass", prefix=PREFIX),
            TENANT_ACL.format(tenant="app2", password="app2-pass", prefix=PREFIX),
            WATCHER_ACL,
            # the server's user without the four literal request patterns
            "user narrow on >narrow-pass resetkeys resetchannels &es:* -@all "
            "+subscribe +unsubscribe +psubscribe +punsubscribe +publish +ping",
        ])

    def server_settings(self):
        return dict(redis_user="eventsource", redis_password="server-pass",
                    channel_prefix=PREFIX, tenants=True)

    @defer.inlineCallbacks
    def tenant(self, name):
        """A wire-level client of tenant ``name``: its requests go to es:<name>:<kind>."""
        client = yield connect_client(self.redis, user=name, password=f"{name}-pass")
        client.prefix = f"{PREFIX}{name}:"
        self.addCleanup(client.disconnect)
        return client

    @defer.inlineCallbacks
    def watcher(self):
        """Hears every message published anywhere from now on."""
        watcher = yield connect_client(self.redis, user="watcher", password="watcher-pass")
        self.addCleanup(watcher.disconnect)
        yield watcher.subscriber.psubscribe("*")
        return watcher

    @defer.inlineCallbacks
    def barrier(self, client):
        """
        A persist of ``client``'s answered: the server has handled everything
        ``client`` published before (one connection each way keeps the order).
        """
        reply = yield client.persist([event("barrier")],
                                     channel=unique(client.prefix + "barrier"))
        self.assertEqual(reply[-1], "end")
        self.assertEqual(reply[0]["affectedRows"], 1)

    def test_recipe_is_the_documented_one(self):
        """docs/OPERATIONS.md gives exactly the ACL lines these tests run with."""
        with open(CHECKOUT / "docs" / "OPERATIONS.md") as f:
            text = f.read()
        self.assertIn("ACL SETUSER " + SERVER_ACL.format(password="SERVER-PASSWORD",
                                                         prefix=PREFIX)[len("user "):], text)
        for name in ("app1", "app2"):
            line = TENANT_ACL.format(tenant=name, password=f"{name.upper()}-PASSWORD",
                                     prefix=PREFIX)
            self.assertIn("ACL SETUSER " + line[len("user "):], text)

    @defer.inlineCallbacks
    def test_tenants_persist_and_fetch_with_the_client(self):
        """eventsource.client with ``tenant=``, each as its own ACL user."""
        yield self.start()
        for name in ("app1", "app2"):
            client = yield connect(port=self.redis.port, username=name,
                                   password=f"{name}-pass", channel_prefix=PREFIX,
                                   tenant=name)
            self.addCleanup(client.disconnect)
            result = yield client.persist(event(pid=name))
            self.assertEqual(result.affected_rows, 1)
            rows = yield client.fetch_all({"$select": {"$where": {"pid": name}}})
            self.assertEqual([row["pid"] for row in rows], [name])
            rows = yield client.fetch_all({"$select": {"$where": {"pid": name}}}, window=10)
            self.assertEqual(len(rows), 1)

    @defer.inlineCallbacks
    def test_patterns_are_subscribed_again_after_a_restart(self):
        """The PSUBSCRIBEs are part of every reconnect's handshake."""
        yield self.start()
        yield self.redis.stop()
        yield self.redis.start()
        for _ in range(500):
            if self.server.bus.connected:
                break
            yield sleep(0.01)
        self.assertEqual(self.redis.cli("PUBSUB", "NUMPAT", user="watcher",
                                        password="watcher-pass"), "4")
        app1 = yield self.tenant("app1")
        yield self.barrier(app1)

    @defer.inlineCallbacks
    def test_server_user_needs_the_request_patterns(self):
        """PSUBSCRIBE is checked literally: a server user with only &es:* cannot start."""
        result = yield self.start(redis_user="narrow", redis_password="narrow-pass")
        self.assertIsInstance(result, StartFailed)
        self.assertIn("NOPERM", str(result.value))
        self.flushLoggedErrors(RedisRefused)

    @defer.inlineCallbacks
    def test_acl_keeps_tenants_off_each_others_channels(self):
        """Redis itself refuses app1 every channel outside es:app1:, the shared ones too."""
        yield self.start()
        app1 = yield self.tenant("app1")
        refused = []
        for attempt in (
            app1.publisher.publish("persist", "{}"),            # version 1 channels
            app1.publisher.publish("fetch", "{}"),
            app1.publisher.publish("fetch-next", "{}"),
            app1.publisher.publish("es:fetch-next", "{}"),
            app1.publisher.publish("es:app2:fetch", "{}"),      # app2's request channels
            app1.publisher.publish("es:app2:fetch-next", "{}"),
            app1.publisher.publish("es:app2:reply:1", '"end"'),  # app2's streams
            app1.publisher.publish("es:app2:reply:1", '"accepted"'),
            app1.publisher.execute_command("PSUBSCRIBE", "es:*"),
            app1.subscriber.subscribe("es:app2:reply:1"),
            app1.subscriber.subscribe("es:app2:persist"),
        ):
            try:
                yield attempt
            except Exception as error:
                refused.append(str(error))
        self.assertEqual(len(refused), 11, refused)
        self.assertTrue(all("NOPERM" in text for text in refused), refused)

    @defer.inlineCallbacks
    def test_app1_cannot_act_on_app2s_stream_through_the_server(self):
        """
        app1 names app2's live reply channel in a fetch (which used to end it
        as "busy"), a persist (which published an OkPacket and "end" there,
        ending it), acceptances (which moved it on), and names a channel of
        an unrelated service: nothing reaches any channel outside es:app1:.
        """
        yield self.start()
        app1 = yield self.tenant("app1")
        app2 = yield self.tenant("app2")
        for i in range(3):
            yield app2.persist([event("app2", f"e{i}")], channel=unique("es:app2:reply:p"))
        stream = unique("es:app2:reply:s")
        yield app2.subscribe(stream)
        yield app2.request("fetch", {"channel": stream,
                                     "query": {"$select": {"$where": {"pid": "app2"}}}})
        yield app2.wait_count(stream, 1)
        watcher = yield self.watcher()

        select = {"$select": {"$where": {"pid": "app2"}}}
        hostile = [
            ("fetch", {"channel": stream, "query": select}),
            ("fetch", {"channel": stream, "query": select, "window": 1000}),
            ("persist", {"channel": stream, "query": {"$insert": {"$documents": [event()]}}}),
            ("fetch-next", {"channel": stream}),
            ("fetch-next", {"channel": stream, "accepted": 1000}),
            ("fetch", {"channel": "unrelated-service", "query": select}),
            ("persist", {"channel": "unrelated-service",
                         "query": {"$insert": {"$documents": [event()]}}}),
            ("fetch", {"channel": "es:app1:fetch", "query": select}),   # its own request channel
        ]
        for kind, message in hostile:
            yield app1.request(kind, message)
        yield self.barrier(app1)

        self.assertEqual(len(app2.messages[stream]), 1)
        self.assertTrue(self.server.streams[stream].is_live)
        outside = sorted({channel for channel in watcher.messages
                          if not channel.startswith("es:app1:")})
        self.assertEqual(outside, [])
        self.assertEqual(len(self.rows(where="WHERE pid = 'tenant'")), 0)
        # app2's stream is intact: its three rows, in order, then "end"
        messages = yield app2.drain(stream)
        self.assertEqual([m["name"] for m in messages[:-1]], ["e0", "e1", "e2"])
        self.assertEqual(messages[-1], "end")

    @defer.inlineCallbacks
    def test_rows_shaped_like_protocol_messages(self):
        """
        Columns renamed "accepted" and "end": each row is a JSON object, so
        its echo on the reply channel never accepts a row or ends the stream;
        and a tenant can only ever point such rows at its own channels.
        """
        yield self.start()
        app1 = yield self.tenant("app1")
        for _ in range(3):
            yield app1.persist([event("app1", "accepted")], channel=unique("es:app1:reply:p"))
        select = {"$columns": [{"name": "accepted"}, {"domain": "end"}],
                  "$where": {"pid": "app1"}}
        stream = unique("es:app1:reply:s")
        yield app1.subscribe(stream)
        yield app1.request("fetch", {"channel": stream, "query": {"$select": select}})
        yield app1.wait_count(stream, 1)
        yield self.barrier(app1)
        yield app1.persist([event("app1", "end")], channel=unique("es:app1:reply:p"))
        self.assertEqual(app1.decoded(stream), [{"accepted": "accepted", "end": "tenants"}])
        self.assertTrue(self.server.streams[stream].is_live)
        messages = yield app1.drain(stream)
        self.assertEqual(len(messages), 4)
        self.assertEqual(messages[-1], "end")
        # the same query aimed at app2's namespace is refused unanswered
        watcher = yield self.watcher()
        yield app1.request("fetch", {"channel": "es:app2:reply:x", "query": {"$select": select}})
        yield self.barrier(app1)
        self.assertEqual(watcher.messages.get("es:app2:reply:x"), None)


class ReplyChannelsPatternTests(IntegrationTestCase):
    """
    ``--reply-channels``, no tenants: two deployments with their own
    prefixes on one Redis; a client of the first names a stream of the second.
    """

    server_config = {}

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.first = self.server
        yield self.first.stopService()
        self.first = yield self.start_server(reply_channels=self.prefix + "*")
        self.other_prefix = unique("other") + ":"
        self.second = yield self.start_server(channel_prefix=self.other_prefix)
        self.other = yield WireClient(self.other_prefix).connect()
        self.addCleanup(self.other.disconnect)
        self.watcher = yield WireClient().connect()
        self.addCleanup(self.watcher.disconnect)

    @defer.inlineCallbacks
    def test_one_deployment_cannot_touch_anothers_streams(self):
        yield self.other.persist([event("d2", f"e{i}") for i in range(3)])
        stream = unique(self.other_prefix + "reply")
        yield self.other.subscribe(stream)
        yield self.other.request("fetch", {"channel": stream,
                                           "query": {"$select": {"$where": {"pid": "d2"}}}})
        yield self.other.wait_count(stream, 1)
        unrelated = unique("unrelated-service")
        yield self.watcher.subscribe(unrelated)
        yield self.watcher.subscribe(stream)
        select = {"$select": {"$where": {"pid": "d2"}}}
        for reply in (stream, unrelated):
            yield self.client.request("persist", {"channel": reply, "query": {
                "$insert": {"$documents": [event("d1")]}}})
            yield self.client.request("fetch", {"channel": reply, "query": select})
            yield self.client.request("fetch-next", {"channel": reply})
        # answered inside the pattern: the first server has handled all of the above
        reply = yield self.client.persist([event("barrier")],
                                          channel=unique(self.prefix + "reply"))
        self.assertEqual(reply[-1], "end")
        self.assertEqual(self.watcher.messages, {stream: [], unrelated: []})
        self.assertEqual(len(self.other.messages[stream]), 1)
        self.assertTrue(self.second.streams[stream].is_live)
        self.assertEqual(self.rows(where="WHERE pid = 'd1'"), ())
        messages = yield self.other.drain(stream)
        self.assertEqual([m["name"] for m in messages[:-1]], ["e0", "e1", "e2"])

    @defer.inlineCallbacks
    def test_reply_channels_outside_the_pattern_get_nothing(self):
        unrelated = unique("unrelated-service")
        yield self.watcher.subscribe(unrelated)
        yield self.client.request("fetch", {"channel": unrelated,
                                            "query": {"$select": {}}})
        reply = yield self.client.persist([event("barrier")],
                                          channel=unique(self.prefix + "reply"))
        self.assertEqual(reply[-1], "end")
        self.assertEqual(self.watcher.messages, {unrelated: []})
