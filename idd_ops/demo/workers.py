"""Independent pieces of the experiment (chunks of scenes, student runs) on a pool of worker
processes, sized from the CPU cores and, on CUDA, the free GPU memory; each worker on its own
CUDA stream, with torch's threads divided between the workers so that the cores are not
oversubscribed. On 2 CPU cores the automatic choice is one worker (this process) on both.

Every piece seeds its own generators from its arguments, so running the pieces in workers gives
the results of running them one by one, with the same number of threads per piece (on the CPU
the order of a parallel reduction may depend on the thread count). The student networks are
small: one at a time, a GPU sits mostly idle waiting for kernel launches.
"""
import os
import sys

import torch
import torch.multiprocessing as mp

from . import progress

# GPU memory one worker needs at the full preset: its CUDA context (about 0.5 GiB), the teacher's
# outputs on the training set (about 0.6 GiB at 128x256 with 2000 images), the teacher, a student
# and their activations
GPU_BYTES_PER_WORKER = 2 << 30
# automatic pool size on the CPU: one worker per this many cores, each on that many threads.
# Measured on 2 cores shared with other work (load about 21), four of the quick preset's student
# runs: one worker on 2 threads took 167, 186 and 203 s, two single-threaded workers 212 and 160 s
# (their start, about 15 s at that load, included): no difference the load lets us see, so
# one worker, no start cost, as before; on more cores the choice is not measured
CPU_CORES_PER_WORKER = 2


def cpu_cores():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def plan(device, workers=None, threads=None, gpu_bytes_per_worker=GPU_BYTES_PER_WORKER):
    """(workers, torch threads per worker) for `device`.

    workers: None (automatic): on CUDA, as many as the free GPU memory holds at
        `gpu_bytes_per_worker` each and at most one per core; on the CPU, one per
        CPU_CORES_PER_WORKER cores. threads: None: the cores divided between the workers.
    """
    cores = cpu_cores()
    if workers is None:
        if str(device).startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            workers = max(1, min(cores, free // gpu_bytes_per_worker))  # a busy GPU still gets one
        else:
            workers = max(1, cores // CPU_CORES_PER_WORKER)
    if workers < 1:
        raise ValueError(f"workers: expected at least 1, got {workers}")
    workers = int(workers)
    return workers, int(threads or max(1, cores // workers))


def _start_worker(threads, device):
    torch.set_num_threads(threads)
    progress.plain_lines()
    if str(device).startswith("cuda"):
        device = torch.device(device)
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.cuda.set_stream(torch.cuda.Stream())


def _call(fn_args):
    fn, args = fn_args
    return fn(*args)


def serial_map(fn, items):
    """fn(*item) for each item, in order, in this process: the map of one worker."""
    return (fn(*item) for item in items)


class Workers:
    """A pool started on first use: ``map(fn, items)`` yields ``fn(*item)`` for every item, in
    order. With one worker (or one item and no pool yet) the pieces run in this process, with its
    thread setting as it is. fn must be a module-level function (the workers are spawned).

    Args: device: where the pieces compute. workers, threads: see :func:`plan`.
    """

    def __init__(self, device, workers=None, threads=None):
        self.device = str(device)
        self.size, self.threads = plan(device, workers, threads)
        self.pool = None

    def map(self, fn, items):
        items = list(items)
        if self.pool is None and (self.size == 1 or len(items) < 2):
            return serial_map(fn, items)
        if self.pool is None:
            print(f"workers: {self.size} processes x {self.threads} threads on {self.device}", file=sys.stderr)
            self.pool = mp.get_context("spawn").Pool(self.size, _start_worker, (self.threads, self.device))
        return self.pool.imap(_call, [(fn, item) for item in items])

    def close(self, wait=True):
        if self.pool is not None:
            if wait:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        self.close(wait=kind is None)
