"""``eval=perplexity``: the objective's exact evaluation on the first rows of the validation split.

For CLM the loss is the per-token NLL (``ppl`` its exponential, the usual perplexity); for MLM it is the
single-mask pseudo-log-likelihood per word (``ppl``: the pseudo-perplexity). Where the source knows the
true distribution, ``optimum`` and ``gap`` give the best achievable loss and the distance to it.
"""

from __future__ import annotations

import math

from lmlab.evaluation.base import Evaluator


class Perplexity(Evaluator):
    name = "perplexity"

    def __init__(self, max_rows: int | None = 500, batch_size: int = 64) -> None:
        self.max_rows, self.batch_size = max_rows, batch_size

    def __call__(self, module, datamodule, run_dir=None) -> dict[str, float]:
        split = datamodule.splits["validation"].with_format(None)
        n = len(split) if self.max_rows is None else min(self.max_rows, len(split))
        rows = [list(r) for r in split[:n]["input_ids"]]
        result = module.objective.evaluate(module.model, rows, datamodule.source, self.batch_size)
        out = {f"{self.name}/loss": float(result["loss"]),
               f"{self.name}/ppl": math.exp(min(float(result["loss"]), 700.0))}
        for key in ("optimum", "gap"):
            if result.get(key) is not None:
                out[f"{self.name}/{key}"] = float(result[key])
        return out
