"""The emulator's traffic model (memory_model.h), read from Python.

    with measured(emu) as launches:
        ...                      # emulated launches
    launches                     # one Launch per launch, in order

A Launch counts what one emulated kernel launch asked of the memory system: warp-level requests
to global memory, the distinct bytes they asked for and the 32-byte sectors that served them (a
coalesced float32 warp request is 4 sectors for 128 bytes), the bytes of the distinct sectors it
read and wrote (its DRAM traffic when every reuse hits in L2), atomics per lane, shared-memory requests
with the passes (wavefronts) they took, and warp collectives (shuffles, votes, __syncwarp), a
measure of warp-synchronous work.
"""
from contextlib import contextmanager
from dataclasses import dataclass, fields

RACES, TRAFFIC = 1, 2  # the bits of _emu_memory's mode (memory_model.h); races are on by default


@dataclass
class Launch:
    site: str  # csrc/cuda/<file>:<line> of the launch
    blocks: int
    threads: int
    ld_requests: int
    ld_sectors: int
    ld_bytes: int
    st_requests: int
    st_sectors: int
    st_bytes: int
    atomics: int
    float_atomics: int
    dram_read: int
    dram_write: int
    sh_requests: int
    sh_wavefronts: int
    sh_atomics: int
    collectives: int  # warp shuffles, votes and __syncwarp calls (per warp)
    sh_least_wavefronts: int  # the passes the shared requests would take without bank conflicts

    @property
    def bank_conflicts(self):
        """Shared-memory passes over the least the requests' bytes need (1: conflict-free)."""
        return self.sh_wavefronts / max(self.sh_least_wavefronts, 1)

    @property
    def sector_bytes(self):
        """The bytes of every sector of every request: what the SMs move through their L1 caches
        (a small table read again and again hits there; only misses reach L2)."""
        return 32 * (self.ld_sectors + self.st_sectors)

    @property
    def dram_bytes(self):
        return self.dram_read + self.dram_write

    @property
    def coalescing(self):
        """Distinct bytes the warps asked for over the bytes of the sectors that served them (1: every
        sector byte used)."""
        return (self.ld_bytes + self.st_bytes) / max(self.sector_bytes, 1)


def parse(text):
    names = [f.name for f in fields(Launch)]
    out = []
    for line in text.splitlines():
        values = line.split("\t")
        assert len(values) == len(names), f"a traffic line of {len(values)} fields: {line!r}"
        out.append(Launch(values[0], *(int(v) for v in values[1:])))
    return out


@contextmanager
def measured(emu, races=True):
    """Counts the traffic of the emulated launches inside the block; yields the list they are
    appended to when it ends."""
    emu._emu_traffic()  # drops what an earlier block left
    before = emu._emu_memory(TRAFFIC | (RACES if races else 0))
    launches = []
    try:
        yield launches
    finally:
        emu._emu_memory(before)
        launches.extend(parse(emu._emu_traffic()))


def total(launches):
    """The sums of a list of launches' counts, as one Launch (site: the number of launches)."""
    sums = [sum(getattr(l, f.name) for l in launches) for f in fields(Launch)[1:]]
    return Launch(f"{len(launches)} launches", *sums)
