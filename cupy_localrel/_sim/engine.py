"""CPU execution of CUDA C kernel sources: compile with g++ against cudasim.h, launch via ctypes.

`SimModule` / `SimKernel` have the call shape of `cupy.RawModule` / `cupy.RawKernel`:
``module.get_function(name)(grid, block, args, shared_mem=0)``, with NumPy arrays standing
in for device pointers. See cudasim.h for the execution model.

Settings (a `SimKernel` attribute wins over its `SimModule`'s, which wins over the
environment, read at each launch):

- ``seed``: thread order in each barrier phase. 0 forward (default), 1 reversed, any other
  int shuffled with that seed. Env ``CUPY_LOCALREL_SIM_SEED``.
- ``workers``: OS threads running blocks. Default: usable cores. Env
  ``CUPY_LOCALREL_SIM_WORKERS``.
- ``stack_kb``: stack of each CUDA thread (fiber), KiB. Default 256 (virtual memory, only
  touched pages cost). Env ``CUPY_LOCALREL_SIM_STACK_KB``.

Build-time environment: ``CUPY_LOCALREL_SIM_ASAN=1`` builds with AddressSanitizer and
``CUPY_LOCALREL_SIM_TSAN=1`` with ThreadSanitizer (the process must preload the runtime,
see `sanitizer_env`); ``CUPY_LOCALREL_SIM_PROFILE=1`` builds with memory-traffic counters
(profile mode: every launch of such a module appends a `profile.LaunchCounters` to
``module.launches``; see profile.py and kernels/PROFILING.md); ``CUPY_LOCALREL_CACHE`` moves the cache of
compiled libraries (default ``$XDG_CACHE_HOME/cupy_localrel`` or ``~/.cache/cupy_localrel``);
``CUPY_LOCALREL_CXX`` picks the compiler (default ``g++``, version 12 or later).
"""
from __future__ import annotations

import bisect
import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HEADER_DIR = Path(__file__).resolve().parent
HEADERS = ("cudasim.h", "cuda_fp16.h", "cuda_bf16.h", "math_constants.h")

ENV_SEED = "CUPY_LOCALREL_SIM_SEED"
ENV_WORKERS = "CUPY_LOCALREL_SIM_WORKERS"
ENV_STACK_KB = "CUPY_LOCALREL_SIM_STACK_KB"
ENV_ASAN = "CUPY_LOCALREL_SIM_ASAN"
ENV_TSAN = "CUPY_LOCALREL_SIM_TSAN"
ENV_PROFILE = "CUPY_LOCALREL_SIM_PROFILE"
ENV_CACHE = "CUPY_LOCALREL_CACHE"
ENV_CXX = "CUPY_LOCALREL_CXX"

DEFAULT_STACK_KB = 256
MAX_ARGS = 64
# Above 48 KiB, CUDA needs the kernel's max_dynamic_shared_size_bytes attribute raised.
DEFAULT_DYN_SMEM_LIMIT = 48 * 1024
MAX_DYN_SMEM = 227 * 1024  # sm_90's opt-in maximum per block

# -ftrivial-auto-var-init=pattern: uninitialised locals (registers on the GPU) hold a
# recognisable garbage pattern instead of whatever the previous block left on the fiber stack.
_BASE_FLAGS = ("-std=c++20", "-O2", "-g", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing",
               "-ftrivial-auto-var-init=pattern", "-Wno-attributes", "-Wno-unused-result")
# The x86-64 fiber switch returns to another fiber's address: mark the library as not
# shadow-stack (CET) compatible, whatever the compiler's default.
_ARCH_FLAGS = ("-fcf-protection=none",) if platform.machine() in ("x86_64", "AMD64") else ()
_SANITIZER_FLAGS = ("-fno-omit-frame-pointer", "-O1")
# Profile mode: ThreadSanitizer's instrumentation (a call per load/store) without its runtime;
# profile_rt.cc counts instead. -O2 as usual, so that g++ keeps what it can in registers.
PROFILE_RUNTIME = HEADER_DIR / "profile_rt.cc"
# DWARF 4: binutils' addr2line then names the #line files rather than "<stdin>".
_PROFILE_FLAGS = ("-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0", "-DCUDASIM_PROFILE",
                  "-gdwarf-4")


# ---------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------
def compiler() -> str:
    return os.environ.get(ENV_CXX, "g++")


MIN_GCC = 12   # _Float16 on x86-64, -ftrivial-auto-var-init


def available() -> tuple[bool, str]:
    """(True, description) when kernels can be compiled and run on this machine."""
    if not sys.platform.startswith("linux"):
        return False, f"the CPU kernel engine needs Linux (ucontext fibers); this is {sys.platform}"
    return _compiler_status(compiler())


