"""The evaluator contract: ``__call__(module, datamodule, run_dir) -> {"<name>/<metric>": value}``.

Evaluators are built before training, and ``skip_reason(source, objective)`` is asked then, with the data
source and the built objective (its ``attention`` says how the model will read): an evaluator that has nothing
to measure (a probe on text without labels) is skipped with a notice, and one that was configured for
something the data or the objective cannot give (lm-eval on a grammar, a mask classifier on a causal model)
raises ``UserError``, before any data is generated or any compute is spent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class Evaluator(ABC):
    name: str

    def skip_reason(self, source, objective=None) -> str | None:
        return None

    @abstractmethod
    def __call__(self, module, datamodule, run_dir=None) -> dict[str, float]: ...
