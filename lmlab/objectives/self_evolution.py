"""Self-evolution learning for masked language models (Zhong et al. 2023, "Self-Evolution Learning for
Discriminative Language Model Pretraining", Findings of ACL 2023, arXiv 2305.15275; used in Vega v2, Zhong
et al. 2022, arXiv 2212.01853), the variant of the released ``WHU-ZQH/SE4PLMs`` code: an NLL threshold
selects the tokens and the smoothing weight is a constant.

Stage 1, self-questioning (in ``bind``, no gradients): an existing lmlab run (``scorer``) reads every row of
the training and validation splits *unmasked* and gives each word token its loss ``l_i = -log p(x_i | x)``
(bidirectional scorers; a causal or prefix scorer gives ``-log p(x_i | x_<i)``). Tokens with ``l_i >
threshold`` (0.1 in the code) are the informative ones; their positions are stored per row (keyed by the
row's tokens, so identical rows share them, as they share their scores).

Stage 2, self-evolution training: exactly the stored positions are replaced by MASK (no 80/10/10, no extra
random masking); a row with no stored position falls back to ``MLM``'s random 15% masking. The loss at the
masked positions is the cross-entropy against the rectified smooth label::

    y~ = (1 - alpha) * onehot(x_i) + alpha * p_ref(. | x),    alpha = 0.1

where ``p_ref`` is the model's own prediction at position i given the *unmasked* row, computed under
``no_grad`` in eval mode at every step (``smoothing=uniform``: the vanilla label-smoothing baseline with a
uniform ``p_ref``). The loss is the mean over masked positions (the code sums; only the scale differs).

SE is continual pre-training of an already trained model: with ``init_from_scorer`` (default) the model
starts from the scorer's weights (the model config must then match the scorer's); the copy is made once,
at the first training step, and a resumed run keeps its own weights.

Evaluation: ``MLM.evaluate`` (single-mask pseudo-likelihood, exact entropy optimum and KL gap).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.attention import BIDIRECTIONAL, PREFIX, Attention, padding_of
from lmlab.errors import UserError
from lmlab.objectives.base import Prepared
from lmlab.objectives.distill import frozen_backbone
from lmlab.objectives.mlm import MLM
from lmlab.settings import Fraction, Positive
from lmlab.vocab import MASK_ID, N_SPECIAL, PAD_ID


@torch.no_grad()
def token_nll(model, kind: str, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) per-token ``-log p(x_i | context)`` of padded unmasked rows (NaN where not scored: PAD, and
    the first token of a causal reading)."""
    padding = ids != PAD_ID
    pad = None if bool(padding.all()) else padding
    out = torch.full(ids.shape, float("nan"), dtype=torch.float64)
    if kind == BIDIRECTIONAL:
        logp = F.log_softmax(model.logits(model(ids, Attention(BIDIRECTIONAL, padding=pad))).double(), -1)
        out = -logp.gather(-1, ids[..., None])[..., 0].cpu()
    else:
        ones = torch.ones(len(ids), dtype=torch.long, device=ids.device)
        attention = Attention(kind, padding=pad, prefix_len=ones if kind == PREFIX else None)
        logp = F.log_softmax(model.logits(model(ids[:, :-1], attention)).double(), -1)
        out[:, 1:] = -logp.gather(-1, ids[:, 1:, None])[..., 0].cpu()
    return out.masked_fill(~padding.cpu(), float("nan"))


def informative_positions(nll, ids, threshold: float) -> list[int]:
    """Positions of word tokens whose loss exceeds ``threshold`` (the self-questioning selector)."""
    return [i for i, (loss, tok) in enumerate(zip(nll, ids)) if tok >= N_SPECIAL and float(loss) > threshold]


