"""``eval=length``: next-token loss by position far beyond the training length, with sliding-window
attention and attention sinks for attention models (StreamingLLM: Xiao et al. 2023, "Efficient Streaming
Language Models with Attention Sinks", arXiv 2309.17453) and the carried state for recurrent models.

The long sequences are the validation rows concatenated in order (``[BOS] .. [EOS] [BOS] .. [EOS] ..``), up to
``sequences`` pieces of ``factor * train_length + 1`` tokens, each starting at the start of a row (with the
``[BOS]`` the model always saw first in training); ``train_length`` is the longest validation row's input (its
tokens less one: the model reads ``ids[:-1]``) unless set. Position ``t`` is the prediction of token ``t + 1``
from tokens ``0..t``.

Attention models (those with ``model.sinks``, the Transformer) read through a window when ``window`` is set:
each query sees its last ``window`` positions plus the first ``sinks`` positions of the sequence (``sinks:
null``: the model's ``model.sinks``). ``positions`` says where a rotary model places the sink keys: ``cache``
(the paper's scheme: positions within the rolling cache of ``sinks + window`` entries, so no distance exceeds
what a window of that size sees; the paper found this needed, its section 3.2) or ``original`` (the sinks keep
their positions in the sequence: distances up to the sequence length, unseen in training). ``window: null`` is
full causal attention over the whole sequence (plain length extrapolation). Recurrent models (mamba, mamba2,
lstm, ...) simply run the long sequence, their state carrying from start to end; a window is refused there.

Keys: ``length/loss@<end>`` is the mean loss over the positions of the bucket that ends (exclusively) at
``end`` and starts where the previous bucket ends (the first at 0); the default ends are ``train_length``,
``2 * train_length``, ``4 * train_length``, .. up to ``factor * train_length``. ``length/loss_in_window`` is the
mean over positions below ``min(window, train_length)`` (the positions the windowed model reads exactly as in
training); ``length/loss_beyond`` over positions from ``train_length`` on; ``length/ratio`` the second over the
first.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.attention import CAUSAL, Attention
from lmlab.errors import UserError
from lmlab.evaluation.base import Evaluator
from lmlab.readout import model_device
from lmlab.settings import NonNegative, Optional, Positive

POSITION_SCHEMES = ("cache", "original")
PositionScheme = Literal[POSITION_SCHEMES]  # the ``positions`` setting


def bucket_ends(train_length: int, total: int, ends: list[int] | None = None) -> list[int]:
    """The (exclusive) ends of the position buckets: ``ends`` as given (checked), else ``train_length``
    doubled until ``total``, ``total`` last."""
    if ends is None:
        out, end = [], train_length
        while end < total:
            out.append(end)
            end *= 2
        return out + [total]
    ends = [int(e) for e in ends]
    if not ends or any(b <= a for a, b in zip([0] + ends, ends)) or ends[-1] > total:
        raise UserError(f"eval.length.buckets={ends} must be increasing positive positions up to {total} "
                        "(factor times the training length): fix the list or set it to null.")
    return ends


def bucket_losses(per_position: np.ndarray, ends: list[int]) -> dict[int, float]:
    """``{end: mean of per_position[previous end:end]}`` for each bucket end (the first starts at 0)."""
    out, start = {}, 0
    for end in ends:
        out[end] = float(np.mean(per_position[start:end]))
        start = end
    return out


class Length(Evaluator):
    name = "length"

    def __init__(self, factor: Positive = 32, train_length: Optional[Positive] = None,
                 window: Optional[Positive] = None, sinks: Optional[NonNegative] = None,
                 positions: PositionScheme = "cache", buckets: list[int] | None = None, sequences: Positive = 8,
                 batch_size: Positive = 1) -> None:
        if positions not in POSITION_SCHEMES:
            raise UserError(f"unknown eval.length.positions {positions!r}: choose one of "
                            f"{', '.join(POSITION_SCHEMES)}.")
        for key, value, default in (("sinks", sinks, None), ("positions", positions, "cache")):
            if value != default and window is None:
                raise UserError(f"eval.length.{key} only applies under a sliding window: set eval.length.window or "
                                f"drop eval.length.{key}.")
        self.factor, self.train_length, self.window, self.sinks = factor, train_length, window, sinks
        self.positions, self.buckets, self.sequences, self.batch_size = positions, buckets, sequences, batch_size

    def skip_reason(self, source, objective=None) -> str | None:
        if objective is not None and objective.attention != CAUSAL:
            raise UserError(f"eval=length scores next-token prediction and objective {type(objective).__name__} "
                            f"trains with {objective.attention} attention: evaluate a causal run (objective=clm).")
        return None

    def long_sequences(self, rows: list[list[int]], length: int) -> torch.Tensor:
        """(n, length) long: up to ``sequences`` pieces, each the next rows concatenated in order from the start
        of a row (so that every sequence begins as the rows do, with ``[BOS]``) and cut at ``length`` tokens;
        the rest of the last row of a piece is left out."""
        out, piece = [], []
        for row in rows:
            piece.extend(row)
            if len(piece) >= length:
                out.append(piece[:length])
                piece = []
                if len(out) == self.sequences:
                    break
        if not out:
            raise UserError(f"the validation rows hold {sum(map(len, rows))} tokens, fewer than one sequence of "
                            f"{length}: raise data.validation_size or lower eval.length.factor.")
        return torch.tensor(out, dtype=torch.long)

    def check_model(self, model) -> None:
        model = getattr(model, "_orig_mod", model)
        if self.window is not None and not hasattr(model, "sinks"):
            raise UserError(f"model {type(model).__name__} has no attention window (its state carries the context): "
                            "drop eval.length.window and eval.length.sinks.")

    @torch.no_grad()
    def __call__(self, module, datamodule, run_dir=None) -> dict[str, float]:
        model = getattr(module.model, "_orig_mod", module.model)
        windowable = hasattr(model, "sinks")
        self.check_model(model)
        rows = [list(r) for r in datamodule.splits["validation"].with_format(None)["input_ids"]]
        train_length = self.train_length or max(len(r) for r in rows) - 1
        total = self.factor * train_length
        ends = bucket_ends(train_length, total, self.buckets)
        seqs = self.long_sequences(rows, total + 1)
        attention = Attention(CAUSAL, window=self.window, sinks=self.sinks, cache_positions=self.positions == "cache")
        was_training = model.training
        model.eval()
        device = model_device(model)
        nll = torch.zeros(total, dtype=torch.float64)
        try:
            for i in range(0, len(seqs), self.batch_size):
                ids = seqs[i : i + self.batch_size].to(device)
                logits = model.logits(model(ids[:, :-1], attention)).double()
                nll += F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum(0).cpu()
        finally:
            model.train(was_training)
        per_position = (nll / len(seqs)).numpy()
        out = {f"{self.name}/loss@{end}": loss for end, loss in bucket_losses(per_position, ends).items()}
        in_window = min(self.window or train_length, train_length)
        out[f"{self.name}/loss_in_window"] = float(per_position[:in_window].mean())
        out[f"{self.name}/loss_beyond"] = float(per_position[train_length:].mean()) if total > train_length \
            else float("nan")
        out[f"{self.name}/ratio"] = out[f"{self.name}/loss_beyond"] / out[f"{self.name}/loss_in_window"]
        out[f"{self.name}/train_length"] = float(train_length)
        out[f"{self.name}/sequences"] = float(len(seqs))
        if windowable and self.window is not None:
            out[f"{self.name}/sinks"] = float(model.sinks if self.sinks is None else self.sinks)
        return out
