"""The model benchmark runs end to end on tiny shapes and prints a row per model and the Mamba comparison."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_models_quick():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_models.py"), "--quick", "--threads", "1",
                          "--models", "transformer,mamba"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    rows = {line.split()[0]: line for line in lines  # the table's rows: name, d_model, ...
            if len(line.split()) > 1 and line.split()[0] in ("transformer", "mamba") and line.split()[1].isdigit()}
    assert " 1.00x  (1.00)" in rows["transformer"] and "x  (" in rows["mamba"], out.stdout
    for label in ("lmlab chunked", "lmlab sequential", "scan alone"):
        assert any(label in line for line in lines), out.stdout
