"""
Hostile input, generated with hypothesis: more than 10,000 requests (random
JSON, wrong types, deep nesting, huge strings, injection attempts in values
and identifiers, unknown operators, other tables, bytes that are not UTF-8)
mixed with valid persists and fetches, published pipelined over the real
Redis to a server in this process.  Then:

* the server is alive and serving, with no stream or machine model left over;
* every valid request got exactly the right answer (persist: the OK packet
  with the number of rows, then ``"end"``; fetch: exactly the expected rows,
  then ``"end"``);
* every answerable invalid request got exactly ``"error"``, ``"end"``;
* no unanswerable request got anything, and the server never published on
  its own request channels;
* the events table holds exactly the rows the valid persists wrote.

The requests are drawn up front by ``@given`` (derandomized, so every run
sends the same ones), a batch per example; the test that sends them is an
ordinary trial test.
"""

import json
import os
import time

import pymysql
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.logger import Logger

from eventsource import wire
from eventsource.stream import MACHINE
from tests.support import IntegrationTestCase, WireClient, numbered, sleep, sql

log = Logger()

#: how many batches hypothesis draws, and how many requests each holds
BATCHES = int(os.environ.get("FUZZ_BATCHES", "105"))
BATCH_SIZE = 100

LIMITS = dict(max_body_bytes=256 * 1024, max_documents=20, max_query_depth=8,
              max_query_terms=50, max_in_list=20)

COLUMNS = ("id", "timestamp", "pid", "domain", "name", "data")
SEED_PIDS = [f"seed{j}" for j in range(10)]
NO_MATCH = "\u2205no-such-domain"

# -- building blocks -----------------------------------------------------------

INJECTIONS = [
    "' OR '1'='1", "'; DROP TABLE event; --", "\\", "\\'", "%", "_", "%%s", "%(x)s",
    "`", "`; SELECT 1; --", '" OR ""="', "\x00", "\x00' OR 1=1 --", "1; SHUTDOWN",
    "${jndi:ldap://x}", "<script>alert(1)</script>", "\u202e\u0000\ufeff", "😀" * 50,
    "SLEEP(10)", "BENCHMARK(1000000,MD5(1))", "\r\n*1\r\n$8\r\nFLUSHALL\r\n",
]
OTHER_TABLES = ["mysql.user", "information_schema.TABLES", "performance_schema.threads",
                "eventsource.event", "other", "event2", "event`", "`event`", "event; DROP",
                "*", "", "mysql.`user`", "es_test.event", 5, None, ["event"], {"t": 1}]
UNKNOWN_OPERATORS = ["$regex", "$where", "$exists", "$expr", "$__", "$__raw", "$elemMatch",
                     "$size", "$type", "$mod", "$text", "$raw", "$sql", "$EQ", "$in ", "$",
                     "$gt$", "$isnull", "$between2", "$concat"]
UNKNOWN_SELECT_KEYS = ["$into", "$union", "$__", "$join", "$leftJoin", "$raw", "$where2",
                       "$table", "$documents", "$window", "columns", "where", "$lock"]

scalars = (st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 63)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))


def stored_value(data):
    """The value the server stores for ``data`` (JSON text in a string), as JavaScript would."""
    if isinstance(data, str):
        data = json.loads(data)
    return json.loads(wire.json_stringify(data))


def depth(value):
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.text(max_size=8), children, max_size=4),
    max_leaves=10,
).filter(lambda value: depth(value) <= 20)

hostile_text = (st.sampled_from(INJECTIONS) | st.text(max_size=30)
                | st.integers(20_000, 100_000).map(lambda n: "A" * n))
names = st.text(min_size=1, max_size=40)
# (no infinities: json.dumps writes them as Infinity, which is not JSON, so the
# request would have no reply channel; hypothesis draws them once the constants
# of the loaded test modules steer it there)
wrong_type = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
              | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3),
                                                                      st.integers(), max_size=2))


