"""Compile every kernel source and instantiation with NVRTC for sm_80 and sm_90, no GPU needed.

    python -m cupy_localrel kernels                       # the package's kernels (registry)
    python -m cupy_localrel._nvrtc_check FILE.cu -n 'k<float,32>' --arch 80

NVRTC comes from the `nvidia-cuda-nvrtc-cu12` wheel (or a CUDA toolkit) and is called
through ctypes with an explicit `-arch=sm_XX`: CuPy's own compile path asks the driver for
the device's arch, which fails without a GPU. ptxas's verbose report (`-Xptxas -v`) gives
registers, shared memory and spills per kernel. Prints one line per kernel and arch; exits
non-zero on any error, including NVRTC not being loadable.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from . import _loader

DEFAULT_ARCHS = ("80", "90")


class NvrtcUnavailable(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------
# ctypes binding of the few NVRTC calls used here
# ---------------------------------------------------------------------------------------
def _nvrtc_candidates() -> list[str]:
    cands = []
    try:
        import nvidia
        for base in getattr(nvidia, "__path__", []):
            for sub in ("cuda_nvrtc/lib", "cu13/lib", "cu12/lib"):
                cands += sorted(glob.glob(os.path.join(base, sub, "libnvrtc.so*")))
    except ImportError:
        pass
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            cands += sorted(glob.glob(os.path.join(os.environ[var], "lib64", "libnvrtc.so*")))
    cands += ["libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc.so"]
    cands += sorted(glob.glob("/usr/local/cuda/lib64/libnvrtc.so*"))
    # the alternative-allocator and builtins libraries are not the API library
    return [c for c in cands if "builtins" not in c and ".alt." not in c]


class Nvrtc:
    def __init__(self):
        errors = []
        for c in _nvrtc_candidates():
            try:
                self.lib = ctypes.CDLL(c)
                self.path = c
                break
            except OSError as e:
                errors.append(f"{c}: {e}")
        else:
            raise NvrtcUnavailable(
                "NVRTC could not be loaded (pip install nvidia-cuda-nvrtc-cu12, or install a CUDA toolkit); "
                f"tried: {'; '.join(errors) or 'nothing found'}")
        L = self.lib
        L.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(L.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
        self.version = (major.value, minor.value)

    def _check(self, rc: int) -> None:
        if rc:
            raise RuntimeError(self.lib.nvrtcGetErrorString(rc).decode())

    def compile(self, source: str, name: str, options: Sequence[str], name_expressions: Sequence[str]):
        """-> (ok, log, {name expression: lowered name})."""
        return self.compile_binary(source, name, options, name_expressions)[:3]

    def compile_binary(self, source: str, name: str, options: Sequence[str], name_expressions: Sequence[str]):
        """-> (ok, log, {name expression: lowered name}, cubin bytes or None, PTX text or None).
        The cubin exists for a real architecture (-arch=sm_XX)."""
        L = self.lib
        prog = ctypes.c_void_p()
        self._check(L.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None))
        try:
            for n in name_expressions:
                self._check(L.nvrtcAddNameExpression(prog, n.encode()))
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            rc = L.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self._check(L.nvrtcGetProgramLogSize(prog, ctypes.byref(size)))
            buf = ctypes.create_string_buffer(size.value)
            self._check(L.nvrtcGetProgramLog(prog, buf))
            log = buf.value.decode(errors="replace")
            lowered, cubin, ptx = {}, None, None
            if rc == 0:
                for n in name_expressions:
                    p = ctypes.c_char_p()
                    self._check(L.nvrtcGetLoweredName(prog, n.encode(), ctypes.byref(p)))
                    lowered[n] = p.value.decode()
                cubin, ptx = self._output(prog, "CUBIN"), self._output(prog, "PTX")
            return rc == 0, log, lowered, cubin, (ptx.rstrip(b"\0").decode(errors="replace") if ptx else None)
        finally:
            L.nvrtcDestroyProgram(ctypes.byref(prog))


    def _output(self, prog, kind: str) -> bytes | None:
        """nvrtcGetCUBIN / nvrtcGetPTX, or None where this NVRTC or the arch gives none."""
        size_fn, get_fn = getattr(self.lib, f"nvrtcGet{kind}Size", None), getattr(self.lib, f"nvrtcGet{kind}", None)
        if size_fn is None or get_fn is None:
            return None
        size = ctypes.c_size_t()
        if size_fn(prog, ctypes.byref(size)) or not size.value:
            return None
        buf = ctypes.create_string_buffer(size.value)
        return buf.raw if get_fn(prog, buf) == 0 else None


def nvrtc_available() -> tuple[bool, str]:
    """(ok, description) for the compile check, e.g. for an `info` command."""
    try:
        nv = Nvrtc()
    except NvrtcUnavailable as e:
        return False, str(e)
    inc = _loader.cuda_include_dir(nv.version[0])
    return True, f"NVRTC {nv.version[0]}.{nv.version[1]} ({nv.path}); CUDA headers: {inc or 'not found'}"


# ---------------------------------------------------------------------------------------
# ptxas report
# ---------------------------------------------------------------------------------------
_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_STACK_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED_RE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, dict]:
    """{mangled kernel name: {regs, smem, stack, spill_stores, spill_loads}} from -Xptxas -v."""
    out, cur = {}, None
    for line in log.splitlines():
        m = _ENTRY_RE.search(line)
        if m:
            cur = out.setdefault(m.group(1), {"regs": 0, "smem": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0})
            continue
        if cur is None:
            continue
        m = _STACK_RE.search(line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _USED_RE.search(line)
        if m:
            cur.update(regs=int(m.group(1)), smem=int(m.group(2) or 0))
    return out


def compiler_warnings(log: str) -> list[str]:
    """NVRTC's and ptxas's warnings in a compile log (not the -v info lines)."""
    return [line.strip() for line in log.splitlines()
            if re.search(r"\bwarning\b", line, re.I) and not line.startswith(("ptxas info", "Remark"))]


# ---------------------------------------------------------------------------------------
# Checking files
# ---------------------------------------------------------------------------------------
def registry_jobs() -> list[tuple[Path, list[str]]]:
    """Every .cu file in the kernel folder with its registered name expressions."""
    files = sorted(_loader.KERNEL_DIR.glob("*.cu"))
    jobs = [(f, list(_loader.INSTANTIATIONS.get(f.name, []))) for f in files]
    missing = set(_loader.INSTANTIATIONS) - {f.name for f in files}
    for name in sorted(missing):
        jobs.append((_loader.KERNEL_DIR / name, list(_loader.INSTANTIATIONS[name])))
    return jobs


def compile_options(path: Path, arch: str, cuda_major: int | None = None) -> list[str]:
    opts = [f"-arch=sm_{arch}", "-std=c++17", "-Xptxas", "-v", "-default-device"]
    opts += [f"-I{d}" for d in _loader.include_dirs_for(path)]
    inc = _loader.cuda_include_dir(cuda_major)
    if inc is not None:
        opts.append(f"-I{inc}")
    return opts


def check_file(nv: Nvrtc, path: Path, names: Sequence[str], archs: Sequence[str], out=None) -> int:
    """Compile one file for each arch; print one line per kernel and arch. Returns #errors."""
    out = sys.stdout if out is None else out
    from ._sim.engine import find_extern_c_kernels
    if not path.is_file():
        print(f"FAIL {path.name}: file not found ({path})", file=out)
        return 1
    source = path.read_text()
    plain = [k for k in find_extern_c_kernels(source) if k not in names]
    errors = 0
    for arch in archs:
        ok, log, lowered = nv.compile(source, path.name, compile_options(path, arch, nv.version[0]), names)
        if not ok:
            errors += 1
            print(f"FAIL sm_{arch} {path.name}: NVRTC error\n{log.rstrip()}", file=out)
            if "cuda_fp16.h" in log and _loader.cuda_include_dir() is None:
                print("     (no CUDA headers found: pip install nvidia-cuda-runtime-cu12 or set CUDA_PATH)", file=out)
            continue
        for w in compiler_warnings(log):
            print(f"warn sm_{arch} {path.name}: {w}", file=out)
        usage = parse_ptxas(log)
        for n in [*names, *plain]:
            u = usage.get(lowered.get(n, n))
            stats = ("regs=? (no ptxas report)" if u is None else
                     f"regs={u['regs']} smem={u['smem']}B stack={u['stack']}B "
                     f"spill={u['spill_stores']}/{u['spill_loads']}B")
            warn = "  WARNING: spills" if u and (u["spill_stores"] or u["spill_loads"]) else ""
            print(f"ok   sm_{arch} {path.name} {n}: {stats}{warn}", file=out)
        if not names and not plain:
            print(f"ok   sm_{arch} {path.name}: compiled (no kernels found)", file=out)
    return errors


