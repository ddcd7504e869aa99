"""T5 span corruption (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", arXiv 1910.10683, the ``span_corruption`` / ``random_spans_noise_mask``
preprocessor: noise density 0.15, mean noise span length 3), for encoders and for decoder-only models as
in Wang et al. 2022 (arXiv 2204.05832: inputs and targets concatenated, loss on the targets only).

Noise mask (per row, re-implemented from the description of T5's ``random_spans_noise_mask``): over the
row's L word tokens (ids >= N_SPECIAL; BOS/EOS/PAD are never noise), ``n_noise = clip(round(0.15 L), 1,
L-1)`` and ``n_spans = max(1, round(n_noise / 3))``; the noise tokens and the kept tokens are each cut
into ``n_spans`` random non-empty pieces (a uniformly random composition) and interleaved, kept piece
first. Runs of noise separated by a special token (packed text) become separate spans.

Sentinels: T5 replaces span k by ``<extra_id_k>``. lmlab's vocabulary is fixed by the data
(``source.vocab_size``) and the model is built with exactly that many ids, so every sentinel is the one
MASK id: span k is the k-th MASK of the input and the k-th MASK of the target, so the order of the MASKs
carries the alignment that T5's numbered sentinels carry and nothing is ambiguous (``reconstruct`` inverts
it exactly), at no extra vocabulary.

``attention`` picks the variant:

* ``causal`` (default; Wang et al.'s CD-MLM, runs on every model) and ``prefix`` (ND-MLM): the sequence
  ``corrupted row ++ [MASK span_1 MASK span_2 .. EOS]`` is read with the CLM shift, the loss is on the
  target part only; with ``prefix`` the corrupted row is the bidirectional prefix.
* ``bidirectional`` (an encoder): the same noise mask applied in place (every noise token becomes MASK,
  the length is kept, SpanBERT-style), loss on the noise tokens: an encoder cannot emit the variable-length
  target sequence.

Evaluation: the single-mask conditionals of ``MLM.evaluate`` (loss, and where the source knows it, the
exact entropy optimum and KL gap), each asked as a one-token span: the row with x_t replaced by MASK
followed by the target sentinel MASK; the model's next-token distribution there is q(. | x_-t). For the
encoder variant this is exactly MLM's evaluation.
"""

from __future__ import annotations

import numpy as np
import torch

from lmlab.attention import BIDIRECTIONAL, CAUSAL, PREFIX, Attention, padding_of
from lmlab.errors import UserError
from lmlab.objectives.base import Prepared
from lmlab.objectives.mlm import MLM
from lmlab.settings import Fraction, PositiveFloat
from lmlab.vocab import EOS_ID, MASK_ID, N_SPECIAL, PAD_ID


