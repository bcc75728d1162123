"""
``python -m benchmarks.table_size`` cannot rot: a run with tiny tables
(``--sizes 200,2000 --quick``) against the real Redis and MariaDB writes
every figure at every size, its ratio and its verdict.  How fast anything was
is not judged here; that it was measured is.  The fill is checked on a real
table; the verdict and the table on made-up numbers.
"""

import argparse
import json
import uuid
from types import SimpleNamespace

import pymysql
from twisted.trial.unittest import TestCase

from benchmarks import table_size
from benchmarks.common import mysql_settings
from eventsource import schema
from tests.support import MYSQL, CommandRunTestCase, run_json_command

KEYS = [key for key, _, _, _ in table_size.FIGURES]

_quick = {}


def quick_run():
    """Run it once for all the tests below: ``(process, results or None)``."""
    return run_json_command("benchmarks.table_size", "--sizes", "200,2000", "--quick",
                            cache=_quick)


class QuickRunTests(CommandRunTestCase):
    """Tiny tables against the real services, as a command."""

    def run_once(self):
        return quick_run()

    def test_every_figure_at_every_size(self):
        summary = self.results["summary"]
        self.assertEqual(sorted(summary), sorted(KEYS))
        for key in KEYS:
            row = summary[key]
            self.assertEqual(sorted(row["medians"]), ["200", "2000"], key)
            for value in row["medians"].values():
                self.assertGreater(value, 0, key)
            self.assertEqual(list(row["ratios"]), ["2000"], key)
            self.assertEqual(len(row["ratios"]["2000"]["runs"]), 1, key)
            self.assertIn(row["verdicts"]["2000"], ("PASS", "FAIL"), key)

    def test_table_printed(self):
        for _, label, _, _ in table_size.FIGURES:
            self.assertIn(label, self.process.stdout)
        self.assertIn("filled 200 in", self.process.stdout)

    def test_fixed_reads(self):
        """The reads do not scale with the table: the smallest table bounds them."""
        self.assertEqual(self.results["read_rows"], 200)
        self.assertEqual(self.results["stream_rows"], 2)

    def test_plans_of_the_servers_pages(self):
        """EXPLAIN of the server's own first pages: each through the key it names."""
        for size in ("200", "2000"):
            plans = self.results["plans"][size]
            self.assertEqual(plans["first_row"][0][5], "pid_id")
            self.assertEqual(plans["window_end"][0][5], "PRIMARY")
            self.assertEqual(plans["stream_read"][0][5], "pid_version")
            self.assertEqual(plans["catch_up"][0][5], "PRIMARY")

    def test_database_dropped(self):
        connection = pymysql.connect(**MYSQL)
        try:
            with connection.cursor() as cursor:
                self.assertEqual(len(self.results["databases"]), 2)
                for database in self.results["databases"]:
                    cursor.execute("SHOW DATABASES LIKE %s", (database,))
                    self.assertEqual(cursor.fetchall(), ())
        finally:
            connection.close()


