"""`python -m inferd.loadtest.bench` (what `make bench` runs)."""

import sys

from inferd.loadtest.bench.suite import main

if __name__ == "__main__":
    sys.exit(main())