def random_spans_noise_mask(length: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """A bool mask of ``length`` with ``round(density * length)`` noise tokens in ``round(n_noise /
    mean_span)`` spans (T5's scheme; the sequence starts with a kept piece)."""
    if length < 2:
        return np.zeros(length, dtype=bool)
    n_noise = int(min(max(round(density * length), 1), length - 1))
    n_spans = max(1, int(round(n_noise / mean_span)))
    n_spans = min(n_spans, n_noise, length - n_noise)

    def pieces(total: int) -> np.ndarray:  # a uniformly random composition of total into n_spans parts
        cuts = np.sort(rng.choice(np.arange(1, total), size=n_spans - 1, replace=False))
        return np.diff(np.concatenate([[0], cuts, [total]]))

    noise, keep = pieces(n_noise), pieces(length - n_noise)
    mask = np.zeros(length, dtype=bool)
    pos = 0
    for k, n in zip(keep, noise):
        pos += k
        mask[pos : pos + n] = True
        pos += n
    return mask


def corrupt(row: list[int], noise: np.ndarray) -> tuple[list[int], list[int]]:
    """``(inputs, targets)``: each run of noise in ``row`` replaced by one MASK; the targets are
    ``MASK span_1 MASK span_2 ..`` (no final EOS)."""
    inputs, targets = [], []
    for i, tok in enumerate(row):
        if noise[i]:
            if i == 0 or not noise[i - 1]:
                inputs.append(MASK_ID)
                targets.append(MASK_ID)
            targets.append(tok)
        else:
            inputs.append(tok)
    return inputs, targets


def reconstruct(inputs: list[int], targets: list[int]) -> list[int]:
    """The original row from ``corrupt``'s output (the k-th MASK of the inputs takes the k-th span)."""
    spans: list[list[int]] = []
    for tok in targets:
        if tok == MASK_ID:
            spans.append([])
        elif tok != EOS_ID or not spans:
            spans[-1].append(tok)
    out, k = [], 0
    for tok in inputs:
        if tok == MASK_ID:
            out.extend(spans[k])
            k += 1
        else:
            out.append(tok)
    return out


class SpanCorruption(MLM):
    """T5 span corruption (see the module docstring)."""

    VARIANTS = (CAUSAL, PREFIX, BIDIRECTIONAL)

    def __init__(self, noise_density: Fraction = 0.15, mean_span_length: PositiveFloat = 3.0,
                 attention: str = CAUSAL) -> None:
        super().__init__()
        if attention not in self.VARIANTS:
            raise UserError(f"unknown span attention {attention!r}: set objective.attention to causal, prefix "
                            "or bidirectional.")
        if not 0 < noise_density < 1 or mean_span_length < 1:
            raise UserError("span corruption needs 0 < objective.noise_density < 1 and objective.mean_span_length "
                            ">= 1: fix them.")
        self.attention = attention
        self.noise_density, self.mean_span_length = noise_density, mean_span_length

    def noise(self, row: list[int], rng: np.random.Generator) -> np.ndarray:
        words = np.flatnonzero(np.asarray(row) >= N_SPECIAL)
        mask = np.zeros(len(row), dtype=bool)
        mask[words] = random_spans_noise_mask(len(words), self.noise_density, self.mean_span_length, rng)
        return mask

    def prepare(self, batch: dict) -> Prepared:
        ids = batch["input_ids"]
        rng = np.random.default_rng([int(batch.get("seed", 0)), 7919])
        rows = [[t for t in r if t != PAD_ID] for r in ids.cpu().tolist()]
        noises = [self.noise(r, rng) for r in rows]
        if self.attention == BIDIRECTIONAL:
            selected = torch.zeros(ids.shape, dtype=torch.bool)
            for i, n in enumerate(noises):
                selected[i, : len(n)] = torch.from_numpy(n)
            selected = selected.to(ids.device)
            return Prepared(inputs=ids.masked_fill(selected, MASK_ID), targets=ids, loss_mask=selected,
                            attention=Attention(BIDIRECTIONAL, padding=padding_of(ids)))
        seqs, starts = [], []
        for r, n in zip(rows, noises):
            inp, tgt = corrupt(r, n)
            seqs.append(inp + tgt + [EOS_ID])
            starts.append(len(inp))
        full = torch.full((len(seqs), max(map(len, seqs))), PAD_ID, dtype=torch.long)
        for i, s in enumerate(seqs):
            full[i, : len(s)] = torch.as_tensor(s)
        full = full.to(ids.device)
        inputs, targets = full[:, :-1], full[:, 1:]
        start = torch.as_tensor(starts, device=ids.device)
        t = torch.arange(targets.shape[1], device=ids.device)
        loss_mask = (targets != PAD_ID) & (t[None, :] + 1 >= start[:, None])
        return Prepared(inputs=inputs, targets=targets, loss_mask=loss_mask,
                        attention=Attention(self.attention, padding=padding_of(inputs),
                                            prefix_len=start if self.attention == PREFIX else None))

    def masked_log_probs(self, model, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.attention == BIDIRECTIONAL:
            return super().masked_log_probs(model, ids, pos)
        # ids: rows with x_t replaced by MASK; append the target sentinel after each row's last token
        lengths = (ids != PAD_ID).sum(1)
        seq = torch.cat([ids, torch.full_like(ids[:, :1], PAD_ID)], dim=1)
        arange = torch.arange(len(ids), device=ids.device)
        seq[arange, lengths] = MASK_ID
        attention = Attention(self.attention, padding=padding_of(seq),
                              prefix_len=lengths if self.attention == PREFIX else None)
        hidden = model(seq, attention)[arange, lengths]
        return torch.log_softmax(model.logits(hidden).double(), dim=-1).cpu()
