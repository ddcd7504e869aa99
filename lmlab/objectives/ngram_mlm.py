"""ERNIE-Gram: explicitly n-gram masked language modelling (Xiao et al., NAACL 2021, "ERNIE-Gram:
Pre-Training with Explicitly N-Gram Masked Language Modeling for Natural Language Understanding",
arXiv 2010.12148). The pre-training code is not public; this follows the paper's description, with the
deviations listed below.

Lexicon (``bind``, cached beside the data): every n-gram (2 <= n <= ``max_n``) of consecutive word tokens of
the training split (never across a special token) is scored with the t-statistic against independence::

    t(w) = (f(w) - mu) / sqrt(f(w) / N),   f(w) = count(w) / N,   mu = prod_i f(x_i)

with N the number of n-gram positions of that length and f(x_i) the unigram frequencies. The lexicon V_N
keeps, per length, the ``top_k`` n-grams with t > 0 seen at least ``min_count`` times. It is cached as JSON
under ``cache_dir`` with a name derived from ``source.cache_key()`` and the lexicon's settings.

Masking (``prepare``): each row's words are segmented by forward maximum matching against V_N (at each
position the longest lexicon entry, else one word). Units are drawn in a random order (``batch["seed"]``)
and masked while the masked words stay within ``max(1, round(mask_prob * n_words))`` (at least one unit).
Each masked unit is replaced by a *single* MASK, so the row shortens by ``sum(n_i - 1)``; its coarse target
is the word itself (n = 1) or ``vocab_size + index in V_N`` (n >= 2), predicted by one softmax over the
union of the vocabulary (the model's own LM head) and V_N (this objective's ``ngram_head``, trained and
checkpointed with the model).

Comprehensive n-gram prediction, deviation: the paper predicts the fine-grained tokens x_1..x_n of a masked
n-gram from extra [M] slots with their own positions and a two-stream attention mask. The ``Backbone``
contract carries only causal/bidirectional/prefix attention, so here the i-th token of a masked n-gram is
predicted from the coarse MASK's hidden state plus a learned offset embedding ``fine_offset[i]``, through
the model's LM head. ``loss = CE_coarse + fine_weight * CE_fine`` (each a mean over its targets).

Enhanced n-gram relation modelling (``relation=true``; off by default). A small generator, the model config
``generator`` (a backbone factory, Hydra ``_partial_``: lmlab's ``Transformer``, 2 layers deep by default; the
paper does not give the depth) built with bidirectional attention at about ``generator_width_factor`` times
the model's width (the paper: one third of the hidden size) in heads of ``generator_head_dim``, is trained
with the explicit n-gram MLM above (coarse only, its own softmax over vocabulary + V_N) on the same masked
row. For every masked slot an identity y' ~ p_G(y | masked row) is sampled (special tokens excluded;
inverse-CDF sampling with uniforms from ``batch["seed"]``; no gradient through the sample) and put in the
slot: a word as itself, an n-gram as its row of the n-gram input embedding. The paper extends the embedding
table to vocabulary + V_N; here the n-gram rows are ``ngram_head``'s weights (tied, as the model's token
embedding is tied to its LM head by default), injected by a forward hook on the model's ``embed``. A sampled
n-gram fills one slot, so the corrupted row has the collator's shortened length. The model reads the corrupted
row once and (a) predicts the original identities (coarse + fine, as above) at the masked slots, and (b) a
replaced-token-detection head (``rtd_head``, a Linear on its hidden states) tells at every real position
whether the identity there differs from the original (only masked slots whose sample differs from the original
count as replaced)::

    loss = CE_gen + CE_coarse + fine_weight * CE_fine + rtd_weight * BCE_rtd

(the paper sums the terms unweighted: ``rtd_weight=1``). Both the corrupted-input MLM and RTD read the same
forward pass (the paper writes them as two terms over the same replaced row). The generator and the heads
are the objective's parameters, trained and checkpointed with the model; MFU counts the generator's
``flops_per_token`` on top of the model's (``extra_flops_per_token``; the small heads are left out).

Evaluation: ``MLM.evaluate`` (single-mask conditionals over the token vocabulary).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.attention import BIDIRECTIONAL, Attention, padding_of
from lmlab.errors import UserError
from lmlab.io import config_hash, write_json
from lmlab.objectives.base import Prepared
from lmlab.objectives.mlm import MLM
from lmlab.settings import Fraction, NonNegativeFloat, Optional, Positive
from lmlab.vocab import MASK_ID, N_SPECIAL, PAD_ID

Ngram = tuple[int, ...]


def word_runs(row) -> list[list[int]]:
    """Maximal runs of consecutive word tokens (ids >= N_SPECIAL) of a row."""
    runs, cur = [], []
    for t in row:
        if t >= N_SPECIAL:
            cur.append(int(t))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def ngram_tstats(rows, max_n: int) -> dict[int, dict[Ngram, tuple[float, int]]]:
    """For each length 2..max_n, ``{ngram: (t-statistic, count)}`` over the rows."""
    uni: Counter = Counter()
    counts = {n: Counter() for n in range(2, max_n + 1)}
    for row in rows:
        for run in word_runs(row):
            uni.update(run)
            for n, cnt in counts.items():
                cnt.update(zip(*(run[i:] for i in range(n))))
    total = sum(uni.values())
    f1 = {w: c / total for w, c in uni.items()}
    out = {}
    for n, cnt in counts.items():
        N = sum(cnt.values())
        out[n] = {g: ((c / N - math.prod(f1[x] for x in g)) / math.sqrt(c / N / N), c) for g, c in cnt.items()}
    return out


def build_lexicon(rows, max_n: int = 3, top_k: int = 100, min_count: int = 5) -> list[Ngram]:
    """The n-gram lexicon: per length, the ``top_k`` n-grams of highest t (> 0, count >= min_count)."""
    lexicon: list[Ngram] = []
    for stats in ngram_tstats(rows, max_n).values():
        good = [(t, g) for g, (t, c) in stats.items() if t > 0 and c >= min_count]
        good.sort(key=lambda x: (-x[0], x[1]))
        lexicon.extend(g for _, g in good[:top_k])
    return lexicon


def max_match(words: list[int], index: dict[Ngram, int], max_n: int) -> list[tuple[int, int]]:
    """Forward maximum matching: ``[(start, length)]`` covering ``words``, longest lexicon entry first."""
    out, i = [], 0
    while i < len(words):
        for n in range(min(max_n, len(words) - i), 1, -1):
            if tuple(words[i : i + n]) in index:
                break
        else:
            n = 1
        out.append((i, n))
        i += n
    return out


@dataclass
class NgramPrepared(Prepared):
    fine_targets: torch.Tensor  # (B, T, max_n) long: the tokens of the n-gram masked at (b, t); -1 elsewhere
    seed: int = 0  # the batch's seed: the generator's samples are drawn from it


def sample_identities(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One class per row of ``logits`` (M, K), sampled from its softmax by inverse CDF with the uniforms
    ``u`` (M,) in [0, 1): the first class whose cumulative probability exceeds ``u``."""
    cdf = logits.detach().double().softmax(-1).cumsum(-1)
    pick = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1])[:, None], right=True).squeeze(1)
    return pick.clamp_max(logits.shape[-1] - 1)


