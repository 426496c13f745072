"""The command line as a new user meets it (issue 12): ``info`` without a GPU, ``demo``'s
time column without the compile."""
import types

import pytest

from cupy_localrel import __main__ as cli
from cupy_localrel import _loader


class _NoDriverCuPy(types.SimpleNamespace):
    """What CuPy answers on a machine without any NVIDIA driver."""

    def __init__(self):
        def count():
            raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is "
                               "insufficient for CUDA runtime version")
        super().__init__(__version__="14.0", cuda=types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDeviceCount=count)))


def test_info_says_plainly_that_there_is_no_gpu_or_driver(monkeypatch, capsys):
    monkeypatch.setattr(_loader, "_import_cupy", _NoDriverCuPy)
    monkeypatch.setattr(_loader, "_driver_library_present", lambda: False)
    assert cli.info() == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("cupy ")
                and "available" in ln)
    assert "unavailable: no NVIDIA GPU or driver found" in line
    assert "insufficient" not in line       # nothing suggests a driver upgrade


def test_an_old_driver_is_named_as_such(monkeypatch):
    monkeypatch.setattr(_loader, "_import_cupy", _NoDriverCuPy)
    monkeypatch.setattr(_loader, "_driver_library_present", lambda: True)
    ok, reason = _loader.cupy_available()
    assert not ok and reason.startswith("the NVIDIA driver is older than the CUDA runtime")


def test_demo_time_column_excludes_the_first_call(monkeypatch, capsys):
    """The first call of each op (where g++/NVRTC compile) is shown apart; the time column
    is a warm call. A fake clock makes the first call take 7 s and later ones 50 ms."""
    clock = types.SimpleNamespace(now=0.0)
    calls = {}

    def fake_cases(seed, asarray):
        def run(backend, _name="op"):
            calls[_name] = calls.get(_name, 0) + 1
            clock.now += 7.0 if calls[_name] == 1 else 0.05
            return (asarray([1.0]),)
        return [("op", run)]

    monkeypatch.setattr(cli, "_demo_cases", fake_cases)
    monkeypatch.setattr(cli.time, "perf_counter", lambda: clock.now)
    assert cli.check_table("numpy")
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("op ") and ln.endswith("ok"))
    assert "50.0ms" in row and "7000.0ms" in row
    assert row.index("50.0ms") < row.index("7000.0ms")     # time column first, then 1st call


def test_quick_benchmark_results_are_ignored_by_git():
    """``make bench`` leaves no untracked folder: its quick runs land in an ignored path."""
    import pathlib
    import shutil
    import subprocess
    root = pathlib.Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    quick = "benchmarks/results/cpu-2026-12-01-quick/results.json"
    full = "benchmarks/results/cpu-2026-12-01/results.json"
    check = lambda p: subprocess.run(["git", "check-ignore", "-q", p], cwd=root).returncode  # noqa: E731
    assert check(quick) == 0 and check(full) == 1
