"""Liu, Xie, Li & Ma, "Same Pre-training Loss, Better Downstream: Implicit Bias Matters for Language Models",
ICML 2023, arXiv 2210.14199: the claim-by-claim report of a rerun of the experiments of
``conf/experiment/same_loss/`` (``make reproduce-paper``, ``lmlab report <dir>``).

It reads every job under ``<dir>`` and sorts them by the experiment that made them and by data set
(``runs``), tests each of the paper's three ways to same-loss models with different transfer on the task the paper
uses for it (``claims``), and writes ``<dir>/report.md``, ``<dir>/report.json`` and PNG plots (``render``).

"Same loss" is a checked property, not an assumption: a comparison counts as matched only when the 95%
interval of its paired gap difference lies inside +-margin (an equivalence test); otherwise it is
"loss-confounded" and shows a gap-adjusted estimate. The matched rows the paper claims form one family whose
p-values are Holm-adjusted; the rows it does not claim are extensions, tested unadjusted (``statistics``,
``paper.RULE``). ``write_report(..., compare=<other dir>)`` adds the agreement of the verdicts with an independent
rerun (other seeds).
"""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.studies.same_loss.render import write_report
from lmlab.studies.same_loss.runs import REPORT_JSON


class SameLoss:
    """The study that ``conf/experiment/same_loss/*.yaml`` declare. ``tolerance``, ``margin``, ``plateau`` and
    ``k`` override the rerun's ``reproduce.json`` (None: its value, or the default)."""

    def __init__(self, tolerance: float | None = None, margin: float | None = None, plateau: float | None = None,
                 k: int | None = None):
        self.tolerance, self.margin, self.plateau, self.k = tolerance, margin, plateau, k

    def __call__(self, path: str | Path, compare: str | Path | None = None) -> Path:
        """Write the report of the rerun under ``path`` (with ``compare``: the stability of its verdicts against
        another rerun's) and return its path."""
        report = write_report(path, self.tolerance, compare=compare, margin=self.margin, plateau=self.plateau,
                              k=self.k)
        stability = json.loads((report.parent / REPORT_JSON).read_text()).get("stability")
        if stability:
            print(f"[lmlab] stability against {stability['compare']}: {stability['agree']} of "
                  f"{stability['decided']} decided rows agree")
        return report


__all__ = ["SameLoss", "write_report"]
