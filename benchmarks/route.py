"""``python -m benchmarks.route``: see :mod:`benchmarks.bench_route`."""

import sys

from benchmarks.bench_route import main

if __name__ == "__main__":
    sys.exit(main())