def nesting(body):
    """How deeply brackets nest in a JSON text, outside its strings (test-side, by hand)."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    depth = deepest = 0
    in_string = escaped = False
    for char in body:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def deep(levels, inner=1):
    value = inner
    for _ in range(levels):
        value = [value]
    return value


# -- request templates ---------------------------------------------------------
# A template is (kind, data); build() turns it into the request n.

valid_persist = st.tuples(
    st.just("valid_persist"),
    st.tuples(
        st.lists(st.tuples(names, names, st.booleans(), json_values), min_size=1, max_size=3),
        st.booleans()))

seed_select = st.tuples(
    st.sampled_from(["eq", "in", "like", "desc", "columns", "limit", "none"]),
    st.lists(st.sampled_from(SEED_PIDS), min_size=1, max_size=3, unique=True),
    st.sampled_from([1, 2, 5, 50]),
    st.sampled_from(["fetch-next", "accepted"]))
valid_fetch = st.tuples(st.just("valid_fetch"), seed_select)

hostile_condition = st.one_of(
    st.tuples(st.sampled_from(["pid", "name", "domain", "data"]), hostile_text),
    st.tuples(st.sampled_from(["pid", "name", "data"]),
              st.fixed_dictionaries({}, optional={
                  "$ne": hostile_text, "$gt": hostile_text, "$like": hostile_text,
                  "$startsWith": hostile_text, "$contains": hostile_text,
                  "$endsWith": hostile_text,
                  "$in": st.lists(hostile_text | st.integers(), min_size=1, max_size=5)}
              ).filter(bool)),
    st.tuples(st.just("id"), st.fixed_dictionaries({"$gte": st.integers(-(2 ** 70), 2 ** 70)})),
)
valid_hostile = st.tuples(st.just("valid_hostile"),
                          st.lists(hostile_condition, min_size=1, max_size=3))

bad_document = st.one_of(
    st.tuples(st.just("drop"), st.sampled_from(["pid", "domain", "name"])),
    st.tuples(st.just("type"), st.sampled_from(["pid", "domain", "name"]), wrong_type),
    st.tuples(st.just("empty"), st.sampled_from(["pid", "domain", "name"])),
    st.tuples(st.just("long"), st.sampled_from(["pid", "domain", "name"]),
              st.integers(256, 400)),
    st.tuples(st.just("data_text"), st.sampled_from(["{", "x", "{'a': 1}", "[1,]", "NaN", ""])),
    st.tuples(st.just("deep_data"), st.integers(40, 80)),
    st.tuples(st.just("not_object"), wrong_type.filter(lambda v: not isinstance(v, dict))),
)
bad_persist_shape = st.one_of(
    st.tuples(st.just("documents"), st.sampled_from([[], "doc", 5, None, [1, 2], [[]], True])),
    st.tuples(st.just("no_documents"), st.none()),
    st.tuples(st.just("table"), st.sampled_from(OTHER_TABLES)),
    st.tuples(st.just("insert_key"), st.sampled_from(["$values", "$__", "$raw", "$onDuplicate",
                                                      "documents", "$select", "table"])),
    st.tuples(st.just("query"), st.sampled_from([[], "x", 5, None, {}, {"$select": {}},
                                                 {"$insert": {}, "$select": {}}])),
    st.tuples(st.just("too_many"), st.integers(21, 40)),
)
invalid_persist = st.tuples(st.just("invalid_persist"),
                            st.one_of(st.tuples(st.just("doc"), bad_document, st.booleans()),
                                      st.tuples(st.just("shape"), bad_persist_shape)))

bad_select = st.one_of(
    st.tuples(st.just("operator"), st.sampled_from(UNKNOWN_OPERATORS) | st.text(
        min_size=1, max_size=8).map(lambda t: "$" + t), scalars),
    st.tuples(st.just("column"), (st.sampled_from(["password", "pid`", "1=1", "id; DROP",
                                                   "PID ", "`pid`", "pid.x", "event.pid",
                                                   "mysql.user.password", "*", "ID"])
                                  | st.text(min_size=1, max_size=12)).filter(
        lambda c: c.lower().strip() not in COLUMNS and not c.startswith("$")), scalars),
    st.tuples(st.just("logical"), st.sampled_from(["$and", "$or", "$not"]),
              st.sampled_from([[], "x", 5, None, [1], [[]]])),
    st.tuples(st.just("from"), st.sampled_from(OTHER_TABLES)),
    st.tuples(st.just("join"), st.sampled_from(["$join", "$leftJoin", "$innerJoin"]), scalars),
    st.tuples(st.just("limit"), st.sampled_from(["$limit", "$offset"]),
              st.sampled_from(["-1", "1.5", " 1", -1, 1.5, True, [1], {"n": 1}, 2 ** 60])),
    st.tuples(st.just("columns"), st.sampled_from([[], [1], ["nope"], [None],
                                                   [{"a b": {"$count": "*"}}], 7])),
    st.tuples(st.just("order"), st.sampled_from([{"pid": 2}, {"nope": 1}, {"pid": "UP"},
                                                 {"pid": None}, 5, [["pid"]]])),
    st.tuples(st.just("distinct"), st.sampled_from(["yes", [], {}, 2])),
    st.tuples(st.just("list_value"), st.lists(scalars, max_size=3)),
    st.tuples(st.just("in"), st.sampled_from(["$in", "$nin"]), st.one_of(
        st.just([]), st.lists(st.integers(), min_size=21, max_size=40),
        st.just([None]), st.just([{"a": 1}]), st.just("a"))),
    st.tuples(st.just("depth"), st.integers(9, 30)),
    st.tuples(st.just("terms"), st.integers(51, 120)),
    st.tuples(st.just("window"), st.sampled_from([0, -3, "2", 1.5, True, None, [1]])),
    st.tuples(st.just("select_key"), st.sampled_from(UNKNOWN_SELECT_KEYS)),
    st.tuples(st.just("query"), st.sampled_from([[], "x", {}, {"$insert": {}},
                                                 {"$select": {}, "x": 1}])),
    st.tuples(st.just("select"), st.sampled_from([[], "x", 5, None, True])),
    st.tuples(st.just("timestamp"), st.sampled_from(["now", 5, "2020-02-30", "2020-1-1x"])),
)
invalid_fetch = st.tuples(st.just("invalid_fetch"), bad_select)

invalid_next = st.tuples(st.just("invalid_next"),
                         st.sampled_from([None, 0, -1, "1", 1.5, True, [1]]))

unanswerable = st.tuples(st.just("unanswerable"), st.one_of(
    st.tuples(st.just("text"), st.text(max_size=60).map(lambda t: "<" + t)),
    st.tuples(st.just("json"), scalars | st.lists(scalars, max_size=4)),
    st.tuples(st.just("no_channel"), st.dictionaries(
        st.text(max_size=8).filter(lambda k: k != "channel"), scalars, max_size=4)),
    st.tuples(st.just("channel_type"), wrong_type.filter(lambda v: not isinstance(v, str))),
    st.tuples(st.just("channel_empty"), st.none()),
    st.tuples(st.just("channel_long"), st.integers(513, 2000)),
    st.tuples(st.just("channel_reserved"), st.sampled_from(["persist", "fetch", "fetch-next",
                                                            "own-persist", "own-fetch",
                                                            "own-fetch-next"])),
    st.tuples(st.just("nan"), st.sampled_from(["NaN", "Infinity", "-Infinity"])),
    st.tuples(st.just("huge"), st.integers(300_000, 400_000)),
    st.tuples(st.just("deep_json"), st.integers(1_500, 5_000)),
    # never UTF-8: a 0xff byte first
    st.tuples(st.just("bytes"), st.binary(max_size=40).map(lambda b: b"\xff" + b)),
))


templates = st.one_of(valid_persist, valid_persist, valid_fetch, valid_hostile,
                      invalid_persist, invalid_persist, invalid_fetch, invalid_fetch,
                      invalid_next, unanswerable, unanswerable)


def draw_requests():
    """Every batch hypothesis draws (the same ones on every run)."""
    batches = []

    @settings(max_examples=BATCHES, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.lists(templates, min_size=BATCH_SIZE, max_size=BATCH_SIZE))
    def collect(batch):
        batches.append(batch)

    collect()
    return [template for batch in batches for template in batch]


# -- turning a template into a request and its expected answer ---------------


class Expect:
    """What the server must answer on a request's reply channel."""

    def __init__(self, kind, channel, answer=None, documents=(), acks=None):
        self.kind = kind
        self.channel = channel
        #: the exact decoded messages expected (rows and control words)
        self.answer = answer
        #: the rows this request must add to the table
        self.documents = documents
        #: how the client accepts rows: "fetch-next", "accepted" or None
        self.acks = acks


