"""``eval=parse``: unsupervised constituency trees read from a model's hidden states, scored against the
grammar's gold trees.

Variant implemented: the distance-based parser of Kim, Choi, Edmiston, Bae and Lee, "Are Pre-trained Language
Models Aware of Phrases? Simple but Strong Baselines for Grammar Induction", ICLR 2020 (arXiv 2002.00737), on
hidden states. At each layer (``lmlab.evaluation.probe.layer_states``: layer 0 the embedding, layer L the
backbone's output) the syntactic distance between adjacent words ``t`` and ``t + 1`` of a row is
``d_t = 1 - cos(h_t, h_{t+1})`` (``distance=cosine``) or ``||h_t - h_{t+1}||_2`` (``distance=l2``), the rows
read whole and unmasked with the objective's attention pattern (as ``eval=probe`` reads them; BOS and EOS are
not words). The tree is built top-down by splitting every span at its largest distance (the distance-to-tree
algorithm of Shen et al., "Straight to the Tree", ACL 2018, arXiv 1806.04168, used by StructFormer, Shen et al.
2021, arXiv 2012.00857); ties split at the leftmost gap. Kim et al.'s attention-based distances and their
right-skewness bias are not implemented.

Score: unlabelled bracket F1 per sentence against the gold tree (the source's ``gold_spans``: for the PCFG
each row's most likely derivation), leaving out the trivial spans (single words and the whole sentence), as
evalb-style unlabelled F1 does, averaged over the sentences of at least 3 words (shorter ones have no span to
score); ``_ci95`` is the half-width of the 95% t-interval of that mean over sentences. The interval covers
the choice of sentences only: the model (its training or initialisation seed) is fixed, so comparing models
needs several seeds.

Layer (``layer``): ``best`` (the default) picks the layer of highest mean F1 on the first ``max_select`` rows
of the ``select_split`` split (downstream: sentences other than the scored ones), ``last`` the backbone's
output (any model), an int that layer. Every layer's F1 on the scored rows is also reported, the per-layer
curve (not with ``last``).

Keys: ``parse/f1`` and ``parse/f1_ci95`` (the chosen layer), ``parse/layer``, ``parse/layer<i>/f1`` and
``_ci95``; the baselines on the same sentences, ``parse/right_f1``, ``parse/left_f1`` (right- and
left-branching trees) and ``parse/random_f1`` (trees of uniform random distances, seeded by ``seed``), each with
its ``_ci95``; ``parse/f1_minus_right`` with its ``_ci95`` (the mean paired difference over sentences between
the model's F1 and the right-branching tree's); ``parse/sentences`` (how many were scored).
"""

from __future__ import annotations

import numpy as np
import torch

from lmlab.errors import UserError
from lmlab.evaluation.base import Evaluator
from lmlab.evaluation.probe import block_list, layer_states
from lmlab.readout import model_device, pad_rows, reading_attention
from lmlab.stats import paired_difference, t_interval
from lmlab.vocab import PAD_ID

Spans = set[tuple[int, int]]
DISTANCES = ("cosine", "l2")


def bracket_f1(pred: Spans, gold: Spans, n: int) -> float | None:
    """Unlabelled bracket F1 of the spans ``(i, j)`` (words i .. j-1) of two trees over ``n`` words, without the
    trivial spans (single words, the whole sentence); ``None`` when neither tree has another span."""
    p = {(i, j) for i, j in pred if j - i > 1 and (i, j) != (0, n)}
    g = {(i, j) for i, j in gold if j - i > 1 and (i, j) != (0, n)}
    if not p and not g:
        return None
    hit = len(p & g)
    if hit == 0:
        return 0.0
    precision, recall = hit / len(p), hit / len(g)
    return 2 * precision * recall / (precision + recall)


