"""`python -m lungcad` (also what `torchrun -m lungcad` runs)."""

import sys

from lungcad.cli import console_main

sys.exit(console_main())