# ---------------------------------------------------------------------------------------
# Instruction mix (SASS from cuobjdump, else PTX)
# ---------------------------------------------------------------------------------------
MIX_KEYS = ("global_load", "global_store", "shared_load", "shared_store", "local", "ffma", "mufu",
            "barrier", "atomic", "total", "memory_words")
# memory_words: the global/shared loads and stores and atomics counted in 4-byte units of
# width per lane (LDS.128 = 4, LDG.E.64 = 2, anything up to 4 bytes = 1): what the same data
# would take in 4-byte instructions (the issue proxy's denominator, _profile.py).
# MEMORY_CLASSES: the classes of memory instructions (also _profile.instructions_per_request).
MEMORY_CLASSES = ("global_load", "global_store", "shared_load", "shared_store", "atomic")
_SASS_CLASSES = {"LDG": "global_load", "STG": "global_store", "LDS": "shared_load", "LDSM": "shared_load",
                 "STS": "shared_store", "LDL": "local", "STL": "local", "FFMA": "ffma", "MUFU": "mufu",
                 "BAR": "barrier", "ATOM": "atomic", "ATOMG": "atomic", "ATOMS": "atomic", "RED": "atomic"}
_SASS_RE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")
_PTX_CLASSES = (("ld.global", "global_load"), ("st.global", "global_store"), ("ld.shared", "shared_load"),
                ("st.shared", "shared_store"), ("ld.local", "local"), ("st.local", "local"),
                ("fma.rn.f32", "ffma"), ("ex2.approx", "mufu"), ("lg2.approx", "mufu"), ("rcp.approx", "mufu"),
                ("rsqrt.approx", "mufu"), ("sin.approx", "mufu"), ("cos.approx", "mufu"), ("bar.sync", "barrier"),
                ("barrier.sync", "barrier"), ("atom.", "atomic"), ("red.", "atomic"))


