"""Tests of the CPU execution engine (cupy_localrel._sim) through the one loader.

The kernels are purpose-written in tests/kernels/; each is also compiled with NVRTC for
sm_80/sm_90 at the end, so the engine is only ever tested on valid CUDA.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cupy_localrel import _loader
from cupy_localrel._sim import engine

HERE = Path(__file__).resolve().parent
KDIR = HERE / "kernels"

pytestmark = pytest.mark.skipif(not _loader.sim_available()[0], reason=_loader.sim_available()[1])

# every test kernel file, with its template instantiations (tests/kernels/instantiations.json,
# which `python -m cupy_localrel._nvrtc_check --registry` also reads)
NAMES = {f.name: [] for f in sorted(KDIR.glob("*.cu"))}
NAMES.update(json.loads((KDIR / "instantiations.json").read_text()))
ORDERS = [0, 1, 12345]  # forward, reversed, shuffled


def load(name: str, **kw):
    return _loader.load_module(str(KDIR / name), NAMES[name], target="sim", **kw)


@pytest.fixture(scope="module")
def barrier_mod():
    return load("sim_barrier.cu")


@pytest.fixture(scope="module")
def warp_mod():
    return load("sim_warp.cu")


@pytest.fixture(scope="module")
def atomics_mod():
    return load("sim_atomics.cu")


@pytest.fixture(scope="module")
def types_mod():
    return load("sim_types.cu")


def kernel(mod, name, seed=0, workers=None):
    k = mod.get_function(name)
    k.seed = seed
    k.workers = workers
    return k


# ---------------------------------------------------------------------------------------
# Barriers and shared memory
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", ORDERS)
@pytest.mark.parametrize("block", [64, 128])
def test_block_sum_static_shared(barrier_mod, seed, block):
    rng = np.random.default_rng(block + seed)
    n = 37 * block - 11
    x = rng.standard_normal(n).astype(np.float32)
    out = np.zeros(37, np.float32)
    kernel(barrier_mod, f"block_sum<{block}>", seed)((37,), (block,), (x, out, np.int32(n)))
    ref = np.pad(x.astype(np.float64), (0, 11)).reshape(37, block).sum(1)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", ORDERS)
def test_block_sum_dynamic_shared_and_include(barrier_mod, seed):
    rng = np.random.default_rng(seed)
    n = 20 * 256 - 3
    x = rng.standard_normal(n)
    out = np.zeros(20)
    kernel(barrier_mod, "block_sum_dyn", seed)((20,), (256,), (x, out, n), shared_mem=256 * 8)
    np.testing.assert_allclose(out, np.pad(x, (0, 3)).reshape(20, 256).sum(1), rtol=1e-12)


def test_syncthreads_count_and_or(barrier_mod):
    pred = np.zeros((4, 96), np.int32)
    pred[0, :] = 1              # all
    pred[1, 5] = 7              # one (non-zero counts as true)
    pred[3, ::3] = 1            # a third
    out = np.zeros(12, np.int32)
    kernel(barrier_mod, "sync_votes", 3)((4,), (96,), (pred, out))
    assert out.reshape(4, 3).tolist() == [[96, 1, 1], [1, 0, 1], [0, 0, 0], [32, 0, 1]]


def test_missing_barrier_detected_by_order(barrier_mod):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(4 * 256).astype(np.float32)
    ref = np.concatenate([np.zeros((4, 1), np.float32), x.reshape(4, 256)[:, :-1]], axis=1).ravel()
    results = {}
    for seed in ORDERS:
        y = np.zeros_like(x)
        kernel(barrier_mod, "shift_no_barrier", seed)((4,), (256,), (x, y))
        results[seed] = np.array_equal(y, ref)
        y2 = np.zeros_like(x)
        kernel(barrier_mod, "shift_barrier", seed)((4,), (256,), (x, y2))
        assert np.array_equal(y2, ref), f"correct kernel wrong under seed {seed}"
    # forward order hides the missing barrier; reversed and shuffled orders expose it
    assert results == {0: True, 1: False, 12345: False}


@pytest.mark.parametrize("workers", [1, 2])
def test_shared_memory_poisoned_at_each_block(barrier_mod, workers):
    static_seen = np.zeros(8 * 64, np.float32)
    dyn_seen = np.zeros(8 * 64, np.float32)
    kernel(barrier_mod, "read_stale", 0, workers)((8,), (64,), (static_seen, dyn_seen), shared_mem=64 * 4)
    assert np.isnan(static_seen).all(), "static __shared__ kept a previous block's values"
    assert np.isnan(dyn_seen).all(), "dynamic shared memory kept a previous block's values"


def test_divergent_barrier_raises(barrier_mod):
    with pytest.raises(RuntimeError, match="divergent __syncthreads"):
        kernel(barrier_mod, "divergent_barrier")((1,), (128,), (np.zeros(128, np.float32),))
    # reversed order: the exiting threads run first; still reported
    with pytest.raises(RuntimeError, match="divergent __syncthreads"):
        kernel(barrier_mod, "divergent_barrier", 1)((1,), (128,), (np.zeros(128, np.float32),))


def test_barriers_at_different_call_sites_raise(barrier_mod):
    src = (KDIR / "sim_barrier.cu").read_text().splitlines()
    start = next(i for i, t in enumerate(src, 1) if "void split_barrier" in t)
    with pytest.raises(RuntimeError, match=rf"divergent __syncthreads.*sim_barrier.cu:{start + 5}.*"
                                           rf"wait at .*sim_barrier.cu:{start + 3}"):
        kernel(barrier_mod, "split_barrier")((1,), (64,), (np.zeros(64, np.float32),))


def test_deadlock_raises(barrier_mod):
    with pytest.raises(RuntimeError, match="deadlock"):
        kernel(barrier_mod, "deadlock")((2,), (32,), (np.zeros(32, np.int32),))


def test_portable_context_switch():
    """The ucontext/_setjmp path used off x86-64 gives the same results."""
    mod = _loader.load_module(str(KDIR / "sim_warp.cu"), ["shuffle<1,16>"], target="sim",
                              options=("-DCUDASIM_PORTABLE_SWITCH",))
    x = np.arange(3 * 128, dtype=np.int32)
    out = np.zeros_like(x)
    kernel(mod, "syncwarp_rotate", 12345)((3,), (128,), (x, out))
    t = np.arange(3 * 128)
    assert np.array_equal(out, t - t % 32 + (t % 32 + 1) % 32)
    a = np.full(x.size, 5, np.int32)
    kernel(mod, "shuffle<1,16>", 1)((3,), (128,), (x, a, out))
    assert np.array_equal(out, shuffle_reference(1, 16, x, a))
    barrier = _loader.load_module(str(KDIR / "sim_barrier.cu"), target="sim", options=("-DCUDASIM_PORTABLE_SWITCH",))
    with pytest.raises(RuntimeError, match="deadlock"):
        barrier.get_function("deadlock")((1,), (32,), (np.zeros(32, np.int32),))
    y = np.zeros(2 * 128, np.float32)
    kernel(barrier, "big_locals", 1)((2,), (128,), (np.ones(64, np.float32), y))
    np.testing.assert_allclose(y, 3 * 64 * np.tile(np.arange(1, 129), 2))


def test_error_does_not_poison_later_launches(barrier_mod):
    with pytest.raises(RuntimeError):
        kernel(barrier_mod, "deadlock")((3,), (32,), (np.zeros(32, np.int32),))
    out = np.zeros(3, np.float32)
    x = np.ones(3 * 64, np.float32)
    kernel(barrier_mod, "block_sum<64>")((3,), (64,), (x, out, np.int32(x.size)))
    assert out.tolist() == [64.0] * 3


def test_indices_3d(barrier_mod):
    grid, block = (2, 3, 4), (4, 2, 2)
    out = np.full(24 * 16, -1, np.int32)
    kernel(barrier_mod, "index3d", 7)(grid, block, (out,))
    assert np.array_equal(out.reshape(24, 16), np.arange(24)[:, None] * 1000 + np.arange(16)[None, :])


def test_big_local_arrays_on_fiber_stacks(barrier_mod):
    x = np.arange(64, dtype=np.float32)
    y = np.zeros(4 * 256, np.float32)
    kernel(barrier_mod, "big_locals", 12345)((4,), (256,), (x, y))
    t = np.tile(np.arange(1, 257, dtype=np.float64), 4)
    np.testing.assert_allclose(y, 3 * x.sum() * t, rtol=1e-6)


@pytest.mark.parametrize("stack_kb", [32, 1024])
def test_stack_size_setting(barrier_mod, monkeypatch, stack_kb):
    monkeypatch.setenv(engine.ENV_STACK_KB, str(stack_kb))
    x = np.ones(64, dtype=np.float32)
    y = np.zeros(2 * 128, np.float32)
    kernel(barrier_mod, "big_locals")((2,), (128,), (x, y))
    np.testing.assert_allclose(y, 3 * 64 * np.tile(np.arange(1, 129), 2))


def test_launch_config_errors(barrier_mod):
    k = kernel(barrier_mod, "index3d")
    out = np.zeros(4096, np.int32)
    with pytest.raises(RuntimeError, match="invalid block"):
        k((1,), (2048,), (out,))
    with pytest.raises(RuntimeError, match="invalid grid"):
        k((0,), (32,), (out,))
    with pytest.raises(TypeError, match="grid must be a tuple"):
        k(1, (32,), (out,))                       # CuPy takes tuples only
    with pytest.raises(TypeError, match="block must be a tuple"):
        k((1,), [32], (out,))
    with pytest.raises(RuntimeError, match="shared_mem"):
        k((1,), (32,), (out,), shared_mem=64 * 1024)
    k.max_dynamic_shared_size_bytes = 64 * 1024
    k((1,), (32,), (out,), shared_mem=64 * 1024)   # allowed once raised, as on the GPU


def test_launch_bounds_enforced(barrier_mod):
    k = kernel(barrier_mod, "bounded")
    assert k.max_threads_per_block == 64
    y = np.zeros(128, np.float32)
    k((1,), (64,), (y,))
    with pytest.raises(RuntimeError, match="__launch_bounds__ allow \\(64\\)"):
        k((1,), (128,), (y,))
    # bounds that depend on template parameters are not evaluated: the hardware limit applies
    assert kernel(barrier_mod, "block_sum<64>").max_threads_per_block == 1024


def test_env_seed_sets_order(barrier_mod, monkeypatch):
    x = np.arange(256, dtype=np.float32)
    ref = np.concatenate([[0.0], x[:-1]]).astype(np.float32)
    k = barrier_mod.get_function("shift_no_barrier")
    k.seed = None
    y = np.zeros_like(x)
    monkeypatch.setenv(engine.ENV_SEED, "1")
    k((1,), (256,), (x, y))
    assert not np.array_equal(y, ref)
    monkeypatch.setenv(engine.ENV_SEED, "0")
    k((1,), (256,), (x, y))
    assert np.array_equal(y, ref)


def test_file_scope_shared_declarations():
    mod = load("sim_filescope.cu")
    x = np.arange(3 * 64, dtype=np.float32)
    y = np.zeros_like(x)
    kernel(mod, "file_scope_shared", 12345)((3,), (64,), (x, y), shared_mem=64 * 4)
    assert np.array_equal(y, x.reshape(3, 64)[:, ::-1].ravel() + 64)


def test_rewrite_shared_declarations():
    src = textwrap.dedent('''\
        extern __shared__ float top[];
        __shared__ int top_static;
        template <class T, int N> __device__ void f() {
          __shared__ __align__(16) T a[N][N + 1], b;   // two declarators
          extern __shared__ __align__(16) unsigned char raw[];
          /* __shared__ float in_comment[3]; */
        }''')
    out = engine.rewrite_shared(src)
    assert "#define top ((float*)::cudasim::dyn_smem())\n#line 1\n" in out
    assert "__shared__ int top_static;" in out                      # file scope: thread_local fallback
    assert "auto& a = ::cudasim::shared_var<T[N][N+1], 0>();" in out
    assert "auto& b = ::cudasim::shared_var<T, 1>();" in out
    assert "unsigned char* raw = (unsigned char*)::cudasim::dyn_smem();" in out
    assert "/* __shared__ float in_comment[3]; */" in out
    assert out.count("\n") == src.count("\n") + 3   # line break, #define, #line 1 (rest of line 1)


def test_kernel_discovery():
    src = textwrap.dedent('''\
        #define BOUNDS __launch_bounds__(256)
        extern "C" __global__ void BOUNDS a(float* x) {}
        extern "C" {
        __global__ void __launch_bounds__(128, 2) b(float* x) {}
        }
        template <int N> __global__ void __launch_bounds__(N) c(float* x) {}
        // extern "C" __global__ void commented_out(float* x) {}
        __global__ void not_extern_c(float* x) {}''')
    assert engine.find_extern_c_kernels(src) == ["a", "b"]
    q = engine.kernel_qualifiers(src)
    assert q["a"] == "BOUNDS" and q["b"].startswith("__launch_bounds__") and q["c"] is None


# ---------------------------------------------------------------------------------------
# Warp collectives
# ---------------------------------------------------------------------------------------
def shuffle_reference(kind: int, width: int, x: np.ndarray, arg: np.ndarray) -> np.ndarray:
    """CUDA's documented semantics, written independently of the engine."""
    out = np.empty_like(x)
    for t in range(x.size):
        warp_base, lane = t - t % 32, t % 32
        seg, lane_in = lane // width, lane % width
        if kind == 0:
            src = seg * width + int(arg[t]) % width
        elif kind == 1:
            src = lane ^ int(arg[0])
            src = lane if src // width > seg else src       # later segments: own value
        elif kind == 2:
            d = int(arg[0])
            src = lane + d if lane_in + d < width else lane
        else:
            d = int(arg[0])
            src = lane - d if lane_in - d >= 0 else lane
        out[t] = x[warp_base + src]
    return out


