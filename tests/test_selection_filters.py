"""Dedup (exact + MinHash/LSH), Gopher/Dolma quality rules and WRAP-style rephrasing: known answers on
hand-made rows, planted duplicates, mixing ratios, caching and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Sequence, Value
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lmlab.data.shards import ShardRows, ShardSource, write_shards
from lmlab.errors import UserError
from lmlab.selection import base, dedup
from lmlab.selection.base import INDICES, REPORT
from lmlab.selection.dedup import Dedup, duplicates, jaccard, lsh_params, minhash_signatures, shingle_hashes
from lmlab.selection.quality import Quality, dup_ngram_fraction, text_stats, top_ngram_fraction
from lmlab.selection.rephrase import STYLES, HFGenerator, Rephrase, RunGenerator
from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL
from tests.conftest import FAST, TINY

CONF = Path(__file__).resolve().parents[1] / "lmlab" / "conf" / "selection"
FEATURES = Features({"input_ids": Sequence(Value("int32")), "label": Value("int64")})


def pool_of(rows: list[list[int]]) -> Dataset:
    return Dataset.from_dict({"input_ids": rows, "label": list(range(len(rows)))}, features=FEATURES)


def random_rows(n: int, length: int = 64, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[BOS_ID, *rng.integers(N_SPECIAL, 2000, length).tolist(), EOS_ID] for _ in range(n)]


# ----- dedup -----

def test_shingles_and_jaccard_known_answers():
    a, b = shingle_hashes([BOS_ID, 5, 6, 7, 8, EOS_ID], 2), shingle_hashes([5, 6, 7, 9], 2)
    assert len(a) == 3 and len(b) == 3  # specials ignored: (5,6) (6,7) (7,8) vs (5,6) (6,7) (7,9)
    assert jaccard(a, b) == pytest.approx(2 / 4)
    assert len(shingle_hashes([5, 6], 3)) == 1  # shorter than ngram: one shingle
    assert len(shingle_hashes([BOS_ID, EOS_ID], 3)) == 0


def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(0)
    base = np.unique(rng.integers(0, 1 << 32, 300).astype(np.uint64))
    other = np.unique(np.concatenate([base[:200], rng.integers(0, 1 << 32, 100).astype(np.uint64)]))
    sig = minhash_signatures([base, other, base], num_perm=512)
    assert (sig[0] == sig[2]).all()
    assert (sig[0] == sig[1]).mean() == pytest.approx(jaccard(base, other), abs=0.06)


def test_lsh_params_favour_recall():
    def p_candidate(s, b, r):  # the LSH S-curve: P(a pair of Jaccard s shares a band)
        return 1 - (1 - s**r) ** b

    # known answer at the shipped default (recall_weight 0.99, as in dedup.py's docstring)
    assert lsh_params(0.8, 128, recall_weight=0.99) == (18, 7)
    assert p_candidate(0.8, 18, 7) == pytest.approx(0.986, abs=1e-3)
    b, r = lsh_params(0.8, 128, recall_weight=0.95)
    assert b * r <= 128
    assert p_candidate(0.8, b, r) > 0.9 and p_candidate(0.5, b, r) < 0.5
    b2, r2 = lsh_params(0.8, 128, recall_weight=0.5)  # the symmetric rule is stricter
    assert p_candidate(0.8, b2, r2) < p_candidate(0.8, b, r)


def test_exact_duplicates_keep_first():
    rows = [[1, 5, 6, 2], [1, 7, 2], [1, 5, 6, 2], [1, 5, 6], [1, 7, 2]]
    exact, near = duplicates(pool_of(rows), near=False)
    assert exact.tolist() == [False, False, True, False, True] and not near.any()


def test_near_duplicates_found_unrelated_kept():
    rows = random_rows(300, seed=1)
    rng = np.random.default_rng(2)
    planted = {}
    for k, src in enumerate(range(0, 60, 3)):  # 20 near copies: substitutions, insertions, deletions
        row = list(rows[src])
        edits = 1 + k % 2
        for _ in range(edits):
            pos = int(rng.integers(2, len(row) - 2))
            kind = k % 3
            if kind == 0:
                row[pos] = int(rng.integers(2000, 3000))
            elif kind == 1:
                row.insert(pos, int(rng.integers(2000, 3000)))
            else:
                del row[pos]
        planted[len(rows)] = src
        rows.append(row)
    similarity = [jaccard(shingle_hashes(rows[i], 3), shingle_hashes(rows[s], 3)) for i, s in planted.items()]
    assert 0.75 < min(similarity) and max(similarity) < 0.95  # 1-2 edits on 64 tokens
    _, near = duplicates(pool_of(rows), threshold=0.7, num_perm=128, ngram=3, exact=False)
    assert set(np.flatnonzero(near)) == set(planted)  # every copy found, no original or unrelated row removed
    _, strict = duplicates(pool_of(rows), threshold=0.9, num_perm=128, ngram=3, exact=False)  # none found
    assert set(np.flatnonzero(strict)) <= set(planted) and strict.sum() < len(planted)


def duplicate_pool(seed: int = 0) -> list[list[int]]:
    """About 200 rows in shuffled order: random rows, exact copies, copies with one substitution (Jaccard of
    3-shingles 0.91), copies of those with one more (0.82 to the original), copies with three (0.75), rows
    without shingles, and 40 rows with one shingle set that differ only in their specials (one LSH bucket
    of more than 32 rows)."""
    rng = np.random.default_rng(seed)
    rows = random_rows(100, seed=seed)

    def substitute(row: list[int], positions) -> list[int]:
        row = list(row)
        for pos in positions:
            row[pos] = int(rng.integers(3000, 4000))
        return row

    once = [substitute(rows[i], [20]) for i in range(0, 20)]
    rows += once + [substitute(row, [45]) for row in once[:8]]
    rows += [substitute(rows[i], [12, 32, 52]) for i in range(20, 32)]
    rows += [list(rows[i]) for i in (1, 25, 40, 101, 102)]
    rows += [[BOS_ID, EOS_ID], [BOS_ID, EOS_ID, EOS_ID], [BOS_ID, EOS_ID]]
    rows += [[BOS_ID, 70, 71, 72, *[EOS_ID] * (k + 1)] for k in range(40)]
    return [rows[i] for i in rng.permutation(len(rows))]


def brute_force_duplicates(rows: list[list[int]], threshold: float, ngram: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The masks ``duplicates`` should return, from every pair's exact Jaccard: exact copies of an earlier row,
    then the rows (with shingles) that are not the first of their cluster of pairs at ``threshold`` or more."""
    exact = np.array([row in rows[:i] for i, row in enumerate(rows)])
    shingles = [shingle_hashes(row, ngram) for row in rows]
    alive = [i for i in range(len(rows)) if not exact[i] and len(shingles[i])]
    root = list(range(len(rows)))

    def find(i: int) -> int:
        while root[i] != i:
            i = root[i]
        return i

    for k, i in enumerate(alive):
        for j in alive[k + 1:]:
            if jaccard(shingles[i], shingles[j]) >= threshold:
                a, b = find(i), find(j)
                root[max(a, b)] = min(a, b)
    return exact, np.array([find(i) != i for i in range(len(rows))])