def find_cuobjdump() -> str | None:
    """cuobjdump from PATH, the nvidia-cuda-cuobjdump wheel, $CUDA_PATH or /usr/local/cuda."""
    import shutil
    cands = [shutil.which("cuobjdump")]
    try:
        import nvidia
        for base in getattr(nvidia, "__path__", []):
            for sub in ("cu13/bin", "cu12/bin", "cuda_cuobjdump/bin"):
                cands.append(os.path.join(base, sub, "cuobjdump"))
    except ImportError:
        pass
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", "cuobjdump"))
    cands.append("/usr/local/cuda/bin/cuobjdump")
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _sass_words(modifiers: str) -> int:
    """4-byte words per lane of a SASS memory instruction from its modifiers (``.128``, ``.64``)."""
    mods = modifiers.split(".")
    return 4 if "128" in mods else 2 if "64" in mods else 1


def _count_sass(mix: dict, opcode: str, modifiers: str) -> None:
    mix["total"] += 1
    cls = _SASS_CLASSES.get(opcode)
    if cls:
        mix[cls] += 1
        if cls in MEMORY_CLASSES:
            mix["memory_words"] += _sass_words(modifiers)


_PTX_BITS = re.compile(r"\.(?:[bfsu])(8|16|32|64)\b")


def _ptx_words(text: str) -> int:
    """4-byte words per lane of a PTX memory instruction (``.v4.f32`` = 4, ``.f64`` = 2)."""
    vec = re.search(r"\.v(2|4|8)\b", text.split()[0])
    bits = _PTX_BITS.search(text.split()[0])
    return max(1, (int(vec.group(1)) if vec else 1) * (int(bits.group(1)) if bits else 32) // 32)


def sass_mix(sass: str) -> dict[str, dict[str, int]]:
    """{mangled function: {class: count}} from ``cuobjdump -sass`` text (static counts)."""
    out: dict[str, dict[str, int]] = {}
    cur = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), dict.fromkeys(MIX_KEYS, 0))
            continue
        m = _SASS_RE.search(line) if cur is not None else None
        if not m or m.group(1) == "NOP":
            continue
        _count_sass(cur, m.group(1), m.group(2))
    return out


def ptx_mix(ptx: str) -> dict[str, dict[str, int]]:
    """{mangled function: {class: count}} from PTX text (static counts, virtual ISA)."""
    out: dict[str, dict[str, int]] = {}
    cur = None
    for line in ptx.splitlines():
        t = line.strip()
        m = re.match(r"\.(?:visible\s+)?\.entry\s+(\w+)", t)
        if m:
            cur = out.setdefault(m.group(1), dict.fromkeys(MIX_KEYS, 0))
            continue
        if cur is None or not t.endswith(";") or t.startswith((".", "//")):
            continue
        t = re.sub(r"^@!?%p\d+\s+", "", t)
        cur["total"] += 1
        for prefix, cls in _PTX_CLASSES:
            if t.startswith(prefix):
                cur[cls] += 1
                if cls in MEMORY_CLASSES:
                    cur["memory_words"] += _ptx_words(t)
                break
    return out


