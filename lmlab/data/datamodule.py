"""The LightningDataModule shared by every source: padding collation and a resumable batch order.

The order of training batches is a pure function of (seed, global step): batch ``s`` takes rows
``s*B .. (s+1)*B`` of an endless stream of per-epoch permutations. A run resumed from a checkpoint at
step ``s`` therefore sees exactly the batches the uninterrupted run would have seen, and every batch
carries a ``seed`` so that objectives make the same random choices (masks, split points) again.

A curriculum (``lmlab.selection.curriculum``) releases the (difficulty-sorted) training rows in stages:
``DataModule.use_stages`` installs a ``Stages`` record, and batch ``s`` then draws from the prefix of the
stage in effect at step ``s``, with its own permutation stream starting at the stage's first step. The
batch order stays a pure function of (seed, step, stage record); the record is saved in the checkpoint by
the callback that grows it.

``doc_mask`` (``data.doc_mask``) keeps the documents packed in a row from attending to each other: every batch
then carries ``documents`` (``lmlab.attention.documents_of``: a new document at each ``[BOS]`` and after each
``[EOS]``), which a causal objective hands to the model in its attention record (a block-diagonal causal mask).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader, Sampler

from lmlab.attention import documents_of
from lmlab.data.source import Source
from lmlab.errors import UserError
from lmlab.vocab import PAD_ID


def collate(rows: list[dict], seed: int = 0, doc_mask: bool = False) -> dict:
    """Pad ``input_ids`` with PAD to the longest row; stack every integer label column. ``padded`` (a Python
    bool: some row is shorter than the longest) lets objectives skip the padding mask without reading the
    ids back from the device (``lmlab.objectives.clm.padding_of``). With ``doc_mask``, ``documents`` numbers
    the documents of each row (``documents_of``)."""
    # one flat array and one masked assignment (no tensor per row): about 5-10x faster than row by row
    seqs = [r["input_ids"] for r in rows]
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    length = int(lengths.max())
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
    ids = np.full((len(seqs), length), PAD_ID, dtype=np.int64)
    ids[np.arange(length)[None, :] < lengths[:, None]] = flat
    batch = {"input_ids": torch.from_numpy(ids), "seed": seed, "padded": bool(lengths.min() < length)}
    if doc_mask:
        batch["documents"] = documents_of(batch["input_ids"])
    for key, value in rows[0].items():
        if key != "input_ids" and isinstance(value, int):
            batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
    return batch


class Stages:
    """Which prefix of the training rows each step may draw from: ``history`` = [(first step, rows), ...],
    ascending in both. ``release`` adds a stage that takes effect ``lag`` steps after the current global
    step, so that batches already drawn ahead (the loop prefetches one, workers ``2 * num_workers`` more)
    keep the stage they were drawn with; ``served`` is the last step drawn, to check exactly that."""

    def __init__(self, first_rows: int, lag: int = 2) -> None:
        self.history: list[tuple[int, int]] = [(0, int(first_rows))]
        self.lag, self.served = lag, -1

    def at(self, step: int) -> tuple[int, int, int]:
        """(stage index, its first step, its rows) of the stage in effect at ``step``."""
        k = max(i for i, (start, _) in enumerate(self.history) if start <= step)
        return k, self.history[k][0], self.history[k][1]

    @property
    def rows(self) -> int:
        return self.history[-1][1]

    def release(self, global_step: int, rows: int) -> int:
        """Grow to ``rows`` from step ``global_step + lag``; returns that step."""
        start = max(global_step + self.lag, self.history[-1][0] + 1)
        if start <= self.served:
            raise RuntimeError(f"curriculum stage would start at step {start} but step {self.served} was "
                               "already drawn: raise Stages.lag")
        self.history.append((start, int(rows)))
        return start

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history[:] = [(int(a), int(b)) for a, b in state["history"]]


class StepBatches(Sampler[list[int]]):
    """Endless batches of row indices; global batch ``s`` depends only on (seed, s). Starts at ``start``.

    With ``world`` processes (DDP), the global batch has ``world * batch_size`` rows and process ``rank``
    takes its slice, so a DDP run sees the same data as one process with the same global batch.
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int, start: int = 0, rank: int = 0,
                 world: int = 1, stages: Stages | None = None) -> None:
        self.n, self.seed, self.start, self.rank, self.world = n_rows, seed, start, rank, world
        self.b = max(1, min(batch_size, n_rows // world))
        self.stages = stages
        self._perms: dict[tuple, np.ndarray] = {}  # the current epochs' permutations (a batch may span two)

    def _permutation(self, key: list[int], epoch: int, n: int) -> np.ndarray:
        """The permutation of ``n`` rows for (key, epoch): drawn once per epoch, not once per batch."""
        k = (*key, epoch, n)
        if k not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(next(iter(self._perms)))
            self._perms[k] = np.random.default_rng([*key, epoch]).permutation(n)
        return self._perms[k]

    def batch(self, step: int) -> list[int]:
        size = self.b * self.world
        out: list[int] = []
        pos, n, key = step * size, self.n, [self.seed]
        if self.stages is not None:  # the stage's prefix, its own stream from its first step
            k, first, n = self.stages.at(step)
            n, pos, key = min(max(n, 1), self.n), (step - first) * size, [self.seed, 1 + k]
            self.stages.served = max(self.stages.served, step)
        while len(out) < size:
            epoch, offset = divmod(pos, n)
            perm = self._permutation(key, epoch, n)
            take = perm[offset : offset + size - len(out)]
            out.extend(int(i) for i in take)
            pos += len(take)
        return out[self.rank * self.b : (self.rank + 1) * self.b]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            yield [step] + self.batch(step)  # the first entry is the step, used as the batch seed
            step += 1

    def __len__(self) -> int:  # Lightning wants a length; training is bounded by max_steps
        return 1 << 62


class StepLoader(DataLoader):
    """The training loader. Its batches are a function of the step (``StepBatches`` starts at the trainer's
    ``global_step``), so resuming needs no loader state: ``state_dict``/``load_state_dict`` say so to Lightning,
    which would otherwise warn that resuming in the middle of an epoch is unreliable."""

    def state_dict(self) -> dict:
        return {"batches_follow_the_step": True}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class DataModule(L.LightningDataModule):
    """Holds the source and its (selected) splits; serves resumable training batches."""

    def __init__(self, source: Source, splits: DatasetDict, batch_size: int, seed: int,
                 num_workers: int = 0, doc_mask: bool = False) -> None:
        super().__init__()
        self.source, self.splits, self.doc_mask = source, splits, bool(doc_mask)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.stages: Stages | None = None

    def use_stages(self, first_rows: int) -> Stages:
        """Release the training rows in stages (a curriculum), starting with the first ``first_rows``."""
        self.stages = Stages(first_rows, lag=2 + 2 * self.num_workers)
        return self.stages

    @property
    def train_rows(self) -> Dataset:
        return self.splits["train"]

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        start = trainer.global_step if trainer is not None else 0
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        data = self.train_rows.with_format(None)
        seed, doc_mask = self.seed, self.doc_mask

        def fetch(step_and_indices: list[int]) -> dict:
            step, indices = step_and_indices[0], step_and_indices[1:]
            rows = data[indices]
            rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
            return collate(rows, seed=(seed * 1_000_003 + step) % (1 << 31), doc_mask=doc_mask)

        return StepLoader(
            _StepDataset(fetch),
            batch_size=None,
            sampler=StepBatches(len(data), self.batch_size, seed, start, rank, world, self.stages),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        """The validation split in order, masks drawn from fixed seeds (the same every validation)."""
        rows = self.splits["validation"].with_format(None).to_list()
        b = self.batch_size
        batches = [collate(rows[i : i + b], seed=i, doc_mask=self.doc_mask) for i in range(0, len(rows), b)]
        return DataLoader(batches, batch_size=None)

    def batches(self, rows: list[dict], batch_size: int | None = None) -> Iterator[dict]:
        """Plain in-order batches of ``rows`` (for evaluation)."""
        b = batch_size or self.batch_size
        for i in range(0, len(rows), b):
            yield collate(rows[i : i + b])


class _StepDataset(torch.utils.data.Dataset):
    """Maps a sampler item (step, indices...) to a collated batch."""

    def __init__(self, fetch) -> None:
        self.fetch = fetch

    def __getitem__(self, item: list[int]) -> dict:
        return self.fetch(item)

    def __len__(self) -> int:
        return 1 << 62


def check_doc_mask(doc_mask: bool, model, objective) -> None:
    """Refuse ``data.doc_mask`` where it would not take effect: the objective must hand the batch's documents
    to the model and the model must mask attention by them (both say so with ``reads_documents``)."""
    if not doc_mask:
        return
    for part, what in ((objective, "objective"), (model, "model")):
        if not getattr(part, "reads_documents", False):
            raise UserError(f"data.doc_mask keeps packed documents apart in attention and {what} "
                            f"{type(part).__name__} does not apply it: use objective=clm with model=transformer, or "
                            "drop data.doc_mask.")
