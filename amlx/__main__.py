"""`python -m amlx ...` runs the command line."""

import sys

from amlx.cli import main

sys.exit(main())
