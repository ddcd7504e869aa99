"""eval=mask_classifier: the MLM head at an appended [MASK], zero-shot and head-tuned, with known answers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lmlab.attention import BIDIRECTIONAL, Attention
from lmlab.data.datamodule import DataModule
from lmlab.data.source import Source
from lmlab.data.tokenizers import Byte
from lmlab.errors import UserError
from lmlab.evaluation.mask_classifier import MaskClassifier, with_mask
from lmlab.models.transformer import Transformer
from lmlab.objectives.clm import CLM
from lmlab.objectives.mlm import MLM
from lmlab.vocab import BOS_ID, EOS_ID, MASK_ID, N_SPECIAL

from .conftest import FAST, TINY


class ThreeClasses(Source):
    """Rows of 3 to 7 words of one of three groups of four words (the label), skewed within a group."""

    tasks = {"first": 3}

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + 12

    def _split(self, n: int, seed: int) -> Dataset:
        rng = np.random.default_rng(seed)
        p = np.array([0.4, 0.3, 0.2, 0.1])
        rows, labels = [], []
        for i in range(n):
            group = int(rng.integers(3))
            words = (4 * group + rng.choice(4, size=int(rng.integers(3, 8)), p=p) + N_SPECIAL).tolist()
            rows.append([BOS_ID, *words, EOS_ID])
            labels.append(group if i % 7 else -1)
        return Dataset.from_dict({"input_ids": rows, "first": labels})

    def build(self) -> DatasetDict:
        sizes = {"train": 20, "validation": 20, "test": 150, "downstream": 300}
        return DatasetDict({k: self._split(n, i) for i, (k, n) in enumerate(sizes.items())})


def setup(objective=None, tie_embeddings=True):
    source = ThreeClasses()
    dm = DataModule(source, source.build(), batch_size=16, seed=0)
    objective = objective or MLM()
    torch.manual_seed(0)
    model = Transformer(source.vocab_size, objective.attention, d_model=32, n_layers=2, n_heads=2,
                        tie_embeddings=tie_embeddings)
    return SimpleNamespace(model=model, objective=objective), dm


def test_with_mask_goes_before_eos():
    assert with_mask([BOS_ID, 7, 8, EOS_ID]) == ([BOS_ID, 7, 8, MASK_ID, EOS_ID], 3)
    assert with_mask([BOS_ID, 7, 8]) == ([BOS_ID, 7, 8, MASK_ID, EOS_ID], 3)  # a cut row without EOS


def test_zero_shot_equals_the_argmax_by_hand_and_the_body_is_untouched():
    module, dm = setup(tie_embeddings=False)
    model = module.model
    model.train()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    evaluator = MaskClassifier(seeds=2, epochs=5)
    out = evaluator(module, dm, None)

    # the verbalizers by hand: the three most frequent words of the labelled downstream rows
    down = dm.splits["downstream"]
    rows = [r for r, y in zip(down["input_ids"], down["first"]) if y >= 0]
    counts = np.bincount([t for r in rows for t in r], minlength=dm.source.vocab_size)
    counts[:N_SPECIAL] = -1
    verb = [int(i) for i in np.argsort(-counts, kind="stable")[:3]]
    assert len(set(verb)) == 3 and min(verb) >= N_SPECIAL
    assert evaluator.verbalizer_ids(dm.source, "first", rows, 3) == verb

    # zero-shot by hand: one unpadded row at a time, logits at the MASK, argmax over the verbalizers
    test = dm.splits["test"]
    model.eval()
    right, n = 0, 0
    with torch.no_grad():
        for row, y in zip(test["input_ids"], test["first"]):
            if y < 0:
                continue
            ids = torch.tensor([list(row[:-1]) + [MASK_ID, EOS_ID]])
            logits = model.logits(model(ids, Attention(BIDIRECTIONAL)))[0, len(row) - 1]
            right += int(int(logits[verb].argmax()) == y)
            n += 1
    assert out["mask_classifier/zeroshot_acc"] == pytest.approx(right / n, abs=1e-12)
    assert set(out) == {f"mask_classifier/{k}" for k in ("zeroshot_acc", "zeroshot_ece", "acc", "acc_std",
                                                           "acc_ci95", "chance", "ece")}
    # tuning trained a copy of the head: the model (body and head) is bit-identical, its mode restored
    model.train()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tuning_the_head_learns_the_task_and_a_vanishing_step_keeps_the_zero_shot_answer():
    module, dm = setup()
    out = MaskClassifier(seeds=2)(module, dm, None)
    # the MASK sees the row's words through bidirectional attention: the tuned head reads their group
    assert out["mask_classifier/acc"] > out["mask_classifier/chance"] + 0.1, out
    still = MaskClassifier(seeds=1, epochs=1, lr=1e-30)(module, dm, None)
    assert still["mask_classifier/acc"] == still["mask_classifier/zeroshot_acc"]


def test_refuses_causal_objectives_and_bad_verbalizers():
    source = ThreeClasses()
    for cfg, kind in [({"_target_": "lmlab.objectives.mlm.MLM"}, BIDIRECTIONAL),
                      ({"_target_": "lmlab.objectives.clm.CLM"}, "causal"),
                      ({"_target_": "lmlab.objectives.prefix_lm.PrefixLM"}, "prefix"),
                      ({"_target_": "lmlab.objectives.span.SpanCorruption", "attention": "causal"}, "causal"),
                      ({"_target_": "lmlab.objectives.span.SpanCorruption", "attention": BIDIRECTIONAL},
                       BIDIRECTIONAL)]:
        objective = instantiate(OmegaConf.create(cfg))
        assert objective.attention == kind
        evaluator = MaskClassifier()
        if kind == BIDIRECTIONAL:
            assert evaluator.skip_reason(source, objective) is None
        else:
            with pytest.raises(UserError, match="objective=mlm"):
                evaluator.skip_reason(source, objective)
    module, dm = setup(CLM())
    with pytest.raises(UserError, match="objective=mlm"):
        MaskClassifier()(module, dm, None)
    with pytest.raises(UserError, match="one verbalizer per class"):
        MaskClassifier(verbalizers=[5, 6]).skip_reason(source)
    module, dm = setup()
    with pytest.raises(UserError, match="share a verbalizer"):
        MaskClassifier(verbalizers=[5, 6, 5])(module, dm, None)
    with pytest.raises(UserError, match="not a word"):
        MaskClassifier(verbalizers=[5, 6, 99])(module, dm, None)
    with pytest.raises(UserError, match="no tokenizer"):
        MaskClassifier(verbalizers=["a", "b", "c"])(module, dm, None)
    out = MaskClassifier(verbalizers=[9, 8, 7], seeds=1, epochs=1)(module, dm, None)
    assert 0.0 <= out["mask_classifier/zeroshot_acc"] <= 1.0


def test_text_labels_are_verbalized_by_their_first_token(lmlab, tmp_path):
    labels = tmp_path / "labels.csv"
    good = ["a fine day", "what a good film", "lovely", "great work", "nice one"]
    bad = ["a dull day", "what a poor film", "awful", "weak work", "bad one"]
    lines = [f"{t},positive" for t in good * 4] + [f"{t},negative" for t in bad * 4]
    labels.write_text("text,label\n" + "\n".join(lines) + "\n", encoding="utf-8")
    text = ["data=text", "data/tokenizer=byte", f"data.labels_csv={labels}", "data.block_size=32"]
    code, out = lmlab("train", *text, *FAST, "objective=mlm", "eval=mask_classifier",
                      "eval.mask_classifier.epochs=2")
    assert code == 0, out
    run = next(lmlab.runs.rglob("results.json")).parent
    metrics = json.loads((run / "results.json").read_text())["metrics"]
    assert 0.0 <= metrics["mask_classifier/zeroshot_acc"] <= 1.0 and "mask_classifier/acc" in metrics
    # the verbalizers: the first byte of each label, in the classes' (sorted) order
    source = SimpleNamespace(name="text", label_names=["negative", "positive"], vocab_size=Byte().vocab_size,
                             encode=Byte().encode)
    assert MaskClassifier().verbalizer_ids(source, "label", [], 2) == [Byte().encode(["n"])[0][0],
                                                                       Byte().encode(["p"])[0][0]]
    source.label_names = ["pos", "positive"]
    with pytest.raises(UserError, match="share a verbalizer"):
        MaskClassifier().verbalizer_ids(source, "label", [], 2)


def test_a_causal_run_is_refused_before_training_and_by_lmlab_eval(lmlab):
    code, out = lmlab("train", *TINY, *FAST, "eval=[perplexity,mask_classifier]")
    assert code == 2 and "objective=mlm" in out
    assert not list(lmlab.runs.rglob("model.pt"))  # refused before training
    code, out = lmlab("train", *TINY, *FAST, "eval=[perplexity]")
    assert code == 0, out
    run = next(lmlab.runs.rglob("model.pt")).parent
    code, out = lmlab("eval", f"run={run}", "eval=mask_classifier")
    assert code == 2 and "objective=mlm" in out
