"""
Tests that need programs the machine may not have (a real Prometheus) or
take long: run once, on one Python, by ``tox -e slow`` (part of ``make
test``), which sets ``EVENTSOURCE_SLOW_TESTS=1``; the suite's other runs skip
them (see :data:`SKIP`).
"""

import os

#: the ``skip`` of every test case here: why it did not run, or None
SKIP = (None if os.environ.get("EVENTSOURCE_SLOW_TESTS") else
        "run once, by tox -e slow (make test), which sets EVENTSOURCE_SLOW_TESTS=1")
