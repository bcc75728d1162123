"""
Event ids: UUIDv7 (RFC 9562), time-ordered so that new ids land at the end
of the ``event_id`` key (Python 3.10 has no ``uuid.uuid7``).
"""

import os
import threading
import time
from typing import Callable, List

#: the 74 bits after the timestamp that are not version or variant
_RANDOM_BITS = 74


def uuid7_bytes(ms: int, random: int) -> bytes:
    """The 16 bytes of the UUIDv7 of Unix time ``ms`` and 74 ``random`` bits."""
    rand_a = random >> 62
    rand_b = random & ((1 << 62) - 1)
    value = ((ms & 0xFFFF_FFFF_FFFF) << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return value.to_bytes(16, "big")


class UUID7:
    """
    Makes UUIDv7s as 16 bytes (the ``event_id`` column's form).  Ids made
    in one millisecond still increase (RFC 9562's monotonic random: the
    next is the last plus a random step), also across threads.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = 0

    def __call__(self) -> bytes:
        return self.many(1)[0]

    def many(self, count: int) -> List[bytes]:
        """``count`` increasing ids (one call for the random bits of all)."""
        ms = int(self._clock() * 1000)
        pool = os.urandom(10 * count)
        made = []
        with self._lock:
            for i in range(count):
                drawn = int.from_bytes(pool[10 * i:10 * i + 10], "big")
                if ms <= self._last_ms:
                    ms = self._last_ms
                    random = self._last_random + 1 + (drawn >> 48)
                    if random >> _RANDOM_BITS:
                        # (the steps used up the random bits: borrow the next millisecond)
                        ms += 1
                        random = drawn >> (80 - _RANDOM_BITS)
                else:
                    random = drawn >> (80 - _RANDOM_BITS)
                self._last_ms, self._last_random = ms, random
                made.append(uuid7_bytes(ms, random))
        return made


#: the server's generator
uuid7 = UUID7()
