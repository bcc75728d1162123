"""
``--metrics-ab``: what serving and scraping the metrics costs, in short
interleaved slices on two servers running at once.

Two servers run side by side on the same database and table, each on a
channel prefix of its own: "off" without ``--http-port``, "on" with it.
For each figure (per-row fetch on 1 and on 100 streams, windowed fetch,
persist with 1 and with 50 in flight) the benchmark runs many short slices
of the same work (``--slice-seconds`` each), alternating between the two
servers in ABBA order (off, on, on, off, off, on, ...): a machine whose
speed drifts over seconds (other work on its two cores) moves both alike,
and both read the same rows of a table that grows for both alike.  The
"on" server's ``/metrics`` is scraped every ``--scrape-interval`` seconds
*of its own slices* (:class:`SliceScraper`): a scrape during an "off" slice
would charge its cost to "off".

Each figure's result is the ratio on / off of the totals (work over time,
summed over every slice of a side; server CPU from ``/proc`` over work),
with its spread: the median and interquartile range of the ratios of the
adjacent pairs (slices 2k and 2k+1, one of each server), and a bootstrap
95 % interval of the totals' ratio, resampling pairs.

The counting behind the metrics (a few integer additions and a ``bisect``
per request) is always on: it is part of both servers, and its own cost is
measured in the reactor thread (docs/OPERATIONS.md, "What the metrics cost").
What differs between the two is the HTTP port and the scrapes.
"""

import math
import random
import statistics
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall

from benchmarks.common import PIDS, Sizes
from benchmarks.processes import Child
from benchmarks.scenarios import Run, warm_up


@dataclass(frozen=True)
class Figure:
    """One figure: what a slice does, and the keys its results go under."""

    name: str
    label: str
    #: the throughput's key (work per second, higher is better)
    rate_key: str
    #: the server CPU's key (µs per unit of work, lower is better)
    cpu_key: str
    #: what a slice's work counts
    unit: str


FIGURES = (
    Figure("fetch_1_stream", "per-row fetch, 1 stream", "fetch_1_stream_rows_per_s",
           "fetch_1_stream_server_cpu_us_per_row", "rows"),
    Figure("fetch_100_streams", "per-row fetch, 100 streams", "fetch_100_streams_rows_per_s",
           "fetch_100_streams_server_cpu_us_per_row", "rows"),
    Figure("fetch_window_100", "windowed fetch (window 100), 1 stream",
           "fetch_window_100_rows_per_s", "fetch_window_100_server_cpu_us_per_row", "rows"),
    Figure("persist_1", "persist, 1 in flight", "persist_1_per_s", "persist_1_server_cpu_us",
           "persists"),
    Figure("persist_50", "persist, 50 in flight", "persist_50_per_s", "persist_50_server_cpu_us",
           "persists"),
)
THROUGHPUT = tuple(figure.rate_key for figure in FIGURES)
CPU = tuple(figure.cpu_key for figure in FIGURES)

#: the two servers, and the order of a pair's slices: ABBA, pair after pair
SIDES = ("off", "on")

#: at most this many uncounted slices on each server size a figure's slices
CALIBRATIONS = 3

#: bootstrap resamples of the pairs, and the seed (the interval is the same for the same slices)
RESAMPLES = 2000
SEED = 14


def pair_order(pair: int) -> tuple[str, str]:
    """Which server goes first in pair ``pair``: off, on | on, off | off, on | ..."""
    return SIDES if pair % 2 == 0 else (SIDES[1], SIDES[0])


