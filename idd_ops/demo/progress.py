"""A dependency-free progress report for long loops (training, rendering, probing).

On a terminal it redraws one bar in place. Anywhere else (a log file, a pipe, a worker process
whose output is shared with others) carriage-return redraws would pile up on one line, so it
prints one plain line every `line_fraction` of the work or every `line_seconds`, whichever
comes first, and a last line when done.
"""
import math
import sys
import time

_plain_everywhere = False


def plain_lines():
    """Plain lines from every later Progress of this process, terminal or not (worker processes
    share one terminal: their redraws would overwrite each other)."""
    global _plain_everywhere
    _plain_everywhere = True


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _format(info):
    """`info`'s values as text; a 0-dim tensor is read (`.item()`) only here, when a line is
    written, so that a caller passing a GPU loss every step waits for the GPU only then."""
    values = {k: v.item() if hasattr(v, "item") else v for k, v in info.items()}
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


class Progress:
    """Args: total: units of work. desc: label. stream: default sys.stderr (read when created).
    every: seconds between redraws on a terminal (0.5). plain: force plain lines (True) or
    redraws (False); default None: plain unless `stream` is a terminal. line_fraction,
    line_seconds: plain-line spacing, defaults 0.1 (every 10 %) and 30 s."""

    def __init__(self, total, desc, stream=None, every=0.5, plain=None, line_fraction=0.1, line_seconds=30.0):
        self.total, self.desc, self.every = total, desc, every
        self.stream = stream if stream is not None else sys.stderr
        self.plain = (_plain_everywhere or not _is_terminal(self.stream)) if plain is None else plain
        self.line_fraction, self.line_seconds = line_fraction, line_seconds
        self.start = self.last = time.perf_counter()
        self.done, self.milestone = 0, 1

    def _milestone_units(self):
        return math.ceil(self.milestone * self.line_fraction * self.total - 1e-9)

    def update(self, n=1, **info):
        self.done += n
        now = time.perf_counter()
        finished = self.done >= self.total
        frac = self.done / max(self.total, 1)
        eta = (now - self.start) / max(frac, 1e-9) * (1 - frac)
        if self.plain:
            if not finished and self.done < self._milestone_units() and now - self.last < self.line_seconds:
                return
            while self._milestone_units() <= self.done and self.milestone * self.line_fraction < 1:
                self.milestone += 1
            self.last = now
            extra = _format(info)
            self.stream.write(f"{self.desc}: {self.done}/{self.total} ({100 * frac:.0f} %) "
                              f"{now - self.start:.0f}s" + ("" if finished else f", eta {eta:.0f}s") +
                              (f", {extra}" if extra else "") + "\n")
            self.stream.flush()
            return
        if now - self.last < self.every and not finished:
            return
        self.last = now
        extra = _format(info)
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        self.stream.write(f"\r{self.desc} [{bar}] {self.done}/{self.total} eta {eta:4.0f}s {extra}   ")
        if finished:
            self.stream.write("\n")
        self.stream.flush()
