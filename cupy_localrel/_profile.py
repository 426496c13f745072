"""``python -m cupy_localrel profile``: the kernels' memory traffic counted on the CPU, and
their *modelled* time on a GPU (kernels/PROFILING.md).

Two modes:

- ops: ``--op lrnet --op sasa --shape B,C,H,W --kernel-size K --dtype float32 --device h200``
  runs the forward and the backward of each op through the real launch code
  (``_backends/_kernel_ops.py``) on a profiling target: each launch of the op's sequence runs a
  deterministic sample of its blocks with the engine's counters (profile mode), scaled to
  the whole grid, and the roofline model of :mod:`cupy_localrel._roofline` turns the counts into
  time. Head layouts are the papers': LR-Net heads = C/8, Dqk = 1, Dv = 8 (geometry bias
  k x k per head); SASA heads = 8, Dqk = Dv = C/8 (relative embedding).
- one kernel: ``--source FILE.cu --kernel NAME --grid X[,Y,Z] --block X[,Y,Z]`` profiles any
  ``extern "C"`` kernel whose parameters are pointers and ints (zero-filled buffers of
  ``--buffer-bytes`` each, 256-byte aligned as cudaMalloc gives; ``--int`` values in order).

Every time printed or written is modelled, never measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _geometry as G
from . import _loader
from . import _roofline as R
from ._backends import _kernel_ops as K
from ._sim import engine
from ._sim.profile import LaunchCounters, sample_blocks

OPS = ("lrnet", "sasa")
DIRECTIONS = ("forward", "backward")
BUDGET_FILE = _loader.KERNEL_DIR / "profile_budget.json"
DEFAULT_RUNS = 3          # (batch, head) planes profiled per launch
FULL_BELOW = 64           # launches of at most this many blocks run whole


# ---------------------------------------------------------------------------------------
# The profiling target: the op's real launch sequence, each launch sampled and counted
# ---------------------------------------------------------------------------------------
class _SampledKernel:
    """A profile-mode kernel that runs a sample of its blocks and hands its counters to the target."""

    def __init__(self, target: "ProfileTarget", kernel):
        self.target, self.kernel = target, kernel

    # The opt-in limit of dynamic shared memory (cudaFuncSetAttribute) is the kernel's.
    @property
    def max_dynamic_shared_size_bytes(self):
        return self.kernel.max_dynamic_shared_size_bytes

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value):
        self.kernel.max_dynamic_shared_size_bytes = value

    def __call__(self, grid, block, args, shared_mem=0, **kw):
        total = int(np.prod(grid))
        planes = self.target.planes
        period = total // planes if planes and total % planes == 0 else 1
        chosen = None if total <= FULL_BELOW else sample_blocks(total, period, self.target.runs)
        self.kernel(grid, block, args, shared_mem=shared_mem, blocks=chosen, **kw)
        self.target.launches.append(self.kernel.module.launches.pop())


def aligned_array(shape, dtype, fill_zero: bool = True, align: int = 256) -> np.ndarray:
    """A C-contiguous array starting on an ``align``-byte boundary, as cudaMalloc gives (sector
    counts depend on alignment: NumPy alone aligns small arrays to 16 bytes only). Large
    allocations stay lazy: untouched pages cost no memory."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = (np.zeros if fill_zero else np.empty)(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes].view(dtype).reshape(shape)