@functools.lru_cache(maxsize=None)
def _compiler_status(cxx: str) -> tuple[bool, str]:
    path = shutil.which(cxx)
    if path is None:
        return False, f"C++ compiler {cxx!r} (g++ >= {MIN_GCC}) not found on PATH; install g++"
    try:
        version = subprocess.run([path, "-dumpfullversion", "-dumpversion"], capture_output=True,
                                 text=True, timeout=60).stdout.strip()
        major = int(version.split(".")[0])
    except (OSError, ValueError, subprocess.SubprocessError):
        return False, f"cannot tell the version of the C++ compiler {path}"
    if "clang" not in _cxx_version(path).lower() and major < MIN_GCC:
        return False, f"g++ {version} at {path} is too old: the CPU engine needs g++ >= {MIN_GCC}"
    return True, f"g++ {version} ({path})" if "clang" not in _cxx_version(path).lower() else f"{path}"


def cache_dir() -> Path:
    """Where compiled kernel libraries are kept ($CUPY_LOCALREL_CACHE, else the user cache)."""
    if os.environ.get(ENV_CACHE):
        base = Path(os.environ[ENV_CACHE])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cupy_localrel"
    return base / "sim"


# Sanitizer modes: the compiler flag, the runtime library, its options for a child process.
SANITIZERS = {
    "address": ("-fsanitize=address", "libasan", "ASAN_OPTIONS", "detect_leaks=0"),
    "thread": ("-fsanitize=thread", "libtsan", "TSAN_OPTIONS", "report_signal_unsafe=0"),
}


def requested_sanitizer() -> str | None:
    """The sanitizer the environment asks for: CUPY_LOCALREL_SIM_ASAN / _TSAN."""
    for env, name in ((ENV_ASAN, "address"), (ENV_TSAN, "thread")):
        if os.environ.get(env, "").strip().lower() not in ("", "0", "false", "no"):
            return name
    return None


def profile_requested() -> bool:
    """True when CUPY_LOCALREL_SIM_PROFILE asks for profile-mode builds."""
    return os.environ.get(ENV_PROFILE, "").strip().lower() not in ("", "0", "false", "no")


def asan_requested() -> bool:
    return requested_sanitizer() == "address"


def _sanitizer_name(sanitize) -> str | None:
    if sanitize is None:
        return requested_sanitizer()
    if sanitize is True:
        return "address"
    if not sanitize:
        return None
    if sanitize not in SANITIZERS:
        raise ValueError(f"sanitize must be True/False, 'address' or 'thread', got {sanitize!r}")
    return sanitize


def runtime_path(sanitizer: str = "address") -> str:
    """Path of the sanitizer runtime (libasan.so / libtsan.so) that g++ links against."""
    lib = SANITIZERS[sanitizer][1]
    r = subprocess.run([compiler(), f"-print-file-name={lib}.so"], capture_output=True, text=True)
    return r.stdout.strip()


def libasan_path() -> str:
    return runtime_path("address")


def sanitizer_env(sanitizer: str = "address", base: dict | None = None) -> dict:
    """Environment for a child process that loads sanitizer-instrumented kernels.

    The runtime must be the first library of the process, hence LD_PRELOAD. ASan's leak
    check is off because the Python interpreter itself never frees everything.
    """
    _flag, _lib, opt_var, opts = SANITIZERS[sanitizer]
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = runtime_path(sanitizer)
    env.setdefault(opt_var, opts)
    env[ENV_ASAN if sanitizer == "address" else ENV_TSAN] = "1"
    return env


def asan_env(base: dict | None = None) -> dict:
    return sanitizer_env("address", base)


def _runtime_loaded(sanitizer: str) -> bool:
    try:
        with open("/proc/self/maps") as f:
            return SANITIZERS[sanitizer][1] in f.read()
    except OSError:
        return False


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------
# Source handling
# ---------------------------------------------------------------------------------------
_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[^\n]*$', re.M)


