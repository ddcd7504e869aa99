"""``lmlab report --scaling`` on a sweep's runs: the sizes and tokens it reads from the recorded runs, and the
fits and the compute multiplier it writes, on runs whose losses follow a known law."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from lmlab.report import scaling
from tests.conftest import FAST, TINY, train_run

E, A, B, ALPHA, BETA = 1.5, 20.0, 30.0, 0.34, 0.28
WIDTHS, STEPS, LAYERS = (16, 32, 64, 128, 256), (100, 1000, 10000), 2
BATCH, ROW = 16, 2 ** 3 + 2  # FAST's batch size; the default PCFG's longest row (levels 3, BOS and EOS)


def non_embedding(d: int) -> int:
    """The default transformer's blocks: qkv and output (4 d^2), the MLP (8 d^2), two RMSNorm gains (2 d) per
    layer, and the final norm (d)."""
    return LAYERS * (12 * d * d + 2 * d) + d


def law(N, D):
    return E + A * N ** -ALPHA + B * D ** -BETA


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    """A sweep of 2 recipes x 5 widths x 3 budgets whose records are those of one real tiny run, with the
    width and steps rewritten and losses from ``law`` (recipe ``mlm`` uses its tokens twice as well)."""
    tmp = tmp_path_factory.mktemp("scaling")
    real = train_run(tmp, *TINY, *FAST, "eval=[perplexity]")
    out = tmp / "sweep"
    for recipe, factor in (("clm", 1.0), ("mlm", 2.0)):
        for d in WIDTHS:
            for steps in STEPS:
                job = out / f"objective={recipe},model.d_model={d},max_steps={steps}"
                shutil.copytree(real, job, ignore=shutil.ignore_patterns("checkpoints", "evals"))
                (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
                    [f"objective={recipe}", f"model.d_model={d}", f"max_steps={steps}"]))
                config = yaml.safe_load((job / "config_resolved.yaml").read_text())
                config["model"]["d_model"], config["max_steps"] = d, steps
                (job / "config_resolved.yaml").write_text(yaml.safe_dump(config))
                results = json.loads((job / "results.json").read_text())
                loss = float(law(non_embedding(d), factor * steps * BATCH * ROW))
                results["metrics"].update({"train/steps": steps, "perplexity/loss": loss, "perplexity/optimum": E})
                (job / "results.json").write_text(json.dumps(results))
    return out


def test_points_read_sizes_and_tokens_from_the_records(sweep):
    points = scaling.load_points([sweep], ("objective", ["clm", "mlm"]))
    assert len(points) == 2 * len(WIDTHS) * len(STEPS)
    for p in points:
        d, steps = (int(v) for v in re.findall(r"model.d_model=(\d+),max_steps=(\d+)", p.job)[0])
        assert (p.N, p.D) == (non_embedding(d), steps * BATCH * ROW)
        assert p.k > 6  # the transformer's own count adds the head and attention to 6 N


def test_scaling_report_fits_the_law_and_the_multiplier(sweep, lmlab, monkeypatch):
    monkeypatch.setattr(scaling, "RESAMPLES", 20)  # noise-free points: every resample refits the same law
    code, out = lmlab("report", str(sweep), "--scaling", "--compare", "objective=clm,mlm")
    assert code == 0, out
    md = (sweep / "report.md").read_text()
    assert (sweep / "scaling.png").stat().st_size > 0
    assert "(20 resamples)" in md
    # noise-free points: approach 3 finds the law, with E free and pinned to the recorded optimum
    rows = re.findall(r"\| E (free|pinned) \| ([\d.]+)[^|]*\|[^|]*\|[^|]*\| ([\d.]+) [^|]*\| ([\d.]+) ", md)
    assert len(rows) == 4, md  # two recipes x (E free, E pinned)
    for _, e, alpha, beta in rows:
        assert (float(e), float(alpha), float(beta)) == pytest.approx((E, ALPHA, BETA), rel=2e-3)
    m = re.search(r"with ([\d.]+) \[([\d.]+), ([\d.]+)\] times that compute", md)
    assert m, md
    assert [float(v) for v in m.groups()] == pytest.approx([0.5] * 3, rel=1e-2)


def test_scaling_report_refuses_a_compare_that_is_not_two_recipes(sweep, lmlab):
    code, out = lmlab("report", str(sweep), "--scaling", "--compare", "objective=clm")
    assert code == 2 and "key=a,b" in out, out
    code, out = lmlab("report", str(sweep), "--scaling", "--compare", "objective=clm,emo")
    assert code == 2 and "objective=emo" in out, out
    code, out = lmlab("report", str(sweep), "--scaling", "--x", "max_steps")  # would not take effect: refused
    assert code == 2 and "takes no x, which would not take effect" in out, out


def test_tokens_per_row_of_each_kind_of_data():
    from omegaconf import OmegaConf

    assert scaling.row_tokens(OmegaConf.create({"block_size": 64})) == 64
    assert scaling.row_tokens(OmegaConf.create({"length": 12})) == 14
    assert scaling.row_tokens(OmegaConf.create({"levels": 3})) == 10
    with pytest.raises(scaling.UserError, match="row length"):
        scaling.row_tokens(OmegaConf.create({"_target_": "x"}))


def test_a_directory_without_runs_is_refused_with_its_fix(tmp_path):
    """A directory that holds no job (a parent of the sweeps, a typo) is not "unfinished": the sentence names the
    directory and the fix."""
    from lmlab.errors import UserError

    (tmp_path / "same_loss").mkdir()
    with pytest.raises(UserError, match=r"no run under .*same_loss: pass the sweep directories"):
        scaling.load_points([tmp_path / "same_loss"])
