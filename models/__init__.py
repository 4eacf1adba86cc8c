"""Lean copies of the architectures CAT builds on (OASIS, PITI, the FID Inception, ...), and what every
stage shares: `DataError` for bad input (`no_file` words a missing file), `ArgumentParser` whose flag errors
are DataErrors (and `HelpFormatter`, its --help with every default), its flag types (`positive_int`, `nonneg_int`, `int_list`, `seed_int`, `finite_float`, `positive_float`,
`unit_float`, `decay_float`), and `cli` to turn them into one line at a script's entry point."""
import argparse
import math
import sys
from pathlib import Path


class DataError(ValueError):
    """Bad input (a file, a flag, a dataset): the message is one line naming it, what was expected and found.

    Library code raises it; only the scripts' entry points (`cli`) turn it into one printed line. One raised in
    a DataLoader worker is re-raised by the loader as DataError('Caught DataError in DataLoader worker process 0.
    Original Traceback ...'): that keeps only the original line (the traceback's last)."""

    def __init__(self, *args):
        text = args[0] if len(args) == 1 and isinstance(args[0], str) else ""
        if text.startswith("Caught ") and "DataLoader worker" in text.split("\n", 1)[0]:
            args = (text.strip().splitlines()[-1].split(": ", 1)[-1],)
        super().__init__(*args)


def no_file(path):
    """Why an expected file is not there, in a few words: a folder in its place, or nothing."""
    return "is a folder, expected a file" if Path(path).is_dir() else "file not found"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a bad or missing flag raised as a DataError (one line from cli()) instead of the usage
    text and exit code 2; --help still prints and exits."""

    def error(self, message):
        raise DataError(f"{message} (see --help)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with the script's docstring as written and each flag's default in its help, unless the default is
    None or False (a flag whose absence is its meaning, or a run-dependent default that the help explains) or the
    help already says it ("(default ...")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "(default" in text:
            return text
        return super()._get_help_string(action)


# argparse types: a bad value is refused by the parser, in one line naming the flag (ArgumentParser.error)


def int_list(text):
    """argparse type: '3,128,128' -> [3, 128, 128]."""
    try:
        return [int(c) for c in str(text).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected comma-separated integers, e.g. 3,128,128,256")


def positive_int(text):
    """argparse type: an integer >= 1."""
    v = int(text) if str(text).lstrip("-").isdigit() else None
    if v is None or v < 1:
        raise argparse.ArgumentTypeError(f"'{text}': expected an integer >= 1")
    return v


def nonneg_int(text):
    """argparse type: an integer >= 0."""
    v = int(text) if str(text).lstrip("-").isdigit() else None
    if v is None or v < 0:
        raise argparse.ArgumentTypeError(f"'{text}': expected an integer >= 0")
    return v


SEED_RANGE = 2 ** 32  # every script's --seed: numpy, torch and Python all accept it


def seed_int(text):
    """argparse type: a seed, an integer in [0, 2**32) (the same range in every script)."""
    v = int(text) if str(text).lstrip("-").isdigit() else None
    if v is None or not 0 <= v < SEED_RANGE:
        raise argparse.ArgumentTypeError(f"'{text}': expected an integer seed >= 0 and < 2**32")
    return v


def finite_float(text):
    """argparse type: a finite number (not nan, not inf)."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"'{text}': expected a finite number")
    return v


def positive_float(text):
    """argparse type: a finite number > 0."""
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"'{text}': expected a number > 0")
    return v


def unit_float(text):
    """argparse type: a number in [0, 1] (a probability, a decay)."""
    v = finite_float(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"'{text}': expected a number in [0, 1]")
    return v


def decay_float(text):
    """argparse type: an EMA decay, a number in [0, 1) (1 would freeze the average at its start)."""
    v = finite_float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"'{text}': expected a decay in [0, 1)")
    return v


def cli(main):
    """Run a script's main(); a DataError (or an unreadable/unwritable path) becomes one line and exit code 1."""
    try:
        main()
    except DataError as e:
        sys.exit("error: " + " ".join(str(e).splitlines()))  # one line even if a message slipped a newline
    except OSError as e:  # a path the checks above did not foresee (disk full, permissions): still one line
        where = f"{e.filename}: " if e.filename else ""
        sys.exit(f"error: {where}{e.strerror or str(e).strip().splitlines()[-1]}")  # a loader worker's: its last line
    except KeyboardInterrupt as e:  # a finetuning loop words where to continue from (run.interrupted)
        sys.exit(f"interrupted: {e}" if str(e) else "interrupted")
