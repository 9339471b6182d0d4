"""The benchmarks run in CI in their smoke mode (tiny model, tiny sizes), so that none rots:
each must finish and exit 0 (a failing row exits non-zero)."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["cpu.py", "vae_tiling.py"])
def test_benchmark_smoke_mode_runs(script):
    if not (BENCHMARKS / script).exists():
        pytest.fail(f"benchmarks/{script} is missing")
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "torch" in done.stdout  # every benchmark prints its versions