class Builder:
    """Builds request ``n`` from its template, knowing the server and the seed rows."""

    def __init__(self, prefix, table, seeds):
        self.prefix = prefix
        self.table = table
        self.seeds = seeds  # [(id, timestamp, pid, domain, name, data)]

    def channel(self, n):
        return f"{self.prefix}fz:{n}"

    def build(self, n, template):
        """Returns ``(request channel kind, body, Expect)``."""
        kind, data = template
        kind, body, expect = getattr(self, kind)(n, data)
        size = len(body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass"))
        if size > LIMITS["max_body_bytes"] or nesting(body) > 64:
            # too large, or nested too deeply, to be read: the reply channel is
            # unknown, so no answer (PROTOCOL: a body nesting deeper than 64
            # levels is refused undecoded)
            expect = Expect(kind="unanswerable", channel=expect.channel, answer=[])
        return kind, body, expect

    def _body(self, message):
        return json.dumps(message, ensure_ascii=bool(len(str(message)) % 2))

    def valid_persist(self, n, data):
        specs, single = data
        documents = []
        for k, (domain, name, with_data, value) in enumerate(specs):
            document = {"pid": f"fz{n}-{k}", "domain": "fz" + domain, "name": name}
            if with_data:
                # a string is JSON text in version 1: send one that is
                document["data"] = json.dumps(value) if isinstance(value, str) else value
            if (n + k) % 5 == 0:
                # fields that are not written are ignored, as the original did
                document.update(timestamp="1999-01-01T00:00:00Z", id=n, requestId=str(n))
            documents.append(document)
        channel = self.channel(n)
        query = {"$documents": documents[0] if single and len(documents) == 1 else documents}
        if n % 3 == 0:
            query["$table"] = self.table
        message = {"channel": channel, "query": {"$insert": query}}
        if n % 7 == 0:
            message["requestId"] = n
        ok = json.loads(wire.encode_ok_packet(len(documents), 0))
        return "persist", self._body(message), Expect(kind="valid_persist", channel=channel,
                                                     answer=[ok, "end"], documents=documents)

    def valid_fetch(self, n, data):
        mode, pids, window, acks = data
        rows = [seed for seed in self.seeds if seed[2] in pids]
        where = {"pid": pids[0]} if len(pids) == 1 else {"pid": {"$in": pids}}
        columns = ["timestamp", "pid", "domain", "name", "data"]
        select = {"$where": where}
        if mode == "like":
            select["$where"] = dict(where, name={"$like": "n1%"})
            rows = [seed for seed in rows if seed[4].startswith("n1")]
        elif mode == "desc":
            select["$orderBy"] = {"id": -1}
            rows = rows[::-1]
        elif mode == "columns":
            columns = ["id", "name", "pid"]
            select["$columns"] = columns
        elif mode == "limit":
            select["$limit"] = 2
            select["$offset"] = 1
            rows = rows[1:3]
        elif mode == "none":
            select["$where"] = dict(where, domain=NO_MATCH)
            rows = []
        if n % 2:
            select["$from"] = self.table
        by_name = dict(zip(COLUMNS, range(6)))
        expected = [{c: self._seed_value(seed, by_name[c]) for c in columns} for seed in rows]
        channel = self.channel(n)
        message = {"channel": channel, "query": {"$select": select}, "window": window}
        if window > 1:
            # a windowed stream's client accepts on fetch-next only (extension 1)
            acks = "fetch-next"
        return "fetch", self._body(message), Expect(
            kind="valid_fetch", channel=channel, answer=expected + ["end"], acks=acks)

    @staticmethod
    def _seed_value(seed, index):
        value = seed[index]
        if index == 1:
            return wire.format_timestamp(value)
        return value

    def valid_hostile(self, n, conditions):
        # (a flat $and keeps it well inside the depth and term limits)
        where = {"$and": [{"domain": NO_MATCH}] + [{column: condition}
                                                   for column, condition in conditions]}
        channel = self.channel(n)
        message = {"channel": channel, "query": {"$select": {"$where": where}}}
        return "fetch", self._body(message), Expect(kind="valid_hostile", channel=channel,
                                                    answer=["end"], acks="fetch-next")

    def _good_document(self, n, k=0):
        return {"pid": f"fz{n}-{k}", "domain": "fz", "name": "good", "data": {"k": k}}

    def invalid_persist(self, n, data):
        channel = self.channel(n)
        message = {"channel": channel, "query": {"$insert": {}}}
        insert = message["query"]["$insert"]
        what = data[0]
        if what == "doc":
            _, (fault, *args), in_list = data
            document = self._good_document(n)
            if fault == "drop":
                del document[args[0]]
            elif fault == "type":
                document[args[0]] = args[1]
            elif fault == "empty":
                document[args[0]] = ""
            elif fault == "long":
                document[args[0]] = "L" * args[1]
            elif fault == "data_text":
                document["data"] = args[0]
            elif fault == "deep_data":
                document["data"] = deep(args[0])
            elif fault == "not_object":
                document = args[0]
            insert["$documents"] = ([self._good_document(n, 1), document, self._good_document(n, 2)]
                                    if in_list else document)
        else:
            _, (fault, value) = data
            insert["$documents"] = self._good_document(n)
            if fault == "documents":
                insert["$documents"] = value
            elif fault == "no_documents":
                del insert["$documents"]
            elif fault == "table":
                insert["$table"] = value
            elif fault == "insert_key":
                insert[value] = {}
            elif fault == "query":
                message["query"] = value
            elif fault == "too_many":
                insert["$documents"] = [self._good_document(n, k) for k in range(value)]
        return "persist", self._body(message), Expect(kind="invalid", channel=channel,
                                                      answer=["error", "end"])

    def invalid_fetch(self, n, data):
        channel = self.channel(n)
        select = {"$where": {"pid": "seed1"}}
        message = {"channel": channel, "query": {"$select": select}}
        fault, *args = data
        if fault == "operator":
            select["$where"] = {"pid": {args[0]: args[1]}}
        elif fault == "column":
            select["$where"] = {args[0]: args[1]}
        elif fault == "logical":
            select["$where"] = {args[0]: args[1]}
        elif fault == "from":
            select["$from"] = args[0]
        elif fault == "join":
            select[args[0]] = args[1]
        elif fault == "limit":
            select[args[0]] = args[1]
        elif fault == "columns":
            select["$columns"] = args[0]
        elif fault == "order":
            select["$orderBy"] = args[0]
        elif fault == "distinct":
            select["$distinct"] = args[0]
        elif fault == "list_value":
            select["$where"] = {"pid": args[0]}
        elif fault == "in":
            select["$where"] = {"pid": {args[0]: args[1]}}
        elif fault == "depth":
            where = {"pid": "seed1"}
            for _ in range(args[0]):
                where = {"$not": where}
            select["$where"] = where
        elif fault == "terms":
            select["$where"] = {"$or": [{"pid": f"p{i}"} for i in range(args[0])]}
        elif fault == "window":
            message["window"] = args[0]
        elif fault == "select_key":
            select[args[0]] = {}
        elif fault == "query":
            message["query"] = args[0]
        elif fault == "select":
            message["query"] = {"$select": args[0]}
        elif fault == "timestamp":
            select["$where"] = {"timestamp": {"$gt": args[0]}}
        return "fetch", self._body(message), Expect(kind="invalid", channel=channel,
                                                    answer=["error", "end"])

    def invalid_next(self, n, accepted):
        channel = self.channel(n)
        message = {"channel": channel}
        if accepted is not None:
            message["accepted"] = accepted
        # no stream is open there: never answered (the server must stay silent)
        return "fetch-next", self._body(message), Expect(kind="silent", channel=channel,
                                                         answer=[])

    def unanswerable(self, n, data):
        channel = self.channel(n)
        fault, value = data
        kind = ("persist", "fetch", "fetch-next")[n % 3]
        query = {"$select": {}} if kind == "fetch" else {"$insert": {"$documents": {}}}
        if fault == "text":
            body = value
        elif fault == "json":
            body = json.dumps(value)
        elif fault == "no_channel":
            body = json.dumps(dict(value, query=query))
        elif fault == "channel_type":
            body = json.dumps({"channel": value, "query": query})
        elif fault == "channel_empty":
            body = json.dumps({"channel": "", "query": query})
        elif fault == "channel_long":
            body = json.dumps({"channel": channel + ":" + "x" * value, "query": query})
        elif fault == "channel_reserved":
            name = value.replace("own-", self.prefix)
            body = json.dumps({"channel": name, "query": query})
        elif fault == "nan":
            body = '{"channel": "%s", "query": {"$select": {"$limit": %s}}}' % (channel, value)
        elif fault == "huge":
            body = json.dumps({"channel": channel, "query": {"$select": {"$where": {
                "pid": "H" * value}}}})
        elif fault == "deep_json":
            body = '{"channel": "%s", "query": %s%s}' % (channel, "[" * value, "]" * value)
        elif fault == "bytes":
            body = b'{"channel": "' + channel.encode() + b'", "x": "' + value + b'"}'
        return kind, body, Expect(kind="unanswerable", channel=channel, answer=[])


# -- the test ---------------------------------------------------------------------


class Collector(WireClient):
    """Records replies per channel; accepts rows of the valid fetches as they come."""

    def __init__(self, prefix):
        super().__init__(prefix)
        self.expect = {}
        self.finished = set()
        self.answerable = 0
        self.on_all_finished = None
        #: how many messages this client published, per channel
        self.sent = {}

    def publish(self, channel, message):
        body = message if isinstance(message, (str, bytes)) else json.dumps(message)
        self.sent[channel] = self.sent.get(channel, 0) + 1
        return self.publisher.publish(channel, body)

    def _received(self, channel, body):
        self.messages.setdefault(channel, []).append(body)
        expect = self.expect.get(channel)
        if expect is None:
            return
        if body.startswith("{") and expect.acks is not None:
            if expect.acks == "accepted" and len(self.messages[channel]) % 2:
                self.publish(channel, '"accepted"')
            else:
                self.request("fetch-next", {"channel": channel})
        elif body in ('"end"', '"timeout"') and expect.answer:
            self.finished.add(channel)
            if len(self.finished) == self.answerable and self.on_all_finished is not None:
                done, self.on_all_finished = self.on_all_finished, None
                done.callback(None)


class FuzzTests(IntegrationTestCase):
    timeout = 240
    server_config = LIMITS

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        connection = pymysql.connect(autocommit=True, host="127.0.0.1", port=3306,
                                     user="root", charset="utf8mb4")
        try:
            with connection.cursor() as cursor:
                cursor.executemany(
                    f"INSERT INTO `{self.database}`.event (pid, domain, name, data, version,"
                    " event_id) VALUES (%s, 'seed', %s, %s, %s, %s)",
                    numbered([(SEED_PIDS[j % 10], f"n{j}", json.dumps({"j": j}))
                              for j in range(30)]))
        finally:
            connection.close()
        self.seeds = [tuple(row) for row in sql(
            f"SELECT id, timestamp, pid, domain, name, data FROM `{self.database}`.event"
            " ORDER BY id")]

    @defer.inlineCallbacks
    def test_fuzz(self):
        started = time.monotonic()
        templates = draw_requests()
        drawn = time.monotonic() - started
        self.assertGreaterEqual(len(templates), min(10_000, BATCHES * BATCH_SIZE))
        builder = Builder(self.prefix, self.table, self.seeds)
        requests = [builder.build(n, template) for n, template in enumerate(templates)]

        collector = Collector(self.prefix)
        yield collector.connect()
        self.addCleanup(collector.disconnect)
        yield collector.subscriber.psubscribe(f"{self.prefix}fz:*")
        request_channels = [self.prefix + kind for kind in ("persist", "fetch", "fetch-next")]
        for channel in request_channels:
            yield collector.subscribe(channel)
        for _, _, expect in requests:
            collector.expect[expect.channel] = expect
        collector.answerable = sum(1 for _, _, e in requests if e.answer)
        all_finished = collector.on_all_finished = defer.Deferred()
        self.assertEqual(MACHINE.models, [])  # (driven by the shared machine, never registered)

        # Pipelined, in chunks of 250, with at most ~750 answers outstanding: a
        # flood that outruns the server long enough overflows Redis's output
        # buffer for its subscriber (client-output-buffer-limit pubsub), and
        # Redis drops the connection (tests.test_faults shows that recovery).
        sent_at = time.monotonic()
        answerable_sent = 0
        for start in range(0, len(requests), 250):
            while len(collector.finished) < answerable_sent - 500:
                yield sleep(0.005)
            for kind, body, expect in requests[start:start + 250]:
                collector.publish(self.prefix + kind, body)
                answerable_sent += bool(expect.answer)
            yield sleep(0)
        try:
            yield all_finished.addTimeout(90, reactor)
        except defer.TimeoutError:
            unfinished = [(e.kind, str(body)[:200], collector.messages.get(e.channel))
                          for _, body, e in requests if e.answer and e.channel not in
                          collector.finished]
            self.fail(f"{len(unfinished)} requests unanswered, e.g. {unfinished[:5]}")
        served_in = time.monotonic() - sent_at
        yield sleep(0.5)   # anything late would show now

        counts = {}
        for _, body, expect in requests:
            counts[expect.kind] = counts.get(expect.kind, 0) + 1
            got = [json.loads(b) for b in collector.messages.get(expect.channel, [])
                   if b != '"accepted"']
            if expect.kind == "valid_persist":
                self.assertEqual(len(got), 2, (body[:300], got))
                self.assertEqual(got[0]["affectedRows"], expect.answer[0]["affectedRows"])
                self.assertGreater(got[0]["insertId"], 0)
                self.assertEqual(got[1], "end")
            else:
                self.assertEqual(got, expect.answer, (expect.kind, str(body)[:300]))
        # nothing was ever published on the request channels but our requests
        for channel in request_channels:
            self.assertEqual(len(collector.messages[channel]), collector.sent[channel])

        # the table holds exactly what the valid persists wrote
        expected = sorted(
            (d["pid"], d["domain"], d["name"], json.dumps(stored_value(d.get("data")), sort_keys=True))
            for _, _, e in requests for d in e.documents)
        stored = sorted(
            (pid, domain, name, json.dumps(json.loads(data), sort_keys=True))
            for pid, domain, name, data in sql(
                f"SELECT pid, domain, name, data FROM `{self.database}`.event"
                " WHERE domain <> 'seed'"))
        self.assertEqual(len(stored), len(expected))
        self.assertEqual(stored, expected)

        # alive, serving, nothing left over
        self.assertFalse(self.server.streams)
        self.assertEqual(MACHINE.models, [])
        reply = yield self.client.persist({"pid": "after", "domain": "d", "name": "n"})
        self.assertEqual(reply[0]["affectedRows"], 1)
        messages = yield self.client.fetch({"$where": {"pid": "after"}})
        self.assertEqual([m["pid"] for m in messages[:-1]], ["after"])

        # the deep-data persists the database refused were logged as failures
        self.flushLoggedErrors(pymysql.err.OperationalError, pymysql.err.IntegrityError,
                               pymysql.err.DataError)
        log.info("measured: fuzz: {total} requests ({counts}), {rows} rows verified; drawn "
                 "in {drawn:.1f} s, served in {served:.1f} s, test {whole:.1f} s",
                 total=len(requests), counts=counts, rows=len(stored), drawn=drawn,
                 served=served_in, whole=time.monotonic() - started)
