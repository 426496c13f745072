"""The wheel installs cupy_localrel.adapters from the top-level adapters/ folder."""
import pathlib
import subprocess
import sys
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_adapters_subpackage(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(ROOT)], check=True, timeout=300)
    (wheel,) = wheels.glob("cupy_localrel-*.whl")
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=600)
    # Package data: every kernel source and simulator header of the tree is in the wheel.
    data = sorted(str(f.relative_to(ROOT / "cupy_localrel")) for pattern in
                  ("kernels/*.cu", "kernels/*.cuh", "kernels/*.json", "_sim/*.h", "_sim/*.cc")
                  for f in (ROOT / "cupy_localrel").glob(pattern))
    code = ("import cupy_localrel, cupy_localrel.adapters, pathlib;"
            "p = pathlib.Path(cupy_localrel.__file__).parent;"
            "assert 'site-packages' in str(p), p;"
            f"missing = [f for f in {data!r} if not (p / f).exists()];"
            "assert not missing, missing;"
            "print(cupy_localrel.adapters.__name__)")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "cupy_localrel.adapters"
