"""The evaluator contract: ``__call__(module, datamodule, run_dir) -> {"<name>/<metric>": value}``.

Evaluators are built before training, and ``skip_reason(source, objective)`` is asked then, with the data
source and the built objective (its ``attention`` says how the model will read): an evaluator that has nothing
to measure (a probe on text without labels) is skipped with a notice, and one that was configured for
something the data or the objective cannot give (lm-eval on a grammar, a mask classifier on a causal model)
raises ``UserError``, before any data is generated or any compute is spent. ``check_model(model)`` is asked
then too, with the built model (on the meta device in preflight: its structure, not its weights), and raises
``UserError`` where the evaluator cannot read that model (a layer-by-layer reading of a model without blocks).
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class Evaluator(ABC):
    name: str

    def skip_reason(self, source, objective=None) -> str | None:
        return None

    def check_model(self, model) -> None:
        """Raise ``UserError`` where this evaluator cannot read ``model``."""

    @abstractmethod
    def __call__(self, module, datamodule, run_dir=None) -> dict[str, float]: ...