class _AlignedNumpy:
    """NumPy for the launch code, with cudaMalloc's 256-byte alignment for new arrays."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=float):
        return aligned_array(np.atleast_1d(shape) if np.ndim(shape) == 0 else shape, dtype, fill_zero=False)

    @staticmethod
    def zeros(shape, dtype=float):
        return aligned_array(np.atleast_1d(shape) if np.ndim(shape) == 0 else shape, dtype)


class ProfileTarget(K.Target):
    """A ``sim`` target whose kernels are built in profile mode and sampled by planes, and
    whose arrays are aligned as on the GPU.

    ``planes`` (batch x heads) tells how a launch's 1-D grid splits into per-plane runs of
    blocks; ``launches`` collects the LaunchCounters of every launch, in order.
    """

    xp = _AlignedNumpy()

    def __init__(self, runs: int = DEFAULT_RUNS):
        super().__init__("sim")
        self.runs = runs
        self.planes = 0
        self.launches: list[LaunchCounters] = []
        self._profiled: dict[str, engine.SimModule] = {}

    def upload(self, host: np.ndarray):
        """The geometry buffer, copied to a cudaMalloc-aligned array."""
        dev = aligned_array(host.shape, host.dtype, fill_zero=False)
        dev[...] = host
        return dev

    def function(self, filename: str, name: str, device=None):   # device: one sim device
        module = self._profiled.get(filename)
        if module is None:
            path = _loader.kernel_path(filename)
            module = self._profiled[filename] = engine.build(
                path, _loader.INSTANTIATIONS.get(filename, ()), include_dirs=_loader.include_dirs_for(path),
                sanitize=False, profile=True)
        return _SampledKernel(self, module.get_function(name))


# ---------------------------------------------------------------------------------------
# The papers' ops
# ---------------------------------------------------------------------------------------
@dataclass
class OpCase:
    """One op direction with lazily zero-filled arrays (untouched pages cost no memory)."""
    name: str                   # lrnet_forward, ...
    geo: G.Geometry
    inputs: dict
    outputs: dict               # name -> (shape, dtype) of what the op writes

    def compulsory_bytes(self) -> int:
        read = sum(a.nbytes for x in self.inputs.values() if x is not None
                   for a in (x if isinstance(x, G.SplitRel) else (x,)))
        written = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in self.outputs.values())
        return read + written


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def op_case(op: str, direction: str, shape: Sequence[int], kernel_size: int, dtype: str = "float32",
            border: str = "mask") -> OpCase:
    """The arrays of ``op`` (``lrnet``/``sasa``) at ``shape`` = (B, C, H, W), papers' heads."""
    B, C, H, W = (int(s) for s in shape)
    if C % 8:
        raise ValueError(f"--shape: C must be a multiple of 8 (both papers' head layouts), got {C}")
    dt = _dtype(dtype)
    zeros = lambda *s: aligned_array(s, dt)   # noqa: E731
    tl = G.table_length(int(kernel_size), border)     # bias/rel entries per axis
    if op == "lrnet":
        heads = C // 8
        q, k, v = zeros(B, heads, H, W), zeros(B, heads, H, W), zeros(B, C, H, W)
        bias, rel = zeros(heads, tl, tl), None
    elif op == "sasa":
        heads, d = 8, C // 8
        q, k, v = zeros(B, C, H, W), zeros(B, C, H, W), zeros(B, C, H, W)
        # rel_h/rel_w as sasa2d hands them to the kernels: factored, never expanded
        bias, rel = None, G.SplitRel(zeros(heads, d // 2, tl), zeros(heads, d // 2, tl))
    else:
        raise ValueError(f"--op must be one of {OPS}, got {op!r}")
    geo = G.qk_geometry(q, k, heads, kernel_size, 1, 1, border, bias, rel, 1.0, v=v)
    acc = G.lse_dtype(dt)
    lse = aligned_array(geo.lse_shape, acc)
    if direction == "forward":
        inputs = dict(q=q, k=k, v=v, bias=bias, rel=rel)
        outputs = dict(out=(geo.out_shape, dt), lse=(geo.lse_shape, acc))
    else:
        inputs = dict(grad_out=zeros(*geo.out_shape), q=q, k=k, v=v, lse=lse, bias=bias, rel=rel)
        outputs = dict(dq=(q.shape, dt), dk=(k.shape, dt), dv=(v.shape, dt))
        small = (("dbias", bias), *(zip(("drel_h", "drel_w"), rel) if isinstance(rel, G.SplitRel) else
                                     (("drel", rel),)))
        for name, a in small:
            if a is not None:
                outputs[name] = (a.shape, dt)
    return OpCase(f"{op}_{direction}", geo, inputs, outputs)


def run_case(case: OpCase, runs: int = DEFAULT_RUNS, target: ProfileTarget | None = None) -> list[LaunchCounters]:
    """Run the op's launch sequence on a profiling target; the counters of each launch."""
    t = target or ProfileTarget(runs)
    t.planes, t.launches = case.geo.batch * case.geo.heads, []
    a = case.inputs
    if case.name.endswith("forward"):
        K.attention_forward(t, case.geo, a["q"], a["k"], a["v"], a["bias"], a["rel"])
    else:
        out = aligned_array(case.geo.out_shape, case.geo.dtype)
        # Only sampled blocks run: drel's host-side sums (split rel) see unwritten entries.
        with np.errstate(invalid="ignore", over="ignore"):
            K.attention_backward(t, case.geo, a["grad_out"], a["q"], a["k"], a["v"], out, a["lse"], a["bias"],
                                 a["rel"])
    return t.launches


# ---------------------------------------------------------------------------------------
# NVRTC: registers and the instruction mix
# ---------------------------------------------------------------------------------------
_ARCH = {"h200": "90", "h100": "90", "a100": "80"}
_REPORTS: dict = {}


def nvrtc_report(filename: str, arch: str) -> dict:
    """{name expression: {regs, smem, ..., mix}} of a kernel file for sm_``arch``; {} without NVRTC.
    Cached per process."""
    key = (filename, arch)
    if key in _REPORTS:
        return _REPORTS[key]
    from . import _nvrtc_check as N
    out: dict = {}
    try:
        nv = N.Nvrtc()
        path = _loader.kernel_path(filename)
        names = list(_loader.INSTANTIATIONS.get(Path(path).name, ()))
        ok, log, lowered = nv.compile(path.read_text(), path.name, N.compile_options(path, arch, nv.version[0]), names)
        usage = N.parse_ptxas(log) if ok else {}
        mix = N.instruction_mix(path, names, arch)
        per_line = N.sass_lines(path, names, arch)
        for n in names + [k for k in mix["kernels"] if k not in names]:
            entry = dict(usage.get(lowered.get(n, n), {}))
            if n in mix["kernels"]:
                entry["mix"] = mix["kernels"][n]
                entry["mix_tool"] = mix["tool"]
            entry["sass_lines"], entry["sass_blocks"] = per_line.get(n, ({}, []))
            out[n] = entry
    except (N.NvrtcUnavailable, RuntimeError, OSError) as e:
        out = {"_error": str(e)}
    _REPORTS[key] = out
    return out


def instructions_per_request(mix: dict | None) -> float | None:
    """All instructions per 4-byte-equivalent memory instruction of the static mix (the issue
    bound's proxy; the model multiplies it by the dynamic requests weighted the same way,
    LaunchCounters.totals()["word_requests"]). A 16-byte load counts 4: it replaces four
    4-byte ones, while the arithmetic on its data stays, so counting it once would charge
    vectorised code the instructions its removed loads used to carry. For code of 4-byte
    accesses (or narrower) this is all instructions per memory instruction."""
    if not mix:
        return None
    from ._nvrtc_check import MEMORY_CLASSES
    mem = mix.get("memory_words") or sum(mix[k] for k in MEMORY_CLASSES)
    return mix["total"] / mem if mem else None


def block_instructions(blocks: list[dict], line_words: dict) -> tuple:
    """Warp instructions of a launch weighed by basic block, and the share of the engine's
    word requests whose line has SASS memory instructions: (instructions, matched share),
    or (None, 0.0) without blocks or requests.

    A block's instructions run equally often. A block with memory instructions runs as often
    as its lines' dynamic word requests (``line_words``, the engine's, whole grid) per static
    memory word say, averaged over the block's memory words; a block without memory
    instructions takes the mean of its nearest such neighbours in program order (a lead:
    loop control and arithmetic sit next to their loads). Unlike the static ratio, this does
    not weigh a loop by how often the compiler unrolled it."""
    static: dict = {}
    for b in blocks:
        for line, words in b["words"].items():
            static[line] = static.get(line, 0) + words
    if not static or not line_words:
        return None, 0.0
    rates = {line: line_words.get(line, 0.0) / words for line, words in static.items()}
    execs = []
    for b in blocks:
        total = sum(b["words"].values())
        execs.append(sum(w * rates[line] for line, w in b["words"].items()) / total if total else None)
    known = [i for i, e in enumerate(execs) if e is not None]
    instructions = 0.0
    for i, (b, e) in enumerate(zip(blocks, execs)):
        if e is None:
            near = [execs[j] for j in (max((j for j in known if j < i), default=None),
                                       min((j for j in known if j > i), default=None)) if j is not None]
            e = sum(near) / len(near)
        instructions += e * b["instructions"]
    matched = sum(v for line, v in line_words.items() if line in static)
    return instructions, matched / sum(line_words.values())


def line_words(c: LaunchCounters) -> dict:
    """{``file:line``: the engine's dynamic requests in 4-byte units of width per lane}, whole
    grid (the units of LaunchCounters.totals()["word_requests"])."""
    out: dict = {}
    for s in c.sites:
        out[s.location] = out.get(s.location, 0.0) + s.words * c.scale
    return out


# ---------------------------------------------------------------------------------------
# Model and report
# ---------------------------------------------------------------------------------------
def kernel_base(name: str) -> str:
    """``attention_forward_tiled<float, 1, 8>`` -> ``attention_forward_tiled``."""
    return name.split("<", 1)[0].strip()


def launch_record(c: LaunchCounters, dev: R.Device, report: dict | None) -> dict:
    """The JSON record of one launch: counters (whole grid) and the model's figures."""
    totals = c.totals()
    info = (report or {}).get(c.kernel, {})
    threads = int(np.prod(c.block))
    smem = c.shared_bytes + int(info.get("smem", 0))
    model = R.launch_time(dev, totals, threads=threads, blocks_total=c.blocks_total, regs=info.get("regs"),
                          smem_bytes=smem, instructions_per_request=instructions_per_request(info.get("mix")))
    # A second issue estimate, by basic block (informational: the bound keeps the static ratio).
    instructions, matched = block_instructions(info.get("sass_blocks") or [], line_words(c))
    if instructions is not None:
        model["issue_per_block_us"] = instructions / (dev.issue_per_sm * min(dev.sms, c.blocks_total)
                                                      * dev.clock_ghz * 1e9) * 1e6
        model["issue_per_block_matched"] = matched
    return {"kernel": c.kernel, "source": Path(c.source).name, "grid": list(c.grid), "block": list(c.block),
            "shared_bytes": c.shared_bytes, "blocks_profiled": c.blocks_profiled, "blocks_total": c.blocks_total,
            **totals, "registers": info.get("regs"), "instruction_mix": info.get("mix"),
            "instruction_mix_tool": info.get("mix_tool"), "model": model,
            "lines": line_costs(c, dev, info.get("sass_lines"))}


def line_costs(c: LaunchCounters, dev: R.Device, sass: dict | None = None) -> list[dict]:
    """Per source line (whole grid): the counters and the line's modelled time in the L2 and
    shared-memory units (its share of those bounds), costliest first. ``sass``: the static
    SASS instructions of each line (``{file:line: mix}``), set beside the engine's counts."""
    clock = dev.clock_ghz * 1e9
    sms = min(dev.sms, c.blocks_total)
    rows: dict = {}
    for s in c.sites:
        r = rows.setdefault(s.location, {"line": s.location, "cost_us": 0.0})
        if sass and s.location in sass:
            r["sass_static"] = {k: v for k, v in sass[s.location].items() if v}
        key = f"{s.space}_{s.kind}"
        r[key] = {"requests": round(s.requests * c.scale), "sectors": round(s.sectors * c.scale),
                  "ideal_sectors": round(s.ideal_sectors * c.scale), "wavefronts": round(s.wavefronts * c.scale),
                  "ideal_wavefronts": round(s.ideal_wavefronts * c.scale), "bytes": round(s.bytes * c.scale)}
        if s.space == "shared":
            r["cost_us"] += s.wavefronts * c.scale / (sms * clock) * 1e6
        else:
            r["cost_us"] += 32 * s.sectors * c.scale / dev.l2_bandwidth * 1e6
    return sorted(rows.values(), key=lambda r: -r["cost_us"])


def profile_ops(ops: Sequence[str], shape, kernel_size: int, dtype: str, device: str, border: str = "mask",
                runs: int = DEFAULT_RUNS, log=None) -> dict:
    """Profile the forward and backward of each op; the ``{"ops": [...], "launches": [...]}`` report."""
    dev = R.device(device)
    arch = _ARCH.get(dev.name, "90")
    ops_out, launches_out = [], []
    target = ProfileTarget(runs)
    for op in ops:
        for direction in DIRECTIONS:
            case = op_case(op, direction, shape, kernel_size, dtype, border)
            if log:
                print(f"profiling {case.name} ...", file=log, flush=True)
            counters = run_case(case, runs, target)
            records = [launch_record(c, dev, nvrtc_report(Path(c.source).name, arch)) for c in counters]
            for r in records:
                r["op"] = case.name
            model = R.op_time(dev, [r["model"] for r in records], case.compulsory_bytes())
            lines: dict = {}
            for r in records:
                for ln in r["lines"]:
                    lines[ln["line"]] = lines.get(ln["line"], 0.0) + ln["cost_us"]
            top = sorted(lines.items(), key=lambda kv: -kv[1])[:3]
            ops_out.append({"name": case.name, **model,
                            "kernels": [r["kernel"] for r in records],
                            "costliest_lines": [{"line": l, "cost_us": c} for l, c in top]})
            launches_out.extend(records)
    return {"label": "modelled: counts from the CPU engine (sampled blocks scaled to the grid), "
                     "times from the roofline model of cupy_localrel/_roofline.py; not measured",
            "device": dev.name, "shape": list(shape), "kernel_size": kernel_size, "dtype": dtype,
            "border": border, "date": datetime.date.today().isoformat(),
            "ops": ops_out, "launches": launches_out}


def _us(x: float) -> str:
    """A modelled time in microseconds: whole microseconds from 100 up, else 3 digits (a
    small shape's floor must not print as 0)."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def format_report(rep: dict) -> str:
    """Markdown tables: ops, then launches (all modelled)."""
    out = [f"Modelled on {rep['device']} (not measured); shape {tuple(rep['shape'])}, k={rep['kernel_size']}, "
           f"{rep['dtype']}, border={rep['border']}", "",
           "| op | predicted us | floor us | share | bound | costliest lines (modelled us) |",
           "|---|---:|---:|---:|---|---|"]
    for o in rep["ops"]:
        lines = "; ".join(f"{l['line']} {_us(l['cost_us'])}" for l in o["costliest_lines"])
        out.append(f"| {o['name']} | {_us(o['predicted_us'])} | {_us(o['floor_us'])} | {o['share']:.1%} | "
                   f"{o['bound']} | {lines} |")
    out += ["", "| op | kernel | blocks (profiled/total) | occ. | sectors/req ld (ideal) | wavefronts/req ld (ideal) | "
            "wavefronts/ideal ld | hbm us | l2 us | shared us | issue us | latency us | predicted us | bound |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rep["launches"]:
        gl, sl, m = r["global_load"], r["shared_load"], r["model"]
        spr = gl["sectors"] / max(1, gl["requests"])
        ideal = gl["ideal_sectors"] / max(1, gl["requests"])
        wpr = sl["wavefronts"] / max(1, sl["requests"])
        wideal = sl.get("ideal_wavefronts", 0) / max(1, sl["requests"])
        wratio = sl["wavefronts"] / max(1, sl.get("ideal_wavefronts", 0))
        t = m["times_us"]
        out.append(f"| {r['op']} | {r['kernel']} | {r['blocks_profiled']}/{r['blocks_total']} | "
                   f"{m['occupancy']:.0%} | {spr:.2f} ({ideal:.2f}) | {wpr:.2f} ({wideal:.2f}) | {wratio:.2f} | "
                   f"{_us(t['hbm'])} | {_us(t['l2'])} | "
                   f"{_us(t['shared'])} | {_us(t['issue'])} | {_us(t['latency'])} | {_us(m['predicted_us'])} | {m['bound']} |")
    blocked = [r for r in rep["launches"] if "issue_per_block_us" in r["model"]]
    if blocked:
        out += ["", "A second issue estimate (a lead, not the bound): each SASS basic block's instructions times "
                "how often its memory instructions run by the engine's counts (_profile.block_instructions); "
                "unlike the issue column it does not weigh a loop by its unrolling.", "",
                "| op | kernel | issue us (static ratio) | issue us (per block) | engine words matched |",
                "|---|---|---:|---:|---:|"]
        for r in blocked:
            m = r["model"]
            out.append(f"| {r['op']} | {r['kernel']} | {_us(m['times_us']['issue'])} | "
                       f"{_us(m['issue_per_block_us'])} | {m['issue_per_block_matched']:.1%} |")
    out += ["", "Costliest lines: the engine's dynamic requests per warp (whole grid / warps launched) beside "
            "the static SASS instructions nvdisasm attributes to the line (-lineinfo); a loop's SASS runs once "
            "per iteration, the engine counts every iteration.", "",
            "| op | kernel | line | modelled us | engine ld.shared/warp | engine ld.global/warp | "
            "SASS LDS | SASS LDG | SASS FFMA | SASS total |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for o in rep["ops"]:
        for top in o["costliest_lines"]:
            for r in rep["launches"]:
                if r["op"] != o["name"]:
                    continue
                ln = next((x for x in r["lines"] if x["line"] == top["line"]), None)
                if ln is None:
                    continue
                warps = r["blocks_total"] * -(-int(np.prod(r["block"])) // 32)
                sl = ln.get("shared_load", {}).get("requests", 0) / warps
                gl = ln.get("global_load", {}).get("requests", 0) / warps
                sass = ln.get("sass_static", {})
                out.append(f"| {o['name']} | {kernel_base(r['kernel'])} | {ln['line']} | {_us(ln['cost_us'])} | "
                           f"{sl:.1f} | {gl:.1f} | {sass.get('shared_load', '-')} | {sass.get('global_load', '-')} | "
                           f"{sass.get('ffma', '-')} | {sass.get('total', '-')} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# One kernel of any file
# ---------------------------------------------------------------------------------------
def _uses_dynamic_shared(src: str, kernel: str) -> bool:
    """Whether the body of ``kernel`` in ``src`` declares or names an ``extern __shared__``
    array (a textual check, for a clear error instead of a fault; helpers it calls that
    reach the array through a pointer argument are not seen)."""
    names = set(re.findall(r"\bextern\s+__shared__[^;\[]*?(\w+)\s*\[", src))
    start = re.search(rf"\b{re.escape(kernel)}\s*\(", src)
    brace = src.find("{", start.end()) if start else -1
    if brace < 0:
        return False
    depth, end = 0, brace
    for end in range(brace, len(src)):
        depth += {"{": 1, "}": -1}.get(src[end], 0)
        if depth == 0:
            break
    body = src[brace:end]
    return bool(re.search(r"\bextern\s+__shared__", body)) or any(re.search(rf"\b{n}\b", body) for n in names)


def profile_source(source: str, kernel: str, grid, block, shared: int = 0, buffer_bytes: int = 1 << 20,
                   ints: Sequence[int] = (), device: str = "h200", sample: bool = False) -> dict:
    """Profile one extern "C" kernel with pointer and int parameters (every block unless
    ``sample``); returns the launch record (counters and modelled time)."""
    path = Path(source).resolve()
    if int(shared) <= 0 and _uses_dynamic_shared(path.read_text(), kernel):
        # the engine cannot bound a kernel's dynamic shared memory: with none allocated, its
        # first access would fault the whole process
        raise ValueError(f"kernel {kernel} uses extern __shared__ memory: give --shared BYTES")
    module = engine.build(path, (), include_dirs=_loader.include_dirs_for(path), sanitize=False, profile=True)
    fn = module.get_function(kernel)
    args, ints = [], list(ints)
    nbytes = -(-int(buffer_bytes) // 16) * 16       # whole elements of any pointee up to 16 bytes
    for i, p in enumerate(fn.params):
        kind, size = p.kind.decode(), int(p.pointee_size)
        if kind == "p":
            buf = aligned_array((nbytes,), np.uint8)
            if p.pointee_kind.decode() == "f" and size in (2, 4, 8):
                buf = buf.view(f"f{size}")
            elif size in (2, 4, 8):
                buf = buf.view(f"u{size}")
            args.append(buf)
        elif kind == "i" and p.size in (1, 2, 4, 8):
            if not ints:
                raise ValueError(f"kernel {kernel}: parameter {i} ({p.type_name.decode()}) needs an --int value")
            args.append(np.array(ints.pop(0)).astype(f"i{p.size}")[()])
        else:
            raise ValueError(f"kernel {kernel}: parameter {i} has type {p.type_name.decode()}; "
                             "only pointers and ints are supported")
    if ints:
        raise ValueError(f"kernel {kernel}: {len(ints)} --int value(s) left over")
    g, b = tuple(grid), tuple(block)
    total = int(np.prod(g))
    fn(g, b, tuple(args), shared_mem=shared, blocks=sample_blocks(total) if sample else None)
    dev = R.device(device)
    return launch_record(module.launches.pop(), dev, None)


# ---------------------------------------------------------------------------------------
# Budget (tests/test_profile.py): sectors and wavefronts per request must not grow
# ---------------------------------------------------------------------------------------
BUDGET_CASES = {"shape": (1, 128, 20, 20), "kernel_size": 7, "dtype": "float32"}


def _line_text(location: str) -> str:
    """The stripped source text of ``file:line`` in the kernel folder (lines are keyed by
    text, so that edits elsewhere in a file do not move the budget)."""
    name, _, no = location.rpartition(":")
    try:
        return (_loader.KERNEL_DIR / name).read_text().split("\n")[int(no) - 1].strip()
    except (OSError, ValueError, IndexError):
        return ""


def budget_measure(runs: int = DEFAULT_RUNS, hot_share: float = 0.05) -> dict:
    """Today's per-request figures of every launch of both ops (forward and backward) at
    BUDGET_CASES, keyed ``op/kernel base name``; hot lines (those with at least ``hot_share`` of
    the launch's sectors or wavefronts) keyed by their source text."""
    out = {}
    for op in OPS:
        for direction in DIRECTIONS:
            case = op_case(op, direction, BUDGET_CASES["shape"], BUDGET_CASES["kernel_size"], BUDGET_CASES["dtype"])
            for c in run_case(case, runs):
                key = f"{case.name}/{kernel_base(c.kernel)}"
                entry = out.setdefault(key, {})
                for kind in ("load", "store"):
                    g, s = c.merged(kind, "global"), c.merged(kind, "shared")
                    if g.requests:
                        entry[f"global_{kind}_sectors_per_request"] = round(g.sectors / g.requests, 4)
                    if s.requests:
                        entry[f"shared_{kind}_wavefronts_per_request"] = round(s.wavefronts / s.requests, 4)
                        entry[f"shared_{kind}_wavefronts_per_ideal"] = round(s.wavefronts / max(1, s.ideal_wavefronts), 4)
                tot_sec = sum(s.sectors for s in c.sites) or 1
                tot_wf = sum(s.wavefronts for s in c.sites) or 1
                lines = entry.setdefault("lines", {})
                for s in c.sites:
                    hot = s.sectors / tot_sec >= hot_share if s.space == "global" else s.wavefronts / tot_wf >= hot_share
                    if not hot or not s.requests:
                        continue
                    text = _line_text(s.location)
                    if not text:
                        continue
                    per = (s.sectors if s.space == "global" else s.wavefronts) / s.requests
                    lines[f"{s.location.rpartition(':')[0]}: {text} [{s.space} {s.kind}]"] = round(per, 4)
    return out


def write_budget(path: Path = BUDGET_FILE) -> dict:
    data = {"_about": "Per-request figures of the kernels today (python -m cupy_localrel._profile "
                      "--write-budget); tests/test_profile.py fails when one grows by more than "
                      "its tolerance. Keys: op/kernel base name; lines keyed by file and source text.",
            "case": {k: list(v) if isinstance(v, tuple) else v for k, v in BUDGET_CASES.items()},
            "tolerance": 0.02, "kernels": budget_measure()}
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def _ints(text: str, what: str, n: int | None = None) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated integers, got {text!r}") from None
    if (n and len(vals) != n) or not 1 <= len(vals) <= 3 and n is None or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{what} must be {n or '1 to 3'} positive integers, got {text!r}")
    return vals


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    ap = parser or argparse.ArgumentParser(prog="python -m cupy_localrel profile")
    ap.description = ("Count the kernels' memory traffic on the CPU engine and model their time on a GPU "
                      "(every time printed is modelled, not measured).")
    ap.add_argument("--op", action="append", choices=OPS, help="op to profile, forward and backward (repeatable)")
    ap.add_argument("--shape", type=lambda s: _ints(s, "--shape", 4), default=(32, 256, 56, 56),
                    help="B,C,H,W (default 32,256,56,56)")
    ap.add_argument("--kernel-size", type=int, default=7)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--device", default="h200", choices=sorted(R.DEVICES))
    ap.add_argument("--border", default="mask", choices=("mask", "zeros", "shift"))
    ap.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="(batch, head) planes profiled per launch")
    ap.add_argument("--json", metavar="PATH", help="write the report as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown")
    ap.add_argument("--source", metavar="FILE.cu", help="profile one extern \"C\" kernel of this file")
    ap.add_argument("--kernel", help="with --source: the kernel's name")
    ap.add_argument("--grid", type=lambda s: _ints(s, "--grid"), help="with --source: X[,Y,Z]")
    ap.add_argument("--block", type=lambda s: _ints(s, "--block"), help="with --source: X[,Y,Z]")
    ap.add_argument("--shared", type=int, default=0, help="with --source: dynamic shared memory, bytes")
    ap.add_argument("--buffer-bytes", type=int, default=1 << 20, help="with --source: bytes of each pointer's buffer")
    ap.add_argument("--int", type=int, action="append", default=[], dest="ints", metavar="V",
                    help="with --source: the int parameters, in order (repeatable)")
    return ap


def run(args) -> int:
    if args.source:
        if args.op:
            print("error: --op and --source are separate modes", file=sys.stderr)
            return 2
        missing = [f for f in ("kernel", "grid", "block", "json") if getattr(args, f) is None]
        if missing:
            print(f"error: --source needs --{' --'.join(m for m in missing)}", file=sys.stderr)
            return 2
        try:
            rec = profile_source(args.source, args.kernel, args.grid, args.block, args.shared,
                                 args.buffer_bytes, args.ints, args.device)
        except (ValueError, KeyError, OSError) as e:   # the caller's arguments, said plainly
            print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
            return 2
        Path(args.json).write_text(json.dumps({"launches": [rec]}, indent=1) + "\n")
        m = rec["model"]
        print(f"{rec['kernel']}: global load {rec['global_load']}, store {rec['global_store']}; shared load "
              f"{rec['shared_load']}, store {rec['shared_store']}; barriers {rec['barriers']}; "
              f"modelled {m['predicted_us']:.2f} us on {args.device} ({m['bound']}-bound)")
        return 0
    if not args.op:
        print("error: give --op (lrnet, sasa) or --source", file=sys.stderr)
        return 2
    ok, why = engine.available()
    if not ok:
        print(f"error: the CPU engine is unavailable: {why}", file=sys.stderr)
        return 2
    rep = profile_ops(list(dict.fromkeys(args.op)), args.shape, args.kernel_size, args.dtype, args.device,
                      args.border, args.runs, log=sys.stderr)
    text = format_report(rep)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    ap.add_argument("--write-budget", action="store_true", help=f"rewrite {BUDGET_FILE.name} from today's kernels")
    args = ap.parse_args(argv)
    if args.write_budget:
        data = write_budget()
        print(f"wrote {BUDGET_FILE} ({len(data['kernels'])} kernels)")
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