@pytest.mark.parametrize("width", [32, 16, 8])
@pytest.mark.parametrize("kind", [0, 1, 2, 3], ids=["shfl", "xor", "down", "up"])
def test_shuffles_value_by_value(warp_mod, kind, width):
    rng = np.random.default_rng(kind * 100 + width)
    n = 2 * 96
    x = rng.integers(-10**6, 10**6, n).astype(np.int32)
    args = {0: [rng.integers(-40, 40, n)], 1: [[1], [2], [5], [16], [31]],
            2: [[1], [3], [8], [17]], 3: [[1], [3], [8], [17]]}[kind]
    for seed in (0, 99):
        for a in args:
            a = np.resize(np.asarray(a, np.int32), n)
            out = np.zeros_like(x)
            kernel(warp_mod, f"shuffle<{kind},{width}>", seed)((2,), (96,), (x, a, out))
            np.testing.assert_array_equal(out, shuffle_reference(kind, width, x, a), err_msg=f"arg {a[:2]}")


def test_shuffle_moves_doubles(warp_mod):
    x = np.random.default_rng(0).standard_normal(32)
    out = np.zeros(32)
    kernel(warp_mod, "shuffle_double")((1,), (32,), (x, out))
    lane = np.arange(32)
    down = np.where(lane + 2 < 32, x[np.minimum(lane + 2, 31)], x)
    np.testing.assert_array_equal(out, x[lane ^ 1] + down)


