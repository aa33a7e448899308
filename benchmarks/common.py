"""Shared pieces of the benchmarks: realistic inputs, timing, copy bandwidth.

Import this module before torch allocates anything: it turns on torch's transparent-huge-page
CPU allocator (THP_MEM_ALLOC_ENABLE=1, read once at start-up) unless the caller set it, so
that fresh large allocations do not dominate every timing. The report scripts also keep freed
memory in the process (retain_freed_memory; --system-malloc leaves it). Fused and reference
run under the same settings; reports state them.
"""
import os
import platform

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from idd_ops._arguments import positive_seconds  # noqa: E402

# name -> (B, student C, teacher C, feature H, W, label Hy, Wy, K)
SHAPES = {
    "cityscapes": (8, 512, 2048, 64, 128, 512, 1024, 19),
    "cityscapes-small": (2, 512, 2048, 64, 128, 512, 1024, 19),
    "voc": (8, 512, 2048, 64, 64, 512, 512, 21),
    "ade20k": (8, 512, 2048, 64, 64, 512, 512, 150),
    # GPU launch-shape cases; the reference's [B, K, K, C] differences bound K=1000's size
    "k1000": (2, 256, 512, 64, 64, 512, 512, 1000),
    "b2-c256": (2, 256, 256, 64, 128, 512, 1024, 19),
}


def street_labels(B, H, W, K, seed=0, ignore_index=255, device="cpu"):
    """Label maps with a street scene's layout: sky above a random horizon, a building band,
    road below, sidewalks at the sides, and boxes (cars, people, poles, signs) of random size,
    with a thin ignored border around each box as real annotations have. Classes are spread
    over [0, K)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(B, H, W, dtype=torch.long)
    for b in range(B):  # regions as slices (full-image masks per box took a minute at B=8 512x1024)
        u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
        horizon, roof = int(u(0.35, 0.55) * H), int(u(0.1, 0.3) * H)
        y = torch.full((H, W), 2 % K)  # road
        y[:horizon] = 1 % K  # building
        y[:roof] = 0  # sky
        side = int(u(0.1, 0.25) * W)
        y[horizon:, :side] = 3 % K  # sidewalks
        y[horizon:, W - side:] = 3 % K
        for _ in range(int(u(5, 25))):
            k = int(u(4, K))
            h, w = int(u(0.02, 0.3) * H) + 1, int(u(0.005, 0.15) * W) + 1
            r0, c0 = int(u(0.2, 0.9) * H), int(u(0, 1) * W)
            y[max(r0 - h - 2, 0):r0 + 2, max(c0 - 2, 0):c0 + w + 2] = ignore_index  # the ignored border...
            y[max(r0 - h, 0):r0, c0:c0 + w] = k  # ...around the box
        out[b] = y
    return out.to(device)


def fragmented_labels(B, H, W, Hy, Wy, K, seed=0, device="cpu"):
    """``[B, Hy, Wy]`` label maps whose nearest-neighbour resizing to the ``H x W`` feature grid
    gives every feature pixel an independent uniform class in [0, K), as fine ADE20K-like maps do
    after downsampling: random classes at ``H x W``, each repeated over its ``Hy/H x Wy/W``
    block (the sizes must divide)."""
    if Hy % H or Wy % W:
        raise ValueError(f"label size {Hy}x{Wy} must be a multiple of the feature size {H}x{W}")
    y = torch.randint(0, K, (B, H, W), generator=torch.Generator().manual_seed(seed))
    return y.repeat_interleave(Hy // H, 1).repeat_interleave(Wy // W, 2).to(device)


LABELS = ("street", "fragmented")


def make_inputs(shape, device="cpu", dtype=torch.float32, seed=0, labels="street"):
    """(student [B, Cs, H, W], teacher [B, Ct, H, W], labels [B, Hy, Wy], K) for a SHAPES tuple;
    labels: "street" (street_labels) or "fragmented" (fragmented_labels)."""
    B, Cs, Ct, H, W, Hy, Wy, K = shape
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, Cs, H, W, generator=g).to(device=device, dtype=dtype)
    t = torch.randn(B, Ct, H, W, generator=g).to(device=device, dtype=dtype)
    if labels == "street":
        y = street_labels(B, Hy, Wy, K, seed=seed, device=device)
    elif labels == "fragmented":
        y = fragmented_labels(B, H, W, Hy, Wy, K, seed=seed, device=device)
    else:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    return s, t, y, K


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


RETAIN_NOTE = ("freed memory stays in the process (glibc's mallopt: M_MMAP_MAX 0, M_TRIM_THRESHOLD max), "
               "as a caching allocator keeps it: memory handed back to the kernel is zeroed again on its next "
               "first touch, and on a VM that reports free pages to its host (as these do) the host must supply "
               "it again, which cost up to 70 ms for a 64 MiB gradient, in whichever implementation came next")

SYSTEM_MALLOC_NOTE = "the C library's defaults (large freed blocks go back to the kernel)"


def retain_freed_memory():
    """Keeps freed memory in this process (glibc only; returns whether it could), so that
    timings measure the ops' work rather than the kernel's and the host's handling of fresh pages
    (RETAIN_NOTE). Call it at the start of a benchmark's main, before large allocations; peak
    memory (from torch's allocation events) is unaffected."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def add_allocator_option(parser):
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave the C library's allocator at its defaults (freed large blocks go back to the "
                             "kernel) instead of keeping freed memory in the process")


