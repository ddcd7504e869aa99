"""Causal language modelling: predict each token from the ones before it (GPT: Radford et al. 2018,
"Improving Language Understanding by Generative Pre-Training"; Radford et al. 2019, GPT-2).

The model reads ``input_ids[:, :-1]`` and predicts ``input_ids[:, 1:]``; every non-PAD target counts
(EOS is predicted, BOS never is since it is never a target). The evaluation loss is the exact per-token
negative log-likelihood, and where the source knows ``-log P(sentence)`` the optimum is its mean per
target token, so ``gap = loss - optimum`` is an exact excess cross-entropy (a KL divergence per token)
on the evaluated rows, up to the sampling of those rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.attention import CAUSAL, Attention, padding_of
from lmlab.data.datamodule import collate
from lmlab.objectives.base import Objective, Prepared
from lmlab.readout import model_device
from lmlab.vocab import PAD_ID


class CLM(Objective):
    """Next-token prediction with causal attention."""

    attention = CAUSAL
    dense_loss = True
    reads_documents = True  # ``data.doc_mask``: the batch's ``documents`` go into the attention record

    def prepare(self, batch: dict) -> Prepared:
        ids = batch["input_ids"]
        inputs, targets = ids[:, :-1], ids[:, 1:]
        documents = batch.get("documents")
        return Prepared(inputs=inputs, targets=targets, loss_mask=targets != PAD_ID,
                        attention=Attention(CAUSAL, padding=padding_of(inputs, batch.get("padded")),
                                            documents=None if documents is None else documents[:, :-1]))

    def prepare_eval(self, batch: dict) -> Prepared:
        """How ``evaluate`` reads a row: next-token prediction of every token (objectives that train on
        part of the row, or with another attention, override this to score whole rows causally)."""
        return CLM.prepare(self, batch)

    @torch.no_grad()
    def evaluate(self, model, rows: list[list[int]], source, batch_size: int = 64) -> dict[str, float]:
        """``loss`` = sum of token NLL / number of target tokens (nats); ``optimum`` = the true
        ``sum(-log P(row)) / number of target tokens`` and ``gap = loss - optimum`` where known."""
        was_training = model.training
        model.eval()
        device = model_device(model)
        total, count = 0.0, 0
        try:
            for i in range(0, len(rows), batch_size):
                batch = collate([{"input_ids": r} for r in rows[i : i + batch_size]],
                                doc_mask=getattr(source, "doc_mask", False))
                batch["input_ids"] = batch["input_ids"].to(device)
                p = self.prepare_eval(batch)
                hidden = model(p.inputs, p.attention)
                logits = model.logits(hidden[p.loss_mask]).double()
                nll = F.cross_entropy(logits, p.targets[p.loss_mask], reduction="sum")
                total += float(nll)
                count += int(p.loss_mask.sum())
        finally:
            model.train(was_training)
        out = {"loss": total / max(count, 1)}
        seq_nll = source.sequence_nll(rows) if source is not None else None
        if seq_nll is not None and count:
            out["optimum"] = float(sum(float(x) for x in seq_nll)) / count
            out["gap"] = out["loss"] - out["optimum"]
        return out
