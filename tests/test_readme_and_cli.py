"""The README's code runs; the command line answers."""
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_blocks_run(index):
    code = _python_blocks()[index]
    exec(compile(code, f"README.md block {index}", "exec"), {})


def test_readme_opens_with_the_two_commands():
    head = (ROOT / "README.md").read_text().split("```", 3)[1]
    assert "make run" in head and "make test" in head
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cupy_localrel", *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


def test_info_lists_versions_and_every_backend():
    r = _cli("info")
    assert r.returncode == 0, r.stderr
    for word in ("cupy-localrel", "numpy", "cupy", "torch", "backends:"):
        assert word in r.stdout
    for backend in ("numpy", "cupy", "sim"):
        assert re.search(rf"^\s+{backend}\s+(available|unavailable): ", r.stdout, flags=re.M), r.stdout


def test_demo_check_table_passes():
    r = _cli("demo", "--check-only", "--backend", "numpy")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(" ok") == 5, r.stdout
