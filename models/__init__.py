"""Lean copies of the architectures CAT builds on (OASIS, PITI, the FID Inception, ...), and what every
stage shares: `DataError` for bad input and `cli` to turn it into one line at a script's entry point."""
import sys


class DataError(ValueError):
    """Bad input (a file, a flag, a dataset): the message is one line naming it, what was expected and found.

    Library code raises it; only the scripts' entry points (`cli`) turn it into one printed line."""


def cli(main):
    """Run a script's main(); a DataError (or an unreadable/unwritable path) becomes one line and exit code 1."""
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
