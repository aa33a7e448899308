"""The emulator's memory model (tests/cuda_emu/memory_model.h) on kernels of known traffic, and
its race check: blocks of one launch that touch the same global bytes unordered.

The race check is on in every emulated test (test_cuda_emulated*.py and the public API's tests
under IDD_OPS_EMULATE_CUDA): a race between blocks in a library kernel fails there.
"""
import pytest
import torch

from cuda_emu.traffic import measured


@pytest.fixture(scope="module")
def emu():
    from cuda_emu import build

    return build.load()


def selftest(emu, name, x=None):
    """Runs one self-test kernel (tests/cuda_emu/selftest.cu); returns (output, its one launch)."""
    x = torch.arange(1.0, 257.0) if x is None else x
    with measured(emu) as launches:
        out = emu._emu_selftest(name, x)
    assert len(launches) == 1
    return out, launches[0]


def test_a_coalesced_copy_takes_4_sectors_per_warp_request(emu):
    out, launch = selftest(emu, "coalesced_copy")
    assert torch.equal(out, torch.arange(1.0, 257.0))
    assert (launch.blocks, launch.threads) == (1, 256)
    assert (launch.ld_requests, launch.ld_sectors, launch.ld_bytes) == (8, 32, 1024)
    assert (launch.st_requests, launch.st_sectors, launch.st_bytes) == (8, 32, 1024)
    assert launch.coalescing == 1.0
    assert (launch.dram_read, launch.dram_write) == (1024, 1024)
    assert launch.atomics == launch.sh_requests == 0


def test_a_strided_read_takes_a_sector_per_lane(emu):
    _, launch = selftest(emu, "strided_read")
    assert (launch.ld_requests, launch.ld_sectors, launch.ld_bytes) == (8, 256, 1024)
    # every lane of a warp reads its own sector, and the 8 warps read the same 32 sectors
    assert launch.dram_read == 32 * 32
    assert launch.coalescing == pytest.approx(2048 / (32 * (256 + 32)))


def test_shared_memory_bank_conflicts_are_counted(emu):
    out, launch = selftest(emu, "bank_conflicts")
    assert out.shape == (256,)
    # 8 warps: a column store (32 lanes in one bank: 32 passes) and a row load (1 pass) each
    assert (launch.sh_requests, launch.sh_wavefronts, launch.sh_least_wavefronts) == (16, 8 * 32 + 8, 16)
    assert launch.bank_conflicts == (8 * 32 + 8) / 16


def test_wide_shared_accesses_are_served_a_part_of_the_warp_at_a_time(emu):
    x = torch.arange(1.0, 257.0)
    out, launch = selftest(emu, "vector_bank_conflicts", x)
    lane = torch.arange(256) % 32
    word = (lane % 8) * 32 + (lane // 8) * 4
    assert torch.equal(out, x[word % 256] + x[(word + 3) % 256])
    # 8 warps: 4 fill stores of 1 pass each, then one 16-byte read of 4 quarter warps x 8 passes
    assert launch.sh_requests == 8 * 5
    assert (launch.sh_wavefronts, launch.sh_least_wavefronts) == (8 * (4 + 32), 8 * (4 + 4))


def test_atomics_between_blocks_are_no_race(emu):
    x = torch.arange(1.0, 257.0)
    out, launch = selftest(emu, "blocks_add_atomically", x)
    assert out[0].item() == -7.0 + x[:4].sum().item()
    assert (launch.atomics, launch.float_atomics) == (4, 4)


@pytest.mark.parametrize("name, message", [
    ("blocks_write_one_element", r"writes a global byte .* that block \(\d,0,0\) wrote in the same launch"),
    # the first conflict found depends on the block order: a read of another block's atomic sum, or
    # an atomic update of a sum another block has read
    ("blocks_read_partial_sum", r"(reads|updates atomically) a global byte .* that block \(\d,0,0\) "
                                r"(updated atomically|read) in the same launch"),
])
def test_a_race_between_blocks_raises(emu, name, message):
    with pytest.raises(RuntimeError, match=message):
        emu._emu_selftest(name, torch.arange(1.0, 257.0))


@pytest.mark.parametrize("name, atomics", [("last_block_sums", 4), ("last_block_sums_2d", 5)])
def test_a_last_block_reads_the_fenced_writes_of_the_blocks_before_its_ticket(emu, name, atomics):
    """The pattern by hand, and the library's last_to_arrive (grid_tickets.cuh) in 2-D blocks: one
    ticket a block (4 atomics), and the last block's reset of the counter (1 more)."""
    x = torch.arange(1.0, 257.0)
    out, launch = selftest(emu, name, x)
    assert out[0].item() == x[:4].sum().item()
    assert torch.equal(out[1:5], x[:4])
    assert launch.atomics == atomics


@pytest.mark.parametrize("name", ["last_block_sums_unfenced_writers", "last_block_sums_unfenced_reader"])
def test_a_last_block_without_both_fences_races(emu, name):
    with pytest.raises(RuntimeError, match=r"reads a global byte .* that block \(\d,0,0\) wrote in the same launch"):
        emu._emu_selftest(name, torch.arange(1.0, 257.0))


def test_the_race_check_can_be_switched_off(emu):
    before = emu._emu_memory(0)
    try:
        with measured(emu, races=False) as launches:  # counting traffic keeps the mode it found
            out = emu._emu_selftest("blocks_write_one_element", torch.arange(1.0, 257.0))
        assert emu._emu_memory(0) == 0
    finally:
        emu._emu_memory(before)
    assert before == 1 and len(launches) == 1
    assert out[0].item() in (0.0, 1.0, 2.0, 3.0)


def test_a_threads_locals_and_the_launch_arguments_are_not_global_memory(emu):
    """block_sum keeps its partial sums in registers, on its stack and in shared memory: its only
    global traffic is the 256 floats it reads and the one it writes."""
    _, launch = selftest(emu, "block_sum")
    assert (launch.ld_bytes, launch.st_bytes) == (1024, 4)


# What issue 21 asks of the CUDA IDD kernels, checked on their traffic: one read of the
# features, coalesced; no float atomics; few launches. (tests/cuda_emu/report.py prints the
# same figures for every loss at a larger shape: benchmarks/TRAFFIC-emulated.md.)
def idd_call(channels_last=False, kernel_set="default"):
    """The launches of one IDD forward+backward through the emulated kernels of `kernel_set`,
    and the bytes of its features."""
    import idd_ops
    from cuda_emu.override import emulated_cuda

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 16, 16, 32, generator=g), torch.randn(2, 64, 16, 32, generator=g)
    if channels_last:
        s, t = (f.contiguous(memory_format=torch.channels_last) for f in (s, t))
    y = torch.randint(0, 7, (2, 64, 128), generator=g)
    s.requires_grad_()
    seed = torch.ones(())
    with emulated_cuda(kernel_set) as emu, measured(emu) as launches, \
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        idd_ops.inter_class_distance_loss(s, t, y, 7).backward(seed)
    return launches, 4 * (s.numel() + t.numel()), prof