def instruction_mix(path: Path, names: Sequence[str], arch: str = "90") -> dict:
    """Static instruction mix of each kernel of a file, compiled by NVRTC for sm_``arch``.

    Returns ``{"tool": "cuobjdump" | "ptx", "arch": ..., "kernels": {name: {class: count}},
    "note": ...}``: SASS from ``cuobjdump -sass`` of the NVRTC cubin when cuobjdump is found
    (the nvidia-cuda-cuobjdump wheel, the ``nvrtc`` extra), else the PTX (what the
    assembler starts from, a weaker guide). Raises NvrtcUnavailable without NVRTC.
    """
    import subprocess
    import tempfile
    from ._sim.engine import find_extern_c_kernels
    nv = Nvrtc()
    source = Path(path).read_text()
    names = list(names)
    plain = [k for k in find_extern_c_kernels(source) if k not in names]
    opts = [o for o in compile_options(Path(path), arch, nv.version[0]) if o not in ("-Xptxas", "-v")]
    ok, log, lowered, cubin, ptx = nv.compile_binary(source, Path(path).name, opts, names)
    if not ok:
        raise RuntimeError(f"NVRTC could not compile {path}:\n{log}")
    tool, note, mixes = "ptx", "cuobjdump not found: PTX counts", {}
    cuobjdump = find_cuobjdump()
    if cuobjdump and cubin:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            # cuobjdump calls nvdisasm, which the wheels put beside it
            env = dict(os.environ, PATH=os.path.dirname(cuobjdump) + os.pathsep + os.environ.get("PATH", ""))
            r = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, env=env)
        if r.returncode == 0:
            tool, note, mixes = "cuobjdump", f"SASS sm_{arch} ({cuobjdump})", sass_mix(r.stdout)
        else:
            note = f"cuobjdump failed ({r.stderr.strip()[:200]}): PTX counts"
    if tool == "ptx":
        mixes = ptx_mix(ptx or "")
    kernels = {}
    for n in [*names, *plain]:
        mix = mixes.get(lowered.get(n, n))
        if mix is not None:
            kernels[n] = mix
    return {"tool": tool, "arch": f"sm_{arch}", "kernels": kernels, "note": note}


_TEXT_RE = re.compile(r"^\.text\.(\S+):$")
_FILE_LINE_RE = re.compile(r'//## File "([^"]+)", line (\d+)')
_BLOCK_ENDS = frozenset({"BRA", "BRX", "JMP", "JMX", "EXIT", "RET"})


def _sass_walk(disassembly: str, marked: frozenset = frozenset()):
    """Yield (mangled function, ``file:line``, opcode, modifiers, starts_block) for each SASS
    instruction of ``nvdisasm -g``/``-gi`` text (NOPs left out). -gi prints an instruction's
    inline chain as consecutive comments, innermost first: the line is the CPU engine's for
    the same chain (_sim.profile.kernel_line: past the toolkit's headers and the lines
    marked "profile: caller's line", the wide loads' helpers; ``marked``: more such
    ``file:line``); -g prints only the innermost. A block starts at a label and after a
    branch, exit or return: the instructions of one basic block run equally often."""
    from ._sim.profile import kernel_line
    func, chain, in_comments, new_block = None, [], False, True
    for line in disassembly.splitlines():
        t = line.strip()
        m = _TEXT_RE.match(t)
        if m:
            func, chain, in_comments, new_block = m.group(1), [], False, True
            continue
        m = _FILE_LINE_RE.search(t)
        if m:
            if not in_comments:
                chain, in_comments = [], True
            chain.append((m.group(1), m.group(2)))
            continue
        if t.startswith(".L") and t.endswith(":"):
            new_block = True
            continue
        m = _SASS_RE.search(t)
        if func is None or not chain or not m or m.group(1) == "NOP":
            continue
        in_comments = False
        innermost = f"{Path(chain[0][0]).name}:{chain[0][1]}"
        where = kernel_line(chain, marked) or innermost
        yield func, where, m.group(1), m.group(2), new_block
        new_block = m.group(1) in _BLOCK_ENDS


