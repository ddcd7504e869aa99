"""eval=perplexity: the whole validation split (or a seeded sample of it) against NLL sums computed by hand,
bits per byte against lm-evaluation-harness's ``bits_per_byte`` on the same documents, and scoring other files
with the run's own tokenizer (``eval.perplexity.paths``)."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmlab.attention import CAUSAL, Attention
from lmlab.data.tokenizers import BPE, Byte
from lmlab.errors import UserError
from lmlab.evaluation.harness import LmlabLM
from lmlab.evaluation.perplexity import Perplexity
from lmlab.models.transformer import Transformer
from lmlab.objectives.clm import CLM
from lmlab.vocab import BOS_ID, EOS_ID

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAST = ["max_steps=4", "val_every=2", "checkpoint_every=2", "batch_size=16", "logger=none"]
DOCS = ["The cat sat on the mat, and then it slept.", "Did Ella see the fox at the beach?",
        "Ünïcödé text: 中文 and an emoji 🙂 cost more bytes than letters.", "Short one.",
        "Tom went to the market\nand bought three apples.", "A [EOS] written in text is text."]


def tiny_transformer(vocab_size: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(vocab_size, CAUSAL, d_model=16, n_layers=1, n_heads=2).eval()


def row_nll(model, row: list[int]) -> list[float]:
    """-log p(row[t] | row[:t]) for t = 1.., from one forward pass over the row alone."""
    with torch.no_grad():
        logp = F.log_softmax(model.logits(model(torch.tensor([row[:-1]]), Attention(CAUSAL))).double(), -1)[0]
    return [-float(logp[t - 1, tok]) for t, tok in enumerate(row) if t > 0]


def setting(model, rows, sources=None, tokenizer=None):
    columns = {"input_ids": rows} if sources is None else {"input_ids": rows, "source": sources}
    source = SimpleNamespace(name="text", sequence_nll=lambda rows: None, tokenizer=tokenizer)
    module = SimpleNamespace(model=model, objective=CLM())
    return module, SimpleNamespace(source=source, splits={"validation": datasets.Dataset.from_dict(columns)})


def random_rows(n: int, vocab: int, seed: int) -> list[list[int]]:
    gen = np.random.default_rng(seed)
    return [[BOS_ID, *gen.integers(4, vocab, size=int(gen.integers(3, 9))).tolist(), EOS_ID] for _ in range(n)]


def test_perplexity_is_the_whole_validation_split():
    """600 rows (more than the old 500-row cut) from two sources: the loss is the NLL summed over every target
    token of every row divided by their number, overall and per source."""
    model = tiny_transformer(12)
    rows = random_rows(600, 12, seed=0)
    sources = ["a"] * 550 + ["b"] * 50
    module, dm = setting(model, rows, sources)
    out = Perplexity()(module, dm)
    nll = [row_nll(model, r) for r in rows]
    assert out["perplexity/loss"] == pytest.approx(sum(map(sum, nll)) / sum(map(len, nll)), abs=1e-6)
    assert out["perplexity/ppl"] == pytest.approx(math.exp(out["perplexity/loss"]))
    assert out["perplexity/rows"] == 600
    for name, part in (("a", nll[:550]), ("b", nll[550:])):
        assert out[f"perplexity/{name}/loss"] == pytest.approx(sum(map(sum, part)) / sum(map(len, part)), abs=1e-6)
        assert out[f"perplexity/{name}/rows"] == len(part)
    assert "perplexity/bpb" not in out  # no tokenizer: no bytes


def test_a_sample_of_max_rows_is_seeded_and_reported():
    model = tiny_transformer(12)
    rows = random_rows(50, 12, seed=1)
    module, dm = setting(model, rows)
    out = Perplexity(max_rows=20, seed=3)(module, dm)
    keep = sorted(np.random.default_rng(3).choice(50, 20, replace=False))
    nll = [row_nll(model, rows[i]) for i in keep]
    assert out["perplexity/rows"] == 20
    assert out["perplexity/loss"] == pytest.approx(sum(map(sum, nll)) / sum(map(len, nll)), abs=1e-6)
    assert Perplexity(max_rows=20, seed=4)(module, dm)["perplexity/loss"] != pytest.approx(out["perplexity/loss"])


def trained_bpe() -> BPE:
    tok = BPE(300)
    tok.train(DOCS * 5)
    return tok


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_bits_per_byte_equals_lm_eval_bits_per_byte(tmp_path, kind):
    """The documents as validation rows ``[BOS] d [EOS]`` and as a local lm-eval ``loglikelihood_rolling`` task
    scored through lmlab's in-process adapter on the same model: ``perplexity/bpb`` is lm-eval's
    ``bits_per_byte`` (the EOS that ends a row has no bytes and is not charged, as lm-eval scores text only)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tok = trained_bpe() if kind == "bpe" else Byte()
    model = tiny_transformer(tok.vocab_size, seed=2)
    rows = [[BOS_ID, *ids, EOS_ID] for ids in tok.encode(DOCS)]
    module, dm = setting(model, rows, tokenizer=tok)
    ours = Perplexity()(module, dm)

    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "docs.py").write_text(
        "import datasets\n\n"
        f"ROWS = {[{'text': d} for d in DOCS]!r}\n\n"
        "def load(**_):\n"
        "    return datasets.DatasetDict({'test': datasets.Dataset.from_list(ROWS)})\n")
    (folder / "mydocs.yaml").write_text(
        "task: mydocs\ncustom_dataset: !function docs.load\noutput_type: loglikelihood_rolling\n"
        "test_split: test\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    lm = LmlabLM(model, tok, batch_size=4, max_length=256)  # every document fits one window
    results = lm_eval.simple_evaluate(model=lm, tasks=["mydocs"], bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=str(folder), include_defaults=False))
    theirs = results["results"]["mydocs"]["bits_per_byte,none"]
    assert ours["perplexity/bpb"] == pytest.approx(theirs, abs=1e-4)
    assert ours["perplexity/loss_per_byte"] == pytest.approx(theirs * math.log(2), abs=1e-4)
    # by hand: the NLL of every token but EOS over the documents' UTF-8 bytes
    nats = sum(sum(row_nll(model, r)[:-1]) for r in rows)
    assert ours["perplexity/loss_per_byte"] == pytest.approx(nats / sum(len(d.encode()) for d in DOCS), abs=1e-6)


