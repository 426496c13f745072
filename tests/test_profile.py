"""The CPU engine's profile mode, the roofline model and the ``profile`` command.

Counts are deterministic, so these are exact tests: calibration kernels whose warp-level
counts follow from the CUDA memory model (tests/kernels/profile_calibration.cu), block
sampling against a full run, and the budget of our own kernels
(cupy_localrel/kernels/profile_budget.json). No timing anywhere: every time is modelled.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cupy_localrel import _loader
from cupy_localrel import _profile as P
from cupy_localrel import _roofline as R
from cupy_localrel._sim import engine
from cupy_localrel._sim.profile import sample_blocks

pytestmark = pytest.mark.skipif(not _loader.sim_available()[0], reason=_loader.sim_available()[1])

CALIBRATION = Path(__file__).resolve().parent / "kernels" / "profile_calibration.cu"


@pytest.fixture(scope="module")
def calib():
    return engine.build(CALIBRATION, profile=True, sanitize=False)


def aligned(nbytes, dtype=np.float32):
    raw = np.zeros(nbytes + 256, np.uint8)
    off = (-raw.ctypes.data) % 256
    return raw[off:off + nbytes].view(dtype)


def line_of(text: str) -> str:
    """``profile_calibration.cu:N`` of the first line containing ``text``."""
    for no, line in enumerate(CALIBRATION.read_text().split("\n"), start=1):
        if text in line:
            return f"{CALIBRATION.name}:{no}"
    raise AssertionError(text)


def launch(module, name, grid, block, args, shared_mem=0):
    module.get_function(name)(grid, block, args, shared_mem=shared_mem)
    return module.launches.pop()


def site(c, kind, space):
    rows = [s for s in c.sites if s.kind == kind and s.space == space]
    assert len(rows) == 1, c.sites
    return rows[0]


# ---------------------------------------------------------------------------------------
# Calibration: global memory (4 blocks of one warp; per request figures are exact)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel, text, sectors, ideal, touched", [
    ("copy_coalesced", "out[i] = in[i];", 4, 4, 512),
    ("load_stride2", "in[2 * i]", 8, 4, 512),
    ("load_stride32", "in[32 * i]", 32, 4, 512),
    ("load_broadcast", "in[blockIdx.x]", 1, 1, 16),
    ("load_offset1", "in[i + 1]", 5, 4, 512),
])
def test_global_sectors_per_request(calib, kernel, text, sectors, ideal, touched):
    inp, out = aligned(1 << 16), aligned(1 << 16)
    c = launch(calib, kernel, (4,), (32,), (inp, out))
    load, store = site(c, "load", "global"), site(c, "store", "global")
    assert load.location == store.location == line_of(text)
    assert load.requests == 4 and load.lanes == 128 and load.bytes == 512
    assert load.sectors == 4 * sectors and load.ideal_sectors == 4 * ideal
    assert store.sectors == store.ideal_sectors == 16          # out[i]: coalesced
    t = c.totals()
    assert t["global_load"] == {"requests": 4, "sectors": 4 * sectors, "ideal_sectors": 4 * ideal, "bytes": 512}
    # distinct bytes: what the loads touched plus the 512 bytes written
    assert t["unique_global_bytes"] == touched + 512
    assert c.blocks_profiled == c.blocks_total == 4 and c.barriers == {}


# ---------------------------------------------------------------------------------------
# Calibration: shared memory bank wavefronts (2 blocks of one warp)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("stride, wavefronts", [(0, 1), (1, 1), (2, 2), (32, 32), (33, 1)])
def test_shared_wavefronts_per_request(calib, stride, wavefronts):
    out = aligned(1 << 12)
    c = launch(calib, "shared_stride", (2,), (32,), (out, np.int32(stride)), shared_mem=32 * 33 * 4)
    store, load = site(c, "store", "shared"), site(c, "load", "shared")
    assert store.location == line_of("buf[t * stride] = (float)t;")
    assert load.location == line_of("= buf[t * stride];")
    for s in (store, load):
        assert s.requests == 2 and s.lanes == 64 and s.bytes == 256
        assert s.wavefronts == 2 * wavefronts
        assert s.ideal_wavefronts == 2   # 4-byte requests: at most 128 distinct bytes, one wavefront
    assert c.barriers == {line_of("  __syncthreads();"): 2}     # one per block


@pytest.mark.parametrize("stride, wavefronts, ideal", [(1, 4, 4), (2, 8, 4), (8, 32, 4), (0, 1, 1)])
def test_shared_float4_wavefronts_against_the_ideal(calib, stride, wavefronts, ideal):
    """A 16-byte request is one request (not four 4-byte ones): 32 contiguous lanes cost the
    minimum 4 wavefronts, ratio 1 to the ideal; strided ones their conflict factor."""
    out = aligned(1 << 12)
    c = launch(calib, "shared_float4_stride", (2,), (32,), (out, np.int32(stride)), shared_mem=32 * 8 * 16)
    store, load = site(c, "store", "shared"), site(c, "load", "shared")
    assert load.location == line_of("const float4 v = localrel::load_wide(buf4 + t * stride);")
    for s in (store, load):
        assert s.requests == 2 and s.lanes == 64
        assert s.bytes == 2 * 32 * 16
        assert s.wavefronts == 2 * wavefronts and s.ideal_wavefronts == 2 * ideal
    totals = c.totals()["shared_load"]
    assert totals["wavefronts"] / totals["ideal_wavefronts"] == wavefronts / ideal
    t = np.arange(32, dtype=np.float32)
    want = 4 * t + 6 if stride else np.full(32, 4 * 31 + 6, np.float32)   # stride 0: the last store wins
    if stride:
        np.testing.assert_array_equal(out[:64], np.tile(want, 2))


def test_barriers_and_atomics_counted(calib):
    out = aligned(1 << 8)
    c = launch(calib, "barriers_and_atomics", (3,), (64,), (out, np.int32(5)))
    assert c.barriers == {line_of("for (int r = 0; r < rounds; ++r) __syncthreads();"): 15}
    atomic = site(c, "atomic", "global")
    assert atomic.location == line_of("atomicAdd(out, 1.0f);")
    assert atomic.lanes == 3 * 64 and atomic.requests == 3 * 2      # one per warp
    assert out[0] == 192.0                                             # the kernel still ran
    assert c.totals()["atomics"] == 6 and c.totals()["global_load"]["requests"] == 0


def test_block_subset_runs_only_those_blocks(calib):
    inp, out = aligned(1 << 12), aligned(1 << 12)
    inp[:] = 1.0
    calib.get_function("copy_coalesced")((8,), (32,), (inp, out), blocks=[0, 7])
    c = calib.launches.pop()
    assert (c.blocks_profiled, c.blocks_total, c.scale) == (2, 8, 4.0)
    assert out[:32].sum() == 32 and out[32:224].sum() == 0 and out[224:256].sum() == 32
    assert c.totals()["global_load"]["requests"] == 8                  # 2 measured, scaled x4
    with pytest.raises(ValueError, match="distinct linear block indices"):
        calib.get_function("copy_coalesced")((8,), (32,), (inp, out), blocks=[8])
    with pytest.raises(ValueError, match="distinct"):
        calib.get_function("copy_coalesced")((8,), (32,), (inp, out), blocks=[1, 1])


def test_profile_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv(engine.ENV_PROFILE, "1")
    module = engine.build(CALIBRATION, sanitize=False)
    assert module.profiling
    inp, out = aligned(1 << 12), aligned(1 << 12)
    module.get_function("copy_coalesced")((2,), (32,), (inp, out))
    assert [c.kernel for c in module.launches] == ["copy_coalesced"]
    monkeypatch.setenv(engine.ENV_PROFILE, "0")
    assert not engine.build(CALIBRATION, sanitize=False).profiling


def test_profile_and_sanitizer_are_exclusive():
    with pytest.raises(ValueError, match="profile mode"):
        engine.build(CALIBRATION, profile=True, sanitize="thread")


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------
def test_sample_blocks_takes_whole_planes_first_and_last():
    s = sample_blocks(10 * 6, period=6, runs=3)
    assert s.tolist() == [0, 1, 2, 3, 4, 5, 24, 25, 26, 27, 28, 29, 54, 55, 56, 57, 58, 59]
    assert sample_blocks(18, period=6, runs=3) is None                   # 3 planes: all of them
    assert sample_blocks(7, period=3, runs=3).tolist() == [0, 3, 6]     # no whole periods
    assert np.array_equal(sample_blocks(1000, 10), sample_blocks(1000, 10))


@pytest.mark.parametrize("op", ["lrnet", "sasa"])
def test_sampling_agrees_with_a_full_run(op):
    """A mid-size case (16 planes) profiled on 3 planes vs every block: totals within 5%."""
    shape = (2, 64, 24, 24)
    for direction in P.DIRECTIONS:
        case = P.op_case(op, direction, shape, 7)
        sampled = P.run_case(case, runs=3)
        full = P.run_case(case, runs=10**6)
        assert [c.kernel for c in sampled] == [c.kernel for c in full]
        assert any(c.blocks_profiled < c.blocks_total for c in sampled)
        assert all(c.blocks_profiled == c.blocks_total for c in full)
        for s, f in zip(sampled, full):
            ts, tf = s.totals(), f.totals()
            for part in ("global_load", "global_store", "shared_load", "shared_store"):
                for key, want in tf[part].items():
                    assert ts[part][key] == pytest.approx(want, rel=0.05), (s.kernel, part, key)
            for key in ("barriers", "unique_global_bytes"):
                assert ts[key] == pytest.approx(tf[key], rel=0.05), (s.kernel, key)


# ---------------------------------------------------------------------------------------
# Budget of our own kernels
# ---------------------------------------------------------------------------------------
def test_kernels_within_their_profile_budget():
    budget = json.loads(P.BUDGET_FILE.read_text())
    tol = budget["tolerance"]
    measured = P.budget_measure()
    worse, stale = [], []
    for key, want in budget["kernels"].items():
        got = measured.get(key)
        assert got is not None, f"{key} no longer launched: regenerate with python -m cupy_localrel._profile --write-budget"
        for metric, limit in want.items():
            if metric == "lines":
                continue
            if got.get(metric, 0.0) > limit * (1 + tol) + 1e-9:
                worse.append(f"{key} {metric}: {got[metric]} > budget {limit}")
        lines = want.get("lines", {})
        matched = [ln for ln in lines if ln in got.get("lines", {})]
        if lines and not matched:
            stale.append(key)
        for ln in matched:
            if got["lines"][ln] > lines[ln] * (1 + tol) + 1e-9:
                worse.append(f"{key} line {ln}: {got['lines'][ln]} > budget {lines[ln]}")
    assert not worse, "kernels got worse than profile_budget.json:\n" + "\n".join(worse)
    assert not stale, f"no budgeted hot line of {stale} is found any more: regenerate the budget"


def test_budget_covers_every_kernel_of_both_ops():
    budget = json.loads(P.BUDGET_FILE.read_text())["kernels"]
    assert {k.split("/")[0] for k in budget} == {"lrnet_forward", "lrnet_backward", "sasa_forward", "sasa_backward"}
    assert sum(len(v["lines"]) for v in budget.values()) >= 20
    assert P.kernel_base("attention_forward_tiled<float, 1, 8, Dot>") == "attention_forward_tiled"


# ---------------------------------------------------------------------------------------
# Roofline model
# ---------------------------------------------------------------------------------------
def test_occupancy_limits():
    h200 = R.device("h200")
    # 128 threads, 64 registers: 8 blocks by registers (64 x 32 per warp, 4 warps, 64K registers)
    assert R.occupancy(h200, 128, 64, 0) == {"blocks_per_sm": 8, "warps_per_sm": 32, "occupancy": 0.5,
                                             "limiter": "registers"}
    # 40 KiB of shared memory + 1 KiB reserved: 5 blocks in 228 KiB
    assert R.occupancy(h200, 128, 32, 40 * 1024)["blocks_per_sm"] == 5
    assert R.occupancy(h200, 1024, None, 0) == {"blocks_per_sm": 2, "warps_per_sm": 64, "occupancy": 1.0,
                                                "limiter": "threads"}
    with pytest.raises(ValueError, match="unknown device"):
        R.device("v100")


def test_launch_time_picks_the_largest_unit_and_labels_it_modelled():
    h200 = R.device("h200")
    zero = {"requests": 0, "sectors": 0, "ideal_sectors": 0, "bytes": 0}
    totals = {"global_load": dict(zero, requests=10**6, sectors=4 * 10**6), "global_store": zero,
              "shared_load": {"requests": 0, "wavefronts": 0, "bytes": 0},
              "shared_store": {"requests": 0, "wavefronts": 0, "bytes": 0},
              "atomics": 0, "barriers": 0, "unique_global_bytes": 128 * 10**6}
    m = R.launch_time(h200, totals, threads=256, blocks_total=10**5, regs=32, smem_bytes=0)
    assert m["label"] == "modelled" and m["bound"] == "hbm"
    assert m["times_us"]["hbm"] == pytest.approx(128e6 / 4.3e12 * 1e6)
    assert m["floor_us"] == pytest.approx(128e6 / 4.8e12 * 1e6)
    assert m["predicted_us"] == pytest.approx(m["times_us"]["hbm"] + h200.launch_overhead_us)
    totals["shared_load"] = {"requests": 10**8, "wavefronts": 32 * 10**8, "bytes": 0}
    assert R.launch_time(h200, totals, threads=256, blocks_total=10**5, regs=32, smem_bytes=0)["bound"] == "shared"
    op = R.op_time(h200, [m, m], 96 * 10**6)
    assert op["predicted_us"] == pytest.approx(2 * m["predicted_us"]) and op["bound"] == "hbm"
    assert op["share"] == pytest.approx(op["floor_us"] / op["predicted_us"])
    # Issue: with a static mix, the requests count in 4-byte words (a 16-byte request is 4).
    kw = dict(threads=256, blocks_total=10**5, regs=32, smem_bytes=0, instructions_per_request=10.0)
    plain = R.launch_time(h200, totals, **kw)["warp_instructions"]
    assert plain == pytest.approx(10.0 * (10**6 + 10**8))
    wide = R.launch_time(h200, dict(totals, word_requests=10**6 + 4 * 10**8), **kw)["warp_instructions"]
    assert wide == pytest.approx(10.0 * (10**6 + 4 * 10**8))


# ---------------------------------------------------------------------------------------
# Instruction mix (NVRTC + cuobjdump, else PTX)
# ---------------------------------------------------------------------------------------
def test_sass_and_ptx_mix_parsers():
    from cupy_localrel import _nvrtc_check as N
    sass = """
        Function : copy
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*0020*/              @!P0 FFMA R3, R2, R2, R3 ;
        /*0030*/                   STS [R0], R3 ;
        /*0040*/                   NOP ;
        /*0050*/                   EXIT ;
    """
    mix = N.sass_mix(sass)["copy"]
    assert (mix["global_load"], mix["ffma"], mix["shared_store"], mix["total"]) == (1, 1, 1, 5)
    assert mix["memory_words"] == 2
    # Wide accesses count their 4-byte words: the issue proxy's denominator.
    wide = """
        Function : wide
        /*0000*/                   LDS.128 R4, [R0] ;
        /*0010*/                   LDG.E.64 R2, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.U16.CONSTANT R6, desc[UR4][R8.64] ;
        /*0030*/                   FFMA R3, R4, R5, R3 ;
    """
    mix = N.sass_mix(wide)["wide"]
    assert (mix["shared_load"], mix["global_load"], mix["memory_words"], mix["total"]) == (1, 2, 4 + 2 + 1, 4)
    assert P.instructions_per_request(mix) == pytest.approx(4 / 7)
    ptx = """.visible .entry k(\n)\n{\n\tld.global.nc.f32 \t%f1, [%rd1];\n\tfma.rn.f32 \t%f2, %f1, %f1, %f1;
\t@%p1 st.global.f32 \t[%rd2], %f2;\n\tbar.sync \t0;\n\tret;\n}\n"""
    mix = N.ptx_mix(ptx)["k"]
    assert (mix["global_load"], mix["global_store"], mix["ffma"], mix["barrier"], mix["total"]) == (1, 1, 1, 1, 5)
    assert mix["memory_words"] == 2
    ptx = """.visible .entry v(\n)\n{\n\tld.shared.v4.f32 \t{%f1, %f2, %f3, %f4}, [%r1];\n\tld.global.nc.v2.u16 \t{%rs1, %rs2}, [%rd1];\n}\n"""
    assert N.ptx_mix(ptx)["v"]["memory_words"] == 4 + 1


_GI_TEXT = """
.text._Z1kv:
	//## File "/x/common.cuh", line 10 inlined at "/x/common.cuh", line 20
	//## File "/x/common.cuh", line 20 inlined at "/tmp/k.cu", line 5
	//## File "/tmp/k.cu", line 5
        /*0000*/                   LDS.128 R4, [R2] ;
	//## File "/tmp/k.cu", line 6
        /*0010*/                   FFMA R0, R4, R5, R0 ;
        /*0020*/               @P0 BRA `(.L_x_1) ;
.L_x_0:
	//## File "/tmp/k.cu", line 7
        /*0030*/                   LDG.E R8, desc[UR4][R6.64] ;
        /*0040*/                   NOP ;
.L_x_1:
        /*0050*/                   EXIT ;
"""


def test_sass_walk_attributes_like_the_engine_and_splits_blocks():
    from cupy_localrel import _nvrtc_check as N
    # The chain's innermost line is a marked helper (10) and so is its caller (20): the
    # access belongs to the kernel line 5, as the CPU engine counts it.
    marked = frozenset({"common.cuh:10", "common.cuh:20"})
    lines = N.sass_line_mix(_GI_TEXT, marked)["_Z1kv"]
    assert lines["k.cu:5"]["shared_load"] == 1 and lines["k.cu:5"]["memory_words"] == 4
    assert lines["k.cu:6"]["ffma"] == 1 and lines["k.cu:7"]["global_load"] == 1
    assert N.sass_line_mix(_GI_TEXT)["_Z1kv"]["common.cuh:10"]["shared_load"] == 1   # unmarked: innermost
    blocks = N.sass_blocks(_GI_TEXT, marked)["_Z1kv"]
    assert [b["instructions"] for b in blocks] == [3, 1, 1]   # after the branch; at each label; no NOP
    assert [b["words"] for b in blocks] == [{"k.cu:5": 4}, {"k.cu:7": 1}, {}]


def test_block_instructions_do_not_weigh_a_loop_by_its_unrolling():
    from cupy_localrel._profile import block_instructions
    n = 1000.0   # dynamic word requests of the loop's load line, 1 word each
    prologue = {"instructions": 30, "words": {"k.cu:1": 1}}
    between = {"instructions": 4, "words": {}}   # no memory: the mean of its two neighbours
    tail = {"instructions": 2, "words": {}}      # no memory, one neighbour: that one's
    rolled = [prologue, between, {"instructions": 5, "words": {"k.cu:9": 1}}, tail]
    unrolled = [prologue, between, {"instructions": 17, "words": {"k.cu:9": 4}}, tail]   # 4 copies
    words = {"k.cu:1": 32.0, "k.cu:9": n}
    a, matched = block_instructions(rolled, words)
    b, _ = block_instructions(unrolled, words)
    assert matched == 1.0
    assert a == pytest.approx(32 * 30 + (32 + n) / 2 * 4 + n * 5 + n * 2)
    assert b == pytest.approx(32 * 30 + (32 + n / 4) / 2 * 4 + n / 4 * 17 + n / 4 * 2)
    assert b < a   # unrolling saves loop control: fewer instructions run
    # The static ratio (all instructions per static memory word, times the dynamic words)
    # would halve its estimate (41 / 2 -> 53 / 5 per word) where what runs falls by 37%.
    static = lambda bl: sum(x["instructions"] for x in bl) / sum(sum(x["words"].values()) for x in bl)  # noqa: E731
    assert static(unrolled) / static(rolled) < 0.55 and b / a > 0.6
    assert block_instructions(rolled, {"other.cu:1": 5.0}) == (pytest.approx(0.0), 0.0)
    assert block_instructions([], words) == (None, 0.0)


def test_instruction_mix_of_the_calibration_copy():
    from cupy_localrel import _nvrtc_check as N
    try:
        mix = N.instruction_mix(CALIBRATION, [], "90")
    except N.NvrtcUnavailable as e:
        pytest.skip(str(e))
    copy = mix["kernels"]["copy_coalesced"]
    assert copy["global_load"] == 1 and copy["global_store"] == 1 and copy["shared_load"] == 0
    shared = mix["kernels"]["shared_stride"]
    assert shared["shared_load"] == 1 and shared["shared_store"] == 1 and shared["barrier"] == 1


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------
def test_profile_source_command(tmp_path, capsys):
    from cupy_localrel.__main__ import main
    out = tmp_path / "p.json"
    rc = main(["profile", "--source", str(CALIBRATION), "--kernel", "load_stride2", "--grid", "4",
               "--block", "32", "--buffer-bytes", "4096", "--json", str(out)])
    assert rc == 0 and "modelled" in capsys.readouterr().out
    rec = json.loads(out.read_text())["launches"][0]
    assert rec["kernel"] == "load_stride2" and rec["grid"] == [4, 1, 1] and rec["block"] == [32, 1, 1]
    assert rec["global_load"] == {"requests": 4, "sectors": 32, "ideal_sectors": 16, "bytes": 512}
    assert rec["blocks_profiled"] == rec["blocks_total"] == 4
    rc = main(["profile", "--source", str(CALIBRATION), "--kernel", "shared_stride", "--grid", "1",
               "--block", "32", "--shared", "4224", "--int", "2", "--json", str(out)])
    rec = json.loads(out.read_text())["launches"][0]
    assert rc == 0 and rec["shared_load"] == {"requests": 1, "wavefronts": 2, "ideal_wavefronts": 1, "bytes": 128}
    assert rec["barriers"] == 1
    # The caller's mistakes are plain errors (exit 2), never a traceback or a crash.
    capsys.readouterr()
    base = ["profile", "--source", str(CALIBRATION), "--grid", "1", "--block", "32", "--json", str(out)]
    for extra, message in ((["--kernel", "shared_stride", "--shared", "4224"], "needs an --int"),
                           (["--kernel", "shared_stride", "--int", "2"], "give --shared BYTES"),
                           (["--kernel", "no_such_kernel", "--shared", "4224"], "no kernel 'no_such_kernel'")):
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert main(["profile", "--source", str(CALIBRATION), "--kernel", "x", "--grid", "1"]) == 2


def test_profile_ops_command_json_schema(tmp_path, monkeypatch):
    from cupy_localrel.__main__ import main
    monkeypatch.setattr(P, "nvrtc_report", lambda filename, arch: {})   # NVRTC is tested above
    out = tmp_path / "ops.json"
    assert main(["profile", "--op", "lrnet", "--op", "sasa", "--shape", "1,64,12,12", "--kernel-size", "3",
                 "--dtype", "float32", "--device", "h100", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert [o["name"] for o in rep["ops"]] == ["lrnet_forward", "lrnet_backward", "sasa_forward", "sasa_backward"]
    for o in rep["ops"]:
        assert o["device"] == "h100" and o["label"] == "modelled"
        assert o["predicted_us"] > o["floor_us"] > 0 and o["bound"] in R.UNITS
    case = P.op_case("sasa", "forward", (1, 64, 12, 12), 3)
    assert rep["ops"][2]["floor_us"] == pytest.approx(case.compulsory_bytes() / 3.35e12 * 1e6)
    for rec in rep["launches"]:
        for key in ("kernel", "grid", "block", "shared_bytes", "blocks_profiled", "blocks_total", "barriers",
                    "unique_global_bytes"):
            assert key in rec
        for part in ("global_load", "global_store"):
            assert set(rec[part]) == {"requests", "sectors", "ideal_sectors", "bytes"}
        for part in ("shared_load", "shared_store"):
            assert set(rec[part]) == {"requests", "wavefronts", "ideal_wavefronts", "bytes"}
        assert rec["word_requests"] >= sum(rec[p]["requests"] for p in ("global_load", "global_store", "shared_load",
                                                                        "shared_store"))
    # the papers' head layouts: LR-Net 8 heads of Dqk 1 (C/8), SASA 8 heads of 8 channels
    lr = P.op_case("lrnet", "forward", (1, 64, 12, 12), 3).geo
    assert (lr.heads, lr.dqk, lr.dv) == (8, 1, 8)
    sasa = case.geo
    assert (sasa.heads, sasa.dqk, sasa.dv) == (8, 8, 8)


# ---------------------------------------------------------------------------------------
# GPU calibration script (benchmarks/gpu_check.sh step 6): what runs without a GPU
# ---------------------------------------------------------------------------------------
def test_gpu_check_script_parses():
    import shutil
    import subprocess
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
    assert subprocess.run([bash, "-n", str(script)]).returncode == 0
    assert "benchmarks.gpu_profile time" in script.read_text()


def test_gpu_profile_takes_the_model_whose_folder_sorts_last(tmp_path):
    from benchmarks import gpu_profile as GP
    for name in ("profile-2026-12-01", "profile-2026-12-01-later", "profile-2026-11-30-z"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "profile-h200.json").write_text("{}")
    assert Path(GP.latest_model(str(tmp_path / "profile-*" / "profile-h200.json"))).parent.name == \
        "profile-2026-12-01-later"


def test_gpu_profile_merges_times_and_ncu_with_the_model(tmp_path):
    from benchmarks import gpu_profile as GP
    model = GP.latest_model()
    assert model is not None, "the committed profile JSON (benchmarks/results/profile-*) is missing"
    rep = GP.load_model(model)
    sasa = [r for r in rep["launches"] if r["op"] == "sasa_forward"]
    times = {"ops": [{"name": "sasa_forward", "measured_us": 2000.0,
                      "launches": [{"kernel": r["kernel"], "measured_us": 2000.0} for r in sasa]}]}
    header = '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\n'
    rows = []
    for i, r in enumerate(rep["launches"]):
        base = P.kernel_base(r["kernel"])
        rows.append(f'"{i}","void {base}<float>(int*)","{GP.NCU_METRICS["global_load_sectors"]}","sector","1,000"')
        rows.append(f'"{i}","void {base}<float>(int*)","{GP.NCU_METRICS["global_load_requests"]}","","250"')
    ncu = GP.parse_ncu_csv("==PROF== Disconnected\n" + header + "\n".join(rows) + "\n")
    assert len(ncu) == len(rep["launches"]) and ncu[0]["global_load_sectors"] == 1000.0
    merged = GP.merge(rep, times, ncu)
    row = next(r for r in merged["launches"] if r["op"] == "sasa_forward")
    assert row["measured_us"] == 2000.0
    assert row["measured_over_modelled"] == pytest.approx(2000.0 / row["modelled_us"])
    assert row["ncu_global_load_sectors_per_request"] == 4.0
    op = next(o for o in merged["ops"] if o["name"] == "sasa_forward")
    assert op["measured_share"] == pytest.approx(op["floor_us"] / 2000.0)
    assert "measured/modelled" in GP.to_markdown(merged)
    bad = [dict(n, kernel="void other_kernel()") for n in ncu]
    with pytest.raises(ValueError, match="does not match"):
        GP.merge(rep, None, bad)
    assert GP.main(["dry-run", "--model", model, "--out", str(tmp_path)]) == 0
    assert "DRY RUN" in (tmp_path / "gpu-profile.md").read_text()


# ---------------------------------------------------------------------------------------
# Kernel variants on a GPU (benchmarks/gpu_variants.py): patching and comparing, no GPU
# ---------------------------------------------------------------------------------------
def _one_line_patch(path: str, old: str, new: str) -> str:
    """A git-style patch replacing the line ``old`` of ``path`` (repository-relative) by ``new``."""
    import difflib
    root = Path(__file__).resolve().parent.parent
    lines = (root / path).read_text().splitlines(keepends=True)
    changed = [new + "\n" if line.rstrip("\n") == old else line for line in lines]
    assert changed != lines, f"{old!r} not in {path}"
    return "".join(difflib.unified_diff(lines, changed, f"a/{path}", f"b/{path}"))


def test_gpu_variants_applies_a_patch_to_a_copy_and_reports_a_stale_one(tmp_path):
    import shutil
    from benchmarks import gpu_variants as GV
    if not (shutil.which("git") or shutil.which("patch")):
        pytest.skip("neither git nor patch is installed")
    path, old = "cupy_localrel/_roofline.py", 'MODELLED = "modelled"'
    good = tmp_path / "good.patch"
    good.write_text(_one_line_patch(path, old, 'MODELLED = "modelled (variant)"'))
    stale = tmp_path / "stale.patch"
    stale.write_text(_one_line_patch(path, old, 'MODELLED = "x"').replace(old, 'MODELLED = "gone"'))
    tree = GV.copy_tree(tmp_path / "copy")
    assert GV.apply_patch(str(good), tree)[0]
    assert 'MODELLED = "modelled (variant)"' in (tree / path).read_text()
    root = Path(__file__).resolve().parent.parent
    assert 'MODELLED = "modelled"' in (root / path).read_text(), "the tree itself was modified"
    ok, message = GV.apply_patch(str(stale), GV.copy_tree(tmp_path / "copy2"))
    assert not ok and message.startswith("stale")


def _drifted(patch: str, old: str, drifted: str) -> str:
    """``patch`` with one context line changed: it no longer applies exactly."""
    assert f" {old}\n" in patch
    return patch.replace(f" {old}\n", f" {drifted}\n", 1)


def test_gpu_variants_rejects_a_drifted_patch_without_git_too(tmp_path, monkeypatch):
    import shutil
    from benchmarks import gpu_variants as GV
    path = "cupy_localrel/_roofline.py"
    patch = _one_line_patch(path, 'MODELLED = "modelled"', 'MODELLED = "modelled (variant)"')
    context = next(line[1:] for line in patch.splitlines() if line.startswith(" ") and line.strip())
    drifted = tmp_path / "drifted.patch"
    drifted.write_text(_drifted(patch, context, context + "  # drifted"))
    tools = [t for t in ("git", "patch") if shutil.which(t)]
    if not tools:
        pytest.skip("neither git nor patch is installed")
    for tool in tools:   # git, and patch alone (as where git is missing): no fuzz
        which = shutil.which
        monkeypatch.setattr(GV.shutil, "which", lambda name, tool=tool: which(name) if name == tool else None)
        ok, message = GV.apply_patch(str(drifted), GV.copy_tree(tmp_path / f"copy-{tool}"))
        assert not ok and message.startswith("stale"), (tool, message)
        monkeypatch.undo()


def test_gpu_variants_dry_run_fails_on_a_stale_patch(tmp_path):
    import shutil
    from benchmarks import gpu_variants as GV
    if not (shutil.which("git") or shutil.which("patch")):
        pytest.skip("neither git nor patch is installed")
    path, old = "cupy_localrel/_roofline.py", 'MODELLED = "modelled"'
    good, stale = tmp_path / "good.patch", tmp_path / "stale.patch"
    good.write_text(_one_line_patch(path, old, 'MODELLED = "modelled (variant)"'))
    stale.write_text(_one_line_patch(path, old, 'MODELLED = "x"').replace(old, 'MODELLED = "gone"'))
    out = tmp_path / "out"
    assert GV.main(["--dry-run", "--out", str(out), str(good)]) == 0
    assert GV.main(["--dry-run", "--out", str(out), str(good), str(stale)]) == 1
    report = json.loads((out / "variants.json").read_text())
    assert [v["ok"] for v in report["variants"]] == [True, False]
    assert report["runs_done"] == 4 and all(r["rc"] == 0 for r in report["base_runs"])
    assert "stale" in (out / "variants.md").read_text()


def test_gpu_variants_compares_the_fastest_rounds():
    from benchmarks import gpu_variants as GV
    def run(us):
        return {"rc": 0, "times": {"ops": [{"name": "lrnet_forward", "measured_us": us,
                                            "launches": [{"kernel": "attention_forward_tiled<float, 1, 8>",
                                                          "measured_us": us}]}]}}
    rows = GV.compare([run(100.0), run(90.0)], [run(80.0), run(85.0)])
    assert len(rows) == 1 and rows[0]["base_us"] == 90.0 and rows[0]["variant_us"] == 80.0
    assert rows[0]["variant_over_base"] == pytest.approx(80.0 / 90.0) and "problem" not in rows[0]
    report = {"model": "m.json", "runs_done": 4, "dry_run": False,
              "variants": [{"name": "v", "applied": "git apply", "ok": True, "rows": rows}]}
    assert "| v | git apply | lrnet_forward |" in GV.to_markdown(report)
    other = run(70.0)
    other["times"]["ops"][0]["launches"][0]["kernel"] = "attention_forward<float, 8>"
    assert GV.compare([run(90.0)], [other])[0]["problem"].startswith("kernels differ")
    assert GV.compare([run(90.0)], [])[0]["problem"] == "timed on one side only"
