"""
Redis behind Sentinel (:mod:`eventsource.sentinel`), quickly: addresses
parsed, the resolver against fake Sentinels on loopback (one down, one that
hangs, one that does not know the master), and the server and the client
following a master that moves between two private ``redis-server`` while a
fake Sentinel names it, with the node it named first demoted to a replica.
The real thing, three ``redis-server --sentinel`` and a ``kill -9`` of the
master under load, is ``tests/slow/test_sentinel.py``.
"""

import io
import json

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from eventsource import cli
from eventsource.client import NO_STREAM, NewEvent, RedisConnectionError, RetryPolicy, connect
from eventsource.sentinel import (
    MasterNotFound,
    NotMaster,
    SentinelEndpoint,
    SentinelResolver,
    check_role,
    encode_command,
    format_addresses,
    parse_address,
    parse_addresses,
)
from tests.redis_server import RedisServer
from tests.support import IntegrationTestCase, LogCapture, free_port, unique, wait_until


class AddressTests(SynchronousTestCase):
    def test_parse(self):
        self.assertEqual(parse_address("s1:26380"), ("s1", 26380))
        self.assertEqual(parse_address(" s1 "), ("s1", 26379))
        self.assertEqual(parse_address("[::1]:7"), ("::1", 7))
        self.assertEqual(parse_address("[::1]"), ("::1", 26379))
        self.assertEqual(parse_addresses("a,b:2, ,[::1]:3"),
                         (("a", 26379), ("b", 2), ("::1", 3)))
        for text in ["", ":1", "a:", "a:x", "a:0", "a:70000", "::1", "[::1", "[::1]:",
                     "[::1]x"]:
            self.assertRaises(ValueError, parse_address, text)
        self.assertRaises(ValueError, parse_addresses, " , ")

    def test_format(self):
        self.assertEqual(format_addresses([("a", 1), ("::1", 2)]), "a:1,[::1]:2")

    def test_encode(self):
        self.assertEqual(encode_command("SENTINEL", "é"),
                         b"*2\r\n$8\r\nSENTINEL\r\n$2\r\n\xc3\xa9\r\n")

    def test_role(self):
        check_role(["master", "0", []], "here")
        check_role([b"master", 0, []], "here")
        error = self.assertRaises(NotMaster, check_role, ["slave", "127.0.0.1", "1"], "X")
        self.assertIn("Redis X is not the master (ROLE says 'slave')", str(error))


class FakeSentinel(Protocol):
    """Answers every command with the factory's ``answer`` (RESP bytes), or nothing."""

    def dataReceived(self, data):
        self.factory.questions.append(data)
        if self.factory.answer is not None:
            self.transport.write(self.factory.answer)


def address_answer(host, port):
    return encode_command(host, str(port))


class FakeSentinels:
    """Fake Sentinels listening on loopback, each answering as told."""

    def __init__(self, testcase):
        self.testcase = testcase

    def listen(self, answer):
        factory = Factory.forProtocol(FakeSentinel)
        factory.answer = answer
        factory.questions = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.testcase.addCleanup(port.stopListening)
        factory.address = ("127.0.0.1", port.getHost().port)
        return factory


