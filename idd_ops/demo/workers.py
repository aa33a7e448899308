"""Independent pieces of the experiment (chunks of scenes, student runs) on a pool of worker
processes, sized from the CPU cores and, on CUDA, the free GPU memory; each worker on its own
CUDA stream, with torch's threads divided between the workers so that the cores are not
oversubscribed. On 2 CPU cores the automatic choice is two single-threaded workers
(CPU_CORES_PER_WORKER has the measurement).

Every piece seeds its own generators from its arguments, so running the pieces in workers gives
the results of running them one by one with the same number of threads per piece: on the CPU the
order of a parallel reduction depends on the thread count, so every piece, and the teacher's
tables the student runs read, compute on the pool's `threads` in every mode (one worker
included), and the runs' cache key holds that number. The student networks are small: one at a
time, a GPU sits mostly idle waiting for kernel launches.
"""
import contextlib
import ctypes
import os
import signal
import sys

import torch
import torch.multiprocessing as mp

from . import progress

# GPU memory one worker needs at the full preset: its CUDA context (about 0.5 GiB), the teacher's
# outputs on the training set (about 0.6 GiB at 128x256 with 2000 images), the teacher, a student
# and their activations
GPU_BYTES_PER_WORKER = 2 << 30
# automatic pool size on the CPU: one worker per this many cores, each on that many threads.
# Measured on 2 idle cores (AMD EPYC; `idd-distill --preset cpu --configs ce ce+kd+idd+pid --seeds
# 0 1 --student-steps 150` with a cached teacher, twice each): one worker on 2 threads 151 and
# 154 s, two single-threaded workers 130 and 119 s; a student step on one thread takes 130-146 ms
# against 98 ms on two, so two runs side by side do 1.4x the steps. (An earlier measurement at
# load 21 could not tell the two apart.) On more cores the choice is not measured.
CPU_CORES_PER_WORKER = 1


def cpu_cores():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def plan(device, workers=None, threads=None, gpu_bytes_per_worker=GPU_BYTES_PER_WORKER):
    """(workers, torch threads per worker) for `device`.

    workers: None (automatic): on CUDA, as many as the free GPU memory holds at
        `gpu_bytes_per_worker` each and at most one per core; on the CPU, one per
        CPU_CORES_PER_WORKER cores. threads: None: the cores divided between the workers, at
        most torch's thread setting (OMP_NUM_THREADS, torch.set_num_threads).
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
    if threads is not None and threads < 1:
        raise ValueError(f"threads: expected at least 1, got {threads}")
    return workers, int(threads or max(1, min(torch.get_num_threads(), cores // workers)))


@contextlib.contextmanager
def torch_threads(threads):
    """torch's intra-op threads set to `threads` inside the block, restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _stop_with(parent):
    """SIGTERM to this process when `parent` dies (Linux). A parent killed by SIGKILL cannot stop
    its pool: an idle worker then ends at the queue's closed pipe, but a busy one would finish its
    run, minutes on a CPU, for nobody. (The kernel signals when the thread that started the
    worker ends: the pool is started from the caller's thread and refilled from its own handler
    thread, which lives as long as the pool.)"""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # refused (a sandbox's seccomp): the worker runs as it would elsewhere
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def _start_worker(threads, device, parent):
    # A session of its own, out of the process group of its parent: Ctrl-C and a time limit's
    # SIGTERM (`timeout` signals its whole group) reach the parent only, which stops the pool.
    # Signalled itself, an idle worker would die holding the lock of the pool's task queue, and
    # Pool.terminate() in the parent would wait for that lock forever.
    os.setsid()
    _stop_with(parent)
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


def serial_map(fn, items, threads=None):
    """fn(*item) for each item, in order, in this process (on `threads` torch threads where
    given): the map of one worker."""
    for item in items:
        with torch_threads(threads) if threads else contextlib.nullcontext():
            result = fn(*item)
        yield result


class Workers:
    """A pool started on first use: ``map(fn, items)`` yields ``fn(*item)`` for every item, in
    order. With one worker (or one item and no pool yet) the pieces run in this process, on the
    pool's threads as a worker would. fn must be a module-level function (the workers are
    spawned). ``with pool.piece_threads():`` runs other work that pieces depend on the same way.

    Args: device: where the pieces compute. workers, threads: see :func:`plan`.
    """

    def __init__(self, device, workers=None, threads=None):
        self.device = str(device)
        self.size, self.threads = plan(device, workers, threads)
        self.pool = None

    def map(self, fn, items):
        items = list(items)
        if self.pool is None and (self.size == 1 or len(items) < 2):
            return serial_map(fn, items, self.threads)
        if self.pool is None:
            print(f"workers: {self.size} processes x {self.threads} threads on {self.device}", file=sys.stderr)
            self.pool = mp.get_context("spawn").Pool(self.size, _start_worker,
                                                      (self.threads, self.device, os.getpid()))
        return self.pool.imap(_call, [(fn, item) for item in items])

    def piece_threads(self):
        """A block in this process on the threads every piece computes on."""
        return torch_threads(self.threads)

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