@pytest.mark.parametrize("seed", ORDERS)
def test_ballot_any_all(warp_mod, seed):
    pred = np.zeros((4, 32), np.int32)
    pred[0] = 1
    pred[1, [0, 7, 31]] = [3, 1, -1]
    pred[3, ::2] = 1
    ballot, anyv, allv = np.zeros(4, np.uint32), np.zeros(4, np.int32), np.zeros(4, np.int32)
    kernel(warp_mod, "votes", seed)((2,), (64,), (pred.ravel(), ballot, anyv, allv))
    assert ballot.tolist() == [0xFFFFFFFF, (1 << 0) | (1 << 7) | (1 << 31), 0, 0x55555555]
    assert anyv.tolist() == [1, 1, 0, 1]
    assert allv.tolist() == [1, 0, 0, 0]


@pytest.mark.parametrize("seed", ORDERS)
def test_half_warp_groups_with_own_masks(warp_mod, seed):
    x = np.arange(64, dtype=np.int32) * 3
    out = np.zeros(64, np.int32)
    kernel(warp_mod, "half_warps", seed)((1,), (64,), (x, out))
    ref = np.empty(64, np.int64)
    for t in range(64):
        lane, base = t % 32, t - t % 16
        group = x[base:base + 16].sum()
        odd = sum(1 << l for l in range(32) if l & 1 and (l < 16) == (lane < 16))
        ref[t] = group + odd
    assert out.astype(np.int64).tolist() == ref.astype(np.int32).astype(np.int64).tolist()