@pytest.mark.parametrize("kernel_set", ["default", "next"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_idd_reads_each_feature_once_coalesced(emu, channels_last, kernel_set):
    """(channels_last splits the pass into pixel segments at this shape: on the next set its
    last blocks read back the float64 partials the launch wrote, from L2 on a GPU.)"""
    launches, feature_bytes, _ = idd_call(channels_last, kernel_set)
    sums = max((l for l in launches if "class_sums_cuda.cu" in l.site), key=lambda l: l.dram_read)
    slot_bytes = 2 * 16 * 32 * 2  # the class-slot map: one int16 per feature pixel
    own = sums.dram_write if kernel_set == "next" else 0
    assert feature_bytes + slot_bytes <= sums.dram_read <= feature_bytes + slot_bytes + own + 64
    assert sums.coalescing > 0.8  # the rest: pivots and per-tile re-reads of the slot map, from cache
    # no float atomics; on the next set a split pass's tickets: one a block, one reset a tile
    assert sums.float_atomics == 0 and sums.atomics <= (2 * sums.blocks if own else 0)


@pytest.mark.parametrize("kernel_set, most", [("default", 6), ("next", 5)])
def test_idd_launches_and_float_atomics(emu, kernel_set, most):
    """The library's own kernel launches per IDD forward+backward, no global float atomics, and
    nothing else launched: no conversion of the sums' float64 gradient (the gather reads it as it
    comes) and no zero fills for unused gradients, so 6 launches in all (issue 21's target; the
    kernels they replaced took 3 and a composite tail of about 110 ATen ops), and 5 on the next
    set, whose tail forward is one kernel. (Its ticket counters are filled once for the stream by
    its first call: the second call is the one counted.)"""
    from cuda_emu.report import aten_ops

    idd_call(kernel_set=kernel_set)
    launches, _, prof = idd_call(kernel_set=kernel_set)
    assert len(launches) <= most, [l.site for l in launches]
    assert sum(l.float_atomics for l in launches) == 0
    assert aten_ops(prof) == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_position_loss_reads_its_table_without_bank_conflicts(emu, dtype):
    """The table-driven position kernels read a pack's column factors with 16-byte shared loads
    (one element at a time, lanes 4 words apart met in a quarter of the banks: 3-3.4 passes for
    each pass's worth of bytes, before the traffic model showed it). bfloat16 packs hold 8
    elements, so a lane's factors span 32 bytes and two loads take twice the least passes."""
    import idd_ops
    from cuda_emu.override import emulated_cuda

    pred = torch.rand(2, 5, 16, 64, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    kinds = ("horizontal", "vertical", "gaussian", "horizontal_stripes", "vertical_stripes")
    with emulated_cuda() as emu, measured(emu) as launches:
        idd_ops.position_encoding_loss(pred, kinds).backward()
    tables = [l for l in launches if "position_encoding_loss_tables" in l.site and l.blocks > 1]
    assert len(tables) == 2  # forward and backward
    most = 2.0 if dtype == torch.bfloat16 else 1.0
    assert all(l.bank_conflicts <= most for l in tables), [(l.site, l.bank_conflicts) for l in tables]


def test_the_traffic_report_counts_kernels_and_aten_ops(emu):
    """tests/cuda_emu/report.py (benchmarks/TRAFFIC-emulated.md) on two of its cases."""
    from cuda_emu import report

    cwd, skd = report.measure("cwd", "default"), report.measure("skd pool2", "default")
    assert [l.site.split(":")[0] for l in cwd["launches"]] == ["csrc/cuda/softmax_kl_cuda.cu"] * 2
    # SKD: its fused kernels around ATen's GEMMs (csrc/cuda/affinity_loss_cuda.cu)
    assert [l.site.split(":")[0] for l in skd["launches"]] == ["csrc/cuda/affinity_loss_cuda.cu"] * 11
    # its 5 GEMMs (bmm_out writes in place: counted), and the mean's sum and division
    assert skd["aten"]["aten::bmm"] == 5 and sum(skd["aten"].values()) == 8
    text = report.markdown([cwd, skd], "abc1234")
    assert "| cwd | default | 2 + " in text and "| skd pool2 | default | 11 + 8 |" in text