class ResolverTests(TestCase):
    """The resolver against fake Sentinels on loopback."""

    timeout = 30

    def resolve(self, resolver):
        """``resolver.master()``: its address, or its error."""
        return resolver.master().addErrback(lambda failure: failure.value)

    @defer.inlineCallbacks
    def test_first_that_knows(self):
        """A Sentinel that is down, one that does not know the master, then one that does."""
        fakes = FakeSentinels(self)
        unknowing = fakes.listen(b"*-1\r\n")
        knowing = fakes.listen(address_answer("10.0.0.7", 6390))
        down = ("127.0.0.1", free_port())
        resolver = SentinelResolver(reactor, [down, unknowing.address, knowing.address], "m")
        self.assertEqual((yield self.resolve(resolver)), ("10.0.0.7", 6390))
        self.assertEqual(unknowing.questions,
                         [encode_command("SENTINEL", "get-master-addr-by-name", "m")])
        # the one that answered is asked first from now on
        self.assertEqual(resolver.sentinels[0], knowing.address)
        self.assertEqual((yield self.resolve(resolver)), ("10.0.0.7", 6390))
        self.assertEqual(len(unknowing.questions), 1)
        self.assertEqual(len(knowing.questions), 2)

    @defer.inlineCallbacks
    def test_none_knows(self):
        """MasterNotFound names every Sentinel and what went wrong with it."""
        fakes = FakeSentinels(self)
        unknowing = fakes.listen(b"*-1\r\n")
        erring = fakes.listen(b"-ERR No such master with that name\r\n")
        silent = fakes.listen(None)
        down = ("127.0.0.1", free_port())
        resolver = SentinelResolver(
            reactor, [unknowing.address, erring.address, silent.address, down], "m",
            timeout=0.3)
        error = yield self.resolve(resolver)
        self.assertIsInstance(error, MasterNotFound)
        message = str(error)
        self.assertTrue(message.startswith("no Sentinel could name the master m: "), message)
        self.assertIn(f"{format_addresses([unknowing.address])} does not know the master m",
                      message)
        self.assertIn("No such master with that name", message)
        self.assertIn("no answer within 0.3 s", message)
        self.assertIn(format_addresses([down]), message)

    @defer.inlineCallbacks
    def test_endpoint_tells_of_a_move(self):
        """The endpoint resolves at every attempt and tells its listeners when the master moved."""
        fakes = FakeSentinels(self)
        sentinel = fakes.listen(address_answer("127.0.0.1", 1))
        resolver = SentinelResolver(reactor, [sentinel.address], "m")
        asked = []
        moves = []

        class Endpoint:
            def __init__(self, host, port):
                asked.append((host, port))

            def connect(self, factory):
                return defer.succeed("connected")

        endpoint = SentinelEndpoint(resolver, Endpoint, moves.append)

        self.assertEqual((yield endpoint.connect(None)), "connected")
        self.assertEqual((yield endpoint.connect(None)), "connected")
        sentinel.answer = address_answer("127.0.0.1", 2)
        self.assertEqual((yield endpoint.connect(None)), "connected")
        self.assertEqual(asked, [("127.0.0.1", 1), ("127.0.0.1", 1), ("127.0.0.1", 2)])
        self.assertEqual(moves, [("127.0.0.1", 2)])
        self.assertEqual(endpoint.master, ("127.0.0.1", 2))


