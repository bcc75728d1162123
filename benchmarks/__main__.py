"""``python3 -m benchmarks``: run the benchmark (see :mod:`benchmarks`)."""

import sys

from benchmarks.main import main

sys.exit(main())