class FillTests(TestCase):
    """The fill on a real table: the main benchmark's rows, grown in steps."""

    def setUp(self):
        self.database = f"test_table_size_{uuid.uuid4().hex[:8]}"
        self.connection = pymysql.connect(autocommit=True, **MYSQL)
        self.addCleanup(self.connection.close)
        with self.connection.cursor() as cursor:
            for statement in schema.create_statements(self.database, "event"):
                cursor.execute(statement)
        self.addCleanup(self._drop)
        self.run = SimpleNamespace(mysql=mysql_settings(), database=self.database,
                                   table=f"`{self.database}`.`event`")

    def _drop(self):
        with self.connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{self.database}`")

    def rows(self):
        with self.connection.cursor() as cursor:
            cursor.execute(f"SELECT `id`, `pid`, `version`, `data` FROM {self.run.table}"
                           " ORDER BY `id`")
            return cursor.fetchall()

    def test_grown_in_steps(self):
        self.patch(table_size, "FILL_CHUNK", 70)
        table_size.fill(self.run, 0, 150)
        table_size.fill(self.run, 150, 420)
        rows = self.rows()
        self.assertEqual(len(rows), 420)
        for i, (_, pid, version, data) in enumerate(rows):
            self.assertEqual((pid, version), (f"p{i % 100}", i // 100))
            self.assertEqual(data, json.dumps({"i": i, "user": f"u-{i}", "amount": 12.5}))
        self.assertEqual(table_size.position_before_last(self.run, 20), rows[-21][0])
        self.assertEqual(table_size.position_before_last(self.run, 420), 0)


class VerdictTests(TestCase):
    def _rep(self, **changes):
        figures = {key: 100.0 for key in KEYS}
        figures.update(changes)
        return figures

    def test_within_ten_percent(self):
        self.assertEqual(table_size.verdict(0.9, True), "PASS")
        self.assertEqual(table_size.verdict(0.89, True), "FAIL")
        self.assertEqual(table_size.verdict(3.0, True), "PASS")
        self.assertEqual(table_size.verdict(1.1, False), "PASS")
        self.assertEqual(table_size.verdict(1.11, False), "FAIL")
        self.assertEqual(table_size.verdict(0.5, False), "PASS")

    def test_ratios_taken_within_each_pair(self):
        """A noisy repetition moves both tables: its ratio, not the medians', counts."""
        pairs = [(self._rep(), self._rep(persist_50_per_s=95.0)),
                 (self._rep(persist_50_per_s=50.0),
                  self._rep(persist_50_per_s=47.0, first_row_ms=130.0))]
        summary = table_size.summarize(10000, {1000000: pairs})
        persist = summary["persist_50_per_s"]
        self.assertEqual(persist["medians"], {10000: 75.0, 1000000: 71.0})
        self.assertEqual(persist["ratios"][1000000]["runs"], [0.95, 0.94])
        self.assertAlmostEqual(persist["ratios"][1000000]["median"], 0.945)
        self.assertEqual(persist["verdicts"], {1000000: "PASS"})
        first = summary["first_row_ms"]
        self.assertAlmostEqual(first["ratios"][1000000]["median"], 1.15)
        self.assertEqual(first["verdicts"], {1000000: "FAIL"})
        self.assertNotIn(10000, persist["ratios"])

    def test_three_sizes_against_the_smallest(self):
        """Each larger table against its own pairs; the smallest's median over all of them."""
        summary = table_size.summarize(10, {
            100: [(self._rep(rss_kb=50.0), self._rep())],
            1000: [(self._rep(rss_kb=100.0), self._rep(rss_kb=105.0))]})
        self.assertEqual(summary["rss_kb"]["medians"], {10: 75.0, 100: 100.0, 1000: 105.0})
        self.assertEqual(summary["rss_kb"]["ratios"][100]["runs"], [2.0])
        self.assertEqual(summary["rss_kb"]["verdicts"], {100: "FAIL", 1000: "PASS"})

    def test_table(self):
        summary = table_size.summarize(10000, {1000000: [
            (self._rep(), self._rep(catch_up_rows_per_s=80.0)), (self._rep(), self._rep())]})
        table = table_size.format_table(summary)
        lines = table.splitlines()
        self.assertEqual(len(lines), 2 + len(KEYS))
        self.assertIn("| figure | 10,000 | 1,000,000 | ratio 1,000,000 (runs) | "
                      "verdict 1,000,000 |", lines[0])
        catch_up = next(line for line in lines if "catch-up" in line)
        self.assertIn("| 0.90 (0.80, 1.00) | PASS |", catch_up)

    def test_sizes_option(self):
        self.assertEqual(table_size.parse_sizes("10000,1_000_000"), [10000, 1000000])
        for bad in ("10000", "1000,100", "50,1000", "100,100"):
            with self.assertRaises(argparse.ArgumentTypeError):
                table_size.parse_sizes(bad)
        self.assertEqual(table_size.parse_args([]).sizes, [10000, 1000000])
        self.assertEqual(table_size.parse_args([]).repeat, 1)
