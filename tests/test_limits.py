"""
The limits, crossed for real against a server on the real Redis and
MariaDB: request body size, open streams, rows buffered per stream
(``page_size``), rows in flight per stream (``max_window``), query
complexity (nesting depth, terms, ``$in`` length) and documents per persist.

Crossing a limit is answered ``"error"``, ``"end"`` (or logged, when the
request is too large to read its reply channel) and never disturbs the
other streams: every test keeps a bystander stream running through it.
"""

import json

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from eventsource.config import Config
from tests.support import IntegrationTestCase, LogCapture, sleep, unique

LIMITS = dict(max_body_bytes=4096, max_streams=4, page_size=8, max_window=4,
              max_query_depth=4, max_query_terms=10, max_in_list=5, max_documents=3)


def event(pid="lim", **data):
    return {"pid": pid, "domain": "limits", "name": "tested", "data": data}


def nested_not(levels):
    """
    A ``$where`` whose condition sits ``levels`` deep (``$not`` inside
    ``$not``) and that matches every bystander row.
    """
    nots = levels - 1
    where = {"pid": "nobody" if nots % 2 else "bystander"}
    for _ in range(nots):
        where = {"$not": where}
    return where


class DefaultsTests(SynchronousTestCase):
    """The defaults are the documented ones (docs/OPERATIONS.md, "Limits")."""

    def test_defaults(self):
        config = Config()
        self.assertEqual(
            (config.max_body_bytes, config.max_streams, config.page_size, config.max_window,
             config.max_query_depth, config.max_query_terms, config.max_in_list,
             config.max_documents),
            (4 * 1024 * 1024, 10000, 1000, 1000, 32, 1000, 1000, 10000))


