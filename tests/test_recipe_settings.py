"""Every data source and selector declares its settings once (``lmlab.settings.Configured``): its constructor, its
ranges and its cache key. Changing any one declared setting changes the cache key, except the settings declared
keyless (how the data is read, served or stored), which leave it as it is."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from lmlab.data.shards import write_shards
from lmlab.data.source import Source
from lmlab.data.tokenizers import Byte
from lmlab.run_dir import RESULTS
from lmlab.selection.base import Selector
from lmlab.selection.rephrase import STYLES
from lmlab.settings import KEY, check_config
from tests.test_pcfg import TINY_RULES, write_rules

CONF = Path(__file__).resolve().parents[1] / "lmlab" / "conf"
HMM = "lmlab.data.hmm.HMMSource"


def targets(group: str) -> list[type]:
    """The classes that the options of a config group build (``conf/<group>/*.yaml``)."""
    names = {OmegaConf.load(p).get("_target_") for p in sorted((CONF / group).glob("*.yaml"))}
    return [get_class(n) for n in sorted(n for n in names if n)]


CLASSES = targets("data") + targets("selection")
# the settings that do not change the data or the selection, declared keyless on purpose (besides every
# source's doc_mask)
KEYLESS_OF = {"TextSource": {"doc_mask", "tokenizer_sample_bytes", "stream_above_bytes"},
              "MixtureSource": {"doc_mask", "select_per_source"}, "Rephrase": {"batch_size"}}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("settings")
    for name, text in (("a.jsonl", "one"), ("b.jsonl", "two")):
        (root / name).write_text(json.dumps({"text": text, "body": text}) + "\n")
    (root / "labels.csv").write_text("text,label\none,0\ntwo,1\nthree,0\nfour,1\n")
    write_rules(root / "grammar.txt", TINY_RULES)
    for name in ("shards_a", "shards_b"):
        write_shards({"train": [[1, 5, 2], [1, 6, 2]]}, root / name, vocab_size=10)
    for name in ("hf_a", "hf_b", "teacher", "run"):
        (root / name).mkdir()
    (root / "hf_a" / "config.json").write_text("{}")
    (root / "hf_b" / "config.json").write_text("{}")
    (root / "run" / RESULTS).write_text("{}")
    return {p.name: str(p) for p in root.iterdir()}


def base(cls: type, f: dict[str, str]) -> dict:
    """Settings that build ``cls`` (its defaults where they do)."""
    return {"MixtureSource": {"sources": {"a": {"_target_": HMM}}},
            "HFSource": {"name": "json", "data_files": f["a.jsonl"]},
            "ShardSource": {"path": f["shards_a"]},
            "Rephrase": {"generator": f["hf_a"]}}.get(cls.__name__, {})


def other(cls: type, field: dataclasses.Field, value, f: dict[str, str]):
    """Another valid value of the setting ``field`` of ``cls``, whose current value is ``value``."""
    given = {
        ("PCFGSource", "grammar"): f["grammar.txt"], ("PCFGSource", "train_labels"): 10,
        ("PlantedSource", "distractor_seeds"): (1, 3), ("PlantedSource", "grammar_seed"): 5,
        ("MixtureSource", "sources"): {"a": {"_target_": HMM, "seed": 1}},
        ("MixtureSource", "temperature"): 1.0, ("MixtureSource", "train_size"): 100,
        ("TextSource", "paths"): f["a.jsonl"], ("TextSource", "documents"): "line",
        ("HFSource", "name"): "text", ("HFSource", "config"): "default", ("HFSource", "split"): "validation",
        ("HFSource", "data_files"): f["b.jsonl"], ("HFSource", "revision"): "main",
        ("HFSource", "max_documents"): 10,
        ("ShardSource", "path"): f["shards_b"],
        ("Quality", "max_tokens"): 100, ("Quality", "max_top_ngram_fraction"): {2: 0.3},
        ("Quality", "max_dup_ngram_fraction"): {2: 0.3},
        ("Curriculum", "key"): "length", ("Curriculum", "reference_data"): "pool", ("Curriculum", "every"): 10,
        ("MiniPLM", "teacher"): f["teacher"],
        ("PreSelect", "runs"): [f["run"]], ("PreSelect", "metric"): "val/loss", ("PreSelect", "family_steps"): [0, 5],
        ("Rephrase", "generator"): f["hf_b"], ("Rephrase", "style"): next(s for s in STYLES if s != "medium"),
    }
    for owner in cls.__mro__:
        if (owner.__name__, field.name) in given:
            return given[owner.__name__, field.name]
    if field.name == "text_field":
        return "body"
    if field.name == "tokenizer":
        return Byte()
    if field.name == "labels_csv":
        return f["labels.csv"]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    raise AssertionError(f"no other value for {cls.__name__}.{field.name}: add one to this test")


def key(obj) -> str:
    return obj.cache_key() if isinstance(obj, Source) else obj.cache_key("data")


CASES = [(cls, field) for cls in CLASSES for field in dataclasses.fields(cls.Settings)]


def test_every_source_and_selector_declares_its_settings():
    names = {cls.__name__ for cls in CLASSES}
    assert {"PCFGSource", "HMMSource", "PlantedSource", "MixtureSource", "TextSource", "HFSource", "ShardSource",
            "RandomSelection", "Dedup", "Quality", "Curriculum", "ColorFilter", "MiniPLM", "PreSelect",
            "Rephrase", "NoSelection"} <= names
    for cls in CLASSES:
        assert issubclass(cls, (Source, Selector)) and "__init__" not in cls.__dict__, cls
        # the constructor's parameters are the declared settings, keyword only
        params = inspect.signature(cls).parameters
        assert list(params) == [f.name for f in dataclasses.fields(cls.Settings)]
        assert all(p.kind is p.KEYWORD_ONLY for p in params.values())
    keyless = {(cls.__name__, f.name) for cls, f in CASES if not f.metadata.get(KEY, True)}
    expected = {(cls.__name__, "doc_mask") for cls in CLASSES if issubclass(cls, Source)}
    expected |= {(c, n) for c, fields in KEYLESS_OF.items() for n in fields}
    assert keyless == expected


@pytest.mark.parametrize("cls, field", CASES, ids=[f"{c.__name__}.{f.name}" for c, f in CASES])
def test_each_setting_changes_the_cache_key(cls, field, files):
    kwargs = base(cls, files)
    built = cls(**kwargs)
    value = getattr(built.settings, field.name)
    changed = cls(**{**kwargs, field.name: other(cls, field, value, files)})
    assert getattr(changed.settings, field.name) != value
    if field.metadata.get(KEY, True):
        assert key(changed) != key(built)
    else:
        assert key(changed) == key(built)


def test_the_built_object_keeps_its_settings_as_attributes(files):
    from lmlab.data.hmm import HMMSource
    from lmlab.selection.random import RandomSelection

    hmm, selector = HMMSource(seed=3, train_size=10), RandomSelection(fraction=0.25, seed=2)
    assert (hmm.seed, hmm.settings.train_size, hmm.vocab_size) == (3, 10, 4 + 30)  # the property wins
    assert (selector.fraction, selector.seed) == (0.25, 2)
    with pytest.raises(TypeError, match="no_such"):
        RandomSelection(no_such=1)


def test_the_declared_ranges_are_checked_before_any_work():
    from lmlab.errors import UserError

    cfg = OmegaConf.create({"data": {"_target_": "lmlab.data.pcfg.PCFGSource", "levels": 1.5},
                            "selection": {"_target_": "lmlab.selection.dedup.Dedup", "threshold": 0.0}})
    with pytest.raises(UserError, match="data.levels must be a whole number"):
        check_config(cfg)
    cfg.data.levels = 3
    with pytest.raises(UserError, match="selection.threshold must be greater than 0"):
        check_config(cfg)
