"""Running the command line in the test's own process."""

from __future__ import annotations


def main_in_process(capsys, *argv: str) -> tuple[int, str]:
    """`amlx ARGV` in this process: (exit status, stderr); argparse's exits count as statuses."""
    from amlx.cli import main

    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err
