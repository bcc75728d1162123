"""
The benchmark: the server over the wire, against floors measured in the same run.

``python3 -m benchmarks`` (``make bench``, from the checkout's root) starts a
server as a process of its own (``twistd eventsource``, from this checkout)
on a database of its own, drives it with an independent client (plain txredisapi with hiredis, as
the server uses), and in the same run measures what the figures must be
compared with:

floors
    Redis pub/sub ping-pong round trips/s (1 pair of channels, and 100 pairs
    at once), raw single-row ``INSERT``/s with PyMySQL in autocommit (1
    connection, and 8 connections in 8 threads), raw ``SELECT`` rows/s.
server
    persist/s and latency (p50/p99) with 1 and 50 requests in flight; fetch
    rows/s with per-row acceptance on 1 stream and on 100 streams at once;
    windowed fetch rows/s (window 100); time to first row; RSS, threads and
    connections with 1,000 streams open and idle; server CPU per row.

The ping-pong floor has the shape of a fetch: an echo process (like the
server, one subscriber and one publisher connection) answers each small
message of the client on ``ping:i`` with a row-sized message on ``pong:i``;
the client side is the same code as the fetch client.  "100 pairs" are 100
channel pairs over those same connections, as 100 streams are.

Every scenario runs in every repetition (each on a fresh server) and ratios
are taken within a repetition, so a noisy machine moves floors and figures
together; the table shows medians.  ``--quick`` is the small run of CI: it
proves the benchmark runs, not how fast.  ``--profile`` afterwards runs the
1-stream and the 100-stream fetch and persist with 50 in flight once more,
against a server under cProfile and against one sampled by py-spy (when
installed), and prints their hot spots.

The client is independent of :mod:`eventsource.client` on purpose: it
measures the server with a client that is not ours, so that neither a
slowness nor a shortcut of our client hides in the figures
(:mod:`benchmarks.redis_client`).

The modules: :mod:`benchmarks.common` (sizes, settings),
:mod:`benchmarks.processes` (child processes, ``/proc``),
:mod:`benchmarks.redis_client` and :mod:`benchmarks.echo` (the client and the
ping-pong's far end), :mod:`benchmarks.floors`, :mod:`benchmarks.scenarios`
(the server's figures), :mod:`benchmarks.subscriptions` (the subscriptions'
figures), :mod:`benchmarks.report` (targets, summary, table),
:mod:`benchmarks.profiling` and :mod:`benchmarks.main` (the command).  The
folder is not part of the package: it needs a source checkout, and is not in
the wheel.  Nothing here imports the global reactor at import time: the
reactor that :func:`twisted.internet.task.react` runs is passed along.
"""