@pytest.mark.parametrize("threshold", [0.5, 0.85])
def test_duplicates_equal_the_all_pairs_answer_across_chunks(monkeypatch, threshold):
    rows = duplicate_pool()
    expect_exact, expect_near = brute_force_duplicates(rows, threshold)
    assert expect_exact.sum() == 6 and expect_near.sum() == {0.5: 79, 0.85: 67}[threshold]
    for chunk_rows, pair_batch in ((10_000, 4096), (37, 7)):  # one chunk, then 6 chunks and small pair batches
        monkeypatch.setattr(base, "CHUNK_ROWS", chunk_rows)
        monkeypatch.setattr(dedup, "PAIR_BATCH", pair_batch)
        exact, near = duplicates(pool_of(rows), threshold=threshold)
        assert exact.tolist() == expect_exact.tolist() and near.tolist() == expect_near.tolist()


def test_dedup_over_shards_reads_them_in_chunks(monkeypatch, tmp_path):
    rows = duplicate_pool(seed=1)
    out = write_shards({"train": rows}, tmp_path / "shards", rows_per_shard=64)
    pool = ShardSource(path=str(out)).load(None)["train"]

    def refuse(self):
        raise AssertionError("dedup loaded the shard pool into memory")

    monkeypatch.setattr(ShardRows, "to_dataset", refuse)
    monkeypatch.setattr(base, "CHUNK_ROWS", 50)
    monkeypatch.setenv("LMLAB_SELECT_MAX_ROWS", "10")  # the limit of materialising selectors does not apply
    on_shards = Dedup(threshold=0.85).run(pool, None, tmp_path / "cache", "k")
    in_memory = Dedup(threshold=0.85).select(pool_of(rows), None, tmp_path)
    assert isinstance(on_shards.dataset, ShardRows) and (on_shards.cache_path / INDICES).exists()
    assert on_shards.dataset.index.tolist() == np.flatnonzero(in_memory.scores).tolist()
    assert on_shards.dataset[:]["input_ids"] == in_memory.dataset["input_ids"]
    assert on_shards.report == in_memory.report and in_memory.report["removed_near"] > 0
    np.testing.assert_array_equal(on_shards.scores, in_memory.scores)


