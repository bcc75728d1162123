"""
The pure decisions of version 2 appends (eventsource.appends): expected
versions and what stored event ids say of a repeated request.
"""

from twisted.trial.unittest import SynchronousTestCase

from eventsource import appends
from eventsource.appends import (ANY, NO_STREAM, STREAM_EXISTS, Append, Appended, Event,
                                 Expectation, IdempotencyConflict, WrongExpectedVersion)

ROW = ("d", "n", "null")


def ids(*numbers):
    return tuple(bytes([n]) * 16 for n in numbers)


class CheckTests(SynchronousTestCase):
    def test_each_spec(self):
        last = {"a": 3}
        self.assertIsNone(appends.check([Expectation("a", 3)], last))
        self.assertIsNone(appends.check([Expectation("a", STREAM_EXISTS)], last))
        self.assertIsNone(appends.check([Expectation("b", NO_STREAM)], last))
        for pid, spec, actual in (("a", 2, 3), ("a", 4, 3), ("a", NO_STREAM, 3),
                                  ("b", STREAM_EXISTS, None), ("b", 0, None)):
            wrong = appends.check([Expectation(pid, spec)], last)
            self.assertIsInstance(wrong, WrongExpectedVersion)
            self.assertEqual((wrong.pid, wrong.expected, wrong.actual), (pid, spec, actual))
            self.assertEqual(wrong.code, "wrongExpectedVersion")

    def test_the_first_failing_stream_is_named(self):
        wrong = appends.check([Expectation("a", 3), Expectation("b", 1), Expectation("c", 9)],
                              {"a": 3, "b": 2})
        self.assertEqual(wrong.pid, "b")

    def test_streams_ignore_trailing_spaces_as_mariadb_does(self):
        self.assertIsNone(appends.check([Expectation("a  ", 3)], {"a": 3}))

    def test_messages_name_the_stream_and_both_states(self):
        self.assertEqual(str(WrongExpectedVersion("p1", 3, 4)),
                         'stream "p1" is at version 4, not version 3')
        self.assertEqual(str(WrongExpectedVersion("p1", NO_STREAM, 0)),
                         'stream "p1" is at version 0, not no events')
        self.assertEqual(str(WrongExpectedVersion("p1", STREAM_EXISTS, None)),
                         'stream "p1" has no events, not at least one event')
        self.assertNotIn(ANY, [NO_STREAM, STREAM_EXISTS])


class RepeatedTests(SynchronousTestCase):
    def append(self, pids, event_ids):
        return Append(tuple((pid,) + ROW for pid in pids), event_ids)

    def test_nothing_stored_is_a_new_append(self):
        self.assertIsNone(appends.repeated(self.append("ab", ids(1, 2)), {}))

    def test_all_stored_in_order_is_the_original_success(self):
        stored = {ids(1)[0]: ("a", 4, 10), ids(2)[0]: ("b", 0, 11), ids(3)[0]: ("a", 5, 12)}
        outcome = appends.repeated(self.append("aba", ids(1, 2, 3)), stored)
        self.assertEqual(outcome, Appended((Event(ids(1)[0], "a", 4, 10), Event(ids(2)[0], "b", 0, 11),
                                            Event(ids(3)[0], "a", 5, 12)), duplicate=True))

    def test_some_stored_is_a_conflict(self):
        outcome = appends.repeated(self.append("aa", ids(1, 2)), {ids(2)[0]: ("a", 0, 1)})
        self.assertIsInstance(outcome, IdempotencyConflict)
        self.assertEqual(outcome.event_id, ids(2)[0])
        self.assertEqual(outcome.code, "idempotencyConflict")

    def test_stored_for_another_stream_is_a_conflict(self):
        outcome = appends.repeated(self.append("a", ids(1)), {ids(1)[0]: ("b", 0, 1)})
        self.assertIsInstance(outcome, IdempotencyConflict)
        self.assertIn('"b"', str(outcome).replace("'", '"'))

    def test_stored_in_another_order_is_a_conflict(self):
        stored = {ids(1)[0]: ("a", 1, 2), ids(2)[0]: ("a", 0, 1)}
        self.assertIsInstance(appends.repeated(self.append("aa", ids(1, 2)), stored),
                              IdempotencyConflict)

    def test_stored_apart_is_a_conflict(self):
        # (two separate appends' events are not one request's)
        stored = {ids(1)[0]: ("a", 0, 1), ids(2)[0]: ("a", 2, 3)}
        self.assertIsInstance(appends.repeated(self.append("aa", ids(1, 2)), stored),
                              IdempotencyConflict)

    def test_trailing_spaces_are_the_same_stream(self):
        outcome = appends.repeated(self.append(["a "], ids(1)), {ids(1)[0]: ("a", 0, 1)})
        self.assertTrue(outcome.duplicate)

    def test_event_ids_are_written_as_uuids(self):
        self.assertEqual(appends.format_event_id(bytes.fromhex("0192f7b08c4e7cc19f0e2b6a3c1d5e4f")),
                         "0192f7b0-8c4e-7cc1-9f0e-2b6a3c1d5e4f")
