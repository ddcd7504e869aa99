"""``eval=robustness``: the objective's evaluation loss on the validation rows under input noise, at several
noise rates: the perturbation analysis of HELM (Liang et al. 2022, "Holistic Evaluation of Language Models",
arXiv 2211.09110, whose robustness perturbations include typos), and the noise of the byte-level papers'
robustness claim (ByT5, Xue et al. 2022, arXiv 2105.13626; the hierarchical autoregressive transformer, HAT,
Neitemeier et al. 2025, arXiv 2501.10322, claims robustness to perturbed input text).

Two kinds of noise, each applied to the first ``max_rows`` validation rows with a generator seeded by
``seed`` (the same rows, the same draws for every model):

- ``token``: every token of the source's own (not BOS/EOS/PAD) is replaced, with probability ``rate``, by an
  id drawn uniformly from the source's own ids (``N_SPECIAL`` to ``vocab_size - 1``);
- ``byte`` (text data only: sources that ``decode`` and ``encode``): each run of own tokens between special
  tokens is decoded to UTF-8, every byte is replaced with probability ``rate`` by a byte drawn uniformly from
  printable ASCII (0x20-0x7e: ASCII text stays valid UTF-8 of the same length; a byte replaced inside a
  multi-byte character leaves an invalid sequence, read as U+FFFD), and the text is encoded again; a row that
  grows is cut back to its length, so that the rows keep their shapes.

What is scored is the perturbed row itself, with the objective's own evaluation (``Objective.evaluate``, the
computation of ``eval=perplexity``): the model reads the noisy text and is scored on it, noise included.
Keys ``robustness/<kind>/<rate>/loss`` and ``.../ppl``; at rate 0 the rows are untouched and the keys also
hold ``optimum`` and ``gap``: exactly ``eval=perplexity``'s numbers (with the same ``max_rows`` and
``batch_size``).

Where the data has downstream labels (``probe``: null), the linear probe of ``eval=probe`` (its defaults: the
data's first task, mean pooling, 3 seeds) is trained on the clean ``downstream`` rows and scored on the
``test`` rows under the same noise, as HELM perturbs the evaluation inputs only: ``.../probe_acc`` and
``.../probe_acc_ci95``; at rate 0, exactly ``probe/acc``.

At rate 1 token noise keeps nothing of the rows but their lengths and the positions of their special tokens:
two sets of rows with the same layout give the same noisy rows and the same loss, the loss on uniform random
inputs.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from lmlab.errors import UserError
from lmlab.evaluation.base import Evaluator
from lmlab.evaluation.probe import Probe
from lmlab.settings import Fraction, NonNegative, Positive
from lmlab.vocab import N_SPECIAL

KINDS = ("token", "byte")


def token_noise(rows: list[list[int]], rate: float, vocab_size: int, seed: int) -> list[list[int]]:
    """Each own token (id >= ``N_SPECIAL``) replaced with probability ``rate`` by a uniform own id. The draws
    depend on the rows' lengths only, not on their tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for row in rows:
        ids = np.asarray(row, dtype=np.int64)
        hit = (ids >= N_SPECIAL) & (rng.random(len(ids)) < rate)
        out.append(np.where(hit, rng.integers(N_SPECIAL, vocab_size, len(ids)), ids).tolist())
    return out


def byte_noise(rows: list[list[int]], rate: float, source, seed: int) -> list[list[int]]:
    """Each byte of the decoded text between special tokens replaced with probability ``rate`` by a uniform
    printable ASCII byte, then encoded again (rows cut back to their lengths)."""
    rng = np.random.default_rng(seed)
    out = []
    for row in rows:
        noisy: list[int] = []
        run: list[int] = []
        for tok in [*row, None]:  # None flushes the last run
            if tok is not None and tok >= N_SPECIAL:
                run.append(tok)
                continue
            if run:
                raw = np.frombuffer(source.decode(run).encode("utf-8"), dtype=np.uint8)
                hit = rng.random(len(raw)) < rate
                raw = np.where(hit, rng.integers(0x20, 0x7F, len(raw)), raw).astype(np.uint8)
                noisy += source.encode([raw.tobytes().decode("utf-8", errors="replace")])[0]
                run = []
            if tok is not None:
                noisy.append(tok)
        out.append(noisy[: len(row)])
    return out


