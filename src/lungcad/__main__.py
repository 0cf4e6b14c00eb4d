"""`python -m lungcad` (also what `torchrun -m lungcad` runs)."""

import sys

from lungcad.cli import main

sys.exit(main())