def test_dedup_selector_reports_and_caches(tmp_path):
    rows = random_rows(50, seed=3)
    near = list(rows[7])
    near[30] = 2500
    rows += [list(rows[4]), list(rows[4]), near]
    selector = instantiate(OmegaConf.load(CONF / "dedup.yaml"))
    selection = selector.run(pool_of(rows), None, tmp_path, "data-key")
    kept = selection.dataset
    assert kept["label"] == list(range(50))
    assert selection.report == {"pool_rows": 53, "kept_rows": 50, "removed_exact": 2, "removed_near": 1}
    entry = next((tmp_path / "selection").iterdir())
    assert json.loads((entry / REPORT).read_text()) == selection.report
    assert np.load(entry / "scores.npy").tolist() == [1.0] * 50 + [0.0] * 3
    again = Dedup().run(pool_of(rows), None, tmp_path, "data-key")
    assert again.dataset["label"] == kept["label"]  # from the cache
    assert again.report == selection.report
    with pytest.raises(UserError, match="threshold"):
        Dedup(threshold=1.5)


# ----- quality -----

def words(*ids: int) -> list[int]:
    return [BOS_ID, *ids, EOS_ID]


def test_token_statistics_known_answers():
    assert top_ngram_fraction([5, 6, 5, 6, 7, 8, 9, 10, 11, 12], 2) == pytest.approx(4 / 10)
    assert top_ngram_fraction(list(range(5, 15)), 2) == 0.0  # no repeated n-gram
    row = list(range(5, 15)) + list(range(5, 10))  # the first 5-gram repeats: tokens 0-4 and 10-14
    assert dup_ngram_fraction(row, 5) == pytest.approx(10 / 15)
    assert dup_ngram_fraction(row, 6) == 0.0


@pytest.mark.parametrize("rule,config,bad,good", [
    ("min_tokens", {"min_tokens": 3}, words(5, 6), words(5, 6, 7)),
    ("max_tokens", {"max_tokens": 3}, words(5, 6, 7, 8), words(5, 6, 7)),
    ("max_top_token_fraction", {"max_top_token_fraction": 0.5}, words(5, 5, 5, 6), words(5, 5, 6, 7)),
    ("max_top_2gram_fraction", {"max_top_ngram_fraction": {2: 0.2}},
     words(5, 6, 5, 6, 7, 8, 9, 10, 11, 12), words(*range(5, 15))),
    ("max_dup_5gram_fraction", {"max_dup_ngram_fraction": {5: 0.15}},
     words(*range(5, 15), *range(5, 10)), words(*range(5, 20))),
    ("min_unique_token_ratio", {"min_unique_token_ratio": 0.5}, words(5, 6, 5, 6, 5, 6), words(5, 6, 7, 5)),
])
def test_each_token_rule(rule, config, bad, good):
    off = {"max_top_token_fraction": None, "max_top_ngram_fraction": None, "max_dup_ngram_fraction": None,
           "min_unique_token_ratio": None, "min_tokens": None}
    q = Quality(**{**off, **config})
    assert q.token_failures(bad) == [rule]
    assert q.token_failures(good) == []


