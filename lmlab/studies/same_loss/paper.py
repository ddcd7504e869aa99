"""What Liu, Xie, Li & Ma, "Same Pre-training Loss, Better Downstream: Implicit Bias Matters for Language
Models" (ICML 2023, arXiv 2210.14199) claims: the three claims, the task each is tested on, the paper's numbers,
the rule the report applies, and the claims' titles."""

from __future__ import annotations

CLAIMS = ("continue", "size", "algorithm")

# The task each claim is tested on (the paper's), per kind of data.
TASKS = {("continue", "pcfg"): ("task_c",), ("continue", "hmm"): ("task_z",),
         ("size", "pcfg"): ("task_b",), ("size", "hmm"): ("task_z",),
         ("algorithm", "pcfg"): ("task_a", "task_b"), ("algorithm", "hmm"): ("task_z",)}

# The paper's numbers (Liu, Xie, Li & Ma, ICML 2023, arXiv 2210.14199), keyed by (claim, kind, row key, task);
# "[paper]": read from its text, not checked line by line. A row without an entry is an extension.
PAPER = {
    ("continue", "pcfg", "acc", "task_c"): "+1.6 pts (task C, SGD constant lr)",
    ("continue", "hmm", "acc", "task_z"): "+4.0 pts (z_10)",
    ("continue", "pcfg", "trace", ""): "falls (no number)",
    ("continue", "hmm", "trace", ""): "falls (no number)",
    ("size", "pcfg", "acc", "task_b"): "+6.9 pts at equal loss (task B probe 40.4% -> 50.5%)",
    ("size", "hmm", "acc", "task_z"): "+4.5 pts (hidden-state task)",
    ("size", "pcfg", "blocks", ""): "-7.2 (Tr(H) 19.8 -> 12.6)",
    ("size", "hmm", "blocks", ""): "falls (no number)",
    ("algorithm", "pcfg", "acc_adv", "task_a"): "+6.8 pts (Table 1, task A: 89.9% vs 83.1%)",
    ("algorithm", "pcfg", "acc_adv", "task_b"): "+6.9 pts (Table 1, task B: 49.2% vs 42.3%)",
    ("algorithm", "pcfg", "acc_lookup", "task_a"): "+18.7 pts (Table 1, task A: 89.9% vs 71.2%)",
    ("algorithm", "pcfg", "acc_lookup", "task_b"): "+9.5 pts (Table 1, task B: 49.2% vs 39.7%)",
    ("algorithm", "pcfg", "trace_adv", ""): "-11.3 (Table 2: Tr(H) 8.01 vs 19.34)",
}

RULE = (
    "Runs enter a comparison only when they count: finished, gap to the exact optimum (KL to the true "
    "single-mask conditionals on the fixed validation rows) at most the tolerance, and, when their history holds "
    "at least two gap evaluations, on a plateau: the gap moved by at most the plateau over the last plateau_steps "
    "steps (without plateau_steps: between the last two evaluations) while the learning rate of the run's recorded "
    "schedule stayed at least 10% of its peak there, or held one constant rate below its peak (a constant stage "
    "after a decay). A schedule decayed to its floor stops the loss by itself, so a flat gap there is not a "
    "plateau. A phase-2 (continue) run counts only when its parent counts by the same rule. Runs are paired by "
    "training seed (claim (a): the mean of the last k evaluations of a run minus the mean of its first k); "
    "accuracies are in percentage points.\n\n"
    "**Matched loss** is tested, not assumed: the paired per-seed gap difference (same direction as the "
    "comparison) must have its 95% t-interval inside +-margin (an equivalence test); claim (a): every evaluation "
    "of every phase-2 run after its burn-in (its schedule's warmup steps) must lie within +-margin of its parent's "
    "gap (its step-0 evaluation), and the gap column shows the largest deviation. A row that fails is "
    "**loss-confounded**: its difference may be the loss's, and it shows instead the gap-adjusted estimate: the "
    "intercept of the least-squares line of the per-seed differences on the per-seed gap differences (the "
    "difference at equal gap), with its 95% interval.\n\n"
    "For every row: n pairs, the mean difference with its 95% t-interval, the paired t-test's two-sided p, and "
    "the smallest detectable effect MDE = (t(1 - a/2, n-1) + t(0.8, n-1)) * sd / sqrt(n) (power 0.8, two-sided "
    "level a). The rows the paper claims, with matched loss, form one family of m rows; their p-values are "
    "Holm-adjusted and their MDE is at Holm's strictest threshold a = 0.05 / m (m is stated); the other rows' "
    "MDE is at a = 0.05. **Reproduced**: adjusted p < 0.05 with the paper's sign. **Not reproduced**: adjusted p "
    "< 0.05 with the opposite sign. **Inconclusive**: otherwise (or fewer than 2 pairs): the MDE says which "
    "effects the seeds could have seen; a null result is not a refutation. **Adversary ineffective** (claim "
    "(c)): the adversarial arm did not cost at least 5 points of the first task's probe accuracy at matched loss, "
    "so AdamW - adversarial tests nothing and is not decided; its table gives the adversary's own head accuracy "
    "on the test rows after training beside the probes. **n/a**: a metric is missing. Rows "
    "the paper does not claim (the HMM in claim (c), the all-parameter trace of claim (b), whose head and "
    "embedding terms widening does not preserve, the blocks-only trace of claims (a) and (c), the probe on a "
    "fixed random projection) are **extensions**, outside the family, with the same wording on their unadjusted "
    "p. Claim (b)'s primary trace is the blocks-only one. A trace row whose two arms counted different "
    "parameters (names or shapes, as the flatness evaluation records them) is **n/a**: not comparable."
)


TITLES = {
    "continue": "Claim (a): continuing pre-training after convergence improves transfer (and flattens)",
    "size": "Claim (b): at equal loss, larger models transfer better (and are flatter)",
    "algorithm": "Claim (c): at equal loss, the training algorithm changes transfer "
                 "(AdamW > adversarial, AdamW > lookup table)",
}

