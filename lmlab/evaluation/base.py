"""The evaluator contract: ``__call__(module, datamodule, run_dir) -> {"<name>/<metric>": value}``.

Evaluators are built before training, and ``skip_reason(source)`` is asked then: an evaluator that has
nothing to measure on this data (a probe on text without labels) is skipped with a notice, and one that
was configured for something the data lacks raises ``UserError``, before any compute is spent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class Evaluator(ABC):
    name: str

    def skip_reason(self, source) -> str | None:
        return None

    @abstractmethod
    def __call__(self, module, datamodule, run_dir=None) -> dict[str, float]: ...