def _readable(rate: float) -> str:
    return f"{rate:g}"


class Robustness(Evaluator):
    """Args: ``rates`` (noise rates in [0, 1]), ``kinds`` (``token``, ``byte``; null: token, and byte where
    the data is text), ``probe`` (the probe's accuracy under noise; null: where the data has downstream
    labels), ``seed``, ``max_rows`` (validation rows), ``batch_size``."""

    name = "robustness"

    def __init__(self, rates: list[Fraction] = (0.0, 0.05, 0.1, 0.2), kinds: list[str] | None = None,
                 probe: bool | None = None, seed: NonNegative = 0, max_rows: Positive | None = 500,
                 batch_size: Positive = 64) -> None:
        unknown = [k for k in (kinds or []) if k not in KINDS]
        if unknown:
            raise UserError(f"eval.robustness.kinds names {', '.join(map(str, unknown))}: choose among "
                            f"{', '.join(KINDS)}.")
        if not rates:
            raise UserError("eval.robustness.rates is empty: give noise rates, e.g. rates='[0,0.05,0.1,0.2]'.")
        self.rates, self.kinds, self.probe, self.seed = [float(r) for r in rates], kinds, probe, seed
        self.max_rows, self.batch_size = max_rows, batch_size

    @staticmethod
    def _is_text(source) -> bool:
        return callable(getattr(source, "decode", None)) and callable(getattr(source, "encode", None))

    def skip_reason(self, source, objective=None) -> str | None:
        if self.kinds and "byte" in self.kinds and not self._is_text(source):
            raise UserError(f"eval.robustness.kinds asks for byte noise and data {source.name} is not text: "
                            "drop byte from kinds (or set kinds=null).")
        if self.probe and Probe().skip_reason(source, objective):
            raise UserError(f"eval.robustness.probe=true and data {source.name} has no downstream labels: set "
                            "probe=null or false.")
        return None

    def _noisy(self, kind: str, rate: float, rows: list[list[int]], source) -> list[list[int]]:
        if rate == 0:
            return rows
        if kind == "token":
            return token_noise(rows, rate, source.vocab_size, self.seed)
        return byte_noise(rows, rate, source, self.seed)

    def _probe(self, probe: Probe, module, datamodule, kind: str, rate: float) -> dict[str, float]:
        """The probe trained on the clean downstream rows and scored on the noisy test rows."""
        test = datamodule.splits["test"]
        rows = self._noisy(kind, rate, [list(r) for r in test.with_format(None)["input_ids"]], datamodule.source)
        noisy = SimpleNamespace(source=datamodule.source, splits={
            **datamodule.splits, "test": test.remove_columns("input_ids").add_column("input_ids", rows)})
        metrics = probe(module, noisy)
        return {"probe_acc": metrics["probe/acc"], "probe_acc_ci95": metrics["probe/acc_ci95"]}

    def __call__(self, module, datamodule, run_dir=None) -> dict[str, float]:
        source = datamodule.source
        kinds = self.kinds or [k for k in KINDS if k == "token" or self._is_text(source)]
        split = datamodule.splits["validation"].with_format(None)
        n = len(split) if self.max_rows is None else min(self.max_rows, len(split))
        rows = [list(r) for r in split[:n]["input_ids"]]
        probe = Probe(lookup=False) if self.probe is not False and not Probe().skip_reason(source) else None
        out: dict[str, float] = {}
        for kind in kinds:
            for rate in self.rates:
                # at rate 0 the rows are untouched: eval=perplexity's computation, optimum included
                known = source if rate == 0 else None
                noisy = self._noisy(kind, rate, rows, source)
                result = module.objective.evaluate(module.model, noisy, known, self.batch_size)
                prefix = f"{self.name}/{kind}/{_readable(rate)}"
                if probe is not None:
                    out.update({f"{prefix}/{k}": v for k, v in self._probe(probe, module, datamodule, kind,
                                                                            rate).items()})
                out[f"{prefix}/loss"] = float(result["loss"])
                out[f"{prefix}/ppl"] = math.exp(min(float(result["loss"]), 700.0))
                for key in ("optimum", "gap"):
                    if result.get(key) is not None:
                        out[f"{prefix}/{key}"] = float(result[key])
        return out
