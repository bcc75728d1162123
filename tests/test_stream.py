"""
Every transition of the reply-channel machine, driven with a Clock and
recording fakes: exact output sequences, timers, late messages.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from transitions import MachineError

from eventsource.stream import MACHINE, StreamState, EchoBudget, Stream

END, ERROR, TIMEOUT = '"end"', '"error"', '"timeout"'


class Harness:
    """A stream wired to a recording publisher and a manual row source."""

    def __init__(self, window=1, timeout=5.0, window_bytes=None, budget=None, clock=None,
                 channel="reply-1"):
        self.clock = clock or Clock()
        self.out = []
        self.fetches = 0
        self.closed = []
        self.stream = Stream.open(
            channel,
            window=window,
            window_bytes=window_bytes,
            budget=budget,
            row_timeout=timeout,
            clock=self.clock,
            publish=lambda channel, body: self.out.append(body),
            fetch_more=self._fetch_more,
            closed=self.closed.append,
        )

    def _fetch_more(self, stream):
        self.asked_by = stream
        self.fetches += 1

    @property
    def state(self):
        return self.stream.state


class Version1Tests(SynchronousTestCase):
    """Window 1: one row, its acceptance, the next row, then "end"."""

    def test_starts_awaiting_row_and_asks_for_rows(self):
        h = Harness()
        self.assertEqual(h.state, StreamState.AWAITING_ROW)
        self.assertEqual(h.fetches, 1)
        self.assertIs(h.asked_by, h.stream)
        # (driven by the shared machine, never registered with it)
        self.assertEqual(MACHINE.models, [])
        self.assertEqual(h.out, [])

    def test_no_rows_is_just_end(self):
        h = Harness()
        h.stream.receive([], True)
        self.assertEqual(h.out, [END])
        self.assertEqual(h.state, StreamState.ENDED)
        self.assertEqual(h.closed, [h.stream])
        self.assertNotIn(h.stream, MACHINE.models)

    def test_one_row_at_a_time_then_end_after_last_acceptance(self):
        h = Harness()
        h.stream.receive(["r1", "r2"], True)
        self.assertEqual(h.out, ["r1"])
        self.assertEqual(h.state, StreamState.AWAITING_ACCEPT)
        h.stream.accept()
        self.assertEqual(h.out, ["r1", "r2"])
        self.assertEqual(h.state, StreamState.AWAITING_ACCEPT)
        h.stream.accept()
        self.assertEqual(h.out, ["r1", "r2", END])
        self.assertEqual(h.state, StreamState.ENDED)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_asks_for_next_page_when_buffer_runs_dry(self):
        h = Harness()
        h.stream.receive(["r1"], False)
        self.assertEqual(h.fetches, 1)
        h.stream.accept()
        self.assertEqual(h.state, StreamState.AWAITING_ROW)
        self.assertEqual(h.fetches, 2)
        h.stream.receive(["r2"], True)
        self.assertEqual(h.out, ["r1", "r2"])
        h.stream.accept()
        self.assertEqual(h.out[-1], END)

    def test_acceptance_with_no_row_pending_is_ignored(self):
        h = Harness()
        h.stream.accept()
        self.assertEqual(h.state, StreamState.AWAITING_ROW)
        h.stream.receive(["r1", "r2"], True)
        h.stream.accept(5)  # only one row is out: counts as one
        self.assertEqual(h.out, ["r1", "r2"])

    def test_timeout(self):
        h = Harness(timeout=5)
        h.stream.receive(["r1", "r2"], True)
        h.clock.advance(4.9)
        self.assertEqual(h.state, StreamState.AWAITING_ACCEPT)
        h.clock.advance(0.2)
        self.assertEqual(h.out, ["r1", TIMEOUT])
        self.assertEqual(h.state, StreamState.TIMED_OUT)
        self.assertEqual(h.closed, [h.stream])
        self.assertNotIn(h.stream, MACHINE.models)

    def test_timer_restarts_for_each_row(self):
        h = Harness(timeout=5)
        h.stream.receive(["r1", "r2"], True)
        h.clock.advance(4)
        h.stream.accept()
        h.clock.advance(4)
        self.assertEqual(h.state, StreamState.AWAITING_ACCEPT)
        h.clock.advance(1.5)
        self.assertEqual(h.out, ["r1", "r2", TIMEOUT])

    def test_no_timer_while_waiting_for_the_database(self):
        h = Harness(timeout=5)
        h.clock.advance(60)
        self.assertEqual(h.state, StreamState.AWAITING_ROW)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_stale_timer_while_waiting_for_a_page_does_not_time_out(self):
        h = Harness(timeout=5)
        h.stream.receive(["r1"], False)
        h.clock.advance(4)
        h.stream.accept()  # next page requested; the old deadline (t=5) passes while waiting
        h.clock.advance(3)
        self.assertEqual(h.state, StreamState.AWAITING_ROW)
        h.stream.receive(["r2"], True)  # sent at t=7: a full timeout from now
        h.clock.advance(4.9)
        self.assertEqual(h.state, StreamState.AWAITING_ACCEPT)
        h.clock.advance(0.2)
        self.assertEqual(h.out, ["r1", "r2", TIMEOUT])

    def test_client_end_publishes_nothing(self):
        for rows in ([], ["r1"]):
            h = Harness()
            if rows:
                h.stream.receive(rows, False)
            h.stream.end()
            self.assertEqual(h.out, rows)
            self.assertEqual(h.state, StreamState.ENDED)
            self.assertEqual(h.clock.getDelayedCalls(), [])
            self.assertNotIn(h.stream, MACHINE.models)

    def test_failure_publishes_error_then_end(self):
        h = Harness()
        h.stream.receive(["r1"], False)
        h.stream.fail("boom")
        self.assertEqual(h.out, ["r1", ERROR, END])
        self.assertEqual(h.state, StreamState.ERRORED)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertNotIn(h.stream, MACHINE.models)

    def test_terminal_states_ignore_late_inputs(self):
        for finish in ("end", "fail", "timeout"):
            h = Harness(timeout=1)
            h.stream.receive(["r1", "r2"], False)
            if finish == "end":
                h.stream.end()
            elif finish == "fail":
                h.stream.fail()
            else:
                h.clock.advance(2)
            published = list(h.out)
            h.stream.accept()
            h.stream.end()
            h.stream.fail()
            h.stream.receive(["late"], True)
            h.stream.deadline_passed()
            self.assertEqual(h.out, published, finish)
            self.assertEqual(len(h.closed), 1)

    def test_impossible_trigger_in_live_state_is_a_bug(self):
        h = Harness()
        h.stream.receive(["r1"], False)  # awaiting-accept
        # (room in the echo budget is only ever made for a stream awaiting a row)
        self.assertRaises(MachineError, h.stream.room_made)
        h.stream.end()


class WindowTests(SynchronousTestCase):
    """Window n: up to n unaccepted rows out, "end" right after the last row."""

    def test_never_more_than_window_unaccepted(self):
        h = Harness(window=3)
        h.stream.receive([f"r{i}" for i in range(10)], True)
        self.assertEqual(h.out, ["r0", "r1", "r2"])
        self.assertEqual(h.state, StreamState.AWAITING_ACCEPT)
        h.stream.accept(2)
        self.assertEqual(h.out, ["r0", "r1", "r2", "r3", "r4"])
        h.stream.accept(1)
        self.assertEqual(h.out[-1], "r5")
        h.stream.accept(3)
        self.assertEqual(h.out[-3:], ["r6", "r7", "r8"])
        h.stream.accept(1)
        self.assertEqual(h.out[-2:], ["r9", END])
        self.assertEqual(h.state, StreamState.ENDED)

    def test_partial_window_keeps_asking_for_rows(self):
        h = Harness(window=4)
        h.stream.receive(["r0"], False)
        self.assertEqual(h.state, StreamState.AWAITING_ROW)
        self.assertEqual(h.fetches, 2)
        h.stream.accept()  # acceptance while awaiting a row
        self.assertEqual(h.state, StreamState.AWAITING_ROW)
        self.assertEqual(h.fetches, 2)  # one page at a time
        h.stream.receive(["r1"], True)
        self.assertEqual(h.out, ["r0", "r1", END])

    def test_timeout_measures_oldest_unaccepted_row(self):
        h = Harness(window=2, timeout=5)
        h.stream.receive(["r0"], False)
        h.clock.advance(3)
        h.stream.receive(["r1", "r2"], False)  # r1 out at t=3
        h.stream.accept()  # r0 accepted; r1 oldest, deadline t=8; r2 out at t=3
        h.clock.advance(4.9)  # t=7.9
        self.assertEqual(h.state, StreamState.AWAITING_ACCEPT)
        h.clock.advance(0.2)
        self.assertEqual(h.out, ["r0", "r1", "r2", TIMEOUT])

    def test_acceptance_beyond_sent_is_ignored(self):
        h = Harness(window=5)
        h.stream.receive(["r0", "r1"], False)
        h.stream.accept(100)
        self.assertEqual(h.stream.state, StreamState.AWAITING_ROW)
        h.stream.receive(["r2", "r3", "r4", "r5", "r6", "r7"], False)
        self.assertEqual(h.out, ["r0", "r1", "r2", "r3", "r4", "r5", "r6"])

    def test_the_next_page_is_read_while_the_client_takes_the_last(self):
        """
        Read ahead: a windowed stream asks for its next page once no more
        than a window (or half the last page) is left to send, one read at
        a time; the page read ahead goes out after the rows still held.
        """
        h = Harness(window=3)
        self.assertEqual(h.fetches, 1)
        h.stream.receive([f"r{i}" for i in range(10)], False)
        self.assertEqual(h.out, ["r0", "r1", "r2"])
        self.assertEqual(h.fetches, 1)  # (7 left, more than half of 10)
        h.stream.accept(2)
        self.assertEqual(h.out[-2:], ["r3", "r4"])
        self.assertEqual(h.fetches, 2)  # (5 left: the next page is asked for now)
        self.assertEqual(h.stream.buffered_rows, 5)
        h.stream.accept(3)
        self.assertEqual(h.fetches, 2)  # (never two reads at once)
        h.stream.receive(["s0", "s1"], True)
        self.assertEqual(h.state, StreamState.AWAITING_ACCEPT)
        for _ in range(4):
            h.stream.accept(3)
        self.assertEqual(h.out, [f"r{i}" for i in range(10)] + ["s0", "s1", END])
        self.assertEqual(h.fetches, 2)
        self.assertEqual(h.state, StreamState.ENDED)

    def test_a_page_read_ahead_arriving_when_all_is_sent_finishes(self):
        h = Harness(window=2)
        h.stream.receive(["r0", "r1", "r2"], False)
        self.assertEqual(h.fetches, 2)  # (1 left: at most a window)
        h.stream.accept(1)
        self.assertEqual(h.state, StreamState.AWAITING_ACCEPT)  # (r1 and r2 out)
        h.stream.receive([], True)  # (the page read ahead was empty)
        self.assertEqual(h.out, ["r0", "r1", "r2", END])
        self.assertEqual(h.state, StreamState.ENDED)

    def test_version_one_streams_do_not_read_ahead(self):
        h = Harness()
        h.stream.receive(["r0", "r1"], False)
        h.stream.accept()
        self.assertEqual(h.out, ["r0", "r1"])
        self.assertEqual(h.fetches, 1)  # (a page at a time: idle streams hold one)

    def test_window_one_is_version_one(self):
        one, v1 = Harness(window=1), Harness()
        for h in (one, v1):
            h.stream.receive(["a", "b"], True)
            h.stream.accept()
            h.stream.accept()
        self.assertEqual(one.out, v1.out)
        self.assertEqual(one.out, ["a", "b", END])


def rows(*sizes, tag="r"):
    """Rows of the given sizes, each starting with its tag and number."""
    return [f"{tag}{i}".ljust(size, "x") for i, size in enumerate(sizes)]


class WindowBytesTests(SynchronousTestCase):
    """The window is bounded in bytes too; one row always goes, however large."""

    def test_never_more_than_window_bytes_unaccepted(self):
        h = Harness(window=1000, window_bytes=100)
        sent = rows(40, 40, 40, 10, 90, 30)
        h.stream.receive(sent, True)
        self.assertEqual(h.out, sent[:2])  # 80 bytes; a third row would be 120
        self.assertEqual(h.stream.unaccepted_bytes, 80)
        self.assertEqual(h.state, StreamState.AWAITING_ACCEPT)
        h.stream.accept(1)
        self.assertEqual(h.out, sent[:4])  # 40 + 40 + 10
        h.stream.accept(3)
        self.assertEqual(h.out, sent[:5])  # 90 alone
        h.stream.accept(1)
        self.assertEqual(h.out, sent + [END])
        self.assertEqual(h.state, StreamState.ENDED)

    def test_a_row_larger_than_the_window_goes_alone(self):
        h = Harness(window=1000, window_bytes=100)
        big = rows(500, 500, 20)
        h.stream.receive(big, False)
        self.assertEqual(h.out, big[:1])
        # (rows the byte window holds back: no page is read past them)
        self.assertEqual(h.fetches, 1)
        h.stream.accept(1)
        self.assertEqual(h.out, big[:2])
        # (20 bytes left, under half the page's: the next page is read ahead)
        self.assertEqual(h.fetches, 2)
        h.stream.accept(1)
        self.assertEqual(h.out, big)
        self.assertEqual(h.state, StreamState.AWAITING_ROW)
        self.assertEqual(h.fetches, 2)  # (that read is still under way)

    def test_rows_held_by_the_byte_window_are_never_read_past(self):
        """
        However many rows the window allows, a stream whose rows wait for
        room in the byte window reads no more pages: what it holds stays
        bounded in bytes (1.5 pages), whatever the rows' count.
        """
        h = Harness(window=1000, window_bytes=1000)
        answered = 0
        while answered < h.fetches and answered < 20:  # (every page asked for, answered)
            h.stream.receive(rows(600, 600, tag=f"p{answered}-"), False)
            answered += 1
        self.assertEqual(answered, 2)  # (the first page, and one read ahead)
        self.assertEqual(h.stream.buffered_bytes, 1800)
        self.assertEqual(len(h.out), 1)

    def test_non_ascii_rows_count_their_utf8_bytes(self):
        h = Harness(window=1000, window_bytes=10)
        h.stream.receive(["\u00e9\u00e9\u00e9", "\u00e9\u00e9\u00e9"], True)  # 6 bytes each
        self.assertEqual(len(h.out), 1)
        self.assertEqual(h.stream.unaccepted_bytes, 6)

    def test_buffer_and_window_bytes_are_released(self):
        h = Harness(window=1000, window_bytes=100)
        h.stream.receive(rows(60, 60, 60), False)
        self.assertEqual((h.stream.unaccepted_bytes, h.stream.buffered_bytes), (60, 120))
        h.stream.end()
        self.assertEqual((h.stream.unaccepted_bytes, h.stream.buffered_bytes), (0, 0))


class EchoBudgetTests(SynchronousTestCase):
    """Version 1 streams share a budget of unaccepted bytes, first come, first served."""

    def setUp(self):
        self.clock = Clock()
        self.budget = EchoBudget(100, self.clock)

    def stream(self, name):
        return Harness(budget=self.budget, clock=self.clock, channel=name)

    def test_streams_over_budget_wait_until_bytes_are_accepted(self):
        a, b, c = self.stream("a"), self.stream("b"), self.stream("c")
        a.stream.receive(rows(60, 60, tag="a"), True)
        b.stream.receive(rows(60, tag="b"), True)
        c.stream.receive(rows(30, tag="c"), True)
        self.assertEqual((len(a.out), b.out, c.out), (1, [], []))  # c queues behind b
        self.assertEqual(self.budget.used, 60)
        self.assertEqual(b.state, StreamState.AWAITING_ROW)
        a.stream.accept()
        # a's next row queues behind b and c; they are woken as a follow-up
        self.assertEqual((len(a.out), b.out, c.out), (1, [], []))
        self.clock.advance(0)
        self.assertEqual((len(a.out), len(b.out), len(c.out)), (1, 1, 1))
        self.assertEqual(self.budget.used, 90)
        b.stream.accept()
        c.stream.accept()
        self.assertEqual((b.out[-1], c.out[-1]), (END, END))
        self.clock.advance(0)
        self.assertEqual(len(a.out), 2)
        a.stream.accept()
        self.assertEqual(a.out[-1], END)
        self.assertEqual((self.budget.used, list(self.budget.waiting)), (0, []))

    def test_a_row_larger_than_the_budget_goes_when_nothing_is_out(self):
        a, b = self.stream("a"), self.stream("b")
        a.stream.receive(rows(10, tag="a"), True)
        b.stream.receive(rows(500, tag="b"), True)
        self.assertEqual(b.out, [])
        a.stream.accept()
        self.clock.advance(0)
        self.assertEqual(len(b.out), 1)
        self.assertEqual(self.budget.used, 500)

    def test_ending_streams_give_back_their_bytes_and_their_place(self):
        a, b, c = self.stream("a"), self.stream("b"), self.stream("c")
        a.stream.receive(rows(90, tag="a"), True)
        b.stream.receive(rows(90, tag="b"), True)
        c.stream.receive(rows(90, tag="c"), True)
        b.stream.end()  # waiting, then gone
        self.assertEqual(list(self.budget.waiting), [c.stream])
        self.clock.advance(6)  # a's row times out
        self.assertEqual(a.out[-1], TIMEOUT)
        self.clock.advance(0)
        self.assertEqual(len(c.out), 1)
        self.assertEqual(self.budget.used, 90)
        self.assertEqual(b.out, [])

    def test_waiting_for_the_budget_starts_no_row_timer(self):
        a, b = self.stream("a"), self.stream("b")
        a.stream.receive(rows(90, tag="a"), True)
        b.stream.receive(rows(90, tag="b"), True)
        self.clock.advance(4)
        a.stream.accept()
        self.clock.advance(0)
        self.clock.advance(4.9)  # b's row went out at t=4
        self.assertEqual(b.state, StreamState.AWAITING_ACCEPT)
        self.clock.advance(0.2)
        self.assertEqual(b.out[-1], TIMEOUT)
