"""
The echo process, the far end of the ping-pong floor:
``python3 -m benchmarks.echo PREFIX PAIRS HOST:PORT`` answers every message on
``<PREFIX>:ping:<i>`` with a row-sized one on ``<PREFIX>:pong:<i>``, as the
server answers an acceptance with a row.  It exits with its parent.
"""

import os
import sys
from collections.abc import Generator
from typing import Any

from twisted.internet import defer, task
from twisted.python.failure import Failure

from benchmarks.common import ROW_LIKE_BODY
from benchmarks.redis_client import Handler, RedisClient, ignore


@defer.inlineCallbacks
def echo(reactor: Any, host: str, port: int, prefix: str, pairs: int
         ) -> Generator["defer.Deferred[Any]", Any, None]:
    """Answer pings until the parent process is gone."""
    parent = os.getppid()
    gone: defer.Deferred[None] = defer.Deferred()

    def check_parent() -> None:
        if os.getppid() != parent and not gone.called:
            gone.callback(None)

    client = yield RedisClient().connect(reactor, host, port)
    publish = client.publisher.execute_command

    def answer(out: str) -> Handler:
        def on_ping(body: str) -> None:
            publish("PUBLISH", out, ROW_LIKE_BODY).addErrback(ignore)
        return on_ping

    yield client.listen_all({f"{prefix}:ping:{i}": answer(f"{prefix}:pong:{i}")
                             for i in range(pairs)})
    print("echo ready", flush=True)
    watch = task.LoopingCall(check_parent)
    watch.clock = reactor
    watch.start(1.0, now=False)
    yield gone
    watch.stop()


def main(argv: list[str]) -> None:
    prefix, pairs, address = argv
    host, _, port = address.rpartition(":")

    def failed(failure: Failure) -> None:
        print(f"echo failed: {failure.getErrorMessage()}", flush=True)

    def run(reactor: Any) -> "defer.Deferred[None]":
        return echo(reactor, host, int(port), prefix, int(pairs)).addErrback(failed)

    task.react(run)


if __name__ == "__main__":
    main(sys.argv[1:])