def sass_line_mix(disassembly: str, marked: frozenset = frozenset()) -> dict[str, dict[str, dict[str, int]]]:
    """{mangled function: {``file:line``: {class: count}}} from ``nvdisasm -g``/``-gi`` text:
    the static SASS instructions the compiler attributes to each source line (-lineinfo)."""
    out: dict = {}
    for func, where, opcode, modifiers, _ in _sass_walk(disassembly, marked):
        _count_sass(out.setdefault(func, {}).setdefault(where, dict.fromkeys(MIX_KEYS, 0)), opcode, modifiers)
    return out


def sass_blocks(disassembly: str, marked: frozenset = frozenset()) -> dict[str, list[dict]]:
    """{mangled function: [block]}: the basic blocks of each function in program order, each
    ``{"instructions": n, "words": {file:line: memory words}}`` (lines as in sass_line_mix,
    the CPU engine's attribution). How often a block runs follows from the engine's dynamic
    requests of its lines (_profile.block_instructions)."""
    out: dict = {}
    for func, where, opcode, modifiers, starts in _sass_walk(disassembly, marked):
        blocks = out.setdefault(func, [])
        if starts or not blocks:
            blocks.append({"instructions": 0, "words": {}})
        block = blocks[-1]
        block["instructions"] += 1
        if _SASS_CLASSES.get(opcode) in MEMORY_CLASSES:
            block["words"][where] = block["words"].get(where, 0) + _sass_words(modifiers)
    return out


def sass_lines(path: Path, names: Sequence[str], arch: str = "90") -> dict:
    """{name expression: ({``file:line``: {class: count}}, [block])}: each kernel's SASS per
    source line (sass_line_mix) and its basic blocks (sass_blocks), from an NVRTC cubin built
    with -lineinfo and disassembled by nvdisasm (beside cuobjdump). {} when no nvdisasm is
    found."""
    import subprocess
    import tempfile
    cuobjdump = find_cuobjdump()
    nvdisasm = os.path.join(os.path.dirname(cuobjdump), "nvdisasm") if cuobjdump else None
    if not nvdisasm or not os.path.isfile(nvdisasm):
        return {}
    nv = Nvrtc()
    source = Path(path).read_text()
    opts = [o for o in compile_options(Path(path), arch, nv.version[0]) if o not in ("-Xptxas", "-v")]
    ok, log, lowered, cubin, _ = nv.compile_binary(source, Path(path).name, opts + ["-lineinfo"], list(names))
    if not ok or not cubin:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run([nvdisasm, "-gi", "-c", f.name], capture_output=True, text=True)
    if r.returncode:
        return {}
    by_mangled, blocks = sass_line_mix(r.stdout), sass_blocks(r.stdout)
    from ._sim.engine import find_extern_c_kernels
    names = [*names, *[k for k in find_extern_c_kernels(source) if k not in names]]
    return {n: (by_mangled[lowered.get(n, n)], blocks.get(lowered.get(n, n), []))
            for n in names if lowered.get(n, n) in by_mangled}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cupy_localrel kernels",
                                 description="Compile CUDA kernels with NVRTC for each arch (no GPU needed).")
    ap.add_argument("files", nargs="*", help=".cu files (default: every file of the package's kernel registry)")
    ap.add_argument("-n", "--name-expression", action="append", default=[], dest="names",
                    help="template instantiation to compile, for every file given (repeatable)")
    ap.add_argument("--registry", metavar="JSON",
                    help="JSON {file name: [name expression, ...]} for the files given "
                         "(default: the package's kernels/instantiations.json)")
    ap.add_argument("--arch", action="append", default=None,
                    help="compute capability like 80 or sm_90 (repeatable; default 80 and 90)")
    args = ap.parse_args(argv)
    archs = [a.replace("sm_", "").replace("compute_", "") for a in (args.arch or DEFAULT_ARCHS)]
    try:
        nv = Nvrtc()
    except NvrtcUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    registry = _loader.INSTANTIATIONS
    if args.registry:
        import json
        registry = json.loads(Path(args.registry).read_text())
    if args.files:
        jobs = [(Path(f).resolve(), args.names or list(registry.get(Path(f).name, []))) for f in args.files]
    else:
        jobs = registry_jobs()
    print(f"NVRTC {nv.version[0]}.{nv.version[1]} ({nv.path}); CUDA headers: {_loader.cuda_include_dir()}")
    if not jobs:
        print(f"no kernel sources in {_loader.KERNEL_DIR}")
    errors = sum(check_file(nv, p, names, archs) for p, names in jobs)
    print(f"{len(jobs)} file(s), {len(archs)} arch(s): {errors} error(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