@pytest.mark.parametrize("seed", ORDERS)
def test_syncwarp_orders_shared_memory(warp_mod, seed):
    x = np.arange(3 * 128, dtype=np.int32)
    out = np.zeros_like(x)
    kernel(warp_mod, "syncwarp_rotate", seed)((3,), (128,), (x, out))
    t = np.arange(3 * 128)
    assert np.array_equal(out, t - t % 32 + (t % 32 + 1) % 32)


def test_device_function_shared_and_shuffle(warp_mod):
    x = np.random.default_rng(3).standard_normal(5 * 96).astype(np.float32)
    out = np.zeros(5, np.float32)
    kernel(warp_mod, "block_max_kernel", 12345)((5,), (96,), (x, out))
    np.testing.assert_array_equal(out, x.reshape(5, 96).max(1))


def test_lane_outside_mask_raises(warp_mod):
    with pytest.raises(RuntimeError, match="not in mask"):
        kernel(warp_mod, "bad_mask")((1,), (32,), (np.zeros(32, np.int32),))


# ---------------------------------------------------------------------------------------
# Atomics
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 12345])
def test_atomics_under_contention(atomics_mod, seed):
    nb, nt = 64, 128
    vals = np.random.default_rng(seed).integers(-1000, 1000, nb * nt).astype(np.int32)
    i_sum, f_sum, d_sum = np.zeros(1, np.int32), np.zeros(1, np.float32), np.zeros(1, np.float64)
    u_sum = np.zeros(1, np.uint64)
    i_max, i_min = np.full(1, -(2**31), np.int32), np.full(1, 2**31 - 1, np.int32)
    u_sub = np.full(1, nb * nt + 5, np.uint32)
    kernel(atomics_mod, "atomics_contention", seed, workers=4)(
        (nb,), (nt,), (i_sum, f_sum, d_sum, u_sum, i_max, i_min, u_sub, vals))
    assert i_sum[0] == vals.sum()
    assert f_sum[0] == nb * nt                     # exact: integers below 2**24
    assert d_sum[0] == 0.5 * vals.astype(np.float64).sum()
    assert u_sum[0] == (vals.astype(np.int64) + 1000).sum()
    assert (i_max[0], i_min[0]) == (vals.max(), vals.min())
    assert u_sub[0] == 5


def test_atomic_cas_counter(atomics_mod):
    counter, ticket = np.zeros(1, np.int32), np.full(32 * 64, -1, np.int32)
    kernel(atomics_mod, "cas_counter", 12345, workers=4)((32,), (64,), (counter, ticket))
    assert counter[0] == ticket.size
    assert np.array_equal(np.sort(ticket), np.arange(ticket.size))


def test_atomic_exch_chain(atomics_mod):
    n = 16 * 64
    slot, olds = np.full(1, -7, np.int32), np.zeros(n, np.int32)
    fslot, folds = np.full(1, -7.0, np.float32), np.zeros(n, np.float32)
    kernel(atomics_mod, "exch_chain", 1, workers=3)((16,), (64,), (slot, olds, fslot, folds))
    assert sorted(olds.tolist() + [int(slot[0])]) == [-7] + list(range(n))
    assert sorted(folds.tolist() + [float(fslot[0])]) == [-7.0] + [float(i) for i in range(n)]


def test_shared_atomics_histogram(atomics_mod):
    x = np.random.default_rng(5).integers(0, 1000, 10007).astype(np.int32)
    hist = np.zeros(16, np.uint32)
    kernel(atomics_mod, "histogram", 12345)((7,), (128,), (x, np.int32(x.size), hist))
    assert np.array_equal(hist, np.bincount(x & 15, minlength=16))