class FollowTheMasterTests(IntegrationTestCase):
    """
    A failover played by hand: Redis A is the master a fake Sentinel names;
    then B is made the master, A a replica of B (as Sentinel does it,
    ``REPLICAOF``, then ``CLIENT KILL`` of A's clients), and the fake
    Sentinel names B.  The server and the client follow.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.a = RedisServer(self)
        self.b = RedisServer(self)
        yield self.a.start()
        yield self.b.start()
        self.sentinel = FakeSentinels(self).listen(address_answer("127.0.0.1", self.a.port))
        self.database = unique("es_test")
        self.table = f"{self.database}.event"
        self.prefix = unique("t") + ":"
        self.logs = LogCapture(self)

    def start(self):
        return self.start_server(redis_sentinels=(self.sentinel.address,),
                                 redis_master_name="m", redis_port=1, redis_max_delay=0.2)

    @defer.inlineCallbacks
    def connect_client(self, **kwargs):
        client = yield connect(sentinels=[format_addresses([self.sentinel.address])],
                               master_name="m", reactor=reactor, channel_prefix=self.prefix,
                               max_delay=0.2, timeout=2, **kwargs)
        self.addCleanup(client.disconnect)
        return client

    def fail_over_to_b(self, kill=("normal", "pubsub")):
        self.b.cli("REPLICAOF", "NO", "ONE")
        self.a.cli("REPLICAOF", "127.0.0.1", str(self.b.port))
        self.sentinel.answer = address_answer("127.0.0.1", self.b.port)
        for kind in kill:
            self.a.cli("CLIENT", "KILL", "TYPE", kind)

    @defer.inlineCallbacks
    def test_server_and_client_follow(self):
        yield self.start()
        client = yield self.connect_client(retry=RetryPolicy(retries=30, max_delay=0.2))
        first = yield client.append("s", [NewEvent("d", "n")], expected_version=NO_STREAM)
        self.assertEqual(first.versions, (0,))
        self.assertIn("cmd=", self.a.cli("CLIENT", "LIST"))
        self.fail_over_to_b()
        second = yield client.append("s", [NewEvent("d", "n")], expected_version=0)
        self.assertEqual(second.versions, (1,))
        yield wait_until(lambda: self.server.bus.connected, what="the server on B")
        # the server's and the client's connections are all on B now
        self.assertEqual(self.a.cli("CLIENT", "LIST").count("cmd="), 1)  # (redis-cli's own)
        self.assertGreaterEqual(self.b.cli("CLIENT", "LIST").count("cmd="), 5)
        self.assertEqual(self.server.bus._sentinel_endpoint.master, ("127.0.0.1", self.b.port))
        texts = "\n".join(self.logs.texts())
        self.assertIn("Sentinel: the master m moved from 127.0.0.1:%d to 127.0.0.1:%d"
                      % (self.a.port, self.b.port), texts)
        self.assertIn("subscribed again", texts)

    @defer.inlineCallbacks
    def test_no_connection_left_on_the_old_master(self):
        """
        Only the subscriber connections to A are dropped (a publisher left on
        a demoted master would publish where no client listens): each
        subscriber finds B, and the publisher still on A is dropped for it.
        """
        yield self.start()
        client = yield self.connect_client(retry=RetryPolicy(retries=30, max_delay=0.2))
        yield client.append("s", [NewEvent("d", "n")], expected_version=NO_STREAM)
        self.fail_over_to_b(kill=("pubsub",))
        second = yield client.append("s", [NewEvent("d", "n")], expected_version=0)
        self.assertEqual(second.versions, (1,))
        yield wait_until(lambda: self.server.bus.connected
                         and self.a.cli("CLIENT", "LIST").count("cmd=") == 1,
                         what="every connection on B")
        self.assertGreaterEqual(self.b.cli("CLIENT", "LIST").count("cmd="), 5)

    @defer.inlineCallbacks
    def test_a_replica_is_not_served(self):
        """The Sentinel names a replica (a failover not finished): the server waits for the master."""
        self.a.cli("REPLICAOF", "127.0.0.1", str(self.b.port))
        started = self.start()
        yield wait_until(lambda: any("is not the master (ROLE says 'slave')" in t
                                     for t in self.logs.texts()), what="the role check")
        self.assertFalse(self.server.bus.connected)
        self.sentinel.answer = address_answer("127.0.0.1", self.b.port)
        yield started
        self.assertTrue(self.server.bus.connected)

    @defer.inlineCallbacks
    def test_client_refuses_a_replica(self):
        """The client does not use a replica the Sentinel names: no connection within the time."""
        self.a.cli("REPLICAOF", "127.0.0.1", str(self.b.port))
        with self.assertRaises(RedisConnectionError):
            yield self.connect_client(connect_timeout=1)
        self.assertTrue(any("is not the master (ROLE says 'slave')" in t
                            for t in self.logs.texts()))

    @defer.inlineCallbacks
    def test_command_line(self):
        """``eventsource append`` and ``read`` with --redis-sentinels and --redis-master-name."""
        yield self.start()
        where = ["--redis-sentinels", format_addresses([self.sentinel.address]),
                 "--redis-master-name", "m", "--channel-prefix", self.prefix]
        for argv in (["append", "s", "d", "n", "--expected-version", "noStream"] + where,
                     ["read", "s"] + where):
            out, err = io.StringIO(), io.StringIO()
            code = yield defer.Deferred.fromCoroutine(
                cli.run(reactor, argv, out, err, None, environ={}))
            self.assertEqual(code, 0, err.getvalue())
            self.assertEqual(json.loads(out.getvalue().splitlines()[0])["version"]
                             if argv[0] == "read" else
                             json.loads(out.getvalue())["events"][0]["version"], 0)

    def test_both_or_neither(self):
        self.assertRaises(ValueError, connect, sentinels=["a:1"], reactor=reactor)
        self.assertRaises(ValueError, connect, master_name="m", reactor=reactor)
