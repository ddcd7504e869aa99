"""``eval=mask_classifier``: classification by the masked-LM head at a [MASK] token.

The reading of Clavié et al. 2025, "It's All in The [MASK]: Simple Instruction-Tuning Enables BERT-like Masked
Language Models As Generative Classifiers" (arXiv 2502.03793), built on the pattern-verbalizer idea of Schick &
Schütze 2021, "Exploiting Cloze Questions for Few Shot Text Classification and Natural Language Inference" (PET,
arXiv 2001.07676): each class c has one verbalizer token v_c, a row gets a MASK, and the class is the one whose
verbalizer the MLM head finds most probable there. This variant uses no template and tunes the head only:

* The row ``[BOS] w_1 .. w_n [EOS]`` becomes ``[BOS] w_1 .. w_n [MASK] [EOS]`` (MASK appended when a row has no
  final EOS) and is read with bidirectional attention and a padding mask; h is the final hidden state at MASK.
* Zero-shot (``mask_classifier/zeroshot_acc``, ``zeroshot_ece``): the prediction is argmax_c of
  ``model.logits(h)[v_c]`` (the softmax over the verbalizers has the same argmax as over the vocabulary).
* Head tuning (``mask_classifier/acc``, ``acc_std``, ``acc_ci95``, ``chance``, ``ece``): the body is frozen
  (read once, in eval mode, without gradients); an untied copy of the LM head's weights (and bias, if any) is
  trained with AdamW on the downstream rows, cross-entropy over the verbalizer logits, ``epochs`` epochs of
  shuffled minibatches; one run per seed (the seed orders the batches; the head starts from the trained LM
  head every time). Scored on the test rows. The trained model is never modified.

Verbalizers (``verbalizers``): null picks them from the data. Text rows labelled by a CSV (``data.labels_csv``):
the first token of each label string as written (``positive`` -> its first BPE token), in the classes' order.
Other data (the grammars): class c gets the c-th most frequent word of the labelled downstream rows (ties to the
lower id). A list sets them, one per class: a whole number is a token id, a string is tokenized (text data) and
its first token taken. Two classes may not share a verbalizer.

The head must have learnt to fill a MASK: the evaluator refuses, before training, an objective that does not
read rows bidirectionally (``clm``, ``prefix_lm``, span corruption other than bidirectional, a distillation into
one of these): the pipeline hands ``skip_reason`` the built objective, and ``__call__`` checks the
module's. ECE: Guo et al. 2017 (arXiv 1706.04599), 15
equal-width bins, ``lmlab.stats.expected_calibration_error``. Rows whose label is -1 are dropped.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.attention import BIDIRECTIONAL
from lmlab.data.tasks import resolve_task
from lmlab.errors import UserError
from lmlab.evaluation.common import DownstreamEvaluator, head_calibration, summarize
from lmlab.readout import model_device, pad_rows, reading_attention
from lmlab.settings import NonNegativeFloat, Positive, PositiveFloat
from lmlab.threads import one_thread
from lmlab.vocab import EOS_ID, MASK_ID, N_SPECIAL

KEY = "mask_classifier"


def with_mask(row: list[int]) -> tuple[list[int], int]:
    """``row`` with MASK before its final EOS (appended when it has none), and the MASK's position."""
    row = list(row)
    body = row[:-1] if row and row[-1] == EOS_ID else row
    return [*body, MASK_ID, EOS_ID], len(body)


def refuse_unless_bidirectional(attention: str | None, objective: str) -> None:
    if attention is not None and attention != BIDIRECTIONAL:
        raise UserError(f"mask_classifier reads a masked-LM head and objective {objective} trains {attention} "
                        "attention: use a masked objective (e.g. objective=mlm) or drop mask_classifier from eval.")