# ---------------------------------------------------------------------------------------
# 16-bit floats, math, vector types, templates
# ---------------------------------------------------------------------------------------
def conversion_inputs() -> np.ndarray:
    rng = np.random.default_rng(0)
    one = np.float32(1.0)
    ties16 = [one + np.float32(2**-11), one + np.float32(3 * 2**-11), np.float32(2049.0), np.float32(2051.0)]
    ties_bf = [np.float32(1 + 2**-8), np.float32(1 + 3 * 2**-8), np.float32(257.0), np.float32(259.0)]
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.0, 65520.0, 1e-8, 6e-8, -3e-5, 3.4e38]
    vals = np.concatenate([rng.standard_normal(500) * 10.0 ** rng.integers(-6, 6, 500), ties16, ties_bf, special])
    return vals.astype(np.float32)


def assert_same_bits(a: np.ndarray, b: np.ndarray):
    nan = np.isnan(a.astype(np.float32))
    assert np.array_equal(nan, np.isnan(b.astype(np.float32)))
    assert np.array_equal(a.view(np.uint16)[~nan], b.view(np.uint16)[~nan])


def test_half_round_to_nearest_even(types_mod):
    x = conversion_inputs()
    h, back = np.zeros(x.size, np.float16), np.zeros(x.size, np.float32)
    kernel(types_mod, "half_convert")((4,), (256,), (x, h, back, np.int32(x.size)))
    with np.errstate(over="ignore"):   # 65520 and 3.4e38 overflow to inf, as intended
        ref = x.astype(np.float16)
    assert_same_bits(h, ref)
    np.testing.assert_array_equal(back, ref.astype(np.float32))


