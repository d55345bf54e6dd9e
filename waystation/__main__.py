"""`python -m waystation ...`: the same command line as the `waystation` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
