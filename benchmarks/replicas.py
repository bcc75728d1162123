"""
``python3 -m benchmarks.replicas``: what replica mode costs and gives
(docs/OPERATIONS.md "Replicas").

Four set-ups, in the same run, each repetition running them in a rotated
order so a noisy machine moves them together: one server without
``--replicas``; one server with it (the claim's cost: one Redis round trip
per persist, fetch and subscribe); two servers with it on the same table and
channels; and two with ``--writer-lease`` too (one of them writes the
persists).  Each does persist with 1 and 50 in flight and per-row fetch on 1
and on 100 streams, with the main benchmark's client and scenarios.  Server
CPU is that of the first server only, so it is given for the one-server
set-ups.
"""

import argparse
import json
import statistics
import sys
from typing import Any, Callable, Generator

from twisted.internet import defer

from benchmarks.common import PIDS, Sizes, in_thread, run_benchmark
from benchmarks.main import _drop_database, _prepare_database, _start_own_redis
from benchmarks.processes import Child, proc_cpu_seconds
from benchmarks.redis_client import RedisClient
from benchmarks.scenarios import Run, warm_up

#: the set-ups: name, servers, --replicas, --writer-lease (seconds; 0: off)
SETUPS = (("single", 1, False, 0.0), ("single_replicas", 1, True, 0.0),
          ("two_replicas", 2, True, 0.0), ("two_replicas_lease", 2, True, 2.0))


class ReplicaRun(Run):
    """A :class:`Run` whose server is started with ``--replicas`` when asked, and its twins."""

    replicas = False
    writer_lease = 0.0
    twins: list[Child]
    #: the pid of the run's own Redis (``--own-redis``), for its CPU
    redis_pid = 0

    def server_args(self) -> list[str]:
        return super().server_args() + (
            ["--replicas", f"--writer-lease={self.writer_lease}"] if self.replicas else [])

    @defer.inlineCallbacks
    def start_twin(self) -> Generator["defer.Deferred[Any]", Any, Child]:
        """Another server on the same table and channels (the first stays :attr:`server`)."""
        first = self.server
        twin: Child = yield self.start_server()
        self.server = first
        self.twins.append(twin)
        return twin

    @defer.inlineCallbacks
    def stop_all(self) -> Generator["defer.Deferred[Any]", Any, None]:
        for twin in self.twins:
            yield twin.stop()
        self.twins = []
        yield self.stop_server()


@defer.inlineCallbacks
def setup_figures(run: ReplicaRun, log: Callable[[str], None]
                  ) -> Generator["defer.Deferred[Any]", Any, dict[str, float]]:
    sizes = run.sizes
    figures: dict[str, float] = {}
    for in_flight in (1, 50):
        log(f"persist, {in_flight} in flight")
        others = others_cpu(run)
        result = yield run.persist(in_flight, sizes.duration)
        twins, redis = (after - before for before, after in zip(others, others_cpu(run)))
        count = result["per_s"] * sizes.duration
        figures[f"persist_{in_flight}_per_s"] = result["per_s"]
        figures[f"persist_{in_flight}_p50_ms"] = result["p50_ms"]
        figures[f"persist_{in_flight}_server_cpu_us"] = result["server_cpu_us"]
        if run.twins:
            figures[f"persist_{in_flight}_twin_cpu_us"] = twins / count * 1e6
        if run.redis_pid:
            figures[f"persist_{in_flight}_redis_cpu_us"] = redis / count * 1e6
    log("per-row fetch, 1 stream")
    rows, seconds, cpu, _ = yield run.fetch([({"$limit": sizes.fetch_1_rows}, sizes.fetch_1_rows)])
    figures["fetch_1_stream_rows_per_s"] = rows / seconds
    figures["fetch_1_stream_server_cpu_us_per_row"] = cpu / rows * 1e6
    log(f"per-row fetch, {sizes.streams} streams")
    selects = [({"$where": {"pid": f"p{i % PIDS}"}, "$limit": sizes.rows_per_stream},
                sizes.rows_per_stream) for i in range(sizes.streams)]
    others = others_cpu(run)
    rows, seconds, cpu, client_cpu = yield run.fetch(selects)
    twins, redis = (after - before for before, after in zip(others, others_cpu(run)))
    figures["fetch_100_streams_rows_per_s"] = rows / seconds
    figures["fetch_100_streams_machine_busy"] = run.machine_busy
    figures["fetch_100_streams_server_cpu_us_per_row"] = cpu / rows * 1e6
    figures["fetch_100_streams_client_cpu_us_per_row"] = client_cpu / rows * 1e6
    if run.twins:
        figures["fetch_100_streams_twin_cpu_us_per_row"] = twins / rows * 1e6
    if run.redis_pid:
        figures["fetch_100_streams_redis_cpu_us_per_row"] = redis / rows * 1e6
    return figures