def apply_allocator_option(args):
    """Keeps freed memory unless --system-malloc; returns the sentence a report states."""
    return RETAIN_NOTE if not args.system_malloc and retain_freed_memory() else SYSTEM_MALLOC_NOTE


def time_ms(fn, device="cpu", repeat=5, warmup=1):
    """Median wall time of fn() in milliseconds (synchronised on CUDA)."""
    return time_interleaved([fn], device, repeat, warmup)[0]


def time_interleaved(fns, device="cpu", repeat=5, warmup=1, settle_s=None, stat=statistics.median):
    """stat (default: the median) of each fn's wall times in ms, timed in alternation (one call
    of each per round), so that every candidate meets the same machine state. After the
    warm-up calls, the first fn keeps running for settle_s: right after large allocations this
    machine's kernel is busy (huge-page work) for a fraction of a second, which would skew the
    first timings. On a GPU 0.1 s (by default) brings its clocks up from idle."""
    if settle_s is None:
        settle_s = 0.1 if torch.device(device).type == "cuda" else 0.5
    for fn in fns:
        for _ in range(warmup):
            fn()
    t_end = time.perf_counter() + settle_s
    while time.perf_counter() < t_end:
        fns[0]()
    sync(device)
    times = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [stat(t) for t in times]


class CopyProbe:
    """A copy between two existing tensors of `nbytes` each (at least 256 MiB, beyond the
    caches), timed in alternation with a row's implementations: the memory bandwidth that row
    meets. On a machine whose memory system is shared with other tenants it drifts (these
    2-core hosts measured 35 to 66 GB/s minutes apart), so one measurement per run would move
    every row's bound with it."""

    def __init__(self, device="cpu", nbytes=2**28):
        self.src = torch.ones(max(nbytes, 2**28) // 4, device=device)
        self.dst = torch.empty_like(self.src)

    def __call__(self):
        self.dst.copy_(self.src)

    def rate(self, ms):
        """Bytes read plus written per second, from the time of one call in ms."""
        return 2 * self.src.numel() * 4 / (ms * 1e-3)


def copy_bandwidth_gbs(nbytes, device="cpu", repeat=5):
    """Bytes read plus bytes written per second by a plain copy between two existing tensors
    of nbytes each (at least 256 MiB, so that caches do not hold them), in GB/s."""
    probe = CopyProbe(device, nbytes)
    return probe.rate(min(time_ms(probe, device, repeat=1) for _ in range(repeat))) / 1e9


def loss_fn(impl, s, t, y, K, backward):
    """A closure running one IDD loss (forward, or forward + backward into s.grad)."""
    def run():
        s.grad = None
        loss = impl(s, t, y, K)
        if backward:
            loss.backward()
        return loss
    return run


def host_ms(fn, device="cpu", calls=20):
    """Host time per call in ms: `calls` calls issued without a synchronise, divided by `calls`
    (after a warm-up call and a synchronise). Where the device is the slower side and its queue
    fills, this grows towards the device time; a launch-bound op shows its host cost."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    sync(device)
    return elapsed * 1e3 / calls


def graph_ms(fn, device="cpu", replays=20):
    """Time per call in ms of fn() captured in a CUDA graph and replayed: the best of `replays`
    replays, each synchronised as time_interleaved's calls are, so the two compare. What a
    captured training step pays for the op, its kernels without the host's cost of issuing them
    (docs/API.md, "CUDA graphs"; the way under the host floor at small shapes). Captured after two
    warm-up calls on a side stream, as torch.cuda.graphs asks. None off CUDA; a failed capture
    raises."""
    if torch.device(device).type != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    del graph  # its pool is freed once the gradient made in it goes too (fn's next `grad = None`)
    return min(times)


def autograd_floor_ms(device="cpu", backward=True):
    """Host ms per call of the least a differentiable loss costs in plain PyTorch: `(x * 2).sum()`
    of a leaf of 8 values, and its backward when `backward` (best of 3 host_ms runs). On CUDA the
    backward runs on the autograd engine's device thread, so this holds the two thread hand-offs
    that every forward+backward pays, whatever its ops: the floor under a host-time target."""
    x = torch.ones(8, device=device, requires_grad=True)

    def run():
        x.grad = None
        y = (x * 2).sum()
        if backward:
            y.backward()
    return min(host_ms(run, device) for _ in range(3))


RUNTIME_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                    "cudaMemsetAsync", "cudaMemcpyAsync", "cudaGraphLaunch")


def count_launches(events):
    """Kernels, memsets and copies that `events` (torch.profiler FunctionEvents) put on the GPU:
    the device-side records where the profiler has them (CUPTI), else the host's runtime calls
    (RUNTIME_LAUNCHES)."""
    on_device = [e for e in events if getattr(e.device_type, "name", "") == "CUDA"]
    if on_device:
        return len(on_device)
    return sum(1 for e in events if e.name in RUNTIME_LAUNCHES)


# The CUDA kernel sets: IDD_OPS_CUDA_NEXT's value for each (idd_ops/_switches.py); the next set's
# is every group unless IDD_OPS_NEXT_SET names some (tools/gpu_check.sh sets it).
KERNEL_SETS = {"default": "0", "next": os.environ.get("IDD_OPS_NEXT_SET", "1")}


def cpu_model():
    """The CPU's model name (/proc/cpuinfo on Linux), else the platform's processor or machine
    name: ratios against eager PyTorch moved 2-3x between the hosts these VMs land on."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {platform.machine()}"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def revision():
    """The measured source's revision: $REV where set (the call on a device machine names it: the
    copy there may hold no .git, or a stale one, which on 2026-12-04 named the session's first
    revision "with uncommitted changes"), else git's short hash (+ " with uncommitted changes"),
    else "unknown"."""
    if os.environ.get("REV"):
        return os.environ["REV"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        rev = None
    if rev is not None and rev.returncode == 0:
        return rev.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")
    return "unknown (no .git here and no REV set)"


def add_kernel_set_options(parser, share, impls_default=None):
    """The options of a benchmark that can run each CUDA kernel set in a child process
    (run_per_kernel_set): --kernels, --time-limit (shared `share`, e.g. "2:1"), --no-peak, and
    the children's own --rows-json and --impls."""
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory columns")
    parser.add_argument("--kernels", nargs="+", choices=tuple(KERNEL_SETS), default=None,
                        help="run each CUDA kernel set in its own child process (IDD_OPS_CUDA_NEXT=0 / 1, read once "
                             "per process): the first measures every implementation, a second adds 'fused next' "
                             "columns")
    parser.add_argument("--time-limit", type=positive_seconds, default=None,
                        help=f"with --kernels: seconds for all children ({share} between the first and a second "
                             f"kernel set); a child stopped at its share gives the rows it finished")
    parser.add_argument("--rows-json", default=None, help=argparse.SUPPRESS)  # a --kernels child's output
    parser.add_argument("--impls", nargs="+", default=impls_default, help=argparse.SUPPRESS)


def write_json(path, obj):
    """Writes obj as JSON to path atomically (a reader never sees half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def run_per_kernel_set(module, argv_for, kernel_sets, time_limit=None, weights=None):
    """Runs `python -m module *argv_for(kernel_set, json_path)` once per kernel set, each in its
    own process with IDD_OPS_CUDA_NEXT set (the switch is read once per process), one after the
    other. A child writes {"rows": [...], ...} to json_path after every row, so a child stopped
    at its time limit still gives the rows it finished. time_limit (s) is shared among the
    children in proportion to `weights` (default equal; those past the kernel sets given are
    dropped, so one set alone has all of it) of the time still left.
    Returns ({kernel set: the child's JSON, or None if it wrote none}, error messages); a child's
    output goes to this process's stdout and stderr."""
    results, errors = {}, []
    weights = list(weights or [1] * len(kernel_sets))[:len(kernel_sets)]
    deadline = time.monotonic() + time_limit if time_limit else None
    for i, kernel_set in enumerate(kernel_sets):
        timeout = max((deadline - time.monotonic()) * weights[i] / sum(weights[i:]), 1) if deadline else None
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "rows.json")
            env = dict(os.environ, IDD_OPS_CUDA_NEXT=KERNEL_SETS[kernel_set])
            print(f"{module}: {kernel_set} kernels (IDD_OPS_CUDA_NEXT={env['IDD_OPS_CUDA_NEXT']}) in a child process"
                  + (f", {timeout:.0f} s at most" if timeout else ""), file=sys.stderr, flush=True)
            try:
                status = subprocess.run([sys.executable, "-m", module, *argv_for(kernel_set, path)], env=env,
                                        timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                status = None
            results[kernel_set] = None
            if os.path.exists(path):
                with open(path) as f:
                    results[kernel_set] = json.load(f)
            done = len(results[kernel_set]["rows"]) if results[kernel_set] else 0
            if status is None:
                errors.append(f"the {kernel_set} kernels' child process reached its time limit ({timeout:.0f} s) "
                              f"after {done} rows; the rows after them are missing")
            elif status != 0:
                errors.append(f"the {kernel_set} kernels' child process failed (exit status {status}) after {done} "
                              f"rows; its output is in the log above")
    return results, errors
