"""
The benchmark cannot rot: ``python -m benchmarks --quick`` runs end to
end against the real Redis and MariaDB and writes every figure, ratio and
target.  How fast anything was is not judged here (the machine is shared and
noisy); that it was measured is.

Its pure helpers (the summary, the table, the py-spy reader) are tested on
made-up numbers.
"""

import math
import os
import subprocess
import sys

import pymysql
from twisted.internet import defer, task
from twisted.trial.unittest import TestCase

from benchmarks import metrics_ab, profiling, report
from benchmarks.common import Sizes
from tests.support import MYSQL, REPO, CommandRunTestCase, run_json_command


#: every figure the table shows, plus the connections the idle target adds up
FIGURES = [key for key, _, unit, _, _ in report.ROWS if unit is not None] + [
    "idle_server_connections"]
RATIOS = ["fetch_1_stream_vs_pingpong_1_pair", "fetch_100_streams_vs_pingpong_100_pairs",
          "fetch_window_100_vs_fetch_1_stream", "fetch_window_100_vs_select",
          "persist_50_vs_insert_8_connections", "persist_1_vs_insert_1_connection",
          "persist_v2_expected_50_vs_persist_v2_50", "persist_v2_50_vs_persist_50",
          "subscribe_catch_up_vs_fetch_window_100",
          "subscribe_catch_up_vs_fetch_v2_window_100"]
#: figures that are rates: a run that measured anything has them above zero
RATES = [key for key in FIGURES if key.endswith("_per_s")]


_quick = {}


def quick_run():
    """Run ``--quick`` once for all the tests below: ``(process, results or None)``."""
    return run_json_command("benchmarks", "--quick", cache=_quick)


class QuickRunTests(CommandRunTestCase):
    """``--quick`` against the real services, as a command, as CI runs it."""

    def run_once(self):
        return quick_run()

    def test_every_figure_and_ratio(self):
        figures = self.results["figures"]
        self.assertEqual(sorted(set(FIGURES + RATIOS) - set(figures)), [])
        for key in FIGURES + RATIOS:
            value = figures[key]["value"]
            self.assertIsInstance(value, (int, float), key)
            self.assertTrue(math.isfinite(value) and value >= 0, f"{key} = {value}")
            self.assertEqual(len(figures[key]["runs"]), 1, key)
        for key in RATES + RATIOS:
            self.assertGreater(figures[key]["value"], 0, key)

    def test_targets(self):
        targets = self.results["targets"]
        self.assertEqual([t["key"] for t in targets], [t[1] for t in report.TARGETS])
        for target in targets:
            self.assertIsInstance(target["pass"], bool)
        for target in report.TARGETS:
            self.assertIn(target[0], self.process.stdout)
        lines = [line for line in self.process.stdout.splitlines()
                 if line.startswith(("PASS  ", "FAIL  "))]
        self.assertEqual(len(lines), len(report.TARGETS))

    def test_machine_and_sizes(self):
        self.assertTrue(self.results["quick"])
        self.assertEqual(self.results["repeat"], 1)
        self.assertEqual(len(self.results["repetitions"]), 1)
        for key in ("arch", "cpu", "cores", "python", "redis", "mariadb"):
            self.assertTrue(self.results["machine"][key], key)

    def test_idle_streams_measured_on_the_server(self):
        figures = self.results["figures"]
        self.assertGreater(figures["idle_rss_open_kb"]["value"], 0)
        self.assertGreater(figures["idle_threads_open"]["value"], 0)
        self.assertGreaterEqual(figures["idle_redis_connections"]["value"], 1)
        self.assertGreaterEqual(figures["idle_mysql_connections"]["value"], 1)

    def test_database_dropped(self):
        connection = pymysql.connect(**MYSQL)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SHOW DATABASES LIKE %s", (self.results["database"],))
                self.assertEqual(cursor.fetchall(), ())
        finally:
            connection.close()


