"""`python -m inferd.loadtest`: the same as `inferd-loadtest`."""

import sys

from inferd.loadtest.cli import main

if __name__ == "__main__":
    sys.exit(main())
