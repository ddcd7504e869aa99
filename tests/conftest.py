"""Shared fixtures: run the real CLI in-process, with runs and data caches in temporary folders."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# The test models are tiny: one thread each is as fast on a quiet machine and far faster on a busy one
# (thread barriers under contention cost 10-50x). Subprocesses inherit it through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# Subprocesses (the `lmlab` console script, `python -m`, scripts, launchers) import the tree under test, not
# whatever lmlab is installed: the repository root goes first on their PYTHONPATH. In this process pytest
# already imports the tree (tests/ is a package under the root).
ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT)])


def reproduce_driver():
    """``scripts/reproduce_paper.py`` imported as a module (the scripts folder is not a package)."""
    spec = importlib.util.spec_from_file_location("reproduce_paper", ROOT / "scripts" / "reproduce_paper.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# Tiny data so that a smoke run of any recipe takes a few seconds.
TINY = ["data.train_size=400", "data.validation_size=40", "data.test_size=80", "data.downstream_size=120"]
FAST = ["max_steps=4", "val_every=2", "checkpoint_every=2", "batch_size=16", "logger=none"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    os.environ["LMLAB_CACHE"] = str(path)
    return path


@pytest.fixture
def lmlab(tmp_path, cache_dir, capsys):
    """``lmlab(*args) -> (exit code, stdout+stderr)``, runs under ``tmp_path/runs``."""
    from lmlab.cli import main

    def run(*args: str) -> tuple[int, str]:
        argv = [args[0], f"out_dir={tmp_path / 'runs'}", *args[1:]] if args[0] == "train" else list(args)
        code = 0
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return code, out.out + out.err

    run.runs = tmp_path / "runs"
    return run


def train_run(out: Path, *args: str) -> Path:
    """A run trained in-process by ``lmlab train`` into ``out/run`` (a name without '='); fails the test if the
    command fails."""
    from lmlab.cli import main

    run = out / "run"
    try:
        main(["train", f"out_dir={out}", *args, f"hydra.run.dir={run}"])
    except SystemExit as e:
        assert not e.code
    return run


def stressed_model(cfg: dict, vocab_size: int) -> torch.nn.Module:
    """The model of ``cfg`` (a model config) with its norms, SSM parameters and biases moved far from their
    initial values, so that an agreement of two implementations is not an accident of initial values."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from lmlab.attention import CAUSAL

    torch.manual_seed(0)
    model = instantiate(OmegaConf.create(cfg), vocab_size=vocab_size, attention=CAUSAL).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", ".D")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith(("dt_proj.bias", "dt_bias", "A_log")):
                p.copy_(0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
    return model
