"""The data-source contract, shared by every source (synthetic grammars, HMMs, local text).

A source is cheap to construct (nothing is generated or read in ``setup`` beyond what is needed to
know ``vocab_size``); ``load(cache_dir)`` builds the splits once and caches them on disk under a key
derived from the source's own settings (``lmlab.settings.Configured``: a frozen dataclass ``Settings``, declared
once, is its constructor, its ranges and its cache key), so every job of a sweep reuses the same data.

Token ids: 0 = PAD, 1 = BOS, 2 = EOS, 3 = MASK; a source's own tokens start at ``N_SPECIAL``.
Rows of every split have ``input_ids`` (a list of ints, exactly what the model reads: synthetic sources
write ``[BOS] w_1 .. w_n [EOS]``, text sources write fixed-length packed blocks) and, where the source
knows downstream labels, one integer column per task (``-1`` where the task does not apply to that row).

Splits: ``train`` (pre-training), ``validation`` (the fixed evaluation set for losses and exact optima),
``test`` (downstream evaluation), ``downstream`` (labelled rows to train probes and fine-tuning heads on).
A source may add a ``target`` split (``TARGET_SPLIT``): the target set of the data-selection stage, drawn
apart from the four above (its own random stream, ``TARGET_STREAM``), so that selecting towards it does not
tune the training data to the rows the evaluations score (``data=planted`` has one; without it the
selection stage falls back to ``validation``, see ``lmlab.pipeline.selection_target``).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from datasets import DatasetDict, load_from_disk

from lmlab.io import atomic_dir, config_hash, discard_if_damaged
from lmlab.settings import Configured, NonNegative, Positive, declared, keyless

SPLITS = ("train", "validation", "test", "downstream")
TARGET_SPLIT = "target"  # optional: the selection stage's target set (see module docstring)
TARGET_STREAM = len(SPLITS) + 1  # random stream index of a generated target split


class Source(Configured, ABC):
    """Base class of data sources. Subclasses declare their ``Settings`` (extending ``Source.Settings``), derive
    what they need in ``setup``, and implement ``build`` and, where they can, the exact optima.

    ``tasks`` maps a label column to its number of classes (empty when the source has no labels).
    """

    @declared
    class Settings(Configured.Settings):
        # ``data.doc_mask`` (``lmlab.data.datamodule``): read by the loader, not the data (the rows are the same)
        doc_mask: bool = keyless(False)

    tasks: dict[str, int] = {}

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """The number of token ids, special tokens included."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def cache_key(self) -> str:
        return f"{type(self).__module__}.{type(self).__name__}-{config_hash(self.config)}"

    @abstractmethod
    def build(self) -> DatasetDict:
        """Generate or read the splits (see module docstring)."""

    def load(self, cache_dir: str | os.PathLike) -> DatasetDict:
        """The splits, built once and cached under ``cache_dir/<cache key>`` (written atomically)."""
        path = Path(cache_dir) / self.cache_key()
        discard_if_damaged(path, f"data of {self.name}")
        if not (path / "dataset_dict.json").exists():
            splits = self.build()
            with atomic_dir(path) as tmp:  # another job of the sweep may win the race: then its copy is used
                # datasets cannot reload a split saved as zero shards: an empty split gets one
                splits.save_to_disk(str(tmp), num_shards={k: 1 if len(v) == 0 else None for k, v in splits.items()})
                self.save_state(tmp)
        self.restore_state(path)
        return load_from_disk(str(path))

    def save_state(self, directory: Path) -> None:
        """Save what ``build`` learned besides the splits (a trained tokenizer, say) into the cache entry."""

    def restore_state(self, directory: Path) -> None:
        """Restore what ``save_state`` saved (called on every ``load``, after a build or from the cache)."""

    # ----- exact optima: ``None`` where the source does not know the true distribution -----

    def sequence_nll(self, rows: list[list[int]]) -> np.ndarray | None:
        """-log P(sentence) for each row (``[BOS] w.. [EOS]``, end of sentence included), in nats."""
        return None

    def single_mask_conditionals(self, rows: list[list[int]]) -> list[np.ndarray] | None:
        """For each row, an array (n_words, vocab_size): row t is the true p(x_t = . | x_-t) for the
        t-th word (BOS/EOS excluded), zero on special tokens."""
        return None


@declared
class Sampled(Source.Settings):
    """The settings of a source that samples its rows: ``seed`` draws them, ``<split>_size`` rows per split
    (each split its own random stream)."""

    seed: NonNegative = 0
    train_size: Positive = 20000
    validation_size: Positive = 500
    test_size: NonNegative = 1000
    downstream_size: NonNegative = 2000
