"""HMMSource: exact inference against brute-force enumeration, sampling against exact probabilities."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy.stats import chisquare

from lmlab.data.hmm import HMMSource
from lmlab.errors import UserError
from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL

CONF = Path(__file__).resolve().parents[1] / "lmlab" / "conf" / "data" / "hmm.yaml"
H, V, L = 3, 3, 4


@pytest.fixture(scope="module")
def tiny() -> HMMSource:
    return HMMSource(hidden_states=H, vocab_size=V, length=L, alpha_transition=1.0, alpha_emission=1.0,
                     hmm_seed=3, seed=5, label_position=2, train_size=20000, validation_size=50,
                     test_size=50, downstream_size=50)


@pytest.fixture(scope="module")
def brute(tiny: HMMSource) -> dict:
    """Joint P(x, z) for every sentence x and hidden path z, by enumeration."""
    pi, a, b = tiny.initial, tiny.transition, tiny.emission
    xs = list(itertools.product(range(V), repeat=L))
    zs = list(itertools.product(range(H), repeat=L))
    joint = np.zeros((len(xs), len(zs)))
    for i, x in enumerate(xs):
        for j, z in enumerate(zs):
            p = pi[z[0]] * b[z[0], x[0]]
            for t in range(1, L):
                p *= a[z[t - 1], z[t]] * b[z[t], x[t]]
            joint[i, j] = p
    return {"xs": xs, "zs": np.array(zs), "joint": joint, "px": joint.sum(axis=1)}


def row(x) -> list[int]:
    return [BOS_ID, *(w + N_SPECIAL for w in x), EOS_ID]


def test_probabilities_sum_to_one_and_nll_matches(tiny, brute):
    assert brute["px"].sum() == pytest.approx(1.0, abs=1e-12)
    nll = tiny.sequence_nll([row(x) for x in brute["xs"]])
    np.testing.assert_allclose(nll, -np.log(brute["px"]), rtol=1e-10)
    assert np.exp(-nll).sum() == pytest.approx(1.0, abs=1e-12)


def test_single_mask_conditionals_match_brute_force(tiny, brute):
    index = {x: i for i, x in enumerate(brute["xs"])}
    conds = tiny.single_mask_conditionals([row(x) for x in brute["xs"]])
    for x, cond in zip(brute["xs"], conds):
        assert cond.shape == (L, tiny.vocab_size)
        np.testing.assert_array_equal(cond[:, :N_SPECIAL], 0.0)
        for t in range(L):
            p = np.array([brute["px"][index[x[:t] + (w,) + x[t + 1:]]] for w in range(V)])
            np.testing.assert_allclose(cond[t, N_SPECIAL:], p / p.sum(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("position", [1, 2, L])
def test_posterior_matches_brute_force(tiny, brute, position):
    post = tiny.posterior([row(x) for x in brute["xs"]], position)
    expected = np.stack([brute["joint"][:, brute["zs"][:, position - 1] == z].sum(axis=1) for z in range(H)], 1)
    np.testing.assert_allclose(post, expected / brute["px"][:, None], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(post.sum(axis=1), 1.0)


def test_default_position_is_label_position(tiny, brute):
    rows = [row(x) for x in brute["xs"][:10]]
    np.testing.assert_array_equal(tiny.posterior(rows), tiny.posterior(rows, tiny.label_position))


def pooled_chisquare(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square p-value, with the cells of expected count < 5 pooled into one."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


@pytest.fixture(scope="module")
def train(tiny):
    rows = tiny.build()["train"]
    return np.array(rows["input_ids"]), np.array(rows["task_z"])


def test_rows_and_columns(tiny, train):
    ids, labels = train
    assert ids.shape == (20000, L + 2)
    assert (ids[:, 0] == BOS_ID).all() and (ids[:, -1] == EOS_ID).all()
    assert ids[:, 1:-1].min() >= N_SPECIAL and ids[:, 1:-1].max() < tiny.vocab_size
    assert tiny.vocab_size == N_SPECIAL + V and tiny.tasks == {"task_z": H}
    assert labels.min() >= 0 and labels.max() < H


def test_sampled_sentences_follow_exact_probabilities(brute, train):
    ids, _ = train
    code = ((ids[:, 1:-1] - N_SPECIAL) * V ** np.arange(L - 1, -1, -1)).sum(axis=1)  # itertools order
    counts = np.bincount(code, minlength=V ** L)
    assert pooled_chisquare(counts, brute["px"]) > 1e-3


def test_label_is_the_state_that_emitted_the_labelled_word(tiny, train):
    ids, labels = train
    k = tiny.label_position
    marginal = tiny.initial @ np.linalg.matrix_power(tiny.transition, k - 1)
    assert pooled_chisquare(np.bincount(labels, minlength=H), marginal) > 1e-3
    # joint of (z_k, x_k): P(z_k = z) B[z, w]
    joint = (marginal[:, None] * tiny.emission).ravel()
    counts = np.bincount(labels * V + ids[:, k] - N_SPECIAL, minlength=H * V)
    assert pooled_chisquare(counts, joint) > 1e-3


def test_splits_are_deterministic_and_independent(tiny):
    kw = {"hidden_states": H, "vocab_size": V, "length": L, "label_position": 2, "hmm_seed": 3, "seed": 5,
          "validation_size": 50, "test_size": 50, "downstream_size": 50}
    a = HMMSource(train_size=10, **kw).build()
    b = HMMSource(train_size=20, **kw).build()
    assert a["validation"]["input_ids"] == b["validation"]["input_ids"]
    assert a["test"]["task_z"] == b["test"]["task_z"]
    assert a["train"]["input_ids"] == HMMSource(train_size=10, **kw).build()["train"]["input_ids"]
    assert a["validation"]["input_ids"] != a["test"]["input_ids"]


def test_nll_of_wrong_length_is_infinite(tiny):
    assert np.isinf(tiny.sequence_nll([[BOS_ID, N_SPECIAL, EOS_ID]]))[0]


@pytest.mark.parametrize("kwargs, needle", [
    ({"hidden_states": 0}, "hidden_states"),
    ({"vocab_size": -3}, "vocab_size"),
    ({"length": 0}, "length"),
    ({"alpha_transition": 0.0}, "alpha_transition"),
    ({"alpha_emission": -1.0}, "alpha_emission"),
    ({"train_size": 0}, "train_size"),
    ({"validation_size": 0}, "validation_size"),
    ({"test_size": -1}, "test_size"),
    ({"downstream_size": 0}, "downstream_size"),
    ({"label_position": 0}, "label_position"),
    ({"label_position": 13, "length": 12}, "label_position"),
    ({"hmm_seed": -1}, "hmm_seed"),
    ({"length": 2.5}, "length"),
])
def test_bad_inputs(kwargs, needle):
    with pytest.raises(UserError, match=needle) as info:
        HMMSource(**kwargs)
    assert "\n" not in str(info.value)


def test_yaml_defaults_instantiate_and_cache(tmp_path):
    cfg = OmegaConf.load(CONF)
    assert cfg._target_ == "lmlab.data.hmm.HMMSource"
    source = instantiate(cfg, train_size=64, validation_size=8, test_size=8, downstream_size=8)
    first = source.load(tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    again = instantiate(cfg, train_size=64, validation_size=8, test_size=8, downstream_size=8).load(tmp_path)
    assert first["train"]["input_ids"] == again["train"]["input_ids"]
    assert len(list(tmp_path.iterdir())) == 1
    other = instantiate(cfg, train_size=64, validation_size=8, test_size=8, downstream_size=8, seed=1)
    other.load(tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    rows = first["validation"]["input_ids"]
    assert np.isfinite(source.sequence_nll(rows)).all()
    assert source.posterior(rows).shape == (8, source.hidden_states)
