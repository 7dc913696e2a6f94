"""`python -m amlx ...` runs the command line."""

import sys

try:
    from amlx.cli import main  # (imported with the package, under its Ctrl-C guard: see amlx/__init__.py)
except KeyboardInterrupt:  # a Ctrl-C here exits as the command's own does: quietly, status 130
    if sys.stderr is not None:
        try:
            print(file=sys.stderr)
        except (OSError, ValueError):
            pass
    sys.exit(130)

sys.exit(main())
