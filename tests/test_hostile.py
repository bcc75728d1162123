"""
Hostile bodies: whatever their shape, judging a body costs time linear in
its size, so one message cannot freeze the reactor for everyone else.
"""

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from eventsource import wire
from tests.support import IntegrationTestCase, unique

LIMIT = 4 * 1024 * 1024

#: the body an attacker found: an unterminated string of escaped quotes
#: after 65 brackets (quadratic before: 60 KB took 15 s)
def escaped_quotes(size):
    return "[" * 65 + '"' + '\\"' * ((size - 66) // 2)


#: pieces that stress a JSON pre-scan: quotes, escapes, brackets, newlines
_pieces = st.sampled_from(['"', '\\"', "\\", "\\\\", "[", "{", "]", "}", "a", "\n", '\\\n', ":", ","])
_shapes = st.lists(_pieces, min_size=1, max_size=12).map("".join)


def judge(body):
    started = time.perf_counter()
    try:
        wire.parse_request("fetch", body, LIMIT)
    except wire.BadRequest:
        pass
    return time.perf_counter() - started


class LinearParseTests(SynchronousTestCase):
    """Bodies up to the size limit are judged in time linear in their size."""

    def test_escaped_quotes_up_to_the_limit(self):
        small = judge(escaped_quotes(64 * 1024))
        self.assertLess(small, 0.25)   # (quadratic: 48 KB took 9.6 s; fail fast, not in hours)
        large = judge(escaped_quotes(LIMIT))
        # linear: 4 MiB is 64 x 64 KiB; quadratic would be ~4000 x (hours)
        self.assertLess(large, 2.0)
        self.assertLess(large, max(small, 0.001) * 64 * 8)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_shapes, st.integers(0, 70))
    def test_any_repeated_shape(self, shape, brackets):
        # a prefix of brackets makes the pre-scan run; the shape fills the body
        body = "[" * brackets + shape * (1024 * 1024 // len(shape))
        self.assertLess(judge(body), 1.0, repr(shape))


class BystanderTests(IntegrationTestCase):
    """A healthy stream does not notice hostile bodies on every request channel."""

    server_config = dict(row_timeout=1.0)

    @defer.inlineCallbacks
    def test_stream_survives_hostile_bodies(self):
        yield self.client.persist([{"pid": "b", "domain": "d", "name": "n"} for _ in range(40)])
        channel = unique("reply")
        yield self.client.subscribe(channel)
        yield self.client.request("fetch", {"channel": channel, "query": {"$select": {}}})
        stream = self.client.drain(channel)
        for kind in ("persist", "fetch", "fetch-next"):
            yield self.client.request(kind, escaped_quotes(LIMIT - 100))
        messages = yield stream
        self.assertEqual(len(messages), 41)
        self.assertEqual(messages[-1], "end")