def smoothed_ce(logits: torch.Tensor, targets: torch.Tensor, p_ref: torch.Tensor, alpha: float) -> torch.Tensor:
    """Mean over rows of ``-sum_v y~_v log softmax(logits)_v`` with ``y~ = (1-alpha) onehot + alpha p_ref``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    soft = (1 - alpha) * F.one_hot(targets, logits.shape[-1]).to(logp.dtype) + alpha * p_ref.to(logp.dtype)
    return -(soft * logp).sum(-1).mean()


class SelfEvolution(MLM, nn.Module):
    """Stage 2 of self-evolution learning, with stage 1 run on the scorer in ``bind``."""

    attention = BIDIRECTIONAL

    def __init__(self, scorer: str | None = None, threshold: float = 0.1, alpha: Fraction = 0.1,
                 smoothing: str = "rectified", init_from_scorer: bool = True, mask_prob: Fraction = 0.15,
                 score_batch_size: Positive = 256) -> None:
        nn.Module.__init__(self)
        MLM.__init__(self, mask_prob=mask_prob)
        if smoothing not in ("rectified", "uniform"):
            raise UserError(f"unknown smoothing {smoothing!r}: set objective.smoothing to rectified or uniform.")
        self.scorer_dir, self.threshold, self.alpha, self.smoothing = scorer, threshold, alpha, smoothing
        self.init_from_scorer, self.score_batch_size = init_from_scorer, score_batch_size
        self.positions: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._scorer_state: dict | None = None
        self.register_buffer("initialized", torch.tensor(False))

    def bind(self, source, splits) -> None:
        MLM.bind(self, source, splits)
        scorer, kind = frozen_backbone(self.scorer_dir, source.vocab_size, "scorer", "scorer")
        if self.init_from_scorer:
            self._scorer_state = {k: v.clone() for k, v in scorer.state_dict().items()}
        rows = {tuple(r) for name in ("train", "validation") if name in splits
                for r in splits[name].with_format(None)["input_ids"]}
        self.positions = self.score(scorer, kind, sorted(rows, key=len))

    def score(self, scorer, kind: str, rows: list[tuple[int, ...]]) -> dict[tuple[int, ...], tuple[int, ...]]:
        out = {}
        for i in range(0, len(rows), self.score_batch_size):
            chunk = rows[i : i + self.score_batch_size]
            ids = torch.full((len(chunk), max(map(len, chunk))), PAD_ID, dtype=torch.long)
            for j, r in enumerate(chunk):
                ids[j, : len(r)] = torch.as_tensor(r)
            nll = token_nll(scorer, kind, ids)
            for j, r in enumerate(chunk):
                out[r] = tuple(informative_positions(nll[j, : len(r)].tolist(), r, self.threshold))
        return out

    def prepare(self, batch: dict) -> Prepared:
        ids = batch["input_ids"]
        fallback = MLM.prepare(self, batch)
        inputs, loss_mask = fallback.inputs.clone(), fallback.loss_mask.clone()
        for i, row in enumerate(ids.cpu().tolist()):
            stored = self.positions.get(tuple(t for t in row if t != PAD_ID))
            if stored:
                loss_mask[i] = False
                loss_mask[i, list(stored)] = True
                inputs[i] = ids[i].masked_fill(loss_mask[i], MASK_ID)
        return Prepared(inputs=inputs, targets=ids, loss_mask=loss_mask,
                        attention=Attention(BIDIRECTIONAL, padding=padding_of(ids)))

    def _initialise(self, model) -> None:
        if bool(self.initialized) or not self.init_from_scorer or self._scorer_state is None:
            return
        target = getattr(model, "_orig_mod", model)
        try:
            target.load_state_dict(self._scorer_state)
        except RuntimeError as e:
            raise UserError("the model config differs from the scorer run's, so it cannot start from the scorer's "
                            "weights: use the scorer's model config or set objective.init_from_scorer=false.") from e
        self.initialized.fill_(True)

    def loss(self, model, prepared: Prepared) -> tuple[torch.Tensor, dict[str, float]]:
        if model.training:
            self._initialise(model)
        targets = prepared.targets[prepared.loss_mask]
        if self.smoothing == "rectified":
            was_training = model.training
            model.eval()
            with torch.no_grad():
                ref = model(prepared.targets, prepared.attention)  # the unmasked row
                p_ref = F.softmax(model.logits(ref[prepared.loss_mask]).float(), dim=-1)
            model.train(was_training)
        hidden = model(prepared.inputs, prepared.attention)
        logits = model.logits(hidden[prepared.loss_mask])
        if self.smoothing == "uniform":
            p_ref = torch.full_like(logits, 1.0 / logits.shape[-1], dtype=torch.float32)
        loss = smoothed_ce(logits, targets, p_ref, self.alpha)
        return loss, {"ce": float(F.cross_entropy(logits.detach().float(), targets))}
