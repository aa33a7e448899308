"""A dependency-free progress bar for long loops (training, rendering, probing)."""
import sys
import time


class Progress:
    def __init__(self, total, desc, stream=sys.stderr, every=0.5):
        self.total, self.desc, self.stream, self.every = total, desc, stream, every
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n=1, **info):
        self.done += n
        now = time.perf_counter()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        frac = self.done / max(self.total, 1)
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        eta = (now - self.start) / max(frac, 1e-9) * (1 - frac)
        extra = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        self.stream.write(f"\r{self.desc} [{bar}] {self.done}/{self.total} eta {eta:4.0f}s {extra}   ")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()