def tree_from_distances(distances) -> Spans:
    """The spans (two words or more, the whole included) of the binary tree over ``len(distances) + 1`` words
    built top-down by splitting each span at its largest distance (``distances[t]``: between words t and t + 1;
    ties at the leftmost)."""
    d = np.asarray(distances, dtype=np.float64)
    spans: Spans = set()
    stack = [(0, len(d) + 1)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        spans.add((i, j))
        k = i + 1 + int(np.argmax(d[i : j - 1]))
        stack += [(i, k), (k, j)]
    return spans


def right_branching(n: int) -> Spans:
    """(w_0 (w_1 (... w_n-1))): the spans (i, n)."""
    return {(i, n) for i in range(n - 1)}


def left_branching(n: int) -> Spans:
    """(((w_0 w_1) ...) w_n-1): the spans (0, j)."""
    return {(0, j) for j in range(2, n + 1)}


def adjacent_distances(h: torch.Tensor, distance: str) -> np.ndarray:
    """(n, d) states of consecutive words -> the n - 1 distances between neighbours, in float64."""
    h = h.double()
    if distance == "cosine":
        return (1.0 - torch.nn.functional.cosine_similarity(h[:-1], h[1:], dim=-1)).cpu().numpy()
    return (h[1:] - h[:-1]).norm(dim=-1).cpu().numpy()


class Parse(Evaluator):
    name = "parse"

    def __init__(self, distance: str = "cosine", layer: str | int = "best", split: str = "validation",
                 max_rows: int | None = 500, select_split: str = "downstream", max_select: int | None = 200,
                 batch_size: int = 256, seed: int = 0) -> None:
        if distance not in DISTANCES:
            raise UserError(f"eval.parse.distance must be one of {', '.join(DISTANCES)}, got {distance!r}: set one.")
        if isinstance(layer, bool) or not (layer in ("best", "last") or (isinstance(layer, int) and layer >= 0)):
            raise UserError(f"eval.parse.layer must be best, last or a layer number 0..n_layers, got {layer!r}: "
                            "set one of those.")
        self.distance, self.layer, self.split, self.max_rows = distance, layer, split, max_rows
        self.select_split, self.max_select = select_split, max_select
        self.batch_size, self.seed = batch_size, seed
        self._gold_cache: dict = {}  # the gold trees do not depend on the model: parsed once (e.g. for eval_every)

    def skip_reason(self, source, objective=None) -> str | None:
        if not callable(getattr(source, "gold_spans", None)):
            raise UserError(f"data {source.name} has no gold trees: run eval=parse on data=pcfg.")
        return None

    def check_model(self, model) -> None:
        if self.layer != "last":
            block_list(model, "eval.parse.layer")

    def __call__(self, module, datamodule, run_dir=None) -> dict[str, float]:
        model, kind = module.model, module.objective.attention
        rows, gold = self._gold(datamodule, self.split, self.max_rows)
        if not rows:
            raise UserError(f"the {self.split} split has no sentence of 3 words or more to parse: "
                            "give eval.parse more rows.")
        was_training = model.training
        model.eval()
        try:
            per_layer = self._distances(model, kind, rows)
            layer, out = self._choose(model, kind, datamodule, len(per_layer))
        finally:
            model.train(was_training)
        n_words = [len(r) - 2 for r in rows]
        scores = {i: self._scores(d, gold, n_words) for i, d in enumerate(per_layer)}
        if self.layer != "last":
            for i, s in scores.items():
                out.update(_summary(f"{self.name}/layer{i}/f1", s))
        chosen = scores[layer if self.layer != "last" else len(per_layer) - 1]
        rng = np.random.default_rng(self.seed)
        baselines = {
            "right": [bracket_f1(right_branching(n), g, n) for n, g in zip(n_words, gold)],
            "left": [bracket_f1(left_branching(n), g, n) for n, g in zip(n_words, gold)],
            "random": [bracket_f1(tree_from_distances(rng.random(n - 1)), g, n) for n, g in zip(n_words, gold)],
        }
        out.update(_summary(f"{self.name}/f1", chosen))
        for name, s in baselines.items():
            out.update(_summary(f"{self.name}/{name}_f1", s))
        diff = paired_difference(chosen, baselines["right"]).diff
        out[f"{self.name}/f1_minus_right"] = diff.mean
        out[f"{self.name}/f1_minus_right_ci95"] = diff.half if len(chosen) > 1 else 0.0
        out[f"{self.name}/sentences"] = float(len(rows))
        return out

    def _gold(self, datamodule, split: str, limit: int | None) -> tuple[list[list[int]], list[Spans]]:
        """The first ``limit`` rows of ``split`` and their gold spans, keeping the sentences of 3 words or more
        that the grammar derives."""
        key = (id(datamodule.source), split, limit)
        if key not in self._gold_cache:
            self._gold_cache[key] = self._parse_gold(datamodule, split, limit)
        return self._gold_cache[key]

    @staticmethod
    def _parse_gold(datamodule, split: str, limit: int | None) -> tuple[list[list[int]], list[Spans]]:
        if split not in datamodule.splits:
            raise UserError(f"eval.parse reads the {split} split, which the data does not have: "
                            f"choose one of {', '.join(datamodule.splits)}.")
        data = datamodule.splits[split].with_format(None)
        n = len(data) if limit is None else min(int(limit), len(data))
        rows = [list(r) for r in data[:n]["input_ids"]]
        rows = [r for r in rows if len(r) - 2 >= 3]
        gold = datamodule.source.gold_spans(rows)
        keep = [i for i, g in enumerate(gold) if g is not None]
        return [rows[i] for i in keep], [gold[i] for i in keep]

    @torch.no_grad()
    def _distances(self, model, kind: str, rows: list[list[int]]) -> list[list[np.ndarray]]:
        """Per layer, per row: the distances between its adjacent words (only the output with ``layer=last``)."""
        per_layer: list[list[np.ndarray]] | None = None
        for b in range(0, len(rows), self.batch_size):
            ids = pad_rows(rows[b : b + self.batch_size])
            if self.layer == "last":
                ids = ids.to(model_device(model))
                states = [model(ids, reading_attention(kind, ids))]
            else:
                states = layer_states(model, ids, kind, "eval.parse.layer")
            per_layer = per_layer or [[] for _ in states]
            lengths = (ids != PAD_ID).sum(1).tolist()
            for i, h in enumerate(states):
                per_layer[i] += [adjacent_distances(h[r, 1 : t - 1], self.distance) for r, t in enumerate(lengths)]
        return per_layer or []

    def _scores(self, distances: list[np.ndarray], gold: list[Spans], n_words: list[int]) -> list[float]:
        return [bracket_f1(tree_from_distances(d), g, n) for d, g, n in zip(distances, gold, n_words)]

    def _choose(self, model, kind: str, datamodule, n_layers: int) -> tuple[int, dict[str, float]]:
        """The layer to report (``layer``) and the ``parse/layer`` key."""
        if self.layer == "last":
            return n_layers - 1, {}
        if self.layer != "best":
            if self.layer >= n_layers:
                raise UserError(f"eval.parse.layer={self.layer} but the model has layers 0..{n_layers - 1}: "
                                "choose one of those, best or last.")
            return self.layer, {f"{self.name}/layer": float(self.layer)}
        rows, gold = self._gold(datamodule, self.select_split, self.max_select)
        if not rows:
            raise UserError(f"the {self.select_split} split has no sentence of 3 words or more to choose a layer "
                            "on: set eval.parse.select_split to another split, or eval.parse.layer to a number.")
        n_words = [len(r) - 2 for r in rows]
        means = [float(np.mean(self._scores(d, gold, n_words))) for d in self._distances(model, kind, rows)]
        best = int(np.argmax(means))
        return best, {f"{self.name}/layer": float(best)}


def _summary(key: str, scores: list[float | None]) -> dict[str, float]:
    """The mean of the scored sentences' F1 (``None``: not scored) and its t-interval half-width."""
    x = np.asarray([s for s in scores if s is not None], dtype=np.float64)
    return {key: float(x.mean()), f"{key}_ci95": t_interval(x)}
