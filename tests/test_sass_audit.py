"""tools/sass_audit.py's reading of SASS, on instruction text as cuobjdump prints it (the tool
itself needs a cuobjdump, which CI's machine lacks)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("sass_audit", os.path.join(ROOT, "tools", "sass_audit.py"))
sass_audit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass_audit)


def code(*lines):
    return [(0x10 * i, line) for i, line in enumerate(lines)]


def test_four_narrow_stores_filling_16_bytes_are_a_split_store():
    found = sass_audit.split_accesses(code(
        "STG.E desc[UR36][R2.64], R22", "STG.E desc[UR36][R2.64+0x4], R28",
        "STG.E desc[UR36][R2.64+0x8], R33", "STG.E desc[UR36][R2.64+0xc], R5"))
    assert found == ["STG 4 x 4 bytes at R2+0x0"]


def test_half_stores_and_double_loads_are_split_by_their_width():
    halves = code(*[f"STG.E.U16 desc[UR36][R4.64+{2 * i:#x}], R{i}" for i in range(8)])
    assert sass_audit.split_accesses(halves) == ["STG 8 x 2 bytes at R4+0x0"]
    doubles = code("LDG.E.64.CONSTANT R8, desc[UR36][R2.64+0x10]", "LDG.E.64.CONSTANT R10, desc[UR36][R2.64+0x18]")
    assert sass_audit.split_accesses(doubles) == ["LDG 2 x 8 bytes at R2+0x10"]


def test_whole_vectors_strided_scalars_and_partial_windows_are_not_split():
    assert sass_audit.split_accesses(code(
        "STG.E.128 desc[UR36][R2.64], R16",                                     # one 16-byte store
        "STG.E desc[UR36][R8.64], R1", "STG.E desc[UR36][R8.64+0x80], R2",       # a warp's unrolled rows
        "STG.E desc[UR36][R8.64+0x100], R3", "STG.E desc[UR36][R8.64+0x180], R4",
        "@P0 STG.E desc[UR36][R6.64+0x4], R1", "STG.E desc[UR36][R6.64+0x8], R2",  # 3 of 4 words
        "STG.E desc[UR36][R6.64+0xc], R3")) == []


def test_access_order_marks_loops_and_keeps_program_order():
    line = sass_audit.access_order([
        (0x100, "LDG.E.128 R24, desc[UR36][R24.64]"), (0x110, "FADD R1, R2, R3"),
        (0x120, "@!P0 BRA 0x200"), (0x130, "STS [R0], R5"), (0x140, "@P1 BRA 0x100"), (0x150, "EXIT")])
    assert line == "0100:LDG.128 0120:BRA 0130:STS 0140:BRA(back) 0150:EXIT"