def _blank_comments(src: str) -> str:
    """Same-length copy of `src` with comments replaced by spaces (newlines kept)."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i)); i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", src[i:j])); i = j
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            out.append(src[i:j + 1]); i = j + 1
        else:
            out.append(c); i += 1
    return "".join(out)


def inline_includes(path: Path, include_dirs: Sequence[Path], _seen: set | None = None) -> str:
    """The text of `path` with its quoted #includes of local files pasted in, with #line
    markers so that compiler and sanitizer messages name the original file and line.

    Each local file is pasted once (local headers are expected to be include-once).
    Angle-bracket includes are left for the compiler.
    """
    seen = set() if _seen is None else _seen
    path = path.resolve()
    seen.add(path)
    text = path.read_text()
    lines = text.split("\n")
    blank = _blank_comments(text).split("\n")
    out = [f'#line 1 "{path}"']
    for no, (line, bl) in enumerate(zip(lines, blank), start=1):
        m = _INCLUDE_RE.match(bl)
        if not m:
            out.append(line)
            continue
        target = _resolve_include(m.group(1), path.parent, include_dirs)
        if target is None:          # not ours: let the compiler find it
            out.append(line)
            continue
        if target not in seen:
            out.append(inline_includes(target, include_dirs, seen))
        out.append(f'#line {no + 1} "{path}"')
    return "\n".join(out)


def _resolve_include(name: str, here: Path, include_dirs: Sequence[Path]) -> Path | None:
    for d in (here, *include_dirs):
        p = Path(d) / name
        if p.is_file():
            return p.resolve()
    return None


def include_closure(path: Path, include_dirs: Sequence[Path]) -> list[Path]:
    """`path` and every local file it includes (quoted includes), recursively."""
    todo, seen = [Path(path).resolve()], []
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        for m in _INCLUDE_RE.finditer(_blank_comments(p.read_text())):
            t = _resolve_include(m.group(1), p.parent, include_dirs)
            if t is not None:
                todo.append(t)
    return seen


_SHARED_RE = re.compile(r"\b(extern\s+)?__shared__\b([^;]*);")
_ALIGN_RE = re.compile(r"\b(?:__align__|alignas)\s*\(\s*[^()]*\)")


def _blank_directives(blank: str) -> str:
    """`blank` with preprocessor lines (and their continuations) replaced by spaces."""
    return re.sub(r"^[ \t]*#(?:[^\n]*\\\n)*[^\n]*", lambda m: re.sub(r"[^\n]", " ", m.group(0)), blank,
                  flags=re.M)


def _split_top(s: str, sep: str = ",") -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "<([{":
            depth += 1
        elif ch in ">)]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur)); cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _scope_kinds(blank: str) -> list[tuple[int, bool]]:
    """Sorted (offset, in_code) change points: in_code is True inside a function body."""
    stack, changes = [], [(0, False)]
    last_stmt = 0
    for i, ch in enumerate(blank):
        if ch == "{":
            head = blank[last_stmt:i]
            is_ns = bool(re.search(r'\bnamespace\b|\bextern\s+"C"\s*$', head)) and not any(stack)
            stack.append(not is_ns and (any(stack) or "(" in head))
            changes.append((i + 1, any(stack)))
            last_stmt = i + 1
        elif ch == "}":
            if stack:
                stack.pop()
            changes.append((i + 1, any(stack)))
            last_stmt = i + 1
        elif ch == ";":
            last_stmt = i + 1
    return changes


def rewrite_shared(src: str) -> str:
    """Turn `__shared__` declarations into per-block storage owned by the engine.

    * ``extern __shared__ T name[];`` -> ``T* name = (T*)::cudasim::dyn_smem();`` (every
      such declaration aliases the one dynamic buffer, as in CUDA);
      At file scope, where no code may run, the name becomes a macro for that expression
      (a ``#line`` keeps the line numbers);
    * ``__shared__ T a[N], b;`` inside functions ->
      ``auto& a = ::cudasim::shared_var<T[N], site>(); auto& b = ...;``: storage that is
      re-poisoned at each block start. File-scope declarations, and declarations made by
      macros, are left to the `thread_local` fallback of cudasim.h.
    """
    blank = _blank_directives(_blank_comments(src))
    scopes = _scope_kinds(blank)
    offsets = [o for o, _ in scopes]
    out, pos, site = [], 0, 0
    for m in _SHARED_RE.finditer(blank):
        decl = _ALIGN_RE.sub(" ", src[m.start(2):m.end(2)]).strip()
        in_code = scopes[bisect.bisect_right(offsets, m.start()) - 1][1]
        if m.group(1):
            repl = _rewrite_dynamic(decl, None if in_code else _logical_line(src, m.start()))
        elif in_code:
            repl = _rewrite_static(decl, site)
            site += decl.count(",") + 1
        else:
            repl = None
        if repl is not None:
            out += [src[pos:m.start()], repl]
            pos = m.end()
    out.append(src[pos:])
    return "".join(out)


def _rewrite_dynamic(decl: str, file_scope_line: int | None) -> str | None:
    m = re.match(r"(.*?)(\w+)\s*\[\s*\]\s*$", decl, re.S)
    if not m:
        return None
    typ, name = m.group(1).strip(), m.group(2)
    if file_scope_line is None:
        return f"{typ}* {name} = ({typ}*)::cudasim::dyn_smem();"
    return f"\n#define {name} (({typ}*)::cudasim::dyn_smem())\n#line {file_scope_line}\n"


def _logical_line(src: str, pos: int) -> int:
    """Line number of offset `pos` as the compiler reports it (after #line markers)."""
    start = 0
    line0 = 1
    for m in re.finditer(r"^#line (\d+)[^\n]*\n", src[:pos], re.M):
        start, line0 = m.end(), int(m.group(1))
    return line0 + src.count("\n", start, pos)


def _rewrite_static(decl: str, site: int) -> str | None:
    parts = _split_top(decl)
    first = re.match(r"(.*?)(\w+)\s*((?:\[[^\]]*\]\s*)*)$", parts[0].strip(), re.S)
    if not first or not first.group(1).strip():
        return None
    base = first.group(1).strip()
    decls = [(first.group(2), first.group(3))]
    for part in parts[1:]:
        pm = re.match(r"\s*(\w+)\s*((?:\[[^\]]*\]\s*)*)$", part)
        if not pm:
            return None
        decls.append((pm.group(1), pm.group(2)))
    return " ".join(f"auto& {name} = ::cudasim::shared_var<{base}{''.join(dims.split())}, {site + j}>();"
                    for j, (name, dims) in enumerate(decls))


_GLOBAL_RE = re.compile(r"\b__global__\b")
_SKIP_WORDS = {"void", "static", "inline", "__noinline__", "__forceinline__", "__launch_bounds__",
               "__device__", "__host__"}


def find_extern_c_kernels(src: str) -> list[str]:
    """Names of the `extern "C"` __global__ functions in `src` (declared or defined)."""
    blank = _blank_comments(src)
    extern_blocks = []
    for m in re.finditer(r'extern\s+"C"\s*\{', blank):
        depth, i = 1, m.end()
        while i < len(blank) and depth:
            depth += {"{": 1, "}": -1}.get(blank[i], 0)
            i += 1
        extern_blocks.append((m.end(), i))
    names = []
    for m in _GLOBAL_RE.finditer(blank):
        head_start = max(blank.rfind(";", 0, m.start()), blank.rfind("}", 0, m.start()),
                         blank.rfind("{", 0, m.start())) + 1
        head = blank[head_start:m.start()]
        if "template" in head:
            continue
        if not (re.search(r'extern\s+"C"', head) or any(a <= m.start() < b for a, b in extern_blocks)):
            continue
        name = _kernel_name_after(blank, m.end())
        if name and name not in names:
            names.append(name)
    return names


def _kernel_name_after(blank: str, i: int) -> str | None:
    """The function name after `__global__` at offset i: the first identifier followed by `(`,
    skipping `void`, qualifiers, attribute macros and `__launch_bounds__(...)`."""
    tok = re.compile(r"\s*(\w+|\S)")
    while True:
        m = tok.match(blank, i)
        if not m:
            return None
        word, i = m.group(1), m.end()
        if word == "__launch_bounds__":
            j = blank.find("(", i)
            if j < 0:
                return None
            depth = 0
            while j < len(blank):
                depth += {"(": 1, ")": -1}.get(blank[j], 0)
                j += 1
                if depth == 0:
                    break
            i = j
        elif word in _SKIP_WORDS:
            continue
        elif re.fullmatch(r"\w+", word):
            if re.match(r"\s*\(", blank[i:]):
                return word
            # an attribute macro such as `#define BOUNDS __launch_bounds__(128)`: skip it
        else:
            return None


def kernel_qualifiers(src: str) -> dict[str, str | None]:
    """{kernel name: the text between `__global__` and the name, minus `void` and the like}.

    That text holds `__launch_bounds__(...)`, possibly behind a macro. None marks a name whose
    bounds cannot be evaluated on its own: declared with different qualifiers, or a template
    whose qualifiers mention its template parameters.
    """
    blank = _blank_comments(src)
    out: dict[str, str | None] = {}
    for m in _GLOBAL_RE.finditer(blank):
        name = _kernel_name_after(blank, m.end())
        if not name:
            continue
        end = re.compile(rf"\b{re.escape(name)}\s*\(").search(blank, m.end()).start()
        qual = " ".join(w for w in re.split(r"(\W)", blank[m.end():end]) if w not in _SKIP_WORDS - {
            "__launch_bounds__"}).strip()
        qual = re.sub(r"\s+", " ", qual)
        head = blank[max(blank.rfind(";", 0, m.start()), blank.rfind("}", 0, m.start())) + 1:m.start()]
        tm = re.search(r"template\s*<(.*)>", head, re.S)
        if tm and set(re.findall(r"\w+", qual)) & set(re.findall(r"\w+", tm.group(1))):
            qual = None
        if name in out and out[name] != qual:
            qual = None
        out[name] = qual
    return out


def _bounds_helper(i: int, qual: str | None) -> str:
    """C++ returning the maxThreadsPerBlock of `__launch_bounds__` in `qual` (0 if none):
    the macro is redefined to a return statement, so macros around it expand as usual."""
    if not qual:
        return ""
    return f'extern "C" long long __sim_bounds_{i}() {{ {qual} ; return 0; }}\n'


def translation_unit(src: str, names: Sequence[str], with_bounds: bool = True) -> str:
    """The C++ file g++ compiles: engine header, rewritten kernel source, launch wrappers
    and (with_bounds) one function per kernel returning its __launch_bounds__ thread limit."""
    wrappers = []
    for i, n in enumerate(names):
        wrappers.append(
            f'extern "C" int __sim_launch_{i}(const ::cudasim::LaunchConfig* c, void** a, char* e, size_t n)'
            f" {{ return ::cudasim::launch(&{n}, c, a, e, n); }}\n"
            f'extern "C" int __sim_sig_{i}(::cudasim::ParamInfo* p, int max)'
            f" {{ return ::cudasim::signature(&{n}, p, max); }}\n")
    bounds = ""
    if with_bounds:
        quals = kernel_qualifiers(src)
        bounds = "".join(_bounds_helper(i, quals.get(re.split(r"\s*<", n)[0].split("::")[-1].strip()))
                         for i, n in enumerate(names))
        if bounds:
            bounds = ("#undef __launch_bounds__\n#define __launch_bounds__(n, ...) return (long long)(n);\n"
                      + bounds)
    return ('#include "cudasim.h"\n' + rewrite_shared(src) + "\n#line 1 \"<cudasim launch wrappers>\"\n"
            + "".join(wrappers) + bounds)


# ---------------------------------------------------------------------------------------
# Build and load
# ---------------------------------------------------------------------------------------
_LIB_CACHE: dict[str, ctypes.CDLL] = {}
_LIB_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _cxx_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return ""


def _passthrough_options(options: Sequence[str]) -> list[str]:
    """Keep the NVRTC options that mean the same to g++ (-D, -U, -I); drop the rest
    (-arch, -std=c++17, --use_fast_math, ...)."""
    out, it = [], iter(options)
    for o in it:
        if o in ("-D", "-U", "-I"):
            out += [o, next(it, "")]
        elif o.startswith(("-D", "-U", "-I")):
            out.append(o)
        elif o.startswith("--include-path="):
            out.append("-I" + o.split("=", 1)[1])
        elif o.startswith("--define-macro="):
            out.append("-D" + o.split("=", 1)[1])
    return out


def build(source: str | Path, name_expressions: Sequence[str] = (), *, options: Sequence[str] = (),
          include_dirs: Sequence[str | Path] = (), sanitize: bool | str | None = None,
          profile: bool | None = None) -> SimModule:
    """Compile a kernel source file for the CPU (cached) and return a SimModule.

    sanitize: True or "address" (AddressSanitizer: out-of-bounds accesses), "thread"
    (ThreadSanitizer: races between CUDA threads that no barrier/collective orders), False,
    or None to follow CUPY_LOCALREL_SIM_ASAN / CUPY_LOCALREL_SIM_TSAN.
    profile: build with the memory-traffic counters (see profile.py); None follows
    CUPY_LOCALREL_SIM_PROFILE. Not combined with a sanitizer.
    """
    ok, why = available()
    if not ok:
        raise RuntimeError(f"sim backend unavailable: {why}")
    path = Path(source).resolve()
    include_dirs = [Path(d).resolve() for d in include_dirs]
    sanitizer = _sanitizer_name(sanitize)
    profile = profile_requested() if profile is None else bool(profile)
    if profile and sanitizer:
        raise ValueError(f"profile mode cannot be combined with the {sanitizer} sanitizer")
    if sanitizer and not _runtime_loaded(sanitizer):
        flag, lib, opt_var, opts = SANITIZERS[sanitizer]
        raise RuntimeError(
            f"sim {flag} mode needs the {lib} runtime loaded first in the process: run Python as "
            f"LD_PRELOAD={runtime_path(sanitizer)} {opt_var}={opts} python ... "
            f"(cupy_localrel._sim.engine.sanitizer_env({sanitizer!r}) builds that environment for a subprocess)")
    code = inline_includes(path, include_dirs)
    names = find_extern_c_kernels(code)
    names += [n for n in name_expressions if n not in names]
    sanitizer_flags = (SANITIZERS[sanitizer][0], *_SANITIZER_FLAGS) if sanitizer else ()
    sanitizer_flags += _PROFILE_FLAGS if profile else ()
    flags = [*_BASE_FLAGS, *_ARCH_FLAGS, *sanitizer_flags, "-I", str(HEADER_DIR),
             *[f"-I{d}" for d in (path.parent, *include_dirs)], *_passthrough_options(options)]
    try:
        so = _compile_cached(translation_unit(code, names), flags, profile)
    except RuntimeError as e:
        # The __launch_bounds__ helpers are a best effort (a macro may expand to more than
        # the bounds); without them the thread limit is simply not checked.
        if "__sim_bounds_" not in str(e):
            raise
        so = _compile_cached(translation_unit(code, names, with_bounds=False), flags, profile)
    with _LIB_LOCK:
        lib = _LIB_CACHE.get(str(so))
        if lib is None:
            lib = _LIB_CACHE[str(so)] = ctypes.CDLL(str(so))
    module = SimModule(lib, names, str(path))
    module.library = str(so)
    module.profiling = profile
    return module


def _compile_cached(tu: str, flags: list[str], profile: bool = False) -> Path:
    h = hashlib.sha256()
    runtime = (PROFILE_RUNTIME.read_text(),) if profile else ()
    for part in (tu, repr(flags), _cxx_version(compiler()), *((HEADER_DIR / f).read_text() for f in HEADERS),
                 *runtime):
        h.update(part.encode()); h.update(b"\0")
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    so = d / f"{h.hexdigest()[:24]}.so"
    if _touch(so):
        return so
    # Concurrent processes (pytest-xdist) wanting the same library: one builds while the
    # others wait on the lock; the build goes to a unique temporary name and is renamed into
    # place, so a reader never sees a partial file even where locks do not work.
    with open(d / f"{so.stem}.lock", "w") as lock:
        _flock(lock)
        if _touch(so):
            return so
        fd, tmp = tempfile.mkstemp(dir=d, prefix=so.stem + ".", suffix=".tmp")
        os.close(fd)
        try:
            if profile:
                _compile_profiled(tu, flags, tmp)
            else:
                _run_cxx([compiler(), *flags, "-x", "c++", "-", "-o", tmp], tu)
            os.replace(tmp, so)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    _prune(d)
    return so


def _run_cxx(cmd: list[str], stdin: str | None = None) -> None:
    try:
        r = subprocess.run(cmd, input=stdin, text=True, capture_output=True)
    except FileNotFoundError:
        raise RuntimeError(f"sim backend unavailable: C++ compiler {compiler()!r} (g++) not found") from None
    if r.returncode:
        raise RuntimeError(f"g++ failed to compile the kernels for the CPU engine:\n{r.stderr[-8000:]}")


def _compile_profiled(tu: str, flags: list[str], out: str) -> None:
    """Profile mode: the kernel TU instrumented (compile only, so libtsan is not linked), the
    counting runtime plain, linked together; -z defs names any hook the runtime lacks."""
    with tempfile.TemporaryDirectory(prefix="cupy_localrel_prof_") as d:
        kernel_o, runtime_o = os.path.join(d, "kernel.o"), os.path.join(d, "runtime.o")
        _run_cxx([compiler(), *flags, "-c", "-x", "c++", "-", "-o", kernel_o], tu)
        _run_cxx([compiler(), "-std=c++20", "-O2", "-fPIC", *_ARCH_FLAGS, "-c", str(PROFILE_RUNTIME),
                  "-o", runtime_o])
        _run_cxx([compiler(), "-shared", "-pthread", *_ARCH_FLAGS, "-Wl,-z,defs", kernel_o, runtime_o,
                  "-o", out])


def _touch(so: Path) -> bool:
    """True if `so` exists; marks it as recently used for _prune."""
    try:
        os.utime(so)
        return True
    except FileNotFoundError:
        return False
    except OSError:           # read-only cache: still usable
        return so.exists()


def _flock(f) -> None:
    try:
        import fcntl
        fcntl.flock(f, fcntl.LOCK_EX)
    except (ImportError, OSError):
        pass


MAX_CACHED_LIBS = 256


def _prune(d: Path) -> None:
    """Keep the cache bounded: drop the least recently used libraries (and stale locks)."""
    libs = sorted(d.glob("*.so"), key=lambda p: p.stat().st_mtime if p.exists() else 0)
    for p in libs[:max(0, len(libs) - MAX_CACHED_LIBS)]:
        for q in (p, p.with_suffix(".lock")):
            try:
                q.unlink()
            except OSError:
                pass


class _LaunchConfig(ctypes.Structure):   # cudasim::LaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("dyn_smem", ctypes.c_uint64),
                ("stack_size", ctypes.c_uint64), ("seed", ctypes.c_int64), ("workers", ctypes.c_uint),
                ("nblocks", ctypes.c_uint), ("blocks", ctypes.POINTER(ctypes.c_uint))]


class _ParamInfo(ctypes.Structure):      # cudasim::ParamInfo
    _fields_ = [("size", ctypes.c_uint64), ("pointee_size", ctypes.c_uint64), ("kind", ctypes.c_char),
                ("pointee_kind", ctypes.c_char), ("type_name", ctypes.c_char * 94)]


class SimModule:
    """CPU counterpart of cupy.RawModule; settings `seed`, `workers`, `stack_kb` apply to its
    kernels unless a kernel sets its own."""

    def __init__(self, lib: ctypes.CDLL, names: Sequence[str], source: str = "<kernel>"):
        self._lib = lib
        self.names = list(names)
        self.source = source
        self.seed: int | None = None
        self.workers: int | None = None
        self.stack_kb: int | None = None
        self._kernels: dict[str, SimKernel] = {}
        self.library: str | None = None      # path of the compiled library
        #: profile mode (built with counters): each launch appends its profile.LaunchCounters
        self.profiling = False
        self.launches: list = []

    def get_function(self, name: str) -> SimKernel:
        if name not in self.names:
            raise KeyError(f"no kernel {name!r} in {self.source}; known: {self.names} "
                           "(template kernels need their name_expressions at load time)")
        k = self._kernels.get(name)
        if k is None:
            k = self._kernels[name] = SimKernel(self, self.names.index(name), name)
        return k


def _dim3(v, what: str) -> tuple[int, int, int]:
    # CuPy's RawKernel takes only tuples here (an int or a list is a TypeError on the GPU)
    if not isinstance(v, tuple):
        raise TypeError(f"{what} must be a tuple of 1 to 3 ints, as for cupy.RawKernel; got {type(v).__name__}")
    if not 1 <= len(v) <= 3:
        raise ValueError(f"{what} must have 1 to 3 dimensions, got {v!r}")
    return tuple(int(x) for x in v) + (1,) * (3 - len(v))


class SimKernel:
    """CPU counterpart of cupy.RawKernel: ``kernel(grid, block, args, shared_mem=0)``."""

    def __init__(self, module: SimModule, index: int, name: str):
        self.module = module
        self.name = name
        self.seed: int | None = None
        self.workers: int | None = None
        self.stack_kb: int | None = None
        self.max_dynamic_shared_size_bytes = DEFAULT_DYN_SMEM_LIMIT
        lib = module._lib
        self._launch = getattr(lib, f"__sim_launch_{index}")
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.POINTER(ctypes.c_void_p),
                                 ctypes.c_char_p, ctypes.c_size_t]
        sig = getattr(lib, f"__sim_sig_{index}")
        sig.restype = ctypes.c_int
        infos = (_ParamInfo * MAX_ARGS)()
        n = sig(infos, MAX_ARGS)
        if n > MAX_ARGS:
            raise RuntimeError(f"{name}: more than {MAX_ARGS} parameters")
        self.params = [infos[i] for i in range(n)]
        try:
            bounds = getattr(lib, f"__sim_bounds_{index}")
            bounds.restype = ctypes.c_longlong
            limit = int(bounds())
        except AttributeError:
            limit = 0
        #: like cupy.RawKernel.max_threads_per_block: __launch_bounds__ or the hardware's 1024
        self.max_threads_per_block = limit if 0 < limit <= 1024 else 1024

    # -- settings -------------------------------------------------------------------------
    def _setting(self, attr: str, env: str, default: int) -> int:
        for obj in (self, self.module):
            v = getattr(obj, attr)
            if v is not None:
                return int(v)
        return _env_int(env, default)

    # -- arguments ------------------------------------------------------------------------
    def _arg_error(self, i: int, msg: str) -> TypeError:
        p = self.params[i]
        return TypeError(f"kernel {self.name!r}: argument {i} (parameter type "
                         f"`{p.type_name.decode()}`): {msg}")

    def _marshal(self, args: Sequence) -> tuple[list, ctypes.Array]:
        if len(args) != len(self.params):
            raise TypeError(f"kernel {self.name!r} takes {len(self.params)} arguments, got {len(args)}")
        keep = []
        for i, (a, p) in enumerate(zip(args, self.params)):
            keep.append(self._marshal_one(i, a, p))
        ptrs = (ctypes.c_void_p * max(1, len(keep)))(*[ctypes.addressof(v) for v in keep])
        return keep, ptrs

    def _marshal_one(self, i: int, a, p: _ParamInfo):
        kind = p.kind.decode()
        if isinstance(a, np.ndarray):
            if kind != "p":
                raise self._arg_error(i, f"got a NumPy array (device pointer) for a non-pointer parameter")
            ps = p.pointee_size
            if ps > 1 and p.pointee_kind.decode() in "fi" and a.itemsize != ps:
                raise self._arg_error(i, f"array of dtype {a.dtype} ({a.itemsize}-byte items) for a pointer to "
                                         f"{ps}-byte elements")
            return ctypes.c_void_p(a.ctypes.data)
        if hasattr(a, "__cuda_array_interface__"):
            raise self._arg_error(i, f"got a GPU array ({type(a).__name__}); the sim backend takes NumPy arrays")
        # Scalars follow CuPy: Python bool -> bool, int -> int64, float -> float64.
        if isinstance(a, (bool, np.bool_)):
            arr, origin = np.asarray(a, np.bool_), "a bool"
        elif isinstance(a, int):
            arr, origin = np.asarray(a, np.int64), "a Python int (passed as 64-bit int64, like CuPy)"
        elif isinstance(a, float):
            arr, origin = np.asarray(a, np.float64), "a Python float (passed as float64, like CuPy)"
        elif isinstance(a, np.generic):
            arr, origin = np.asarray(a), f"numpy.{a.dtype.name}"
        elif a is None:
            raise self._arg_error(i, "got None; pass numpy.uint64(0) for a null pointer")
        else:
            raise self._arg_error(i, f"unsupported argument type {type(a).__name__}")
        if kind == "p":
            if arr.dtype.kind in "iu" and arr.itemsize == 8 and int(arr) == 0:
                return ctypes.c_void_p(0)   # null pointer
            raise self._arg_error(i, f"got {origin} for a pointer parameter; pass a NumPy array")
        if arr.itemsize != p.size:
            raise self._arg_error(i, f"got {origin}, {arr.itemsize} bytes, but the parameter has {p.size} "
                                     f"bytes; pass a NumPy scalar of the parameter's type")
        is_float = arr.dtype.kind == "f" or arr.dtype.name in ("bfloat16",)
        if kind == "f" and not is_float or kind == "i" and arr.dtype.kind not in "iub":
            raise self._arg_error(i, f"got {origin} for a {'floating' if kind == 'f' else 'integer'} parameter")
        return ctypes.create_string_buffer(arr.tobytes(), arr.itemsize)

    # -- launch ---------------------------------------------------------------------------
    def __call__(self, grid, block, args, shared_mem: int = 0, stream=None,
                 enable_cooperative_groups: bool = False, *, blocks: Sequence[int] | None = None):
        """Launch like cupy.RawKernel. ``blocks`` (CPU engine only): run just these linear
        block indices (x fastest), in this order; profiling samples blocks this way."""
        g, b = _dim3(grid, "grid"), _dim3(block, "block")
        nthreads = b[0] * b[1] * b[2]
        if min(g) < 1 or g[0] > 2**31 - 1 or max(g[1:]) > 65535:
            raise RuntimeError(f"kernel {self.name!r}: invalid grid {g} (CUDA_ERROR_INVALID_VALUE)")
        if min(b) < 1 or nthreads > 1024 or b[2] > 64:
            raise RuntimeError(f"kernel {self.name!r}: invalid block {b} (CUDA_ERROR_INVALID_VALUE)")
        if nthreads > self.max_threads_per_block:
            raise RuntimeError(f"kernel {self.name!r}: block {b} has {nthreads} threads, more than its "
                               f"__launch_bounds__ allow ({self.max_threads_per_block}); the GPU refuses "
                               "this launch (CUDA_ERROR_INVALID_VALUE)")
        shared_mem = int(shared_mem)
        limit = max(DEFAULT_DYN_SMEM_LIMIT, min(int(self.max_dynamic_shared_size_bytes), MAX_DYN_SMEM))
        if not 0 <= shared_mem <= limit:
            raise RuntimeError(f"kernel {self.name!r}: shared_mem={shared_mem} bytes exceeds {limit} "
                               "(raise max_dynamic_shared_size_bytes, as on the GPU)")
        keep, ptrs = self._marshal(args)
        cfg = _LaunchConfig()
        cfg.grid[:] = g
        cfg.block[:] = b
        cfg.dyn_smem = shared_mem
        cfg.stack_size = max(16, self._setting("stack_kb", ENV_STACK_KB, DEFAULT_STACK_KB)) * 1024
        cfg.seed = self._setting("seed", ENV_SEED, 0)
        cfg.workers = max(1, self._setting("workers", ENV_WORKERS, default_workers()))
        chosen = None
        if blocks is not None:
            total = g[0] * g[1] * g[2]
            chosen = np.ascontiguousarray(blocks, dtype=np.uint32)
            if chosen.ndim != 1 or (chosen.size and int(chosen.max()) >= total) or \
                    np.unique(chosen).size != chosen.size:
                raise ValueError(f"kernel {self.name!r}: blocks must be distinct linear block indices "
                                 f"below {total}")
            cfg.nblocks = chosen.size
            cfg.blocks = chosen.ctypes.data_as(ctypes.POINTER(ctypes.c_uint))
        err = ctypes.create_string_buffer(1024)
        counters = None
        if self.module.profiling:
            from . import profile
            cfg.workers = 1        # the counters are one sequential stream of accesses
            rc, counters = profile.run_counted(self, (g, b, shared_mem, chosen), args,
                                               lambda: self._launch(ctypes.byref(cfg), ptrs, err, len(err)))
        else:
            rc = self._launch(ctypes.byref(cfg), ptrs, err, len(err))
        del keep
        if rc:
            raise RuntimeError(f"kernel {self.name!r} ({self.module.source}): {err.value.decode(errors='replace')}")
        if counters is not None:
            self.module.launches.append(counters)

    def __repr__(self) -> str:
        return f"<SimKernel {self.name} of {self.module.source}>"
