"""`python -m lungcad` (also what `torchrun -m lungcad` runs)."""

import sys

from lungcad.cli import console_main

if __name__ == "__main__":  # not when a spawned process (train --jobs) imports the parent's main module
    sys.exit(console_main())