class NgramMLM(MLM, nn.Module):
    """Explicit n-gram masked language modelling with comprehensive n-gram prediction.

    Args: ``d_model`` (the model's width, passed by the pipeline), ``max_n``, ``top_k``, ``min_count`` (the
    lexicon), ``mask_prob``, ``fine_weight``, ``cache_dir``; for ``relation=true``: ``generator`` (a callable
    ``generator(vocab_size=, attention=, d_model=, n_heads=) -> backbone``, the YAML's partial model config),
    ``generator_width_factor``, ``generator_head_dim``, ``rtd_weight``.
    """

    attention = BIDIRECTIONAL

    def __init__(self, d_model: Optional[Positive] = None, max_n: Positive = 3, top_k: Positive = 100,
                 min_count: Positive = 5,
                 mask_prob: Fraction = 0.15, fine_weight: NonNegativeFloat = 1.0, cache_dir: str | None = None,
                 relation: bool = False, generator: Callable[..., nn.Module] | None = None,
                 generator_width_factor: Fraction = 1 / 3, generator_head_dim: Positive = 16,
                 rtd_weight: NonNegativeFloat = 1.0) -> None:
        nn.Module.__init__(self)
        MLM.__init__(self, mask_prob=mask_prob)
        if d_model is None:
            raise UserError("ngram_mlm needs the model's width: the pipeline passes it as objective.d_model; "
                            "set it when building the objective by hand.")
        if relation and generator is None:
            raise UserError("objective.relation=true needs objective.generator, a model config with _target_ "
                            "and _partial_: true: see conf/objective/ngram_mlm.yaml.")
        if max_n < 2:
            raise UserError(f"objective.max_n={max_n} leaves no n-grams: set it to 2 or more.")
        self.d_model, self.max_n, self.top_k, self.min_count = d_model, max_n, top_k, min_count
        self.fine_weight, self.cache_dir = fine_weight, cache_dir
        self.lexicon: list[Ngram] = []
        self.index: dict[Ngram, int] = {}
        self.fine_offset = nn.Embedding(max_n, d_model)
        nn.init.normal_(self.fine_offset.weight, std=0.02)
        self.ngram_head: nn.Linear | None = None
        self.relation, self.rtd_weight = relation, rtd_weight
        self.make_generator, self.generator_head_dim = generator, generator_head_dim
        self.generator_width = generator_head_dim * max(1, round(d_model * generator_width_factor / generator_head_dim))
        # built with the lexicon, after the model (so the model's initialisation does not depend on relation)
        self.generator: nn.Module | None = None
        self.generator_ngram_head: nn.Linear | None = None
        self.rtd_head: nn.Linear | None = None

    # ----- the lexicon -----

    def bind(self, source, splits) -> None:
        MLM.bind(self, source, splits)
        settings = {"max_n": self.max_n, "top_k": self.top_k, "min_count": self.min_count}
        root = self.cache_dir or os.environ.get("LMLAB_CACHE")
        path = Path(root) / f"{source.cache_key()}-ernie-gram-{config_hash(settings)}.json" if root else None
        if path is not None and path.exists():
            lexicon = [tuple(g) for g in json.loads(path.read_text())["lexicon"]]
        else:
            lexicon = build_lexicon(splits["train"].with_format(None)["input_ids"], self.max_n, self.top_k,
                                    self.min_count)
            if path is not None:
                write_json(path, {"settings": settings, "lexicon": lexicon})
        self.set_lexicon(lexicon)

    def set_lexicon(self, lexicon: list[Ngram]) -> None:
        if not lexicon:
            raise UserError("the ERNIE-Gram lexicon is empty: lower objective.min_count or use more training data.")
        self.lexicon = [tuple(g) for g in lexicon]
        self.index = {g: i for i, g in enumerate(self.lexicon)}
        self.ngram_head = nn.Linear(self.d_model, len(self.lexicon), bias=False)
        nn.init.normal_(self.ngram_head.weight, std=0.02)
        if self.relation:
            width = self.generator_width
            self.generator = self.make_generator(vocab_size=self.vocab_size, attention=BIDIRECTIONAL, d_model=width,
                                                 n_heads=width // self.generator_head_dim)
            self.generator_ngram_head = nn.Linear(width, len(self.lexicon), bias=False)
            nn.init.normal_(self.generator_ngram_head.weight, std=0.02)
            self.rtd_head = nn.Linear(self.d_model, 1)

    # ----- masking -----

    def mask_row(self, row: list[int], rng: np.random.Generator) -> tuple[list[int], list[int], list[list[int]]]:
        """``(shortened row, coarse targets, fine targets)``: coarse is -1 on unmasked positions, fine holds
        the masked n-gram's tokens (empty on unmasked positions and on masked single words)."""
        units = []  # (start in row, length, maskable)
        i = 0
        while i < len(row):
            if row[i] < N_SPECIAL:
                units.append((i, 1, False))
                i += 1
                continue
            j = i
            while j < len(row) and row[j] >= N_SPECIAL:
                j += 1
            units.extend((i + s, n, True) for s, n in max_match(row[i:j], self.index, self.max_n))
            i = j
        n_words = sum(1 for t in row if t >= N_SPECIAL)
        budget = max(1, round(self.mask_prob * n_words))
        chosen, used = set(), 0
        for u in rng.permutation(len(units)):
            _, n, ok = units[u]
            if ok and (used + n <= budget or not chosen):
                chosen.add(int(u))
                used += n
            if used >= budget:
                break
        short, coarse, fine = [], [], []
        for u, (s, n, _) in enumerate(units):
            if u in chosen:
                short.append(MASK_ID)
                gram = tuple(row[s : s + n])
                coarse.append(gram[0] if n == 1 else self.vocab_size + self.index[gram])
                fine.append(list(gram) if n > 1 else [])
            else:
                short.extend(row[s : s + n])
                coarse.extend([-1] * n)
                fine.extend([[]] * n)
        return short, coarse, fine

    def prepare(self, batch: dict) -> NgramPrepared:
        ids = batch["input_ids"]
        rng = np.random.default_rng([int(batch.get("seed", 0)), 104729])
        out = [self.mask_row([t for t in r if t != PAD_ID], rng) for r in ids.cpu().tolist()]
        T = max(len(s) for s, _, _ in out)
        inputs = torch.full((len(out), T), PAD_ID, dtype=torch.long)
        coarse = torch.full((len(out), T), -1, dtype=torch.long)
        fine = torch.full((len(out), T, self.max_n), -1, dtype=torch.long)
        for b, (s, c, f) in enumerate(out):
            inputs[b, : len(s)] = torch.as_tensor(s)
            coarse[b, : len(c)] = torch.as_tensor(c)
            for t, gram in enumerate(f):
                fine[b, t, : len(gram)] = torch.as_tensor(gram, dtype=torch.long)
        dev = ids.device
        inputs, coarse, fine = inputs.to(dev), coarse.to(dev), fine.to(dev)
        return NgramPrepared(inputs=inputs, targets=coarse.clamp_min(0), loss_mask=coarse >= 0,
                             attention=Attention(BIDIRECTIONAL, padding=padding_of(inputs)), fine_targets=fine,
                             seed=int(batch.get("seed", 0)))

    # ----- the loss -----

    def loss(self, model, prepared: NgramPrepared) -> tuple[torch.Tensor, dict[str, float]]:
        if not self.relation:
            return self.ngram_loss(model, model(prepared.inputs, prepared.attention), prepared)
        mask = prepared.loss_mask
        gen_logits = self.generator_logits(prepared)
        gen = F.cross_entropy(gen_logits, prepared.targets[mask])
        u = torch.rand(len(gen_logits), generator=torch.Generator().manual_seed(prepared.seed))
        corrupted, replaced = self.corrupt(prepared, sample_identities(gen_logits, u.to(gen_logits.device)))
        hidden = self.hidden_of_identities(model, corrupted, prepared.attention)
        loss, metrics = self.ngram_loss(model, hidden, prepared)
        real = prepared.inputs != PAD_ID
        rtd = F.binary_cross_entropy_with_logits(self.rtd_head(hidden[real]).squeeze(-1).float(),
                                                 replaced[real].float())
        metrics.update(gen=float(gen.detach()), rtd=float(rtd.detach()),
                       replaced=float(replaced.sum() / mask.sum()))
        return gen + loss + self.rtd_weight * rtd, metrics

    def ngram_loss(self, model, hidden: torch.Tensor, prepared: NgramPrepared) -> tuple[torch.Tensor, dict]:
        """Coarse + fine n-gram prediction at the masked slots, from the model's hidden states (B, T, d)."""
        hidden = hidden[prepared.loss_mask]
        logits = torch.cat([model.logits(hidden), self.ngram_head(hidden)], dim=-1).float()
        coarse = F.cross_entropy(logits, prepared.targets[prepared.loss_mask])
        fine_t = prepared.fine_targets[prepared.loss_mask]  # (M, max_n)
        valid = fine_t >= 0
        metrics = {"coarse": float(coarse.detach())}
        loss = coarse
        if bool(valid.any()):
            h = hidden[:, None, :] + self.fine_offset.weight[None]  # (M, max_n, d)
            fine = F.cross_entropy(model.logits(h[valid]).float(), fine_t[valid])
            loss = loss + self.fine_weight * fine
            metrics["fine"] = float(fine.detach())
        return loss, metrics

    # ----- enhanced n-gram relation modelling -----

    def extra_flops_per_token(self, seq_len: int) -> float:
        """With ``relation=true``, the generator's forward and backward (it is trained with the model)."""
        return self.generator.flops_per_token(seq_len) if self.generator is not None else 0.0

    def generator_logits(self, prepared: NgramPrepared) -> torch.Tensor:
        """The generator's logits (M, vocab + lexicon) at the masked slots; special tokens are never proposed."""
        h = self.generator(prepared.inputs, prepared.attention)[prepared.loss_mask]
        logits = torch.cat([self.generator.logits(h), self.generator_ngram_head(h)], dim=-1).float()
        return logits.index_fill(1, torch.arange(N_SPECIAL, device=logits.device), float("-inf"))

    @staticmethod
    def corrupt(prepared: NgramPrepared, sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, replaced)``: the shortened row with each masked slot holding its sampled identity (a word,
        or vocab_size + lexicon index), and the positions whose identity differs from the original."""
        ids = prepared.inputs.clone()
        ids[prepared.loss_mask] = sampled
        return ids, prepared.loss_mask & (ids != prepared.targets)

    def hidden_of_identities(self, model, ids: torch.Tensor, attention: Attention) -> torch.Tensor:
        """The model's hidden states for ids over vocabulary + lexicon: an n-gram id enters as its row of
        ``ngram_head``'s weights, written over the model's token embedding by a forward hook on ``embed``."""
        embed = getattr(model, "embed", None)
        if not isinstance(embed, nn.Embedding):
            raise UserError(f"objective.relation=true needs a model with a token embedding `embed`, which "
                            f"{type(model).__name__} lacks: use model=transformer or objective.relation=false.")
        gram = ids >= self.vocab_size
        vectors = self.ngram_head.weight[(ids - self.vocab_size).clamp_min(0)]
        handle = embed.register_forward_hook(
            lambda module, args, out: torch.where(gram[..., None], vectors.to(out.dtype), out))
        try:
            return model(ids.masked_fill(gram, MASK_ID), attention)
        finally:
            handle.remove()
