"""The coordinate check (lmlab.evaluation.coordcheck): under muP each layer's output size stays the same across
widths after 10 steps at one learning rate; under the standard parameterisation it grows with the width."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.evaluation.coordcheck import WIDTHS, coord_check, coord_sizes, main, spread


@pytest.mark.parametrize("model", ["transformer", "moe"])
def test_mup_keeps_the_coordinates_and_sp_does_not(model):
    # docs/mup.md's setting: widths 64..512, base width 64, 10 AdamW steps at 3e-3, two seeds
    mup, sp = spread(coord_check(model, "mup", WIDTHS)), spread(coord_check(model, "sp", WIDTHS))
    assert max(mup.values()) <= 1.3, mup
    assert max(sp[k] for k in sp if k != "embed") >= 2, sp
    # the token embedding is an input weight in both: its size never depends on the width
    assert sp["embed"] <= 1.3 and mup["embed"] <= 1.3


def test_sizes_are_the_rms_of_each_layers_output():
    sizes = coord_sizes("transformer", "sp", 32, steps=0, n_layers=1, vocab_size=20, seq_len=6, batch_size=2)
    assert set(sizes) == {"embed", "block0", "logits"} and all(len(v) == 1 for v in sizes.values())
    # rebuild the same model and held batch by hand
    from lmlab.attention import CAUSAL
    from lmlab.models.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(20, CAUSAL, d_model=32, n_layers=1, n_heads=4).eval()
    held = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = model.embed(held[:, :-1])
        h = model.blocks[0](x, None, True)
        logits = model.logits(model.norm(h))
    for name, t in [("embed", x), ("block0", h), ("logits", logits)]:
        assert sizes[name][0] == pytest.approx(t.pow(2).mean().sqrt().item(), rel=1e-6), name


def test_spread_is_the_largest_over_the_smallest_at_the_last_step():
    sizes = {32: {"a": [1.0, 2.0]}, 64: {"a": [9.0, 3.0]}, 128: {"a": [0.1, 6.0]}}
    assert spread(sizes) == {"a": 3.0} and spread(sizes, step=0) == {"a": 90.0}


def test_the_command_writes_the_table_the_numbers_and_the_plot(tmp_path):
    main(["--out", str(tmp_path / "cc"), "--models", "transformer", "--parametrizations", "sp,mup",
          "--widths", "32,64", "--steps", "2", "--seeds", "1", "--base-width", "32"])
    out = tmp_path / "cc"
    record = json.loads((out / "coordcheck.json").read_text())
    assert record["widths"] == [32, 64] and record["settings"]["steps"] == 2
    table = (out / "coordcheck.md").read_text()
    for par in ("sp", "mup"):
        sizes = {int(w): s for w, s in record["sizes"][f"transformer/{par}"].items()}
        worst = max(spread(sizes).values())
        assert f"| transformer | {par} |" in table and f"{worst:.2f} |" in table
        assert all(len(v) == 3 for s in sizes.values() for v in s.values())  # before training, after 2 steps
    assert (out / "coordcheck.png").read_bytes()[:4] == b"\x89PNG"
