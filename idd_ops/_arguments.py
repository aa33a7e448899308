"""argparse types shared by the package's commands (idd-distill, its tuning) and the repository's
benchmarks: a bad option fails at once with argparse's error naming it, before any work."""
import argparse
import os

import torch


def positive_int(text):
    """An int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def positive_seconds(text):
    """A finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, got {text!r}")
    return value


def seed(text):
    """A seed torch's generators take, 0 <= seed < 2**63."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**63), got {value}")
    return value


def device(text):
    """'cpu', or 'cuda[:N]' where this torch sees that GPU; returned as given."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N; got {text!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}, but torch sees no CUDA device (torch {torch.__version__})")
        if (dev.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text!r}, but torch sees {count} CUDA device(s)")
    return text


def make_out(parser, out):
    """Creates the output folder `out` now, so that a path that cannot be one is an argument error
    of --out, before any work."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        parser.error(f"--out: cannot create the folder {out!r}: {error.strerror or error}")