def _rep(scale=1.0):
    """One made-up repetition with every figure."""
    figures = {key: 100.0 * scale for key in FIGURES if key != "idle_server_connections"}
    figures.update(idle_mysql_connections=10, idle_redis_connections=2, idle_threads_added=1,
                   idle_rss_kb_per_stream=12.0 * scale)
    figures["pingpong_1_pair_rt_per_s"] = 4000.0 * scale
    figures["fetch_1_stream_rows_per_s"] = 3800.0 * scale
    figures.update(report.ratios(figures))
    return figures


class ImportTests(TestCase):
    def test_no_global_reactor_at_import(self):
        """Importing any part of the benchmark installs no reactor: react() chooses it."""
        names = sorted(name[:-3] for name in os.listdir(os.path.join(REPO, "benchmarks"))
                       if name.endswith(".py") and name != "__main__.py")
        self.assertIn("scenarios", names)
        code = ("import importlib, sys\n"
                f"for name in {names!r}:\n"
                "    importlib.import_module('benchmarks' if name == '__init__' else "
                "'benchmarks.' + name)\n"
                "print('twisted.internet.reactor' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
        self.assertEqual((out.returncode, out.stdout.strip()), (0, "False"), out.stderr)

    def test_not_in_the_package(self):
        """The benchmark needs a checkout: it is no module of the installed package."""
        self.assertFalse(os.path.exists(os.path.join(REPO, "eventsource", "bench.py")))
        self.assertEqual(os.path.dirname(report.__file__), os.path.join(REPO, "benchmarks"))


class SummaryTests(TestCase):
    def test_medians_and_worst(self):
        summary, _ = report.summarize([_rep(1), _rep(3), _rep(2)], pool_size=10)
        self.assertEqual(summary["pingpong_1_pair_rt_per_s"]["value"], 8000.0)
        self.assertEqual(summary["pingpong_1_pair_rt_per_s"]["runs"], [4000.0, 12000.0, 8000.0])
        # memory is judged by its worst repetition, not its median
        self.assertEqual(summary["idle_rss_kb_per_stream"]["value"], 36.0)
        self.assertEqual(summary["idle_server_connections"]["value"], 12)

    def test_targets(self):
        _, targets = report.summarize([_rep()], pool_size=10)
        verdicts = {t["key"]: t["pass"] for t in targets}
        self.assertEqual(verdicts, {
            "fetch_1_stream_vs_pingpong_1_pair": True,  # 0.95
            "fetch_100_streams_vs_pingpong_100_pairs": True,  # 1.0
            "fetch_window_100_vs_fetch_1_stream": False,  # 100 / 3800
            "persist_50_vs_insert_8_connections": True,
            "persist_v2_expected_50_vs_persist_v2_50": True,  # 1.0
            "idle_threads_added": True,
            "idle_server_connections": True,  # 12 <= pool size + 2
            "idle_rss_kb_per_stream": True,
            "subscribe_catch_up_vs_fetch_v2_window_100": True,  # 1.0
            "live_1000_p99_ms": True,  # 100 <= 100
        })

    def test_table(self):
        summary, targets = report.summarize([_rep(), _rep()], pool_size=10)
        machine = dict(arch="x86_64", cpu="CPU", cores=2, python="3.11", redis="7",
                       mariadb="10.11")
        sizes = Sizes(rows=1000, fetch_1_rows=100, rows_per_stream=10, streams=100,
                            pairs=100, window=100, duration=0.5, first_row_samples=2,
                            idle_streams=10, repeat=2)
        table = report.format_table(summary, targets, machine, sizes, 2)
        self.assertIn("x86_64, CPU, 2 cores", table)
        self.assertIn("Redis ping-pong, 1 pair", table)
        self.assertIn("FAIL  windowed fetch", table)
        self.assertIn("PASS  idle streams: <= 30 KB RSS each", table)


_quick_ab = {}


class MetricsABQuickRunTests(CommandRunTestCase):
    """``--quick --metrics-ab``: two servers at once, interleaved slices, a ratio a figure."""

    def run_once(self):
        # (scraped five times a second: several scrapes fall in the few short slices)
        return run_json_command("benchmarks", "--quick", "--metrics-ab", "--scrape-interval",
                                "0.2", cache=_quick_ab)

    def setUp(self):
        super().setUp()
        self.ab = self.results["metrics"]["ab"]

    def test_a_ratio_per_figure(self):
        summary = self.ab["summary"]
        self.assertEqual(sorted(summary), sorted(metrics_ab.THROUGHPUT + metrics_ab.CPU))
        for key, figure in summary.items():
            for name in ("ratio", "off", "on", "pair_median"):
                self.assertTrue(math.isfinite(figure[name]) and figure[name] > 0,
                                f"{key} {name} = {figure[name]}")
            low, high = figure["ci95"]
            self.assertLessEqual(low, high, key)
            self.assertEqual(figure["slices"], {"off": 4, "on": 4}, key)
            self.assertEqual(figure["pairs"], 4, key)
        for line in metrics_ab.format_summary(summary):
            self.assertIn(line.strip(), self.process.stderr)
        self.assertEqual(self.results["repetitions"], [])

    def test_slices_alternate_between_the_servers(self):
        """Off, on, on, off, off, on, on, off: each figure's slices, in the order they ran."""
        records = self.ab["records"]
        for figure in metrics_ab.FIGURES:
            mine = [r for r in records if r["figure"] == figure.name]
            self.assertEqual([r["side"] for r in mine], ["off", "on", "on", "off"] * 2,
                             figure.name)
            self.assertEqual([r["pair"] for r in mine], [0, 0, 1, 1, 2, 2, 3, 3])
            for record in mine:
                self.assertGreater(record["work"], 0, record)
                self.assertGreater(record["seconds"], 0, record)
                self.assertGreaterEqual(record["server_cpu_s"], 0, record)

    def test_only_the_on_server_is_scraped_and_only_in_its_slices(self):
        records = self.ab["records"]
        self.assertEqual(sum(r["scrapes"] for r in records if r["side"] == "off"), 0)
        scraped = sum(r["scrapes"] for r in records if r["side"] == "on")
        self.assertGreater(scraped, 0)
        metrics = self.results["metrics"]
        self.assertEqual(metrics["scrape_interval"], 0.2)
        self.assertGreaterEqual(metrics["ok"], scraped)
        self.assertEqual(metrics["failed"], 0)

    def test_two_servers_on_one_table(self):
        off, on = (self.ab["servers"][side].split() for side in ("off", "on"))
        self.assertNotIn("--http-port", off)
        self.assertIn("--http-port", on)
        self.assertEqual(off[off.index("--table") + 1], on[on.index("--table") + 1])
        self.assertNotEqual(off[off.index("--channel-prefix") + 1],
                            on[on.index("--channel-prefix") + 1])


def _record(figure, side, pair, work, seconds, cpu):
    return {"figure": figure, "side": side, "pair": pair, "work": work, "seconds": seconds,
            "server_cpu_s": cpu, "scrapes": 0}


class MetricsABTests(TestCase):
    def test_abba(self):
        self.assertEqual([side for pair in range(4) for side in metrics_ab.pair_order(pair)],
                         ["off", "on", "on", "off", "off", "on", "on", "off"])

    def test_ratio_of_the_totals_through_drift(self):
        """
        A machine twice as fast from the third pair on moves both servers of
        a pair: "on" does 2 % less in every pair, and that is the ratio of
        the totals, the pairs' median and the bootstrap's whole interval.
        """
        records = []
        for pair in range(6):
            speed = 1.0 if pair < 2 else 2.0
            for side in metrics_ab.pair_order(pair):
                work = 1000 * speed * (0.98 if side == "on" else 1.0)
                records.append(_record("persist_50", side, pair, work, 1.0,
                                       work * (50e-6 if side == "on" else 40e-6)))
        summary = metrics_ab.summarize(records)
        self.assertEqual(set(summary), {"persist_50_per_s", "persist_50_server_cpu_us"})
        rate = summary["persist_50_per_s"]
        self.assertAlmostEqual(rate["ratio"], 0.98)
        self.assertAlmostEqual(rate["pair_median"], 0.98)
        self.assertAlmostEqual(rate["ci95"][0], 0.98)
        self.assertAlmostEqual(rate["ci95"][1], 0.98)
        self.assertAlmostEqual(rate["off"], (2 * 1000 + 4 * 2000) / 6)
        self.assertEqual((rate["slices"], rate["pairs"]), ({"off": 6, "on": 6}, 6))
        cpu = summary["persist_50_server_cpu_us"]
        self.assertAlmostEqual(cpu["ratio"], 1.25)
        self.assertAlmostEqual(cpu["off"], 40.0)
        self.assertAlmostEqual(cpu["on"], 50.0)
        lines = metrics_ab.format_summary(summary)
        self.assertIn("persist_50_per_s (throughput): on / off 0.980 (95 % 0.980-0.980", lines[0])
        self.assertIn("6 + 6 slices", lines[0])

    def test_totals_weigh_slices_by_their_time(self):
        """The ratio is of work over time summed, not a mean of the pairs' ratios."""
        records = [_record("fetch_1_stream", "off", 0, 100, 1.0, 0.1),
                   _record("fetch_1_stream", "on", 0, 300, 1.0, 0.3),
                   _record("fetch_1_stream", "on", 1, 100, 3.0, 0.1),
                   _record("fetch_1_stream", "off", 1, 100, 1.0, 0.1)]
        figure = metrics_ab.summarize(records)["fetch_1_stream_rows_per_s"]
        self.assertAlmostEqual(figure["ratio"], (400 / 4.0) / (200 / 2.0))  # 1.0
        self.assertAlmostEqual(figure["pair_median"], (3.0 + 1 / 3) / 2)
        self.assertEqual(figure["pair_iqr"][0] <= figure["pair_median"] <= figure["pair_iqr"][1],
                         True)
        low, high = figure["ci95"]
        self.assertTrue(low <= 1.0 <= high, figure["ci95"])

    def test_an_unpaired_slice_is_left_out(self):
        records = [_record("persist_1", "off", 0, 100, 1.0, 0.1),
                   _record("persist_1", "on", 0, 90, 1.0, 0.1),
                   _record("persist_1", "on", 1, 10, 1.0, 0.1)]
        figure = metrics_ab.summarize(records)["persist_1_per_s"]
        self.assertAlmostEqual(figure["ratio"], 0.9)
        self.assertEqual(figure["pairs"], 1)

    def test_scrapes_only_while_resumed(self):
        """Every interval of the time resumed, the first at once; none while paused."""
        clock = task.Clock()
        answers = []

        def scrape():
            d = defer.Deferred()
            answers.append(d)
            return d

        scraper = metrics_ab.SliceScraper(clock, 1.0, scrape)
        scraper.resume()
        clock.advance(0)
        self.assertEqual(scraper.count, 1)
        answers[-1].callback(None)
        clock.advance(0.5)
        self.successResultOf(scraper.pause())
        clock.advance(10)  # (the other server's slices)
        self.assertEqual(scraper.count, 1)
        scraper.resume()
        clock.advance(0.25)
        self.assertEqual(scraper.count, 1)
        clock.advance(0.25)  # 1.0 s resumed in all
        self.assertEqual(scraper.count, 2)
        clock.advance(1.0)
        self.assertEqual(scraper.count, 3)
        # a pause waits for the scrape under way: its cost stays with "on"
        paused = scraper.pause()
        self.assertNoResult(paused)
        answers[1].callback(None)
        self.assertNoResult(paused)
        answers[2].callback(None)
        self.successResultOf(paused)
        self.assertAlmostEqual(scraper.elapsed, 2.0)
        clock.advance(5)
        self.assertEqual(scraper.count, 3)


class PySpyTests(TestCase):
    def test_summary(self):
        site = "/usr/lib/python3.11/site-packages/"
        run = f"MainThread;run ({site}twisted/internet/base.py:1);doRead ({site}twisted/internet/tcp.py:2)"
        pool = f"PoolThread-1;worker ({site}twisted/python/threadpool.py:7);work (eventsource/store.py:9)"
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                f"thread (1): {run};publish (eventsource/bus.py:3) 6\n"
                f"thread (1): {run} 2\n"
                f"thread (2): {pool};encode_row (eventsource/wire.py:4) 2\n"
                f"thread (2): {pool};fetchall (pymysql/cursors.py:5) 1\n"
                f"thread (1): MainThread;run ({site}twisted/internet/base.py:1);"
                f"doPoll ({site}twisted/internet/epollreactor.py:3) 5\n"
            )
        summary = profiling.pyspy_summary(path)
        self.assertEqual(summary["samples"], 11)
        self.assertEqual(summary["threads"], {"reactor": 8, "other threads": 3})
        self.assertEqual(summary["waiting"], {"reactor": 5})
        top = summary["by_own_samples"][0]
        self.assertEqual((top["thread"], top["function"], top["samples"]),
                         ("reactor", "publish (eventsource/bus.py)", 6))
        inclusive = {r["function"]: r["samples"] for r in summary["by_inclusive_samples"]}
        # the reactor loop and the thread pool only pass work along: left out
        self.assertNotIn("run (twisted/internet/base.py)", inclusive)
        self.assertNotIn("doRead (twisted/internet/tcp.py)", inclusive)
        self.assertNotIn("worker (twisted/python/threadpool.py)", inclusive)
        self.assertEqual(inclusive["publish (eventsource/bus.py)"], 6)
        self.assertEqual(inclusive["work (eventsource/store.py)"], 3)
        self.assertEqual(inclusive["encode_row (eventsource/wire.py)"], 2)

    def test_short_paths(self):
        self.assertEqual(profiling._short_path("/x/lib/python3.11/site-packages/txredisapi.py"),
                         "txredisapi.py")
        self.assertEqual(profiling._short_path("/x/lib/python3.11/json/encoder.py"),
                         "json/encoder.py")
        self.assertEqual(profiling._short_path(os.path.join(REPO, "eventsource", "bus.py")),
                         os.path.join("eventsource", "bus.py"))