class MaskClassifier(DownstreamEvaluator):
    name = KEY

    def __init__(self, task: str | None = None, verbalizers: Optional[list[int | str]] = None,
                 epochs: Positive = 50, lr: PositiveFloat = 1e-2, batch_size: Positive = 256, seeds: Positive = 3,
                 weight_decay: NonNegativeFloat = 0.0, max_train: Optional[Positive] = None,
                 max_test: Optional[Positive] = None, encode_batch_size: Positive = 256) -> None:
        self.task = task
        self.verbalizers = None if verbalizers is None else [v if isinstance(v, str) else int(v) for v in verbalizers]
        self.epochs, self.lr, self.batch_size, self.seeds = epochs, lr, batch_size, seeds
        self.weight_decay, self.max_train, self.max_test = weight_decay, max_train, max_test
        self.encode_batch_size = encode_batch_size

    def skip_reason(self, source, objective=None) -> str | None:
        reason = super().skip_reason(source, objective)
        if reason:
            return reason
        if objective is not None:
            refuse_unless_bidirectional(objective.attention, type(objective).__name__)
        if self.verbalizers is not None:
            self._check_count(resolve_task(source, self.task, self.name)[1])
        return None

    def _check_count(self, n_classes: int) -> None:
        if len(self.verbalizers) != n_classes:
            raise UserError(f"eval.mask_classifier.verbalizers lists {len(self.verbalizers)} and the task has "
                            f"{n_classes} classes: give one verbalizer per class.")

    # ----- verbalizers -----

    def verbalizer_ids(self, source, task: str, train_rows: list[list[int]], n_classes: int) -> list[int]:
        """One token id per class (see the module docstring)."""
        if self.verbalizers is not None:
            self._check_count(n_classes)
            ids = [self._token(source, v) for v in self.verbalizers]
        elif task == "label" and len(getattr(source, "label_names", []) or []) == n_classes:
            ids = [self._token(source, str(name)) for name in source.label_names]
        else:
            counts = np.bincount([t for r in train_rows for t in r if t >= N_SPECIAL],
                                 minlength=source.vocab_size)[N_SPECIAL:]
            order = np.argsort(-counts, kind="stable")
            if int((counts > 0).sum()) < n_classes:
                raise UserError(f"the downstream rows hold fewer distinct words than the {n_classes} classes: set "
                                "eval.mask_classifier.verbalizers to one token id per class.")
            ids = [int(order[c]) + N_SPECIAL for c in range(n_classes)]
        if len(set(ids)) < len(ids):
            raise UserError(f"two classes share a verbalizer token ({ids}): set eval.mask_classifier.verbalizers to "
                            "words that begin with different tokens.")
        return ids

    def _token(self, source, verbalizer: int | str) -> int:
        if isinstance(verbalizer, str):
            if not callable(getattr(source, "encode", None)):
                raise UserError(f"data {source.name} has no tokenizer for the verbalizer {verbalizer!r}: give "
                                "eval.mask_classifier.verbalizers as token ids.")
            tokens = source.encode([verbalizer])[0]
            if not tokens:
                raise UserError(f"the verbalizer {verbalizer!r} tokenizes to nothing: choose another word.")
            return int(tokens[0])
        if not N_SPECIAL <= verbalizer < source.vocab_size:
            raise UserError(f"the verbalizer token id {verbalizer} is not a word of data {source.name} (ids "
                            f"{N_SPECIAL}..{source.vocab_size - 1}): fix eval.mask_classifier.verbalizers (quote "
                            "words, e.g. '[\"0\",\"1\"]').")
        return int(verbalizer)

    # ----- reading and tuning -----

    @torch.no_grad()
    def mask_states(self, model, rows: list[list[int]]) -> torch.Tensor:
        """(n, d_model) final hidden states at the MASK of each row (``with_mask``), bidirectional reading."""
        parts = []
        device = model_device(model)
        for i in range(0, len(rows), self.encode_batch_size):
            masked = [with_mask(r) for r in rows[i : i + self.encode_batch_size]]
            ids = pad_rows([m for m, _ in masked]).to(device)
            pos = torch.as_tensor([p for _, p in masked], device=device)
            hidden = model(ids, reading_attention(BIDIRECTIONAL, ids))
            parts.append(hidden[torch.arange(len(masked), device=device), pos])
        return torch.cat(parts)

    def __call__(self, module, datamodule, run_dir=None) -> dict[str, float]:
        model = getattr(module.model, "_orig_mod", module.model)
        refuse_unless_bidirectional(module.objective.attention, type(module.objective).__name__)
        task, train_rows, train_y, test_rows, test_y, n_classes, _ = self.labelled_splits(datamodule)
        verb = torch.as_tensor(self.verbalizer_ids(datamodule.source, task, train_rows, n_classes))
        was_training = model.training
        model.eval()
        try:
            h_train, h_test = self.mask_states(model, train_rows), self.mask_states(model, test_rows)
            with torch.no_grad():
                zero = model.logits(h_test)[:, verb.to(h_test.device)].float().cpu()
        finally:
            model.train(was_training)
        y_test = torch.as_tensor(test_y)
        out = {f"{self.name}/zeroshot_acc": float((zero.argmax(-1) == y_test).double().mean()),
               f"{self.name}/zeroshot_ece": head_calibration(zero, y_test)}
        # the head as the logits apply it (times the output multiplier of muP), so the tuned copy starts zero-shot
        mult = getattr(model, "output_mult", 1.0)
        weight = model.head.weight.detach() if mult == 1.0 else model.head.weight.detach() * mult
        bias = None if model.head.bias is None else model.head.bias.detach() * mult
        with one_thread(h_train.device.type == "cpu"):  # the head's matmuls are tiny
            fits = [self._fit(weight, bias, verb, h_train, torch.as_tensor(train_y), h_test, y_test, seed)
                    for seed in range(self.seeds)]
        out.update(summarize(self.name, [acc for acc, _ in fits], test_y))
        out[f"{self.name}/ece"] = float(np.mean([ece for _, ece in fits]))
        return out

    def _fit(self, weight, bias, verb, h_train, y_train, h_test, y_test, seed: int) -> tuple[float, float]:
        """One tuned copy of the LM head (``seed`` orders the batches): test accuracy and calibration error."""
        device = h_train.device
        w = weight.clone().float().requires_grad_(True)
        b = None if bias is None else bias.clone().float().requires_grad_(True)
        opt = torch.optim.AdamW([w] if b is None else [w, b], lr=self.lr, weight_decay=self.weight_decay)
        verb, y_train = verb.to(device), y_train.to(device)
        g = torch.Generator().manual_seed(seed)
        n = len(h_train)
        with torch.enable_grad():
            for _ in range(self.epochs):
                perm = torch.randperm(n, generator=g).to(device)
                for i in range(0, n, self.batch_size):
                    idx = perm[i : i + self.batch_size]
                    logits = F.linear(h_train[idx].float(), w, b)[:, verb]
                    loss = F.cross_entropy(logits, y_train[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        with torch.no_grad():
            logits = F.linear(h_test.float(), w, b)[:, verb].cpu()
        return float((logits.argmax(-1) == y_test).double().mean()), head_calibration(logits, y_test)