def test_bfloat16_round_to_nearest_even(types_mod):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = conversion_inputs()
    b, back = np.zeros(x.size, ml_dtypes.bfloat16), np.zeros(x.size, np.float32)
    kernel(types_mod, "bf16_convert")((4,), (256,), (x, b, back, np.int32(x.size)))
    assert_same_bits(b, x.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(back, x.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_double_to_16_bit_single_rounding(types_mod):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    # just above a float32-rounding tie: rounding via float32 first would go the wrong way
    one = 1.0
    x = np.array([one + 2**-8 + 2**-40, one + 2**-8 - 2**-40, one + 2**-11 + 2**-40, -(one + 3 * 2**-8),
                  1e300, -1e-300, np.nan, 3.0], np.float64)
    h, b = np.zeros(x.size, np.float16), np.zeros(x.size, ml_dtypes.bfloat16)
    kernel(types_mod, "from_double")((1,), (32,), (x, h, b, np.int32(x.size)))
    with np.errstate(over="ignore"):
        assert_same_bits(h, x.astype(np.float16))          # NumPy rounds float64 -> float16 once
    exact = [1 + 2**-7, 1.0, 1.0, -(1 + 4 * 2**-8), np.inf, -0.0, np.nan, 3.0]
    assert_same_bits(b, np.array(exact).astype(np.float32).astype(ml_dtypes.bfloat16))


def test_half_and_bfloat16_arithmetic(types_mod):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(2)
    a = rng.standard_normal(300).astype(np.float16)
    b = rng.standard_normal(300).astype(ml_dtypes.bfloat16)
    hs, bs, fs = np.zeros(300, np.float16), np.zeros(300, ml_dtypes.bfloat16), np.zeros(300, np.float32)
    kernel(types_mod, "half_math")((2,), (256,), (a, b, hs, bs, fs, np.int32(300)))
    assert_same_bits(hs, (a.astype(np.float32) * 2).astype(np.float16))
    assert_same_bits(bs, (b.astype(np.float32) ** 2).astype(ml_dtypes.bfloat16))
    np.testing.assert_allclose(fs, a.astype(np.float32) + b.astype(np.float32) + 0.5, rtol=1e-6)


@pytest.mark.parametrize("ctype,dtype", [("float", "float32"), ("double", "float64"), ("__half", "float16"),
                                         ("__nv_bfloat16", "bfloat16")])
def test_templates_via_name_expressions(types_mod, ctype, dtype):
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    x = np.linspace(-3, 3, 1000).astype(dtype)
    y = np.zeros_like(x)
    kernel(types_mod, f"scale_t<{ctype}>")((4,), (256,), (x, y, np.float32(1.5), np.int32(1000)))
    ref = (np.float32(1.5) * x.astype(np.float32)).astype(dtype)
    np.testing.assert_array_equal(y.astype(np.float64), ref.astype(np.float64))


def test_math_intrinsics(types_mod):
    x = np.linspace(-4, 4, 50).astype(np.float32)
    xd = np.linspace(-4, 4, 50)
    out, outd = np.zeros(50 * 16, np.float32), np.zeros(50 * 3)
    kernel(types_mod, "math_funcs")((1,), (64,), (x, xd, out, outd, np.int32(50)))
    o = out.reshape(50, 16).astype(np.float64)
    v = x.astype(np.float64)
    i = np.arange(50)
    ref = [np.exp(v), np.exp(v), np.log(abs(v) + 1), np.log(abs(v) + 1), np.maximum(v, .25), np.minimum(v, .25),
           np.sqrt(abs(v)), 1 / np.sqrt(abs(v) + 1), v / 3, v * 2 + 1, v * v - 1,
           np.maximum(v, 0) + np.minimum(i, 3) + np.maximum(7, i), np.ones(50), np.zeros(50), v,
           np.exp(v) + np.log(abs(v) + 2)]
    ref[12][x == 0] = 0.0   # 0/0 is nan, not inf
    ref[13][:] = 0.0
    np.testing.assert_allclose(o, np.stack(ref, 1), rtol=2e-6, atol=1e-6)
    d = outd.reshape(50, 3)
    np.testing.assert_allclose(d, np.stack([np.exp(xd), np.log(abs(xd) + 1), xd], 1), rtol=1e-15)


def test_vector_types(types_mod):
    rng = np.random.default_rng(4)
    a = rng.standard_normal((32, 4)).astype(np.float32)
    b = rng.standard_normal((32, 2)).astype(np.float32)
    c = rng.integers(0, 100, (32, 4)).astype(np.int32)
    d = rng.integers(0, 100, (32, 2)).astype(np.int32)
    out = np.zeros(32, np.float32)
    c0, d0 = c.copy(), d.copy()
    # float4*/int4* parameters take arrays of their 4-byte components
    kernel(types_mod, "vec_types")((1,), (32,), (a, b, c, d, out))
    assert np.array_equal(c, c0[:, ::-1]) and np.array_equal(d, d0[:, ::-1])
    np.testing.assert_allclose(out, a.sum(1) + b.sum(1) + 16 + 8, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------
def test_scalar_arguments_marshalled(types_mod):
    out = np.zeros(6)
    k = kernel(types_mod, "scalars")
    k((1,), (1,), (np.int32(-3), 2**40, np.float32(0.5), 2.25, np.uint32(7), np.uint64(9), out))
    assert out.tolist() == [-3, 2**40, 0.5, 2.25, 7, 9]


def test_python_int_for_int_parameter_raises(types_mod):
    out = np.zeros(6)
    k = kernel(types_mod, "scalars")
    with pytest.raises(TypeError, match=r"argument 0 .*`int`.*Python int.*8 bytes.*4 bytes"):
        k((1,), (1,), (-3, 2**40, np.float32(0.5), 2.25, np.uint32(7), np.uint64(9), out))
    with pytest.raises(TypeError, match=r"argument 2 .*float"):
        k((1,), (1,), (np.int32(1), 1, 0.5, 2.25, np.uint32(7), np.uint64(9), out))   # float64 for float
    with pytest.raises(TypeError, match=r"argument 3 .*Python int.*floating"):
        k((1,), (1,), (np.int32(1), 1, np.float32(0.5), 2, np.uint32(7), np.uint64(9), out))
    with pytest.raises(TypeError, match=r"argument 6 .*pointer"):
        k((1,), (1,), (np.int32(1), 1, np.float32(0.5), 2.0, np.uint32(7), np.uint64(9), 5))
    with pytest.raises(TypeError, match="takes 7 arguments"):
        k((1,), (1,), (np.int32(1),))


def test_array_dtype_checked_against_pointer(types_mod):
    x = np.zeros(8)   # float64 for a float*
    with pytest.raises(TypeError, match=r"argument 0 .*float64"):
        kernel(types_mod, "half_convert")((1,), (8,), (x, np.zeros(8, np.float16), np.zeros(8, np.float32),
                                                       np.int32(8)))


def test_unknown_kernel_name(types_mod):
    with pytest.raises(KeyError, match="scale_t<int>"):
        types_mod.get_function("scale_t<int>")


# ---------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------
def test_loader_sim_cache_and_fresh_settings(tmp_path, monkeypatch):
    monkeypatch.setenv(engine.ENV_CACHE, str(tmp_path))
    src = tmp_path / "k.cu"
    src.write_text('extern "C" __global__ void fill(float* y, const float v) { y[threadIdx.x] = v; }\n')
    m1 = _loader.load_module(str(src), target="sim")
    libs = list((tmp_path / "sim").glob("*.so"))
    assert len(libs) == 1 and not list((tmp_path / "sim").glob("*.tmp"))
    m2 = _loader.load_module(str(src), target="sim")
    m1.seed = 1
    assert m2.seed is None, "modules from the loader must not share settings"
    y = np.zeros(4, np.float32)
    m2.get_function("fill")((1,), (4,), (y, np.float32(2.5)))
    assert y.tolist() == [2.5] * 4
    src.write_text(src.read_text().replace("= v;", "= 2 * v;"))
    _loader.load_module(str(src), target="sim").get_function("fill")((1,), (4,), (y, np.float32(2.5)))
    assert y.tolist() == [5.0] * 4


def test_loader_errors(monkeypatch):
    with pytest.raises(ValueError, match="target"):
        _loader.load_module(str(KDIR / "sim_oob.cu"), target="gpu")
    with pytest.raises(FileNotFoundError):
        _loader.load_module("no_such_kernel.cu", target="sim")
    monkeypatch.setenv(engine.ENV_CXX, "definitely-not-a-compiler-g++")
    assert not _loader.sim_available()[0]
    with pytest.raises(RuntimeError, match="g\\+\\+"):
        _loader.load_module(str(KDIR / "sim_oob.cu"), target="sim")


def test_loader_registry_and_cupy_unavailable():
    assert _loader.KERNEL_DIR.is_dir()
    data = json.loads((_loader.KERNEL_DIR / "instantiations.json").read_text())
    assert _loader.INSTANTIATIONS == {k: list(v) for k, v in data.items()}
    ok, why = _loader.cupy_available()
    assert isinstance(ok, bool) and why
    if not ok:
        with pytest.raises(RuntimeError, match="cupy backend unavailable"):
            _loader.load_module(str(KDIR / "sim_oob.cu"), target="cupy")


def test_loader_cupy_target_with_stand_in_cupy(monkeypatch):
    """The CuPy path without a GPU: what reaches cupy.RawModule, and the per-key cache."""
    import types
    made = []

    class RawModule:
        def __init__(self, code, options, name_expressions):
            made.append((code, options, name_expressions))

        def compile(self):
            if "-DBROKEN" in self.options:
                raise RuntimeError("stand-in NVRTC error")

        @property
        def options(self):
            return made[-1][1]

    class Device:
        id = 0

    fake = types.SimpleNamespace(
        RawModule=RawModule, __version__="0-test",
        cuda=types.SimpleNamespace(Device=Device, get_cuda_path=lambda: None, runtime=types.SimpleNamespace(
            getDeviceProperties=lambda d: {"name": b"fake"}, getDeviceCount=lambda: 1)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(_loader, "_cache", {})
    path = str(KDIR / "sim_barrier.cu")
    m1 = _loader.load_module(path, ["block_sum<64>"], target="cupy", options=("-DX=1",))
    m2 = _loader.load_module(path, ["block_sum<64>"], target="cupy", options=("-DX=1",))
    assert m1 is m2 and len(made) == 1
    code, options, names = made[0]
    assert code.startswith((KDIR / "sim_barrier.cu").read_text()) and "cupy_localrel deps" in code
    assert options[0] == "-DX=1" and f"-I{KDIR}" in options
    assert names == ("block_sum<64>",)
    _loader.load_module(path, ["block_sum<128>"], target="cupy")
    assert len(made) == 2
    assert _loader.cupy_available() == (True, "CuPy 0-test, 1 device(s), current: fake")
    # RawModule compiles lazily; the loader compiles at once and names what failed.
    with pytest.raises(RuntimeError, match="NVRTC could not compile sim_barrier.cu"):
        _loader.load_module(path, ["block_sum<64>"], target="cupy", options=("-DBROKEN",))


def test_cuda_headers_of_the_nvrtc_version_come_first(tmp_path, monkeypatch):
    import types
    for sub in ("cuda_runtime", "cu13"):      # CUDA 12 and CUDA 13 wheel layouts
        (tmp_path / sub / "include").mkdir(parents=True)
        (tmp_path / sub / "include" / "cuda_fp16.h").write_text("")
    monkeypatch.setitem(sys.modules, "nvidia", types.SimpleNamespace(__path__=[str(tmp_path)]))
    for var in ("CUDA_PATH", "CUDA_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert _loader.cuda_include_dir(12) == tmp_path / "cuda_runtime" / "include"
    assert _loader.cuda_include_dir(13) == tmp_path / "cu13" / "include"


def test_compile_error_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv(engine.ENV_CACHE, str(tmp_path))
    src = tmp_path / "bad.cu"
    src.write_text('extern "C" __global__ void bad(float* y) { y[0] = undefined_thing; }\n')
    with pytest.raises(RuntimeError, match="undefined_thing"):
        _loader.load_module(str(src), target="sim")


# ---------------------------------------------------------------------------------------
# AddressSanitizer mode (in a subprocess: ASan aborts the process it finds a bug in)
# ---------------------------------------------------------------------------------------
def test_asan_reports_out_of_bounds_write_with_file_and_line(tmp_path):
    if not Path(engine.libasan_path()).is_file():
        pytest.skip("libasan not found next to g++")
    script = textwrap.dedent(f"""
        import numpy as np
        from cupy_localrel import _loader
        mod = _loader.load_module({str(KDIR / 'sim_oob.cu')!r}, target="sim", sanitize=True)
        y = np.zeros(1000, np.float32)
        mod.get_function("oob_write")((4,), (256,), (y, np.int32(y.size)))
        print("NOT DETECTED")
    """)
    env = engine.asan_env()
    env[engine.ENV_CACHE] = os.environ.get(engine.ENV_CACHE, str(engine.cache_dir().parent))
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    line = next(i for i, t in enumerate((KDIR / "sim_oob.cu").read_text().splitlines(), 1) if "BUG on purpose" in t)
    assert "NOT DETECTED" not in r.stdout
    assert "heap-buffer-overflow" in r.stderr, r.stderr[-3000:]
    assert f"sim_oob.cu:{line}" in r.stderr, r.stderr[-3000:]
    # y[1000] is written by global thread 1000 only: block 3, thread 232 of 256
    assert "happened in CUDA block (3,0,0) thread (232,0,0)" in r.stderr, r.stderr[-3000:]


def test_tsan_racecheck_reports_missing_barrier_only(tmp_path):
    """ThreadSanitizer mode: the unsynchronised neighbour read is reported with both source
    lines and CUDA threads; the same exchange with a barrier, warp exchanges ordered by
    __syncwarp and atomics are not."""
    if not Path(engine.runtime_path("thread")).is_file():
        pytest.skip("libtsan not found next to g++")
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from cupy_localrel import _loader
        k = {str(KDIR)!r}
        bar = _loader.load_module(k + "/sim_barrier.cu", target="sim", sanitize="thread")
        warp = _loader.load_module(k + "/sim_warp.cu", target="sim", sanitize="thread")
        atom = _loader.load_module(k + "/sim_atomics.cu", target="sim", sanitize="thread")
        x = np.arange(2 * 256, dtype=np.float32)
        bar.get_function("shift_barrier")((2,), (256,), (x, np.zeros_like(x)))
        warp.get_function("syncwarp_rotate")((2,), (128,), (np.arange(256, dtype=np.int32),
                                                            np.zeros(256, np.int32)))
        atom.get_function("histogram")((4,), (64,), (np.arange(999, dtype=np.int32), np.int32(999),
                                                     np.zeros(16, np.uint32)))
        sys.stderr.write("CLEAN PART DONE\\n"); sys.stderr.flush()
        bar.get_function("shift_no_barrier")((2,), (256,), (x, np.zeros_like(x)))
    """)
    env = engine.sanitizer_env("thread")
    env[engine.ENV_CACHE] = os.environ.get(engine.ENV_CACHE, str(engine.cache_dir().parent))
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    clean, marker, racy = r.stderr.partition("CLEAN PART DONE")
    assert marker, r.stderr[-3000:]
    assert "WARNING: ThreadSanitizer" not in clean, clean[-6000:]
    assert racy.count("WARNING: ThreadSanitizer: data race") == 1, racy[-6000:]
    src = (KDIR / "sim_barrier.cu").read_text().splitlines()
    start = next(i for i, t in enumerate(src, 1) if "void shift_no_barrier" in t)
    assert f"shift_no_barrier {KDIR / 'sim_barrier.cu'}:{start + 4}" in racy    # the read
    assert f"shift_no_barrier {KDIR / 'sim_barrier.cu'}:{start + 3}" in racy    # the write
    assert "'CUDA block (" in racy


def test_asan_mode_without_runtime_says_how(monkeypatch):
    if "libasan" in open("/proc/self/maps").read():
        pytest.skip("this process already runs under ASan")
    with pytest.raises(RuntimeError, match="LD_PRELOAD"):
        load("sim_oob.cu", sanitize=True)


# ---------------------------------------------------------------------------------------
# NVRTC: the test kernels are valid CUDA for sm_80 and sm_90
# ---------------------------------------------------------------------------------------
def test_nvrtc_compiles_test_kernels(capsys):
    from cupy_localrel import _nvrtc_check
    try:
        nv = _nvrtc_check.Nvrtc()
    except _nvrtc_check.NvrtcUnavailable as e:
        pytest.skip(str(e))
    errors = sum(_nvrtc_check.check_file(nv, KDIR / f, names, ["80", "90"]) for f, names in NAMES.items())
    out = capsys.readouterr().out
    assert errors == 0, out
    for arch in ("sm_80", "sm_90"):
        assert f"ok   {arch} sim_warp.cu shuffle<3,8>: regs=" in out
        assert f"ok   {arch} sim_barrier.cu block_sum<128>: regs=" in out


def test_nvrtc_check_main_reports_errors(tmp_path, capsys):
    from cupy_localrel import _nvrtc_check
    try:
        _nvrtc_check.Nvrtc()
    except _nvrtc_check.NvrtcUnavailable as e:
        pytest.skip(str(e))
    bad = tmp_path / "bad.cu"
    bad.write_text('extern "C" __global__ void bad(float* y) { y[0] = nope; }\n')
    assert _nvrtc_check.main([str(bad), "--arch", "80"]) == 1
    assert "FAIL sm_80 bad.cu" in capsys.readouterr().out
    good = tmp_path / "good.cu"
    good.write_text("template <int N> __global__ void good(float* y) { y[threadIdx.x] = N; }\n")
    assert _nvrtc_check.main([str(good), "-n", "good<3>"]) == 0
    out = capsys.readouterr().out
    assert "ok   sm_80 good.cu good<3>: regs=" in out and "ok   sm_90 good.cu good<3>" in out
    reg = tmp_path / "reg.json"
    reg.write_text(json.dumps({"good.cu": ["good<4>", "good<5>"]}))
    assert _nvrtc_check.main([str(good), "--registry", str(reg), "--arch", "sm_90"]) == 0
    out = capsys.readouterr().out
    assert "ok   sm_90 good.cu good<4>" in out and "ok   sm_90 good.cu good<5>" in out


def test_nvrtc_check_without_nvrtc_fails_clearly(monkeypatch, capsys):
    from cupy_localrel import _nvrtc_check
    monkeypatch.setattr(_nvrtc_check, "_nvrtc_candidates", lambda: ["/nonexistent/libnvrtc.so.12"])
    assert _nvrtc_check.main([str(KDIR / "sim_oob.cu")]) == 2
    err = capsys.readouterr().err
    assert "NVRTC could not be loaded" in err and "nvidia-cuda-nvrtc-cu12" in err
    ok, why = _nvrtc_check.nvrtc_available()
    assert not ok and "NVRTC could not be loaded" in why