class LimitTests(IntegrationTestCase):
    server_config = LIMITS

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.insert_events(40, pid="bystander")
        # A stream that runs through the whole test, accepting slowly.
        self.bystander = unique("bystander")
        yield self.client.subscribe(self.bystander)
        yield self.client.request("fetch", {"channel": self.bystander, "query": {
            "$select": {"$where": {"pid": "bystander"}}}})
        yield self.client.wait_count(self.bystander, 1)

    @defer.inlineCallbacks
    def finish_bystander(self):
        """The bystander stream still delivers all 40 rows, in order, then "end"."""
        messages = yield self.client.drain(self.bystander)
        self.assertEqual(messages[-1], "end")
        self.assertEqual([json.loads(m["data"])["i"] for m in messages[:-1]], list(range(40)))

    @defer.inlineCallbacks
    def fetch(self, select, **extra):
        channel = unique("q")
        yield self.client.subscribe(channel)
        yield self.client.request("fetch", {"channel": channel, "query": {"$select": select},
                                            **extra})
        messages = yield self.client.drain(channel)
        return messages

    @defer.inlineCallbacks
    def test_body_size(self):
        log = LogCapture(self)
        channel = unique("big")
        yield self.client.subscribe(channel)
        padding = "x" * 4096
        yield self.client.request("persist", {"channel": channel, "query": {
            "$insert": {"$documents": event(pad=padding)}}})
        # multi-byte text counts in bytes: 1,400 characters, 4,200 bytes
        yield self.client.request("persist", json.dumps({"channel": channel, "query": {
            "$insert": {"$documents": event(pad="€" * 1400)}}}, ensure_ascii=False))
        # just under the limit: served
        reply = yield self.client.persist(event(pad="y" * 3800))
        self.assertEqual(reply[0]["affectedRows"], 1)
        # the large ones were not answered (their reply channel is unknown) but logged
        self.assertEqual(self.client.messages[channel], [])
        refusals = [line for line in log.texts() if "larger than 4096 bytes" in line]
        self.assertEqual(len(refusals), 2, log.texts())
        self.assertLess(max(len(line) for line in refusals), 1000)
        self.assertEqual(len(self.rows(where="WHERE pid = 'lim'")), 1)
        yield self.finish_bystander()

    @defer.inlineCallbacks
    def test_open_streams(self):
        # the bystander is stream 1; three more fill the limit of 4
        channels = [unique("s") for _ in range(4)]
        for channel in channels:
            yield self.client.subscribe(channel)
            yield self.client.request("fetch", {"channel": channel, "query": {
                "$select": {"$where": {"pid": "bystander"}}}})
        yield self.client.wait_for(lambda: all(self.client.messages[c] for c in channels[:3])
                                   and len(self.client.messages[channels[3]]) >= 2)
        self.assertEqual(self.client.decoded(channels[3]), ["error", "end"])
        self.assertEqual(len(self.server.streams), 4)
        # the three within the limit deliver everything
        for channel in channels[:3]:
            messages = yield self.client.drain(channel)
            self.assertEqual(len(messages), 41)
        # room again: a new stream is served
        messages = yield self.fetch({"$where": {"pid": "bystander"}, "$limit": 2})
        self.assertEqual(len(messages), 3)
        yield self.finish_bystander()

    @defer.inlineCallbacks
    def test_rows_buffered_per_stream(self):
        """A stream holds at most ``page_size`` rows read ahead of the client."""
        read_sizes = []
        buffered = []
        read_page = self.server.store.read_page

        def recording_read_page(plan, high_water, position, size, max_bytes=None):
            read_sizes.append(size)
            for stream in self.server.streams.values():
                buffered.append(stream.buffered_rows)
            return read_page(plan, high_water, position, size, max_bytes)

        self.server.store.read_page = recording_read_page
        messages = yield self.fetch({"$where": {"pid": "bystander"}}, window=4)
        self.assertEqual(len(messages), 41)
        self.assertEqual(max(read_sizes), 8)
        self.assertLessEqual(max(buffered), 8)
        yield self.finish_bystander()

    @defer.inlineCallbacks
    def test_window(self):
        """A client asking for a window of 100 gets at most ``max_window`` rows ahead."""
        channel = unique("w")
        yield self.client.subscribe(channel)
        yield self.client.request("fetch", {"channel": channel, "window": 100, "query": {
            "$select": {"$where": {"pid": "bystander"}}}})
        yield self.client.wait_count(channel, 4)
        yield sleep(0.2)
        self.assertEqual(len(self.client.messages[channel]), 4)
        yield self.client.request("fetch-next", {"channel": channel, "accepted": 4})
        yield self.client.wait_count(channel, 8)
        yield self.client.publish(channel, '"end"')
        yield self.finish_bystander()

    @defer.inlineCallbacks
    def test_query_complexity(self):
        bystander = {"pid": "bystander"}
        cases = [
            # (what, select, served)
            ("depth at the limit", {"$where": nested_not(4)}, True),
            ("depth over the limit", {"$where": nested_not(5)}, False),
            ("10 terms", {"$where": {"$or": [bystander] * 10}}, True),
            ("11 terms", {"$where": {"$or": [bystander] * 11}}, False),
            ("$in of 5", {"$where": {"pid": {"$in": ["bystander", "a", "b", "c", "d"]}}}, True),
            ("$in of 6", {"$where": {"pid": {"$in": ["bystander", "a", "b", "c", "d", "e"]}}},
             False),
            ("$nin of 6", {"$where": {"pid": {"$nin": ["a", "b", "c", "d", "e", "f"]}}}, False),
        ]
        for what, select, served in cases:
            select = dict(select, **{"$limit": 1})
            messages = yield self.fetch(select)
            if served:
                self.assertEqual(len(messages), 2, what)
                self.assertEqual(messages[0]["pid"], "bystander", what)
                self.assertEqual(messages[-1], "end", what)
            else:
                self.assertEqual(messages, ["error", "end"], what)
        yield self.finish_bystander()

    @defer.inlineCallbacks
    def test_documents_per_persist(self):
        reply = yield self.client.persist([event(n=i) for i in range(3)])
        self.assertEqual(reply[0]["affectedRows"], 3)
        reply = yield self.client.persist([event(n=i) for i in range(4)])
        self.assertEqual(reply, ["error", "end"])
        self.assertEqual(len(self.rows(where="WHERE pid = 'lim'")), 3)
        yield self.finish_bystander()

    @defer.inlineCallbacks
    def test_limits_crossed_together_under_load(self):
        """Every kind of refusal at once, interleaved with good requests."""
        good, bad = [], []
        for i in range(10):
            # (one good stream at a time: with the bystander, well within max_streams)
            replies = yield defer.gatherResults([
                self.client.persist(event(f"ok{i}")),
                self.fetch({"$where": {"pid": "bystander"}, "$limit": 3}),
                self.client.persist([event(n=n) for n in range(4)]),
                self.fetch({"$where": nested_not(6)}),
                self.fetch({"$where": {"pid": {"$in": list("abcdefgh")}}}),
            ])
            good += replies[:2]
            bad += replies[2:]
        for reply in good:
            self.assertEqual(reply[-1], "end")
            self.assertNotIn("error", reply)
        self.assertEqual(bad, [["error", "end"]] * 30)
        self.assertEqual(len(self.rows(where="WHERE pid LIKE 'ok%'")), 10)
        yield self.finish_bystander()
