"""Mutation testing of the modules whose numbers researchers publish, with mutmut (3.x).

Each module is mutated in a copy of the tree (``--workdir``/NAME: lmlab, tests, conf, hydra_plugins, scripts, docs
and pyproject.toml, with a ``[tool.mutmut]`` section written for that module only), and each mutant is checked by
ONLY the tests listed for the module here (mutmut narrows them further to the tests that call the mutated
function). ``functions`` restricts a module to the functions that compute published numbers (mutmut's mangled
names: ``x_NAME`` for a function, ``xǁCLASSǁNAME`` for a method; globs allowed); without it every function of
the file is mutated. The kill rate per module is printed at the end:

    killed / (killed + survived + no tests)       (a timeout counts as killed, as mutmut does)

beside the wall time and the CPU time (user + system seconds of mutmut and every test process it ran, from
``getrusage(RUSAGE_CHILDREN)``), which measures the budget on a machine shared with other jobs too.

``EQUIVALENT`` lists mutants that no test can kill because they do not change behaviour (with the reason); they
are reported apart and left out of the rate of non-equivalent mutants. docs/testing.md has the figures.

    python scripts/mutate.py stats                # one module
    python scripts/mutate.py                      # all of them but those marked default=False (`make mutate`)
    python scripts/mutate.py --list               # the modules, their functions and tests
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ["lmlab", "tests", "conf", "hydra_plugins", "scripts", "docs", "pyproject.toml"]  # docs: tests compare with it


@dataclass(frozen=True)
class Module:
    path: str                              # the file mutated, relative to the repository root
    tests: tuple[str, ...]                 # pytest node ids or files: the only tests that check it
    functions: tuple[str, ...] = ()        # mangled-name globs of the functions mutated (empty: all)
    what: str = ""
    default: bool = True                   # False: run only when named (its survivors are not reviewed)
    preload: tuple[str, ...] = ()          # modules imported once before the mutants are checked (pytest -p)

    @property
    def dotted(self) -> str:
        return self.path.removesuffix(".py").replace("/", ".")

    def globs(self) -> list[str]:
        return [f"{self.dotted}.{f}__mutmut_*" for f in (self.functions or ("*",))]


HMM = "xǁHMMSourceǁ"
# the export weight mapping: each model's HFAdapter (to_hf / from_hf), checked against transformers' own classes
EXPORT_TESTS = ("tests/test_mutation_kills.py",
                "tests/test_export.py::test_every_weight_of_the_mapping_reaches_the_logits",
                "tests/test_export.py::test_models_without_a_transformers_counterpart_are_refused_in_one_sentence",
                "tests/test_hf_import.py::test_export_then_import_gives_the_same_logits",
                "tests/test_hf_import.py::test_a_checkpoint_the_model_does_not_compute_is_refused_in_one_sentence")
# transformers imports its model classes on first use, seconds of CPU that each mutant's test process would pay
# again (and that a mutant of a function with fast tests would spend past its time limit): import them once
EXPORT_PRELOAD = tuple(f"transformers.models.{m}.modeling_{m}" for m in ("arcee", "llama", "gpt2", "mamba", "mamba2"))
PCFG = "xǁPCFGSourceǁ"
MODULES: dict[str, Module] = {
    "stats": Module("lmlab/stats.py",
                    ("tests/test_stats.py", "tests/test_mutation_kills.py",
                     "tests/test_evaluators.py::test_t_interval_equals_scipy",
                     "tests/test_sweep_report.py::test_mean_interval_matches_scipy",
                     "tests/test_sweep_report.py::test_mean_interval_of_one_and_none",
                     "tests/test_sweep_report.py::test_paired_difference_matches_ttest_rel",
                     "tests/test_zeroshot.py::test_ece_hand_example_with_exact_fractions",
                     "tests/test_zeroshot.py::test_ece_bins_are_closed_on_the_right_and_one_bin_is_the_overall_gap",
                     "tests/test_zeroshot.py::test_ece_of_perfectly_calibrated_predictions_is_near_zero"),
                    what="t quantiles and intervals, paired tests, equivalence, Holm, OLS, calibration error"),
    "grammar": Module("lmlab/data/grammar.py",
                      ("tests/test_pcfg.py", "tests/test_mutation_kills.py",
                       *(f"tests/test_parse.py::{t}" for t in (
                           "test_viterbi_attaches_the_prepositional_phrase_by_hand",
                           "test_viterbi_follows_unary_chains",
                           "test_viterbi_equals_a_brute_force_search_on_the_default_grammar",
                           "test_gold_trees_score_one_against_themselves"))),
                      ("x__merge", "xǁGrammarǁfrom_rules", "x_parse_grammar", "xǁGrammarǁsample",
                       "xǁGrammarǁviterbi_spans", "xǁGrammarǁ_close_unary"),
                      what="grammar files and generated grammars: rules, probabilities, sampling"),
    "pcfg": Module("lmlab/data/pcfg.py", ("tests/test_pcfg.py", "tests/test_mutation_kills.py"),
                   tuple(PCFG + f for f in ("_emissions", "_inside", "_close", "_outside", "_unclose",
                                            "_argmax_or_minus1", "labels", "_rows_to_words", "sequence_nll",
                                            "single_mask_conditionals")),
                   what="inside-outside: exact sequence NLL, single-mask conditionals, labels"),
    "hmm": Module("lmlab/data/hmm.py", ("tests/test_hmm.py", "tests/test_mutation_kills.py"),
                  tuple(HMM + f for f in ("_words", "_forward_backward", "_by_length", "sequence_nll",
                                          "single_mask_conditionals", "posterior")),
                  what="forward-backward: exact sequence NLL, single-mask conditionals, posteriors"),
    "callbacks": Module("lmlab/training/callbacks.py",
                        ("tests/test_mutation_kills.py",
                         "tests/test_stats_callback.py::test_divergence_guard_passes_a_skipped_update",
                         "tests/test_endrun.py::test_loss_window_is_the_mean_of_the_last_steps_and_survives_a_checkpoint"),
                        ("xǁDivergedǁ*", "xǁDivergenceGuardǁ*", "xǁLossWindowǁ*", "xǁSaveOnTermǁ*",
                         "xǁEvaluateEveryǁ*"),
                        what="the divergence guard, and the loss window and evaluation history a resume restores"),
    # dedup's fast tests only (each well under a second): the all-pairs answer on a small pool in chunks
    # (tests/test_mutation_kills.py) stands in for the larger all-pairs, planted-copies and shards tests
    "dedup": Module("lmlab/selection/dedup.py",
                    (*(f"tests/test_selection_filters.py::{t}" for t in (
                        "test_shingles_and_jaccard_known_answers", "test_minhash_estimates_jaccard",
                        "test_lsh_params_favour_recall", "test_exact_duplicates_keep_first",
                        "test_dedup_selector_reports_and_caches")),
                        "tests/test_mutants.py::test_dedup_at_threshold_one_removes_a_pair_of_equal_shingle_sets",
                        "tests/test_mutation_kills.py"),
                    ("x__splitmix64", "x_shingle_hashes", "x_permutations", "x_minhash_signatures", "x_lsh_params",
                     "x_jaccard", "x_band_keys", "x_bucket_pairs", "x__find", "x__confirm", "x_duplicates",
                     "xǁDedupǁselect"),
                    what="MinHash-LSH near-duplicate removal"),
    **{name: Module(path, EXPORT_TESTS, functions, what=f"the weight mapping onto transformers' classes ({what})",
                    preload=EXPORT_PRELOAD)
       for name, path, functions, what in (
           ("export", "lmlab/models/transformer.py", ("x_rope_theta", "x__to_hf", "x__from_hf"),
            "GPT-2, Llama, Arcee"),
           ("export-mamba", "lmlab/models/mamba.py", ("x_mixer_state_to_hf", "x_mixer_state_from_hf",
                                                     "x_check_mixer_config", "x__mamba_to_hf", "x__mamba_from_hf"),
            "Mamba, and the mixer weights of Mamba-2"),
           ("export-mamba2", "lmlab/models/mamba2.py", ("x__to_hf", "x__from_hf"), "Mamba-2"))},
    "paper": Module("lmlab/studies/same_loss/statistics.py",
                    ("tests/test_paper_report.py", "tests/test_mutation_kills.py"),
                    ("x_make_row", "x_within_pair_adjustment", "x__direction", "x_decide", "x_base_verdict"),
                    what="the same-loss study's verdicts"),
    "paper-runs": Module("lmlab/studies/same_loss/runs.py",
                         ("tests/test_paper_report.py", "tests/test_mutation_kills.py"),
                         ("x_plateau_exclusion", "x_exclusion", "x__parent_exclusion", "x_run_exclusion",
                          "xǁScheduleǁ*", "x_read_schedule"),
                         what="which runs count: tolerance, the plateau rule and its learning-rate floor, parents"),
    "paper-claims": Module("lmlab/studies/same_loss/claims.py",
                           ("tests/test_paper_report.py", "tests/test_mutation_kills.py"),
                           ("x_burn_in", "x_parent_deviation", "x_continue_matched", "x_same_parameters",
                            "x_adversary_rows"),
                           what="claim (a)'s matched loss at every evaluation, one parameterisation per trace row, "
                                "an ineffective adversary"),
}

# Mutants that cannot change what a caller gets, with the reason (mutmut numbers the mutants of a function in
# order, so a change to that function renumbers them: rerun and review the survivors after editing it).
_DTYPE = "dtype=float64 dropped: numeric input is promoted to float64 by the arithmetic that follows"
_NEG = "reshape(-2) is reshape(-1): numpy reads any negative size as 'the rest'"
_BINS = ("for confidences in [0, 1] the bin index is at most n_bins - 1 already: edges past 1 and the upper clip "
         "change nothing")
_BISECT = ("200 halvings narrow the bracket far below one float's spacing: the bracket's start and growth, one more "
           "halving, or which side an exact tie falls (probability 0) land on the same quantile")
_EMPTY_GROUP = ("the word array of the 0-word group is never read: sequence_nll skips other lengths, "
                "single_mask_conditionals skips n = 0, posterior refuses it")
_WORD_DTYPE = "token ids are Python ints (int64 without the dtype); an empty row's array is only measured"
_ZERO_BY_ZERO = "the divisor is a sum of the non-negative numerators: only 0 / 0 (invalid) occurs, never divide"
_NO_UNARY = "without unary rules the closure K is the identity matrix: x @ K is x"
_INT_DTYPE = ("integer arrays and lists of Python ints become int64 (torch.long) without the dtype; the empty list of "
              "start children is never used as an index")
_CHART = "a chart one cell larger, or a span loop one longer (no start fits it), is never read past the sentence"
_MARKS = ("split points are >= 1 and children/rules >= 0, so only the sign of the -1 marks is read: -2, `<= 0` or "
          "`< 1` read the same")
_SPAN_ONE = ("the traceback stops at a one-word cell either way (a unary rule there adds no constituent of two or "
             "more words)")
EQUIVALENT: dict[str, str] = {
    **{f"lmlab.stats.x_expected_calibration_error__mutmut_{i}": _DTYPE for i in (5, 7, 13, 15, 31, 33)},
    **{f"lmlab.stats.x_expected_calibration_error__mutmut_{i}": _NEG for i in (9, 17)},
    **{f"lmlab.stats.x_expected_calibration_error__mutmut_{i}": _BINS for i in (35, 39, 54)},
    "lmlab.stats.x_expected_calibration_error__mutmut_27": 'float("NAN") is float("nan")',
    "lmlab.stats.x_expected_calibration_error__mutmut_49": 'side="left" is searchsorted\'s default',
    **{f"lmlab.stats.x_ols__mutmut_{i}": _DTYPE for i in (3, 5, 9, 11)},
    "lmlab.stats.x_ols__mutmut_13": _NEG,
    **{f"lmlab.stats.x_ols_slope__mutmut_{i}": _DTYPE for i in (4, 6, 12, 14)},
    **{f"lmlab.stats.x_ols_slope__mutmut_{i}": _NEG for i in (8, 16)},
    "lmlab.stats.x_ols_slope__mutmut_28": "sum(xc * (y + mean y)) = sum(xc * (y - mean y)) since sum(xc) = 0",
    **{f"lmlab.stats.x_paired_difference__mutmut_{i}": _DTYPE for i in (5, 7, 13, 15)},
    **{f"lmlab.stats.x_paired_difference__mutmut_{i}": _NEG for i in (9, 17)},
    **{f"lmlab.stats.x_paired_t_test__mutmut_{i}": _DTYPE for i in (4, 6)},
    "lmlab.stats.x_paired_t_test__mutmut_8": _NEG,
    "lmlab.stats.x_paired_t_test__mutmut_2": "paired_difference, which gets x, flattens it",
    **{f"lmlab.stats.x_t_interval__mutmut_{i}": _DTYPE for i in (4, 6)},
    **{f"lmlab.stats.x_mean_interval__mutmut_{i}": _DTYPE for i in (5, 7)},
    "lmlab.stats.x_mean_interval__mutmut_9": _NEG,
    **{f"lmlab.stats.x_t_quantile__mutmut_{i}": _BISECT for i in (8, 13, 16, 18, 27)},
    "lmlab.stats.xǁOLSFitǁinterval__mutmut_2": "a fit from ols() has a NaN se where df = 0: `or` and `and` agree",
    **{f"lmlab.data.hmm.xǁHMMSourceǁ_by_length__mutmut_{i}": _EMPTY_GROUP for i in (12, 15, 17, 18)},
    **{f"lmlab.data.hmm.xǁHMMSourceǁ_words__mutmut_{i}": _WORD_DTYPE for i in (5, 7)},
    **{f"lmlab.data.hmm.xǁHMMSourceǁsingle_mask_conditionals__mutmut_{i}": _ZERO_BY_ZERO for i in (19, 21)},
    **{f"lmlab.data.hmm.xǁHMMSourceǁ_forward_backward__mutmut_{i}": _ZERO_BY_ZERO for i in (12, 14)},
    "lmlab.data.hmm.xǁHMMSourceǁ_forward_backward__mutmut_75": (
        "where the prefix is impossible beta is read only up to a positive factor (the conditionals are normalised "
        "per position, the posterior is 0): the batch's sum serves as well as the row's"),
    "lmlab.training.callbacks.xǁDivergenceGuardǁon_train_batch_end__mutmut_16":
        "step 0 is a multiple of every, so it is read either way: only steps >= 1 tell `or 0` from `or 1`",
    **{k: 'float("NAN") is float("nan")' for k in (
        "lmlab.training.callbacks.xǁDivergenceGuardǁon_train_batch_end__mutmut_43",
        "lmlab.training.callbacks.xǁLossWindowǁ__init____mutmut_15",
        "lmlab.training.callbacks.xǁLossWindowǁmean__mutmut_6")},
    "lmlab.training.callbacks.xǁLossWindowǁmean__mutmut_2": "torch's mean of no values is NaN too",
    "lmlab.selection.dedup.x__confirm__mutmut_2": ("`or` only reads more pairs: a rejected pair is checked again with "
                                                   "the same answer, a joined one is skipped in the loop"),
    "lmlab.selection.dedup.x__confirm__mutmut_53": ("`rejected` only spares rechecking a pair: without it the same "
                                                    "pair is rejected again"),
    "lmlab.selection.dedup.xǁDedupǁselect__mutmut_41": "astype(None) is astype(float64)",
    "lmlab.selection.dedup.x_bucket_pairs__mutmut_7": 'numpy reads the sort kind case-insensitively: "STABLE"',
    **{f"lmlab.selection.dedup.{f}__mutmut_{i}": ("numpy integer arrays wrap silently (only scalar operations "
       "warn): the errstate changes nothing") for f, i in (("x__splitmix64", 7), ("x_shingle_hashes", 31),
                                                          ("x_band_keys", 14), ("x_minhash_signatures", 42))},
    **{f"lmlab.selection.dedup.{f}__mutmut_{i}": ("float64 zeros: the first round adds a word id or a 32-bit "
       "signature value to 0, exact in float64, and _splitmix64 casts the sum to uint64; later rounds are uint64")
       for f, i in (("x_shingle_hashes", 28), ("x_shingle_hashes", 30), ("x_band_keys", 11), ("x_band_keys", 13))},
    **{f"lmlab.selection.dedup.{f}__mutmut_{i}": _WORD_DTYPE for f, i in (
        ("x_shingle_hashes", 3), ("x_shingle_hashes", 5), ("x_duplicates", 57), ("x_duplicates", 59))},
    **{f"lmlab.selection.dedup.x_minhash_signatures__mutmut_{i}": ("row lengths are Python ints (int64 without "
       "the dtype); an empty list returns before they are read") for i in (16, 18)},
    **{f"lmlab.selection.dedup.x_minhash_signatures__mutmut_{i}": ("the grouping of rows only bounds one step's "
       "memory: every grouping gives the same signatures (checked at chunk 1, 3 and 65536)")
       for i in (28, 32, 33, 34, 35, 38)},
    "lmlab.selection.dedup.x_permutations__mutmut_20": "integers(p) is integers(0, p)",
    "lmlab.selection.dedup.x__splitmix64__mutmut_5": "astype copies by default (copy=True)",
    **{f"lmlab.selection.dedup.x_minhash_signatures__mutmut_{i}": ("np.full takes the dtype of its fill value, "
       "MAX_HASH, a uint64") for i in (10, 13)},
    **{f"lmlab.selection.dedup.x_duplicates__mutmut_{i}": ("float64 keeps 53 of each 64-bit half of the 16-byte "
       "digest: two different rows still differ but with probability about n^2 2^-107") for i in (18, 20)},
    **{f"lmlab.selection.dedup.x_duplicates__mutmut_{i}": ("float64 band keys keep 53 of their 64 bits: rounding "
       "can only make two keys equal (about n^2 2^-54 a band), an extra candidate that the exact check rejects")
       for i in (27, 29)},
    **{f"lmlab.selection.dedup.x_duplicates__mutmut_{i}": ("an array allocated larger when exact (or near) is off "
       "is never read then") for i in (22, 23, 31, 32)},
    "lmlab.selection.dedup.x_duplicates__mutmut_62": _NEG,
    "lmlab.selection.dedup.x_duplicates__mutmut_102": "None stored in a bool array is False",
    "lmlab.selection.dedup.x_duplicates__mutmut_122": ("overlapping batches confirm a pair again: a rejected pair is "
                                                       "remembered and a joined one skipped, with the same answer"),
    "lmlab.selection.dedup.x_duplicates__mutmut_137": ("a row is a near duplicate iff it is not its cluster's root, "
                                                       "parent[i] != i, whether or not every row points at the root"),
    "lmlab.selection.dedup.x_lsh_params__mutmut_2": ("one more grid point moves the areas far less than the gap "
                                                     "between the best two (b, r): the same choice in 400 random "
                                                     "settings against 201 points"),
    "lmlab.selection.dedup.x_lsh_params__mutmut_4": "every (b, r) has a finite error: the first replaces the start",
    "lmlab.selection.dedup.x_lsh_params__mutmut_27": "b = num_perm + 1 leaves no r (num_perm // b = 0)",
    "lmlab.selection.dedup.x_lsh_params__mutmut_42": ("2 - P(s) adds the same threshold * (1 - recall_weight) to "
                                                      "every (b, r)'s error: the same argmin"),
    "lmlab.selection.dedup.x_lsh_params__mutmut_62": ("distinct (b, r) have distinct S-curves: their errors tie "
                                                      "only by a coincidence of rounding"),
    **{f"lmlab.data.pcfg.xǁPCFGSourceǁ{f}__mutmut_{i}": _NO_UNARY for f, i in (("_close", 2), ("_unclose", 2))},
    **{f"lmlab.data.pcfg.xǁPCFGSourceǁ{f}__mutmut_{i}": _INT_DTYPE for f, i in (
        ("_emissions", 3), ("_emissions", 5), ("labels", 5), ("labels", 8), ("labels", 13), ("labels", 15))},
    **{f"lmlab.data.pcfg.xǁPCFGSourceǁ_rows_to_words__mutmut_{i}": _WORD_DTYPE for i in (5, 7)},
    **{f"lmlab.data.pcfg.xǁPCFGSourceǁ_argmax_or_minus1__mutmut_{i}": "the values are (batch, candidates): dim 1 "
       "is dim -1" for i in (3, 12)},
    "lmlab.data.pcfg.xǁPCFGSourceǁ_inside__mutmut_27": "a slice end past the array end is clipped: the same s cells",
    "lmlab.data.pcfg.xǁPCFGSourceǁ_inside__mutmut_42": "the left/right gathers of the whole span are never read",
    "lmlab.data.pcfg.xǁPCFGSourceǁ_outside__mutmut_2": "lefts[0] and lefts[1] have the same batch size",
    **{f"lmlab.data.grammar.xǁGrammarǁviterbi_spans__mutmut_{i}": _CHART for i in (16, 18, 28, 30, 41, 43, 81)},
    **{f"lmlab.data.grammar.xǁGrammarǁviterbi_spans__mutmut_{i}": _INT_DTYPE for i in (23, 26, 36, 39)},
    **{f"lmlab.data.grammar.xǁGrammarǁviterbi_spans__mutmut_{i}": _MARKS for i in (32, 45, 138, 139, 143, 144)},
    "lmlab.data.grammar.xǁGrammarǁ_close_unary__mutmut_21": _MARKS,
    **{f"lmlab.data.grammar.xǁGrammarǁviterbi_spans__mutmut_{i}": _SPAN_ONE for i in (133, 134, 140, 141)},
    **{f"lmlab.studies.same_loss.runs.x__parent_exclusion__mutmut_{i}": (
        "the else branch is the parent's status itself: \"done\" where the first test would have said so")
       for i in (16, 17)},
    **{f"lmlab.studies.same_loss.runs.x_read_schedule__mutmut_{i}": (
        "a missing _target_ read as None, XXXX or '' has no dot: module '' is not lmlab.schedule either way")
       for i in (20, 22, 25)},
    "lmlab.studies.same_loss.runs.x_plateau_exclusion__mutmut_76": (
        "a window within 1e-12 of a peak >= 0 already passes the floor; under a negative peak neither test holds"),
    "lmlab.studies.same_loss.statistics.x_decide__mutmut_32": (
        "a claimed row the Holm loop leaves without a verdict has a NaN p, for which _direction is INCONCLUSIVE too"),
    "lmlab.studies.same_loss.statistics.x_make_row__mutmut_99": (
        "ALPHA is min_detectable_effect's default level (0.05)"),
    "lmlab.data.grammar.x__merge__mutmut_24": _NEG,
    **{f"lmlab.data.grammar.x__merge__mutmut_{i}": "a list of Python floats is float64" for i in (26, 28)},
    **{f"lmlab.data.grammar.xǁGrammarǁsample__mutmut_{i}": _INT_DTYPE for i in (8, 11)},
    **{f"lmlab.data.grammar.xǁGrammarǁsample__mutmut_{i}": ("a + u lands exactly on a cumulative boundary (u = 0) or "
       "rounds up to a + 1 with probability about 2^-53 a draw") for i in (28, 37)},
    "lmlab.data.grammar.xǁGrammarǁsample__mutmut_89": "every sentence has a word, so every id occurs in the count",
    "lmlab.data.grammar.x_parse_grammar__mutmut_65": ("no float64 sum near 1 lies exactly 1e-6 from it (differences "
                                                      "there are multiples of 2^-53)"),
    "lmlab.data.grammar.x_parse_grammar__mutmut_77": "parse_grammar sets start_children itself right after",
    "lmlab.data.grammar.x_parse_grammar__mutmut_53": ("no sum near 1 lies exactly SUM_TOLERANCE from 1 in float64 "
                                                      "(differences there are multiples of 2^-53, 1e-3 is not)"),
    **{f"lmlab.models.transformer.x__from_hf__mutmut_{i}": ("a transformers config of these classes always has "
       "the attribute (PretrainedConfig sets architectures and tie_word_embeddings; LlamaConfig and ArceeConfig set "
       "head_dim, attention_bias and mlp_bias): getattr's default is never read")
       for i in (7, 16, 19, 22, 220, 231, 237, 240, 243, 246, 249, 252)},
    **{f"lmlab.models.transformer.x__from_hf__mutmut_{i}": ("transformer.ln_f.bias contains '.ln_', which the test "
       "before it excludes already") for i in (56, 57)},
    **{f"lmlab.models.transformer.x__to_hf__mutmut_{i}": ("transformers' GPT2Config has the same default "
       "(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False): the "
       "argument only states the choice") for i in (46, 47, 48)},
    **{f"lmlab.models.transformer.x__to_hf__mutmut_{i}": ("transformers' LlamaConfig and ArceeConfig have the same "
       "default (num_key_value_heads and head_dim from the heads, no biases, attention_dropout 0, Llama's "
       "hidden_act silu): the argument only states the choice") for i in (164, 177, 178, 182, 183, 184, 208)},
    "lmlab.models.transformer.x__to_hf__mutmut_225": "chunk's default dim is 0",
    **{f"lmlab.models.mamba.{f}__mutmut_{i}": ("PretrainedConfig always sets tie_word_embeddings, and MambaConfig "
       "and Mamba2Config the settings check_mixer_config reads: getattr's default is never read")
       for f, i in (("x_mixer_state_from_hf", 5), ("x_mixer_state_from_hf", 8), ("x_mixer_state_from_hf", 11),
                    ("x__mamba_from_hf", 53), ("x__mamba_from_hf", 56), ("x__mamba_from_hf", 59),
                    ("x_check_mixer_config", 3), ("x_check_mixer_config", 6))},
    **{f"lmlab.models.mamba2.x__from_hf__mutmut_{i}": ("Mamba2Config always sets time_step_limit and "
       "tie_word_embeddings: getattr's default is never read") for i in (21, 24, 27, 30, 88, 91, 94)},
    "lmlab.models.mamba2.x__from_hf__mutmut_35": 'float("INF") is float("inf")',
    "lmlab.models.mamba2.x__to_hf__mutmut_65": 'float("INF") is float("inf")',
    **{f"lmlab.models.mamba2.x__to_hf__mutmut_{i}": ("transformers' Mamba2Config has the same default (no linear "
       "bias, a convolution bias, silu, the residual in float32, time_step_limit (0, inf)): the argument only "
       "states the choice") for i in (46, 47, 48, 49, 50)},
    "lmlab.models.mamba.x_mixer_state_to_hf__mutmut_15": "a tied model's head.weight is its embed.weight (add_head)",
    **{f"lmlab.models.mamba.x__mamba_to_hf__mutmut_{i}": ("transformers' MambaConfig has the same default (no "
       "linear bias, a convolution bias, silu, the residual in float32, no mambapy): the argument only states the "
       "choice") for i in (31, 32, 33, 34, 37)},
    "lmlab.models.transformer.x__to_hf__mutmut_271": "a tied model's head.weight is its embed.weight (add_head)",
    "lmlab.models.transformer.x__from_hf__mutmut_224": ("head_dim d / H equals d // H where H divides d, and "
                                                        "`or d % H` refuses the rest"),
    "lmlab.data.pcfg.xǁPCFGSourceǁ_outside__mutmut_16": ("the outside scores are only read normalised per position "
                                                        "(single_mask_conditionals): a constant factor cancels"),
}

KILLED = {1, 3, 24, -24, 36, 152, 255}      # mutmut's codes for a failing test run and for a timeout
SURVIVED = {0}
NO_TESTS = {5, 33}


def _config(mod: Module) -> str:
    def arr(xs):
        return "[" + ", ".join(json.dumps(x) for x in xs) + "]"
    preload = [arg for m in mod.preload for arg in ("-p", m)]
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["lmlab"]\n'
        f"only_mutate = {arr([mod.path])}\n"
        f'also_copy = {arr(["conf", "hydra_plugins", "scripts", "docs"])}\n'
        f"pytest_add_cli_args_test_selection = {arr(mod.tests)}\n"
        f"pytest_add_cli_args = {arr(['-p', 'no:cacheprovider', '-x', '-q', *preload])}\n"
        'process_isolation = "forkserver"\n'
        "use_git_change_detection = false\n"
        "timeout_multiplier = 5.0\n"  # a mutant whose tests take 5x their clean CPU time loops: counted killed
    )


def prepare(name: str, mod: Module, workdir: Path) -> Path:
    work = workdir / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for item in COPIED:
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, work / item, ignore=ignore)
        else:
            shutil.copy2(src, work / item)
    pyproject = work / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + _config(mod))
    return work


def results(work: Path, mod: Module) -> dict[str, int]:
    """mutant name -> mutmut's exit code, for the mutants of ``mod``'s selected functions."""
    meta = work / "mutants" / (mod.path + ".meta")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {k: v for k, v in codes.items() if any(fnmatch.fnmatchcase(k, g) for g in mod.globs())}


def diff(work: Path, mutant: str, env: dict) -> str:
    """The changed line of ``mutant``, as ``- old`` / ``+ new`` (from ``mutmut show``)."""
    shown = subprocess.run([_mutmut(), "show", mutant], cwd=work, env=env, capture_output=True, text=True).stdout
    return " / ".join(" ".join(line.split()) for line in shown.splitlines()
                      if line[:1] in "-+" and not line.startswith(("---", "+++")))


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes (mutmut and every test process it waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _mutmut() -> str:
    return shutil.which("mutmut") or str(Path(sys.executable).with_name("mutmut"))


def run(name: str, mod: Module, workdir: Path, max_children: int, again: bool = True) -> dict:
    """Mutation-test ``mod`` in ``workdir``/``name`` (``again=False``: only read the results of the last run)."""
    work = workdir / name
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the copy under test, not this tree
    env.update(OMP_NUM_THREADS="1", LMLAB_CACHE=str(work / "cache"), MPLBACKEND="Agg")
    t0, cpu0 = time.time(), _children_cpu()
    if again:
        prepare(name, mod, workdir)
        with open(work / "mutmut.log", "w") as log:
            proc = subprocess.run([_mutmut(), "run", "--max-children", str(max_children), *mod.globs()],
                                  cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    elif not (work / "mutants").is_dir():
        raise SystemExit(f"{work} holds no mutation run: run without --results-only first")
    wall, cpu = time.time() - t0, _children_cpu() - cpu0
    if again and proc.returncode != 0:
        tail = (work / "mutmut.log").read_text()[-3000:]
        raise SystemExit(f"mutmut failed on {mod.path} (exit {proc.returncode}); the end of {work}/mutmut.log:\n"
                         f"{tail}")
    codes = results(work, mod)
    unchecked = sorted(k for k, v in codes.items() if v is None)  # a run stopped early (--results-only)
    if unchecked and again:
        raise SystemExit(f"{mod.path}: {len(unchecked)} mutants were not checked; see {work}/mutmut.log")
    codes = {k: v for k, v in codes.items() if v is not None}
    unknown = sorted(k for k, v in codes.items() if v not in KILLED | SURVIVED | NO_TESTS)
    if unknown:
        raise SystemExit(f"{mod.path}: mutants neither killed nor survived (exit codes "
                         f"{sorted({codes[k] for k in unknown})}): {unknown[:10]}; see {work}/mutmut.log")
    killed = sorted(k for k, v in codes.items() if v in KILLED)
    alive = sorted(k for k, v in codes.items() if v not in KILLED)
    equivalent = [k for k in alive if k in EQUIVALENT]
    gaps = [k for k in alive if k not in EQUIVALENT]
    return {"module": mod.path, "mutants": len(codes), "killed": len(killed),
            "no_tests": sorted(k for k, v in codes.items() if v in NO_TESTS),
            "equivalent": equivalent, "surviving": gaps, "wall_s": round(wall), "cpu_s": round(cpu),
            "unchecked": len(unchecked),
            "diffs": {k: diff(work, k, env) for k in alive},
            "rate": len(killed) / len(codes) if codes else float("nan"),
            "rate_non_equivalent": len(killed) / (len(codes) - len(equivalent)) if codes else float("nan"),
            "workdir": str(work)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", help=f"which ({', '.join(MODULES)}); default: all")
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "mutate")
    ap.add_argument("--max-children", type=int, default=2, help="mutants checked at once")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--list", action="store_true", help="print the modules and exit")
    ap.add_argument("--results-only", action="store_true", help="report the last run in --workdir, run nothing")
    args = ap.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        ap.error(f"unknown module(s) {unknown}; choose from {list(MODULES)}")
    if args.list:
        for name, mod in MODULES.items():
            when = "" if mod.default else " (run only when named)"
            print(f"{name:10s} {mod.path}: {mod.what}{when}\n{'':10s} functions: {', '.join(mod.functions) or 'all'}\n"
                  f"{'':10s} tests: {' '.join(mod.tests)}")
        return 0
    out = []
    names = args.modules or [name for name, mod in MODULES.items() if mod.default]
    for name in sorted(set(MODULES) - set(names)) if not args.modules else []:
        print(f"{MODULES[name].path}: not run by default (its survivors are not reviewed); "
              f"`python scripts/mutate.py {name}` runs it", flush=True)
    for name in names:
        r = run(name, MODULES[name], args.workdir, args.max_children, again=not args.results_only)
        out.append(r)
        print(f"{r['module']}: {r['killed']}/{r['mutants']} killed ({100 * r['rate']:.1f}%), "
              f"{len(r['equivalent'])} equivalent, {100 * r['rate_non_equivalent']:.1f}% of the non-equivalent; "
              + ("(timed earlier)" if args.results_only else f"{r['wall_s']} s wall, {r['cpu_s']} s CPU"), flush=True)
        if r["unchecked"]:
            print(f"    {r['unchecked']} mutants not checked yet (the run was stopped): left out of the rates")
        for k in r["surviving"]:
            print(f"    surviving: {k}{'  (no test calls it)' if k in r['no_tests'] else ''}: {r['diffs'][k]}")
        for k in r["equivalent"]:
            print(f"    equivalent: {k}: {r['diffs'][k]} ({EQUIVALENT[k]})")
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    timed = not args.results_only
    print("\nkill rate per module (killed / non-equivalent mutants)" + (", wall and CPU seconds:" if timed else ":"))
    for r in out:
        print(f"  {r['module']:32s} {r['killed']:4d}/{r['mutants'] - len(r['equivalent']):<4d} "
              f"{100 * r['rate_non_equivalent']:5.1f}%" + (f" {r['wall_s']:6d} s {r['cpu_s']:6d} s" if timed else ""))
    if timed:
        print(f"  {'total':32s} {'':15s} {sum(r['wall_s'] for r in out):6d} s {sum(r['cpu_s'] for r in out):6d} s "
              f"(CPU: user + system of mutmut and its test processes; on 2 free cores with --max-children 2 the wall "
              "is about half the CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
