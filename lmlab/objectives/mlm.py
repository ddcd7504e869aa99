"""Masked language modelling (BERT: Devlin et al. 2019, arXiv 1810.04805).

Training: each word token (id >= N_SPECIAL; BOS/EOS/PAD are never chosen) is selected with probability
``mask_prob`` (at least one per row that has a word); a selected token is replaced by MASK with
probability ``mask_token_frac``, by a uniformly random word with probability ``random_token_frac``, and
kept otherwise (BERT's 80/10/10). The loss is the cross-entropy on the selected positions. All random
choices come from ``torch.Generator().manual_seed(batch["seed"])``, so a batch is masked identically
every time it is seen (e.g. after a resume).

``strategy="suffix"`` (PepMLM: Chen et al. 2023, "PepMLM: Target Sequence-Conditioned Generation of
Peptide Binders via Masked Language Modeling", arXiv 2310.03842) instead selects the last
``max(1, round(mask_prob * n_words))`` words of each row (the span just before EOS, or the end of a packed
block) and replaces every one of them by MASK (no 80/10/10: the model learns to generate the whole
suffix conditioned on the rest, as PepMLM masks the whole binder). The random stream is drawn exactly as
for ``strategy="random"``.

Evaluation (single-mask): for every row and every word position t, the row is copied with exactly x_t
replaced by MASK, and the model gives q(. | x_-t). ``loss`` is the mean over all (row, t) of
``-log q(x_t | x_-t)`` (a pseudo-log-likelihood per token, Salazar et al. 2020, arXiv 1910.14659).
Where the source knows the true conditionals p(. | x_-t): ``optimum`` is the mean entropy
``H(p(. | x_-t))`` and ``gap`` the mean ``KL(p(. | x_-t) || q(. | x_-t))``. Both are exact given the
evaluated contexts (no noise from the sampled x_t), so ``gap`` is a noise-free measure; ``loss - optimum``
equals ``gap`` only in expectation over the rows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.attention import BIDIRECTIONAL, Attention, padding_of
from lmlab.errors import UserError
from lmlab.objectives.base import Objective, Prepared
from lmlab.readout import model_device
from lmlab.settings import Fraction
from lmlab.vocab import MASK_ID, N_SPECIAL, PAD_ID


class MLM(Objective):
    """BERT-style masked language modelling with bidirectional attention.

    ``vocab_size`` bounds the random replacement words to ``[N_SPECIAL, vocab_size)`` (BERT); the pipeline
    sets it to the data's vocabulary (``bind``). Left unset, they are drawn from the batch's own words.
    """

    attention = BIDIRECTIONAL

    STRATEGIES = ("random", "suffix")

    def __init__(self, mask_prob: Fraction = 0.15, mask_token_frac: Fraction = 0.8,
                 random_token_frac: Fraction = 0.1, vocab_size: int | None = None, strategy: str = "random") -> None:
        if strategy not in self.STRATEGIES:
            raise UserError(f"unknown MLM strategy {strategy!r}: set objective.strategy to random or suffix.")
        self.strategy = strategy
        self.mask_prob = mask_prob
        self.mask_token_frac = mask_token_frac
        self.random_token_frac = random_token_frac
        self.vocab_size = vocab_size

    def bind(self, source, splits) -> None:
        if self.vocab_size is None:
            self.vocab_size = source.vocab_size

    def prepare(self, batch: dict) -> Prepared:
        ids = batch["input_ids"]
        g = torch.Generator().manual_seed(int(batch.get("seed", 0)))
        cpu = ids.cpu()
        maskable = cpu >= N_SPECIAL
        # draw every random number unconditionally, so the stream (and the masks) depend only on seed
        select_u = torch.rand(cpu.shape, generator=g)
        pick_u = torch.rand(cpu.shape, generator=g)
        action_u = torch.rand(cpu.shape, generator=g)
        if self.vocab_size is not None:
            random_words = torch.randint(N_SPECIAL, self.vocab_size, cpu.shape, generator=g)
        else:
            words = cpu[maskable].unique()
            index = torch.randint(0, max(len(words), 1), cpu.shape, generator=g)
            random_words = words[index] if len(words) else torch.full_like(cpu, MASK_ID)

        if self.strategy == "suffix":
            return self._suffix(ids, cpu, maskable)
        selected = (select_u < self.mask_prob) & maskable
        need = maskable.any(1) & ~selected.any(1)
        if bool(need.any()):
            pick = pick_u.masked_fill(~maskable, -1.0).argmax(1)
            rows = need.nonzero().squeeze(1)
            selected[rows, pick[rows]] = True
        to_mask = selected & (action_u < self.mask_token_frac)
        to_random = selected & (action_u >= self.mask_token_frac) & (
            action_u < self.mask_token_frac + self.random_token_frac)

        inputs = cpu.clone()
        inputs[to_mask] = MASK_ID
        inputs[to_random] = random_words[to_random]
        return Prepared(inputs=inputs.to(ids.device), targets=ids, loss_mask=selected.to(ids.device),
                        attention=Attention(BIDIRECTIONAL, padding=padding_of(ids)))

    def _suffix(self, ids: torch.Tensor, cpu: torch.Tensor, maskable: torch.Tensor) -> Prepared:
        n_words = maskable.sum(1)
        k = (n_words.double() * self.mask_prob).round().long().clamp_min(1).minimum(n_words)
        # rank of each word counted from the end of the row: 0 for the last word
        from_end = maskable.flip(1).long().cumsum(1).flip(1) - 1
        selected = maskable & (from_end < k[:, None])
        inputs = cpu.masked_fill(selected, MASK_ID)
        return Prepared(inputs=inputs.to(ids.device), targets=ids, loss_mask=selected.to(ids.device),
                        attention=Attention(BIDIRECTIONAL, padding=padding_of(ids)))

    def masked_log_probs(self, model, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``log q(. | x_-t)`` (n, V) in float64 on the CPU, for each row of ``ids`` (on the model's device)
        whose position ``pos`` holds MASK: how ``evaluate`` asks the model for a single-mask conditional.
        Objectives that pose the question another way (a sentinel span in a decoder) override this."""
        hidden = model(ids, Attention(BIDIRECTIONAL, padding=padding_of(ids)))
        hidden = hidden[torch.arange(len(ids), device=ids.device), pos.to(ids.device)]
        return F.log_softmax(model.logits(hidden).double(), dim=-1).cpu()

    @torch.no_grad()
    def evaluate(self, model, rows: list[list[int]], source, batch_size: int = 64) -> dict[str, float]:
        """Single-mask evaluation (see the module docstring); ``batch_size`` masked copies per forward."""
        was_training = model.training
        model.eval()
        device = model_device(model)
        conds = source.single_mask_conditionals(rows) if source is not None else None
        # one item per (row, word position): (row index, position in the row, word index in the row)
        items = [(r, t, k) for r, row in enumerate(rows)
                 for k, t in enumerate(t for t, tok in enumerate(row) if tok >= N_SPECIAL)]
        nll_sum = ent_sum = kl_sum = 0.0
        try:
            for i in range(0, len(items), batch_size):
                chunk = items[i : i + batch_size]
                length = max(len(rows[r]) for r, _, _ in chunk)
                ids = torch.full((len(chunk), length), PAD_ID, dtype=torch.long)
                for j, (r, _, _) in enumerate(chunk):
                    ids[j, : len(rows[r])] = torch.as_tensor(rows[r], dtype=torch.long)
                pos = torch.tensor([t for _, t, _ in chunk])
                arange = torch.arange(len(chunk))
                targets = ids[arange, pos].clone()
                ids[arange, pos] = MASK_ID
                logq = self.masked_log_probs(model, ids.to(device), pos)
                nll_sum += float(-logq[arange, targets].sum())
                if conds is not None:
                    p = torch.from_numpy(np.stack([np.asarray(conds[r][k], dtype=np.float64)
                                                   for r, _, k in chunk]))
                    pos_p = p > 0
                    logp = torch.where(pos_p, p.clamp_min(1e-300).log(), torch.zeros_like(p))
                    ent_sum += float(-(p * logp).sum())
                    kl_sum += float(torch.where(pos_p, p * (logp - logq), torch.zeros_like(p)).sum())
        finally:
            model.train(was_training)
        n = max(len(items), 1)
        out = {"loss": nll_sum / n}
        if conds is not None:
            out["optimum"] = ent_sum / n
            out["gap"] = kl_sum / n
        return out
