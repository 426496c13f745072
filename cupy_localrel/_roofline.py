"""A roofline model of NVIDIA GPUs that turns the CPU engine's counters into *modelled* time.

Every figure this module returns is modelled, not measured: it is what the counters of
:mod:`cupy_localrel._sim.profile` imply on a device described by :data:`DEVICES`. The model
(kernels/PROFILING.md explains it and its limits) per launch:

- occupancy: resident blocks per SM from threads, registers (allocated per warp in units of
  256) and shared memory (plus 1 KiB reserved per block), from the NVRTC report;
- one time per unit, the largest bounds the launch:
  ``hbm`` distinct global bytes / achievable HBM bandwidth; ``l2`` sectors x 32 B / L2
  bandwidth; ``shared`` bank wavefronts / (1 per clock per SM); ``issue`` warp instructions /
  (4 per clock per SM); ``latency`` the time the resident warps need to have every global
  request served, a few requests in flight per warp (Little's law), distinct bytes at HBM
  latency and the rest (re-reads) at L2 latency;
- the floor: compulsory bytes (each input read once, each output written once) over the
  peak HBM bandwidth; share = floor / predicted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MODELLED = "modelled"


@dataclass(frozen=True)
class Device:
    name: str
    sms: int
    clock_ghz: float            # SM boost clock
    hbm_peak: float             # bytes/s, datasheet
    hbm_achievable: float       # bytes/s, a large device-to-device copy (read + write)
    l2_bandwidth: float         # bytes/s
    l2_bytes: int
    smem_per_sm: int            # bytes usable by blocks
    smem_per_block: int         # opt-in maximum of one block
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    fp32_lanes_per_sm: int = 128   # FP32 FMA lanes per clock
    issue_per_sm: int = 4          # warp instructions per clock (4 schedulers)
    memory_latency_ns: float = 600.0   # a global load served by HBM, round trip under load (lead)
    l2_latency_ns: float = 200.0       # a global load served by L2 (lead)
    launch_overhead_us: float = 3.0    # back-to-back launches on one stream (lead)


# One table of device constants. Sources:
# - H200 SXM: NVIDIA H200 datasheet (141 GB HBM3e, 4.8 TB/s; 132 SMs as the H100 SXM; 1.98 GHz
#   boost); 60 MB of L2 and a ~4.3 TB/s device-to-device copy as seen on the lent H200s
#   (/work/.library/device/KINDS.md, 2026-10-28 and 2026-11-04).
# - H100 SXM5: NVIDIA H100 datasheet and Hopper architecture whitepaper (132 SMs, 1.98 GHz
#   boost, 3.35 TB/s HBM3, 50 MB L2, 228 KB shared memory per SM with 227 KB per block,
#   128 FP32 lanes per SM); achievable copy ~90% of peak (lead, not measured here).
# - A100 SXM4 80GB: NVIDIA A100 datasheet and Ampere whitepaper (108 SMs, 1.41 GHz boost,
#   2.04 TB/s HBM2e, 40 MB L2, 164 KB shared memory per SM with 163 KB per block, 64 FP32
#   lanes per SM); achievable copy ~90% of peak (lead).
# - L2 bandwidth is not on the datasheets: A100's whitepaper gives 5120 B/clk (~7.2 TB/s at
#   1.41 GHz); for Hopper we take ~2.2x HBM as microbenchmarks of the H100 suggest (lead).
# - Memory latency ~600 ns (HBM miss, microbenchmarks of A100/H100: ~450-700 cycles plus
#   queueing under load), ~200 ns for an L2 hit, and the launch overhead (~3 us back to back)
#   are leads: the first lent GPU calibrates them (benchmarks/gpu_check.sh).
DEVICES: dict[str, Device] = {
    "h200": Device("h200", sms=132, clock_ghz=1.98, hbm_peak=4.8e12, hbm_achievable=4.3e12,
                   l2_bandwidth=10.5e12, l2_bytes=60 * 2**20, smem_per_sm=228 * 1024,
                   smem_per_block=227 * 1024),
    "h100": Device("h100", sms=132, clock_ghz=1.98, hbm_peak=3.35e12, hbm_achievable=3.0e12,
                   l2_bandwidth=7.5e12, l2_bytes=50 * 2**20, smem_per_sm=228 * 1024,
                   smem_per_block=227 * 1024),
    "a100": Device("a100", sms=108, clock_ghz=1.41, hbm_peak=2.04e12, hbm_achievable=1.8e12,
                   l2_bandwidth=7.2e12, l2_bytes=40 * 2**20, smem_per_sm=164 * 1024,
                   smem_per_block=163 * 1024, fp32_lanes_per_sm=64, memory_latency_ns=650.0),
}

UNITS = ("hbm", "l2", "shared", "issue", "latency")
SMEM_RESERVED_PER_BLOCK = 1024   # CUDA reserves 1 KiB of shared memory per block (sm_80+)
# In-flight global requests per warp the latency cap assumes: the kernels issue a few
# independent loads before they use them (lead; ncu's long-scoreboard stalls will tell).
REQUESTS_IN_FLIGHT_PER_WARP = 4
# Warp instructions per memory request when no instruction mix is known (lead).
DEFAULT_INSTRUCTIONS_PER_MEMORY_REQUEST = 4.0


def device(name: str) -> Device:
    try:
        return DEVICES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown device {name!r}; known: {sorted(DEVICES)}") from None


def occupancy(dev: Device, threads: int, regs: int | None, smem_bytes: int) -> dict:
    """Resident blocks and warps per SM, and what limits them (threads, registers, shared
    memory or the block limit). ``regs`` None (no NVRTC report) leaves registers out."""
    warps = -(-threads // 32)
    limits = {"blocks": dev.max_blocks_per_sm, "threads": dev.max_threads_per_sm // (warps * 32)}
    if regs:
        per_warp = -(-regs * 32 // 256) * 256          # allocation unit: 256 registers per warp
        limits["registers"] = dev.regs_per_sm // (per_warp * warps)
    limits["shared"] = dev.smem_per_sm // (smem_bytes + SMEM_RESERVED_PER_BLOCK)
    blocks = max(0, min(limits.values()))
    limiter = min(limits, key=lambda k: limits[k])
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
            "occupancy": blocks * warps * 32 / dev.max_threads_per_sm, "limiter": limiter}


def launch_time(dev: Device, totals: dict, *, threads: int, blocks_total: int, regs: int | None,
                smem_bytes: int, instructions_per_request: float | None = None) -> dict:
    """Modelled time of one launch from its whole-grid counters (``LaunchCounters.totals()``).

    Returns the per-unit times (us), ``predicted_us`` (the largest plus the launch
    overhead), ``bound`` (the unit), the occupancy and ``floor_us`` (distinct bytes at peak HBM).
    """
    occ = occupancy(dev, threads, regs, smem_bytes)
    if occ["blocks_per_sm"] == 0:
        raise ValueError(f"a block of {threads} threads, {regs} registers and {smem_bytes} B of shared "
                         f"memory does not fit one SM of {dev.name}")
    sms_used = min(dev.sms, blocks_total)         # a small grid leaves SMs idle
    clock = dev.clock_ghz * 1e9
    gl, gs = totals["global_load"], totals["global_store"]
    sl, ss = totals["shared_load"], totals["shared_store"]
    sectors = gl["sectors"] + gs["sectors"]
    requests = gl["requests"] + gs["requests"] + sl["requests"] + ss["requests"] + totals.get("atomics", 0)
    ipr = instructions_per_request or DEFAULT_INSTRUCTIONS_PER_MEMORY_REQUEST
    # With a static mix, ipr is per 4-byte-equivalent memory instruction: weight the dynamic
    # requests the same way (a 16-byte request counts 4; _profile.instructions_per_request).
    weighted = totals.get("word_requests", requests) if instructions_per_request else requests
    warp_instructions = weighted * ipr
    resident_warps = min(occ["warps_per_sm"], -(-blocks_total // sms_used) * -(-threads // 32)) * sms_used
    global_requests = gl["requests"] + gs["requests"] + totals.get("atomics", 0)
    # Little's law: requests complete at (requests in flight) / latency; a request's latency
    # is HBM's for the share of sectors that are first touches, L2's for the re-reads.
    dram_share = min(1.0, totals["unique_global_bytes"] / max(1, 32 * sectors))
    latency_s = (dram_share * dev.memory_latency_ns + (1 - dram_share) * dev.l2_latency_ns) * 1e-9
    in_flight = resident_warps * REQUESTS_IN_FLIGHT_PER_WARP
    t = {
        "hbm": totals["unique_global_bytes"] / dev.hbm_achievable,
        "l2": 32 * sectors / dev.l2_bandwidth,
        "shared": (sl["wavefronts"] + ss["wavefronts"]) / (sms_used * clock),
        "issue": warp_instructions / (dev.issue_per_sm * sms_used * clock),
        "latency": global_requests * latency_s / in_flight if in_flight else 0.0,
    }
    bound = max(t, key=lambda k: t[k])
    times_us = {k: v * 1e6 for k, v in t.items()}
    return {"label": MODELLED, "times_us": times_us, "bound": bound,
            "predicted_us": times_us[bound] + dev.launch_overhead_us,
            "floor_us": totals["unique_global_bytes"] / dev.hbm_peak * 1e6,
            "warp_instructions": round(warp_instructions), "instructions_per_request": ipr, **occ}


def op_time(dev: Device, launches: list[dict], compulsory_bytes: int) -> dict:
    """Modelled time of an op: its launches back to back. ``bound``: the unit that bounds the
    launches that take most of the time; floor: compulsory bytes at peak HBM."""
    predicted = sum(l["predicted_us"] for l in launches)
    by_unit: dict[str, float] = {}
    for l in launches:
        by_unit[l["bound"]] = by_unit.get(l["bound"], 0.0) + l["predicted_us"]
    bound = max(by_unit, key=lambda k: by_unit[k]) if by_unit else "none"
    floor = compulsory_bytes / dev.hbm_peak * 1e6
    return {"label": MODELLED, "device": dev.name, "predicted_us": predicted, "floor_us": floor,
            "share": floor / predicted if predicted else math.nan, "bound": bound,
            "compulsory_bytes": int(compulsory_bytes)}
