"""The benchmarks run in CI in their smoke mode (tiny model, tiny sizes), so that none rots:
each must finish and exit 0 (a failing row, or ldm disagreeing with its reference beyond the
script's stated tolerance, exits non-zero), and print the versions it ran with."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ["cpu.py", "vae_tiling.py", "op_count.py", "attention.py", "load_memory.py",
           pytest.param("pipeline.py", marks=pytest.mark.slow)]  # ~20 s: a process per row


def test_every_benchmark_has_a_smoke_run():
    listed = {p if isinstance(p, str) else p.values[0] for p in SCRIPTS}
    assert {p.name for p in BENCHMARKS.glob("*.py")} <= listed


@pytest.mark.parametrize("script", SCRIPTS + ["cpu.py --kernels"])
def test_benchmark_smoke_mode_runs(script):
    script, *mode = script.split()
    if not (BENCHMARKS / script).exists():
        pytest.fail(f"benchmarks/{script} is missing")
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *mode, "--smoke"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "torch" in done.stdout  # every benchmark prints its versions