def test_eval_perplexity_paths_scores_a_file_with_the_runs_tokenizer(lmlab, tmp_path):
    """``lmlab eval run=R eval=perplexity eval.perplexity.paths=<file>`` scores the file's blocks (``[BOS]`` + the
    next block_size - 1 tokens of ``d [EOS]``, tokenized with R's BPE), not R's validation split."""
    from omegaconf import OmegaConf

    from lmlab.pipeline import rebuild

    code, out = lmlab("train", "data=text", "data.block_size=16", "model.d_model=16", "model.n_layers=1",
                      "eval=[perplexity]", *FAST)
    assert code == 0, out
    run = next(p.parent for p in lmlab.runs.rglob("DONE"))
    text = " ".join(DOCS) * 3
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps({"text": text}) + "\n")
    code, out = lmlab("eval", f"run={run}", "eval=perplexity", f"eval.perplexity.paths={held_out}")
    assert code == 0, out
    metrics = {**json.loads((run / "results.json").read_text())["metrics"],
               **json.loads((run / "evals" / "1.json").read_text())["metrics"]}
    _, module, dm, _ = rebuild(run, OmegaConf.create({}))
    stream = [*dm.source.tokenizer.encode([text])[0], EOS_ID]
    blocks = [[BOS_ID, *stream[i : i + 15]] for i in range(0, len(stream) - 14, 15)]
    nll = [row_nll(module.model, b) for b in blocks]
    assert metrics["perplexity/files/rows"] == len(blocks) > 1
    assert metrics["perplexity/files/loss"] == pytest.approx(sum(map(sum, nll)) / sum(map(len, nll)), abs=1e-5)
    assert metrics["perplexity/files/loss"] != pytest.approx(metrics["perplexity/loss"], abs=1e-3)
    assert "perplexity/files/bpb" in metrics


def test_eval_perplexity_paths_is_refused_for_a_grammar():
    grammar = SimpleNamespace(name="PCFGSource", vocab_size=20)
    with pytest.raises(UserError, match="no tokenizer") as info:
        Perplexity(paths="some.txt").skip_reason(grammar)
    assert str(info.value).count(". ") == 0
    with pytest.raises(UserError, match="empty list"):
        Perplexity(paths=[])