class SliceScraper:
    """
    Calls ``scrape`` every ``interval`` seconds of the time between
    :meth:`resume` and :meth:`pause` (the "on" server's slices), the first
    at once: the time paused does not count, so the scrapes per second of
    "on" work are those of a scrape every ``interval`` seconds throughout.
    """

    def __init__(self, clock: Any, interval: float,
                 scrape: Callable[[], "defer.Deferred[Any]"]) -> None:
        self.clock = clock
        self.interval = interval
        self.scrape = scrape
        #: scrapes started
        self.count = 0
        #: seconds resumed so far (up to the last pause, or the last scrape)
        self.elapsed = 0.0
        self._due = 0.0  # when the next scrape is due, in resumed seconds
        self._resumed_at: float | None = None
        self._call: IDelayedCall | None = None
        self._in_flight: list["defer.Deferred[Any]"] = []

    @property
    def running(self) -> bool:
        return self._resumed_at is not None

    def resume(self) -> None:
        assert self._resumed_at is None, "already resumed"
        self._resumed_at = self.clock.seconds()
        self._schedule()

    def _schedule(self) -> None:
        self._call = self.clock.callLater(max(0.0, self._due - self.elapsed), self._fire)

    def _fire(self) -> None:
        self._call = None
        assert self._resumed_at is not None
        now = self.clock.seconds()
        self.elapsed += now - self._resumed_at
        self._resumed_at = now
        self._due += self.interval
        self.count += 1
        d = defer.maybeDeferred(self.scrape)
        self._in_flight.append(d)

        def done(result: object) -> None:
            self._in_flight.remove(d)

        d.addBoth(done)
        self._schedule()

    def pause(self) -> "defer.Deferred[Any]":
        """Stop scraping; fires once the scrapes under way have answered."""
        if self._resumed_at is not None:
            self.elapsed += self.clock.seconds() - self._resumed_at
            self._resumed_at = None
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return defer.gatherResults(list(self._in_flight), consumeErrors=True)


# -- the slices ---------------------------------------------------------------------------


