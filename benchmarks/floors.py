"""
The floors: what the server's figures are compared with, measured in the same
run with the same machine's noise: Redis ping-pong (the echo process at the
far end), raw single-row ``INSERT``/s and a raw ``SELECT`` with PyMySQL.
"""

import threading
import time
from collections.abc import Generator
from typing import Any

import pymysql
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from benchmarks.common import BenchError, connect_mysql
from eventsource.ids import uuid7
from eventsource import schema
from benchmarks.redis_client import Handler, RedisClient


@defer.inlineCallbacks
def pingpong(reactor: IReactorTime, client: RedisClient, prefix: str, pairs: int,
             duration: float) -> Generator["defer.Deferred[Any]", Any, float]:
    """Round trips/s of ``pairs`` concurrent ping-pong lanes for ``duration`` seconds."""
    done: defer.Deferred[float] = defer.Deferred()
    state: dict[str, int] = {"count": 0, "active": pairs}
    deadline = [0.0]
    ack = '{"channel":"ack"}'
    publish = client.publish
    clock = time.perf_counter

    def lane(i: int) -> tuple[str, Handler]:
        ping = f"{prefix}:ping:{i}"

        def on_pong(body: str) -> None:
            state["count"] += 1
            if clock() < deadline[0]:
                publish(ping, ack)
            else:
                state["active"] -= 1
                if state["active"] == 0 and not done.called:
                    done.callback(clock())
        return ping, on_pong

    lanes = [lane(i) for i in range(pairs)]
    for i, (_, on_pong) in enumerate(lanes):
        client.handlers[f"{prefix}:pong:{i}"] = on_pong
    start = clock()
    deadline[0] = start + duration
    for ping, _ in lanes:
        publish(ping, ack)
    done.addTimeout(duration + 30, reactor)
    end: float = yield done
    return state["count"] / (end - start)


def _insert_worker(settings: dict[str, Any], table: str, clock: dict[str, Any],
                   counts: list[int], index: int, errors: list[Exception],
                   lock: str | None = None) -> None:
    connection: pymysql.Connection | None = None
    try:
        connection = connect_mysql(settings)
        if lock is not None:
            connection.autocommit(False)
    except Exception as error:  # reported by the caller
        errors.append(error)
    try:
        clock["ready"].wait()  # connected (PyMySQL takes ~20 ms): now the clock runs
        if connection is None:
            return
        with connection.cursor() as cursor:
            # (the stream columns as the server writes them: a version and a UUIDv7)
            sql = (f"INSERT INTO {table} (`pid`, `domain`, `name`, `data`, `version`, `event_id`)"
                   " VALUES (%s, %s, %s, %s, %s, %s)")
            pid = f"floor{index}-{time.perf_counter_ns()}"
            deadline = clock["deadline"]
            n = 0
            take = None if lock is None else schema.lock_append_sql(lock)
            while time.perf_counter() < deadline:
                if take is not None:
                    # (the server's transaction for one persist: the append lock,
                    # the row, the commit)
                    cursor.execute(take)
                cursor.execute(sql, (pid, "bench", "floor", '{"n": %d}' % n, n, uuid7()))
                if take is not None:
                    connection.commit()
                n += 1
            counts[index] = n
            clock["ends"][index] = time.perf_counter()
    except Exception as error:
        errors.append(error)
    finally:
        if connection is not None:
            connection.close()


def raw_inserts(settings: dict[str, Any], table: str, connections: int, duration: float,
                lock: str | None = None) -> float:
    """
    Single-row autocommit INSERTs/s over ``connections`` connections, one
    thread each; with ``lock`` (the append lock table, quoted), each row in a
    transaction of its own that takes the lock first, as the server's writer
    does for a one-row persist.
    """
    counts: list[int] = [0] * connections
    errors: list[Exception] = []
    clock: dict[str, Any] = {"ends": [0.0] * connections}

    def started() -> None:
        clock["start"] = time.perf_counter()
        clock["deadline"] = clock["start"] + duration

    clock["ready"] = threading.Barrier(connections, action=started)
    workers = [threading.Thread(target=_insert_worker,
                                args=(settings, table, clock, counts, i, errors, lock))
               for i in range(connections)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise BenchError(f"raw INSERT failed: {errors[0]}")
    ends: list[float] = clock["ends"]
    start: float = clock["start"]
    return sum(counts) / (max(ends) - start)


def raw_select(settings: dict[str, Any], table: str, rows: int) -> float:
    """Rows/s of one PyMySQL SELECT of ``rows`` rows of the events table, all fetched."""
    connection = connect_mysql(settings)
    try:
        with connection.cursor() as cursor:
            start = time.perf_counter()
            cursor.execute(f"SELECT `id`, `timestamp`, `pid`, `domain`, `name`, `data` FROM {table}"
                           " ORDER BY `id` LIMIT %s", (rows,))
            fetched = len(cursor.fetchall())
            elapsed = time.perf_counter() - start
    finally:
        connection.close()
    if fetched != rows:
        raise BenchError(f"raw SELECT fetched {fetched} rows, not {rows}")
    return fetched / elapsed
