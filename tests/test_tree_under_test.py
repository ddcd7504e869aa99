"""The suite tests the tree it sits in: subprocesses (the ``lmlab`` console script, ``python -c``) import lmlab
from this repository, not from wherever lmlab happens to be installed (a second checkout would otherwise test the
first)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import lmlab

ROOT = Path(__file__).resolve().parents[1]
LMLAB = str(Path(sys.executable).with_name("lmlab"))


def test_this_process_imports_the_tree_under_test():
    assert Path(lmlab.__file__).resolve() == ROOT / "lmlab" / "__init__.py"


def test_a_python_subprocess_imports_the_tree_under_test():
    code = "import lmlab, hydra_plugins; print(lmlab.__file__); print(list(hydra_plugins.__path__)[0])"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ}, cwd="/", capture_output=True, text=True,
                         check=True).stdout.split()
    assert Path(out[0]).resolve() == ROOT / "lmlab" / "__init__.py", out
    assert Path(out[1]).resolve() == ROOT / "hydra_plugins", out


def test_the_console_script_imports_the_tree_under_test(tmp_path):
    # PYTHONVERBOSE makes the interpreter name every source file it loads: the lmlab it loads is this tree's
    proc = subprocess.run([LMLAB, "--help"], env={**os.environ, "PYTHONVERBOSE": "1"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = {Path(p).resolve() for p in re.findall(r"(\S+/lmlab/cli\.py)\b", proc.stderr)}
    assert loaded == {ROOT / "lmlab" / "cli.py"}, loaded