@defer.inlineCallbacks
def do_slice(run: Run, figure: Figure, size: float
             ) -> Generator["defer.Deferred[Any]", Any, tuple[int, float, float]]:
    """
    One slice of ``figure`` on the current server: ``size`` rows (fetch on
    1 stream, windowed), rows per stream (fetch on 100 streams) or seconds
    (persist).  Returns ``(work, seconds, server_cpu_seconds)``.
    """
    sizes = run.sizes
    if figure.name == "fetch_1_stream":
        rows = int(size)
        work, seconds, cpu, _ = yield run.fetch([({"$limit": rows}, rows)])
    elif figure.name == "fetch_100_streams":
        rows = int(size)
        selects = [({"$where": {"pid": f"p{i % PIDS}"}, "$limit": rows}, rows)
                   for i in range(sizes.streams)]
        work, seconds, cpu, _ = yield run.fetch(selects)
    elif figure.name == "fetch_window_100":
        rows = int(size)
        work, seconds, cpu, _ = yield run.fetch(
            [({"$limit": rows}, rows)], window=sizes.window,
            accept_batch=max(1, sizes.window // 2))
    else:
        in_flight = int(figure.name.rsplit("_", 1)[1])
        result = yield run.persist(in_flight, size, totals=True)
        work, seconds, cpu = result["count"], result["seconds"], result["server_cpu_s"]
    return int(work), float(seconds), float(cpu)


def probe_size(figure: Figure, sizes: Sizes, slice_seconds: float) -> tuple[float, float]:
    """A figure's first (uncounted) slice's size, and the most a slice may be."""
    if figure.name == "fetch_1_stream":
        return max(1, sizes.fetch_1_rows // 5), sizes.rows
    if figure.name == "fetch_100_streams":
        cap = max(1, sizes.rows // PIDS)
        return min(cap, max(1, sizes.rows_per_stream // 5)), cap
    if figure.name == "fetch_window_100":
        return max(1, sizes.rows // 5), sizes.rows
    return slice_seconds, slice_seconds


def slice_size(probe: float, cap: float, seconds: float, slice_seconds: float,
               figure: Figure) -> float:
    """The size of work that the probe says takes ``slice_seconds``."""
    if figure.name.startswith("persist_"):
        return slice_seconds
    if seconds <= 0:
        return cap
    return float(max(1, min(int(cap), round(probe * slice_seconds / seconds))))


class Servers:
    """The two servers ("off", "on"), and which one the run's requests go to."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.prefixes = {side: f"{run.prefix}:{side}:" for side in SIDES}
        self.children: dict[str, Child] = {}
        self.argv: dict[str, str] = {}
        self._restore = (run.channel_prefix, run.metrics_on)

    @defer.inlineCallbacks
    def start(self) -> Generator["defer.Deferred[Any]", Any, None]:
        """Both servers, on the run's table, each warmed up."""
        run = self.run
        yield run.stop_server()
        for side in SIDES:
            run.set_channel_prefix(self.prefixes[side])
            run.metrics_on = side == "on"
            self.argv[side] = "twistd -n eventsource " + " ".join(run.server_args())
            self.children[side] = yield run.start_server(scrape=False)
        for side in SIDES:
            self.use(side)
            yield warm_up(run)
            yield run.persist(1, 0.2)

    def use(self, side: str) -> None:
        """Send the run's requests to ``side``, and measure its CPU."""
        run = self.run
        run.set_channel_prefix(self.prefixes[side])
        run.metrics_on = side == "on"
        run.server = self.children[side]

    @defer.inlineCallbacks
    def stop(self) -> Generator["defer.Deferred[Any]", Any, None]:
        """Both servers; the run's prefix is its own again."""
        self.run.server = None
        prefix, self.run.metrics_on = self._restore
        self.run.set_channel_prefix(prefix)
        for side in SIDES:
            child = self.children.pop(side, None)
            if child is not None:
                yield child.stop()


@defer.inlineCallbacks
def measure(run: Run, slices: int, slice_seconds: float, log: Callable[[str], None]
            ) -> Generator["defer.Deferred[Any]", Any, dict[str, Any]]:
    """
    Both servers at once, and ``slices`` slices of each figure on each, in
    ABBA order: the slices (``records``), each figure's size of a slice,
    the servers' command lines and the :func:`summarize`.
    """
    servers = Servers(run)
    scraper = SliceScraper(run.reactor, run.scrape_interval, run.scrape)
    records: list[dict[str, Any]] = []
    slice_sizes: dict[str, float] = {}

    @defer.inlineCallbacks
    def one(figure: Figure, side: str, size: float
            ) -> Generator["defer.Deferred[Any]", Any, dict[str, Any]]:
        servers.use(side)
        scrapes = scraper.count
        if side == "on":
            scraper.resume()
        try:
            work, seconds, cpu = yield do_slice(run, figure, size)
        finally:
            if side == "on":
                yield scraper.pause()
        return {"figure": figure.name, "side": side, "work": work, "seconds": seconds,
                "server_cpu_s": cpu, "scrapes": scraper.count - scrapes}

    try:
        log("metrics A/B: two servers at once, one without and one with --http-port")
        yield servers.start()
        for figure in FIGURES:
            # Uncounted slices, on each server: the figure's warm-up, and
            # how much work a slice does (sized again while the probe took
            # under half a slice: a small one is mostly its first row's wait).
            size, cap = probe_size(figure, run.sizes, slice_seconds)
            for _ in range(CALIBRATIONS):
                seconds = 0.0
                for side in SIDES:
                    record = yield one(figure, side, size)
                    seconds += record["seconds"] / len(SIDES)
                probe, size = size, slice_size(size, cap, seconds, slice_seconds, figure)
                if seconds >= slice_seconds / 2 or probe >= cap:
                    break
            slice_sizes[figure.name] = size
            what = ("s" if figure.name.startswith("persist_") else
                    " rows a stream" if figure.name == "fetch_100_streams" else " rows")
            log(f"  {figure.label}: {slices} slices on each server, {size:,g}{what} each")
            for pair in range(slices):
                for side in pair_order(pair):
                    record = yield one(figure, side, size)
                    record["pair"] = pair
                    records.append(record)
    finally:
        yield scraper.pause()
        yield servers.stop()
    return {"method": "interleaved", "slices_per_server": slices,
            "slice_seconds": slice_seconds, "scrape_interval": run.scrape_interval,
            "slice_sizes": slice_sizes, "servers": servers.argv,
            "summary": summarize(records), "records": records}


# -- the summary --------------------------------------------------------------------------


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def _ratio(pairs: list[tuple[tuple[float, float], tuple[float, float]]]) -> float:
    """(Σ numerator / Σ denominator of "on") / (the same of "off"); NaN when undefined."""
    off_n = sum(off[0] for off, _ in pairs)
    off_d = sum(off[1] for off, _ in pairs)
    on_n = sum(on[0] for _, on in pairs)
    on_d = sum(on[1] for _, on in pairs)
    if not (off_n and off_d and on_d):
        return math.nan
    return (on_n / on_d) / (off_n / off_d)


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """
    Per figure, the throughput's and the server CPU's: the ratio on / off
    of the totals, each side's total, the pairs' median and quartiles, a
    bootstrap 95 % interval over the pairs, and the slices of each side.
    """
    summary: dict[str, dict[str, Any]] = {}
    rng = random.Random(SEED)
    for figure in FIGURES:
        by_pair: dict[int, dict[str, dict[str, Any]]] = {}
        slices = {side: 0 for side in SIDES}
        for record in records:
            if record["figure"] == figure.name:
                by_pair.setdefault(record["pair"], {})[record["side"]] = record
                slices[record["side"]] += 1
        complete = [by_pair[k] for k in sorted(by_pair) if len(by_pair[k]) == len(SIDES)]
        if not complete:
            continue
        for key, kind, numerator, denominator, scale in (
                (figure.rate_key, "throughput", "work", "seconds", 1.0),
                (figure.cpu_key, "server CPU", "server_cpu_s", "work", 1e6)):
            pairs = [((p["off"][numerator], p["off"][denominator]),
                      (p["on"][numerator], p["on"][denominator])) for p in complete]
            ratio = _ratio(pairs)
            per_pair = [r for r in (_ratio([pair]) for pair in pairs) if not math.isnan(r)]
            boot = sorted(r for r in (_ratio([pairs[rng.randrange(len(pairs))]
                                              for _ in pairs]) for _ in range(RESAMPLES))
                          if not math.isnan(r))
            totals = {side: (sum(pair[i][0] for pair in pairs), sum(pair[i][1] for pair in pairs))
                      for i, side in enumerate(SIDES)}
            q1, median, q3 = _quartiles(per_pair) if per_pair else (math.nan,) * 3
            summary[key] = {
                "kind": kind,
                "ratio": ratio,
                # (each side's total: work/s, or µs of server CPU per unit of work)
                **{side: scale * n / d if d else math.nan for side, (n, d) in totals.items()},
                "pairs": len(pairs),
                "pair_median": median,
                "pair_iqr": [q1, q3],
                "ci95": ([boot[int(0.025 * (len(boot) - 1))], boot[int(0.975 * (len(boot) - 1))]]
                         if boot else [math.nan, math.nan]),
                "slices": dict(slices),
            }
    return summary


def format_summary(summary: dict[str, dict[str, Any]]) -> list[str]:
    """One line a figure: the totals' ratio, its interval, the pairs' spread."""
    lines = []
    for key, figure in summary.items():
        low, high = figure["ci95"]
        q1, q3 = figure["pair_iqr"]
        slices = " + ".join(str(figure["slices"][side]) for side in SIDES)
        lines.append(
            f"  {key} ({figure['kind']}): on / off {figure['ratio']:.3f} "
            f"(95 % {low:.3f}-{high:.3f}; pairs: median {figure['pair_median']:.3f}, "
            f"IQR {q1:.3f}-{q3:.3f}; {slices} slices)")
    return lines
