"""``eval=perplexity``: the objective's exact evaluation on the first rows of the validation split.

For CLM the loss is the per-token NLL (``ppl`` its exponential, the usual perplexity); for MLM it is the
single-mask pseudo-log-likelihood per word (``ppl``: the pseudo-perplexity). Where the source knows the
true distribution, ``optimum`` and ``gap`` give the best achievable loss and the distance to it.

Where the validation split names each row's source (a ``source`` column: ``data=mixture``), the same keys are
also reported per source, ``perplexity/<source>/loss`` etc., each on that source's first ``max_rows`` rows.
"""

from __future__ import annotations

import math

from lmlab.evaluation.base import Evaluator
from lmlab.settings import Optional, Positive


class Perplexity(Evaluator):
    name = "perplexity"

    def __init__(self, max_rows: Optional[Positive] = 500, batch_size: Positive = 64) -> None:
        self.max_rows, self.batch_size = max_rows, batch_size

    def __call__(self, module, datamodule, run_dir=None) -> dict[str, float]:
        split = datamodule.splits["validation"].with_format(None)
        n = len(split) if self.max_rows is None else min(self.max_rows, len(split))
        out = self._score(module, datamodule, [list(r) for r in split[:n]["input_ids"]], self.name)
        if "source" in split.column_names:
            groups: dict[str, list[list[int]]] = {}
            for ids, name in zip(split["input_ids"], split["source"]):
                rows = groups.setdefault(str(name), [])
                if self.max_rows is None or len(rows) < self.max_rows:
                    rows.append(list(ids))
            for name, rows in groups.items():
                out.update(self._score(module, datamodule, rows, f"{self.name}/{name}"))
        return out

    def _score(self, module, datamodule, rows: list[list[int]], prefix: str) -> dict[str, float]:
        result = module.objective.evaluate(module.model, rows, datamodule.source, self.batch_size)
        out = {f"{prefix}/loss": float(result["loss"]), f"{prefix}/ppl": math.exp(min(float(result["loss"]), 700.0))}
        for key in ("optimum", "gap"):
            if result.get(key) is not None:
                out[f"{prefix}/{key}"] = float(result[key])
        return out
