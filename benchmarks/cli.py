"""Command-line checks shared by the benchmarks: a bad option fails at once with argparse's error,
before anything is measured (a late failure would throw away the minutes already spent)."""
import os
import shlex
import sys

from idd_ops._arguments import device, make_out, positive_int  # noqa: F401  (the benchmarks' option helpers)


def check_file_paths(parser, **paths):
    """parser.error unless each given path (option name -> path or None) can be written as a file:
    checked before the run, so a typo does not cost the measurements."""
    for option, path in paths.items():
        if path is None:
            continue
        flag = "--" + option.replace("_", "-")
        if os.path.isdir(path):
            parser.error(f"{flag}: {path} is a folder; expected a file name")
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            parser.error(f"{flag}: cannot create {path} ({parent} is not a writable folder)")


def open_for_writing(path):
    """open(path, "w"), its folder made first (check_file_paths let a new folder through)."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, "w")


def command_line(module, argv=None):
    """The command that reproduces this run, quoted so that it can be pasted back into a shell."""
    return f"python -m {module} {shlex.join(sys.argv[1:] if argv is None else list(argv))}".rstrip()
