"""Lean copies of the architectures CAT builds on (OASIS, PITI, the FID Inception, ...), and what every
stage shares: `DataError` for bad input, `ArgumentParser` whose flag errors are DataErrors, and `cli` to turn
them into one line at a script's entry point."""
import argparse
import sys


class DataError(ValueError):
    """Bad input (a file, a flag, a dataset): the message is one line naming it, what was expected and found.

    Library code raises it; only the scripts' entry points (`cli`) turn it into one printed line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a bad or missing flag raised as a DataError (one line from cli()) instead of the usage
    text and exit code 2; --help still prints and exits."""

    def error(self, message):
        raise DataError(f"{message} (see --help)")


def _one_line(e):
    """The message of a DataError; one raised inside a DataLoader worker arrives wrapped in the worker's
    traceback ('Caught DataError in DataLoader worker process 0. Original Traceback ...'): keep its last line."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught DataError"):
        return lines[-1].split("DataError: ", 1)[-1]
    return " ".join(ln.strip() for ln in lines)


def cli(main):
    """Run a script's main(); a DataError (or an unreadable/unwritable path) becomes one line and exit code 1."""
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {_one_line(e)}")
    except OSError as e:  # a path the checks above did not foresee (disk full, permissions): still one line
        where = f"{e.filename}: " if e.filename else ""
        sys.exit(f"error: {where}{e.strerror or e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