@pytest.mark.parametrize("rule,bad,good", [
    ("min_mean_word_length", "a an to be of it is at the and", "the quick brown foxes jumped over the cat"),
    ("max_mean_word_length", "the and incomprehensibilities antidisestablishmentarianism",
     "the cat and the dog sat together"),
    ("max_symbol_word_ratio", "the #cat #and #the #dog with hats", "the cat and the dog with hats"),
    ("max_bullet_line_fraction", "-the cats\n-and the dogs\n-with hats", "the cats\n-and the dogs\nwith hats"),
    ("max_ellipsis_line_fraction", "the cat and the dog sat on the mat with hats...\nthe dog and the cat ran to the "
     "park with friends...\nwith the hats", "the cat and the dog\nwith the hats"),
    ("min_alpha_word_fraction", "the 123 456 and 789 000 with", "the cat and the dog with 42"),
    ("min_stop_words", "cats dogs hats mats rats bats", "the cats and dogs"),
])
def test_each_text_rule(rule, bad, good):
    q = Quality()
    assert q.text_failures(bad) == [rule], text_stats(bad)
    assert q.text_failures(good) == [], text_stats(good)


class ByteSource:
    """A stand-in text source: byte tokens (id = 4 + byte)."""

    tokenizer_kind = "byte"

    def decode(self, ids):
        return bytes(i - N_SPECIAL for i in ids if i >= N_SPECIAL).decode()

    def encode(self, texts):
        return [[N_SPECIAL + b for b in t.encode()] for t in texts]


def test_quality_selector_reports_by_rule(tmp_path):
    src = ByteSource()
    texts = ["the cats and the dogs slept under the table", "### ### ### ### the and", "1 2 3 4 5 6 the and",
             "the bird and the fox ran with it"]
    rows = [[BOS_ID, *ids, EOS_ID] for ids in src.encode(texts)]
    q = Quality(max_top_ngram_fraction=None, max_dup_ngram_fraction=None, max_top_token_fraction=None,
                min_unique_token_ratio=None)
    kept = q.run(pool_of(rows), None, tmp_path, "key", source=src)
    assert kept.dataset["label"] == [0, 3]
    assert kept.report["removed"] == 2 and kept.report["text_rules"] is True
    assert kept.report["failed_max_symbol_word_ratio"] == 1 and kept.report["failed_min_alpha_word_fraction"] == 2
    # without a source (token sources) the text rules are skipped
    q2 = Quality(max_top_ngram_fraction=None, max_dup_ngram_fraction=None, max_top_token_fraction=None,
                 min_unique_token_ratio=None)
    kept2 = q2.run(pool_of(rows), None, tmp_path / "b", "key")
    assert len(kept2.dataset) == 4 and kept2.report["text_rules"] is False
    with pytest.raises(UserError, match="removed all"):
        Quality(min_tokens=1000).run(pool_of(rows), None, tmp_path / "c", "key")


# ----- rephrase -----