def others_cpu(run: ReplicaRun) -> tuple[float, float]:
    """CPU seconds so far of the first server's twins, and of the run's own Redis (0: none)."""
    twins = sum(proc_cpu_seconds(twin.pid) for twin in run.twins)
    return twins, proc_cpu_seconds(run.redis_pid) if run.redis_pid else 0.0


@defer.inlineCallbacks
def benchmark(reactor: Any, options: argparse.Namespace, log: Callable[[str], None]
              ) -> Generator["defer.Deferred[Any]", Any, dict[str, Any]]:
    sizes = Sizes.from_options(options)
    run = ReplicaRun(reactor, options, sizes)
    run.twins = []
    children: list[Child] = []
    reps: list[dict[str, dict[str, float]]] = []
    created = False
    try:
        if options.own_redis:
            children.append((yield _start_own_redis(run)))
            run.redis_pid = children[-1].pid
            run.redis_host = "127.0.0.1"
        run.client = yield RedisClient().connect(reactor, run.redis_host, run.redis_port)
        created = True
        yield run.start_server()
        log(f"filling {sizes.rows:,} rows")
        yield in_thread(reactor, _prepare_database, run)
        for index in range(sizes.repeat):
            turn = index % len(SETUPS)
            order = SETUPS[turn:] + SETUPS[:turn]
            rep: dict[str, dict[str, float]] = {}
            for name, servers, replicas, lease in order:
                log(f"repetition {index + 1} of {sizes.repeat}: {name}")
                yield run.stop_all()
                run.replicas, run.writer_lease = replicas, lease
                yield run.start_server()
                for _ in range(servers - 1):
                    yield run.start_twin()
                yield warm_up(run)
                yield run.persist(1, 0.2)
                rep[name] = yield setup_figures(run, lambda what: log(f"  {what}"))
            reps.append(rep)
    finally:
        if run.client is not None:
            yield run.client.disconnect()
        yield run.stop_all()
        for child in reversed(children):
            yield child.stop()
        if created:
            yield in_thread(reactor, _drop_database, run)
    return summarize(reps)


def summarize(reps: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Medians per set-up, and the ratios taken within each repetition, then their median."""
    medians = {name: {key: statistics.median(rep[name][key] for rep in reps)
                      for key in reps[0][name]} for name, _, _, _ in SETUPS}
    pairs = {
        "claim_cost_persist_1": ("single_replicas", "single", "persist_1_per_s"),
        "claim_cost_persist_50": ("single_replicas", "single", "persist_50_per_s"),
        "claim_cost_fetch_1_stream": ("single_replicas", "single", "fetch_1_stream_rows_per_s"),
        "two_vs_one_fetch_100_streams": ("two_replicas", "single", "fetch_100_streams_rows_per_s"),
        "two_vs_one_persist_50": ("two_replicas", "single", "persist_50_per_s"),
        "two_vs_one_fetch_1_stream": ("two_replicas", "single", "fetch_1_stream_rows_per_s"),
        "two_lease_vs_one_persist_50": ("two_replicas_lease", "single", "persist_50_per_s"),
        "two_lease_vs_one_replica_persist_50": ("two_replicas_lease", "single_replicas",
                                                "persist_50_per_s"),
        "two_lease_vs_one_persist_1": ("two_replicas_lease", "single", "persist_1_per_s"),
        "two_lease_vs_one_fetch_100_streams": ("two_replicas_lease", "single",
                                               "fetch_100_streams_rows_per_s"),
    }
    ratios = {}
    for label, (a, b, key) in pairs.items():
        values = [rep[a][key] / rep[b][key] for rep in reps]
        ratios[label] = {"median": statistics.median(values), "runs": values}
    return {"medians": medians, "ratios": ratios, "repetitions": reps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.replicas",
                                     description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--own-redis", action="store_true")
    parser.add_argument("--json", default="bench-replicas.json", metavar="PATH")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    options.idle_streams, options.database = None, None
    ran = run_benchmark(benchmark, options)
    if ran is None:
        return 1
    result, _ = ran
    with open(options.json, "w") as f:
        json.dump(result, f, indent=2)
    for name, figures in result["medians"].items():
        print(name)
        for key, value in figures.items():
            print(f"  {key}: {value:,.1f}")
    for label, ratio in result["ratios"].items():
        runs = ", ".join(f"{r:.2f}" for r in ratio["runs"])
        print(f"{label}: {ratio['median']:.2f} (runs {runs})")
    print(f"results written to {options.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