class RunBenchmarkTests(TestCase):
    """The three commands' shared run (benchmarks.common.run_benchmark), in a process of its own."""

    def run_command(self, body):
        code = ("import sys\n"
                "from twisted.internet import defer\n"
                "from benchmarks.common import BenchError, run_benchmark\n"
                f"{body}\n"
                "ran = run_benchmark(benchmark, None)\n"
                "print('ran', ran if ran is None else (ran[0], ran[1] >= 0))\n")
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                              text=True, timeout=60)

    def test_result_and_seconds(self):
        process = self.run_command(
            "def benchmark(reactor, options, log):\n"
            "    log('working')\n"
            "    return defer.succeed({'figure': 1})")
        self.assertEqual(process.stdout.strip(), "ran ({'figure': 1}, True)")
        self.assertRegex(process.stderr, r"^\[ +\d+\.\d s\] working\n$")

    def test_a_failure_is_printed_and_none_returned(self):
        process = self.run_command(
            "def benchmark(reactor, options, log):\n"
            "    return defer.fail(BenchError('no MariaDB'))")
        self.assertEqual(process.stdout.strip(), "ran None")
        self.assertIn("benchmark failed: no MariaDB", process.stderr)
        process = self.run_command(
            "def benchmark(reactor, options, log):\n"
            "    raise ValueError('a bug')")
        self.assertEqual(process.stdout.strip(), "ran None")
        self.assertIn("ValueError: a bug", process.stderr)