def tiny_hf_model(path: Path) -> Path:
    """A randomly initialised GPT-2 with a word-level tokenizer, built and saved locally (nothing downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = ["[UNK]", "[PAD]", "[EOS]"] + sorted({w for t in [*STYLES.values(), "the cat and dog sat on a mat"]
                                                  for w in t.split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_positions=512, n_embd=16, n_layer=1, n_head=2,
                        eos_token_id=2, bos_token_id=2, pad_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


class StubGenerator:
    calls = 0

    def generate(self, rows, seed):
        StubGenerator.calls += 1
        return [[BOS_ID, 999, *r[1:3], EOS_ID] for r in rows]


@pytest.mark.parametrize("ratio,expected", [(0.5, 40), (0.25, 13), (0.0, 0), (0.75, 120)])
def test_rephrase_mixes_the_configured_ratio(tmp_path, ratio, expected):
    model = tiny_hf_model(tmp_path / "hf") if not (tmp_path / "hf").exists() else tmp_path / "hf"
    selector = Rephrase(generator=str(model), ratio=ratio)
    selection = selector.select(pool_of(random_rows(40, length=6)), None, tmp_path, generator=StubGenerator())
    mixed, scores = selection.dataset, selection.scores
    assert scores is None and len(mixed) == 40 + expected
    synthetic = mixed.select(range(40, len(mixed))) if expected else mixed.select([])
    assert all(r[1] == 999 for r in synthetic["input_ids"]) and set(synthetic["label"]) <= {-1}
    assert mixed["label"][:40] == list(range(40))
    assert selection.report["synthetic_rows"] == expected
    if ratio == 0.5:
        assert selection.report["synthetic_fraction"] == 0.5  # 1 : 1 gives exactly half


def test_rephrase_caches(tmp_path, monkeypatch):
    model = tiny_hf_model(tmp_path / "hf")
    pool = pool_of(random_rows(30, length=6))
    StubGenerator.calls = 0
    monkeypatch.setattr(Rephrase, "make_generator", lambda self: StubGenerator())
    first = Rephrase(generator=str(model)).run(pool, None, tmp_path / "cache", "key").dataset
    selection = Rephrase(generator=str(model)).run(pool, None, tmp_path / "cache", "key")
    second = selection.dataset
    assert StubGenerator.calls == 1 and first["input_ids"] == second["input_ids"] and len(second) == 60
    assert selection.report["synthetic_rows"] == 30


def test_hf_generator_rephrases_text_locally(tmp_path):
    model = tiny_hf_model(tmp_path / "hf")
    src = ByteSource()
    rows = [[BOS_ID, *ids, EOS_ID] for ids in src.encode(["the cat sat on a mat", "the dog and the cat"])]
    gen = HFGenerator(str(model), src, style="easy", max_new_tokens=8)
    assert STYLES["easy"] in gen.prompt("x")
    out = gen.generate(rows, seed=0)
    assert len(out) == 2
    for row, orig in zip(out, rows):
        assert row[0] == BOS_ID and row[-1] == EOS_ID and len(row) <= len(orig)
        assert src.decode(row).strip() == src.decode(row).strip()  # decodes back to text
    with pytest.raises(UserError, match="text source"):
        HFGenerator(str(model), object())
    with pytest.raises(UserError, match="neither"):
        Rephrase(generator=str(tmp_path))
    with pytest.raises(UserError, match="generator"):
        Rephrase()


def test_run_generator_keeps_prefix_and_lengths():
    from lmlab.models.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(vocab_size=20, d_model=16, n_layers=1, n_heads=2)
    gen = RunGenerator(model, prefix=0.5, temperature=1.0, batch_size=2)
    sentences = [[BOS_ID, 5, 6, 7, 8, EOS_ID], [BOS_ID, 9, 10, 11, 12, 13, 14, EOS_ID]]
    block = [[BOS_ID, 5, 6, EOS_ID, 7, 8, 9, 10]]
    out = gen.generate(sentences + block, seed=3)
    assert out == gen.generate(sentences + block, seed=3)  # seeded
    assert out[0][:3] == [BOS_ID, 5, 6] and out[1][:4] == [BOS_ID, 9, 10, 11]
    assert out[0][-1] == EOS_ID and out[1][-1] == EOS_ID and len(out[1]) <= 8
    assert out[2][:4] == [BOS_ID, 5, 6, EOS_ID] and len(out[2]) == len(block[0])
    assert all(t not in (0, BOS_ID, 3) for r in out for t in r[1:])
    with pytest.raises(UserError, match="vocabulary"):
        gen.generate([[BOS_ID, 50, EOS_ID]], seed=0)


def test_rephrase_with_an_lmlab_run_through_the_cli(lmlab, tmp_path):
    code, out = lmlab("train", "name=gen", "eval=[]", *FAST, *TINY)
    assert code == 0, out
    run = next(p.parent for p in lmlab.runs.rglob("model.pt"))
    code, out = lmlab("train", "name=mix", "selection=rephrase", f"selection.generator='{run}'", "eval=[perplexity]",
                      *FAST, *TINY)
    assert code == 0, out
    mixed = next((lmlab.runs / "mix").rglob("results.json"))
    metrics = json.loads(mixed.read_text())["metrics"]
    pool = json.loads(next((lmlab.runs / "gen").rglob("results.json")).read_text())["metrics"]["train/rows"]
    assert metrics["train/rows"] == 2 * pool  # ratio 0.5: as many synthetic rows as real ones
