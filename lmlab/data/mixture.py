"""A weighted mixture of data sources: explicit weights, or temperature sampling over the sources' sizes.

Pre-training corpora are mixtures of sources drawn in chosen proportions (the data mixes of OLMo, Groeneveld
et al. 2024, arXiv 2402.00838); multilingual LMs draw source ``i`` with probability ``p_i`` proportional to
``n_i ** alpha``, its number of training rows raised to an exponent ``alpha`` ("temperature sampling",
Conneau et al. 2020, arXiv 1911.02116: ``alpha = 1`` keeps the sizes' proportions, ``alpha = 0`` is
uniform, values in between up-sample the small sources). Here ``p_i`` is proportional to
``weight_i * n_i ** alpha`` with ``alpha = temperature``; with ``temperature: null`` it is proportional to
``weight_i`` alone.

``sources`` maps a name to a full data config (``_target_`` and its settings, as under ``data=``) plus an
optional ``weight`` (default 1). The ``train`` split is built once and cached like any source's: ``train_size``
rows (default: the sum of the sources' training rows), each drawn from source ``i`` with probability ``p_i``
from a fixed seed; the rows of one source are taken in the order of a seeded permutation of its training
split, a new permutation on each pass when a source is up-sampled beyond its size. Every split has a
``source`` column holding the name of the row's source. The datamodule's step-indexed batch order
(``lmlab.data.datamodule.StepBatches``) then makes a resumed run see the same batches.

Selection per source: with ``select_per_source: true`` the selection stage (``lmlab.selection.base``,
``Selector.run(..., by="source")``) runs the selector on each source's training rows alone, so a selector with a
``fraction`` keeps that fraction of every source and the mixture's proportions survive a method that favours one
source (a filter such as ``dedup`` then judges each source's rows only against each other); with ``false`` (the
default) it selects over the pooled rows (``selection/kept_<source>`` reports what it kept of each source). The
curriculum, which orders the whole pool, refuses it.

``validation``, ``test`` and ``downstream`` are each source's own splits, concatenated in the order of
``sources``. Task columns are renamed ``<source>_<task>`` (``-1`` on rows of the other sources).

One token space: every source's rows are used as they are, so the sources must share token ids. The
synthetic sources (grammars, HMMs) write their own words as ids ``N_SPECIAL ..``: two of them in one mixture
share those ids (word 0 of one grammar is the same token as word 0 of the other), which is what makes the
mixture a mixture over one vocabulary. The mixture's ``vocab_size`` is the largest of its sources'. Text
sources must all use the same fixed tokenizer (a BPE trained on each source's own documents would give the
same ids different meanings): ``data/tokenizer=byte`` on each, or one ``tokenizer.json`` shared by all
(``{_target_: lmlab.data.tokenizers.File, path: ...}`` as each source's ``tokenizer``: the same file content,
or a finished run's trained BPE); text cannot be mixed with synthetic sources.

Exact optimum: when every source knows its distribution, ``sequence_nll`` is the mixture's own,
``-log sum_i p_i P_i(x)`` (rows holding ids beyond a source's vocabulary have probability 0 under it): the
best loss a model of the training mixture can reach on any row, since it cannot tell which source a row came
from where the sources overlap. The single-mask conditionals of the mixture are not implemented (``None``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
from datasets import Dataset, DatasetDict, Features, Sequence, Value

from lmlab.data.source import SPLITS, Source
from lmlab.data.tokenizers import Tokenizer
from lmlab.errors import UserError
from lmlab.io import config_hash, write_json
from lmlab.settings import NonNegative, NonNegativeFloat, Positive, declared, keyless, plain

SOURCE_COLUMN = "source"
MIXTURE_FILE = "mixture.json"  # in the cache entry: the sources' training sizes and probabilities
# The mixture's own random streams are default_rng([seed, STREAM, ...]). NumPy's SeedSequence ignores trailing
# zero words (default_rng([s, 0]) is default_rng(s)), so a draw seeded [seed, 0] would be the very stream of
# every other default_rng(seed) in a run (a random selection's scores, say), and rows of one source would be
# the ones such a selection keeps. A constant no other stream uses keeps them apart.
STREAM = 0x6D6978  # "mix"


def _instantiate(config: dict[str, Any]) -> Source:
    from hydra.utils import instantiate

    return instantiate(config)


def mixture_probabilities(weights: list[float], sizes: list[int], temperature: float | None) -> np.ndarray:
    """``p_i`` proportional to ``weights[i] * sizes[i] ** temperature`` (just ``weights[i]`` when ``None``)."""
    w = np.asarray(weights, dtype=np.float64)
    if temperature is not None:
        w = w * np.asarray(sizes, dtype=np.float64) ** float(temperature)
    if not np.isfinite(w).all() or w.sum() <= 0:
        raise UserError("the mixture's weights give every source probability 0: give some source a weight > 0.")
    return w / w.sum()


class MixtureSource(Source):
    """Rows of several sources in weighted proportions, with a ``source`` column (see the module docstring)."""

    @declared
    class Settings(Source.Settings):
        """``sources``: name -> data config with an optional ``weight``; ``temperature``: the exponent alpha
        over the sources' training sizes, or ``None`` for the weights alone; ``train_size``: mixture training
        rows (``None``: the sum of the sources'); ``seed``: the draw of the rows; ``select_per_source``: the
        selection stage selects within each source's rows separately (module docstring: it changes the
        selection, whose cache key names it, not the rows)."""

        sources: Mapping[str, Any]
        temperature: Optional[NonNegativeFloat] = None
        train_size: Optional[Positive] = None
        seed: NonNegative = 0
        select_per_source: bool = keyless(False)

    def setup(self) -> None:
        s = self.settings
        sources, temperature, train_size = plain(s.sources), s.temperature, s.train_size
        if not isinstance(sources, Mapping) or not sources:
            raise UserError("data.sources is empty: name at least one source, e.g. data.sources.a={_target_: "
                            "lmlab.data.pcfg.PCFGSource}.")
        configs: dict[str, dict[str, Any]] = {}
        weights: dict[str, float] = {}
        for name, cfg in sources.items():
            name = str(name)
            if not isinstance(cfg, Mapping) or "_target_" not in cfg:
                raise UserError(f"data.sources.{name} is not a data config: give it a _target_ such as "
                                "lmlab.data.pcfg.PCFGSource.")
            cfg = dict(cfg)
            weight = cfg.pop("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
                raise UserError(f"data.sources.{name}.weight is {weight!r}; make it a number >= 0.")
            configs[name], weights[name] = cfg, float(weight)
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                        or not 0 <= temperature < float("inf")):
            raise UserError(f"data.temperature is {temperature!r}; make it a number >= 0 or null.")
        if train_size is not None and (isinstance(train_size, bool) or not isinstance(train_size, int)
                                       or train_size <= 0):
            raise UserError(f"data.train_size is {train_size!r}; make it a whole number > 0 or null.")
        if not isinstance(s.select_per_source, bool):
            raise UserError(f"data.select_per_source is {s.select_per_source!r}; make it true or false.")
        if temperature is None:
            mixture_probabilities(list(weights.values()), [1] * len(weights), None)  # refuses all-zero weights
        self.weights = weights
        self.sources: dict[str, Source] = {name: _instantiate(cfg) for name, cfg in configs.items()}
        self._check_token_space()
        self.columns = {f"{name}_{task}": (name, task) for name, s in self.sources.items() for task in s.tasks}
        if len(self.columns) < sum(len(s.tasks) for s in self.sources.values()):
            raise UserError("two of the mixture's sources give a task column the same name (<source>_<task>): "
                            "rename one of the sources.")
        self.tasks = {column: self.sources[name].tasks[task] for column, (name, task) in self.columns.items()}
        # the sources' training sizes and the drawing probabilities: known once built (or read from the cache)
        self.sizes: dict[str, int] | None = None
        self.probabilities: dict[str, float] | None = None

    def _check_token_space(self) -> None:
        """Refuse sources whose token ids mean different things (see the module docstring)."""
        tokenizers = {name: getattr(s, "tokenizer", None) for name, s in self.sources.items()}
        texts = [t for t in tokenizers.values() if isinstance(t, Tokenizer)]
        trained = [t for t in texts if type(t).train is not Tokenizer.train]  # learns its ids from the documents
        if texts and (len(texts) < len(tokenizers) or len({config_hash(t.config) for t in texts}) > 1
                      or (len(texts) > 1 and trained)):
            raise UserError(f"the mixture's sources {', '.join(tokenizers)} do not share one token space: mix text "
                            "sources only with each other and with one fixed tokenizer (the byte tokenizer, or the "
                            "same tokenizer file, lmlab.data.tokenizers.File, on each), and synthetic sources only "
                            "with synthetic ones.")

    @property
    def vocab_size(self) -> int:
        return max(s.vocab_size for s in self.sources.values())

    def cache_key(self) -> str:
        # the sources' own keys (a text source's key follows its files), not only their configs
        keys = {name: s.cache_key() for name, s in self.sources.items()}
        # select_per_source changes the selection (whose cache key names it), not the rows
        cfg = {**self.config, "source_keys": keys, "streams": STREAM}
        return f"{type(self).__module__}.{type(self).__name__}-{config_hash(cfg)}"

    # ------------------------------------------------------------------ build

    def _rows(self, split: Dataset) -> list[list[int]]:
        return [list(map(int, r)) for r in split.with_format(None)["input_ids"]]

    def _combine(self, splits: dict[str, Dataset], picks: list[tuple[str, int]]) -> Dataset:
        """The rows ``picks`` (source name, row index into ``splits[name]``), in that order, with the
        ``source`` column and the task columns prefixed by the source's name."""
        features = Features({"input_ids": Sequence(Value("int64")), **{t: Value("int64") for t in self.tasks},
                             SOURCE_COLUMN: Value("string")})
        data = {name: split.with_format(None).to_dict() for name, split in splits.items()}
        columns: dict[str, list] = {"input_ids": [], **{t: [] for t in self.tasks}, SOURCE_COLUMN: []}
        for name, i in picks:
            own = data[name]
            columns["input_ids"].append([int(x) for x in own["input_ids"][i]])
            for t, (origin, task) in self.columns.items():
                columns[t].append(int(own[task][i]) if origin == name and task in own else -1)
            columns[SOURCE_COLUMN].append(name)
        return Dataset.from_dict(columns, features=features)

    def build(self) -> DatasetDict:
        built = {name: s.build() for name, s in self.sources.items()}
        sizes = {name: len(d["train"]) for name, d in built.items()}
        empty = [n for n, k in sizes.items() if k == 0]
        if empty:
            raise UserError(f"the mixture's source {empty[0]} has no training rows: give it a train_size > 0 or "
                            "remove it from data.sources.")
        names = list(self.sources)
        self.sizes = sizes
        p = self._probabilities()
        n = int(self.settings.train_size or sum(sizes.values()))
        seed = int(self.settings.seed)
        choice = np.random.default_rng([seed, STREAM]).choice(len(names), size=n, p=[p[k] for k in names])
        # each source's rows in the order of its own seeded permutations, one per pass over it
        orders: list[list[int]] = []
        for i, name in enumerate(names):
            need, order, passes = int((choice == i).sum()), [], 0
            while len(order) < need:
                order.extend(np.random.default_rng([seed, STREAM, 1 + i, passes]).permutation(sizes[name]).tolist())
                passes += 1
            orders.append(order)
        cursor = [0] * len(names)
        picks = []
        for i in choice.tolist():
            picks.append((names[i], orders[i][cursor[i]]))
            cursor[i] += 1
        splits = {"train": self._combine({k: built[k]["train"] for k in names}, picks)}
        for split in SPLITS[1:]:
            parts = {k: built[k][split] for k in names}
            splits[split] = self._combine(parts, [(k, i) for k in names for i in range(len(parts[k]))])
        return DatasetDict(splits)

    def _probabilities(self) -> dict[str, float]:
        names = list(self.sources)
        p = mixture_probabilities([self.weights[k] for k in names], [self.sizes[k] for k in names],
                                  self.settings.temperature)
        self.probabilities = {k: float(v) for k, v in zip(names, p)}
        return self.probabilities

    def save_state(self, directory: Path) -> None:
        """Each source's state under ``sources/<name>``, and the sources' sizes and probabilities."""
        for name, source in self.sources.items():
            sub = Path(directory) / "sources" / name
            sub.mkdir(parents=True, exist_ok=True)
            source.save_state(sub)
        write_json(Path(directory) / MIXTURE_FILE, {"sizes": self.sizes, "probabilities": self.probabilities})

    def restore_state(self, directory: Path) -> None:
        for name, source in self.sources.items():
            source.restore_state(Path(directory) / "sources" / name)
        state = json.loads((Path(directory) / MIXTURE_FILE).read_text())
        self.sizes = {k: int(v) for k, v in state["sizes"].items()}
        self.probabilities = {k: float(v) for k, v in state["probabilities"].items()}

    # ------------------------------------------------------------------ exact optimum

    def sequence_nll(self, rows: list[list[int]]) -> np.ndarray | None:
        """``-log sum_i p_i P_i(row)`` in nats (see the module docstring); ``None`` where a source does not know
        its distribution or the proportions are not known yet (before ``load``)."""
        if self.probabilities is None:
            return None
        rows = [list(map(int, r)) for r in rows]
        terms = []
        for name, source in self.sources.items():
            inside = np.array([max(r, default=0) < source.vocab_size for r in rows], dtype=bool)
            nll = np.full(len(rows), np.inf)
            if inside.any():
                own = source.sequence_nll([r for r, ok in zip(rows, inside) if ok])
                if own is None:
                    return None
                nll[inside] = own
            p = self.probabilities[name]
            with np.errstate(divide="ignore"):
                terms.append(np.log(p) - nll)
        return -np.logaddexp.reduce(np.stack(terms), axis=0)
