"""``eval=perplexity``: the objective's exact evaluation on the validation split, and bits per byte on text.

For CLM the loss is the per-token NLL (``ppl`` its exponential, the usual perplexity); for MLM it is the
single-mask pseudo-log-likelihood per word (``ppl``: the pseudo-perplexity). Where the source knows the
true distribution, ``optimum`` and ``gap`` give the best achievable loss and the distance to it. ``rows`` is the
number of rows scored: the whole validation split by default (``max_rows: null``), or a random sample of
``max_rows`` rows drawn with ``seed``.

Where the validation split names each row's source (a ``source`` column: ``data=mixture``), the same keys are
also reported per source, ``perplexity/<source>/loss`` etc., each on that source's rows (its whole share, or a
sample of ``max_rows`` of them).

Bits per byte (a causal model on text, whose tokenizer says how many UTF-8 bytes each token stands for):
``loss_per_byte`` is the NLL in nats of the scored tokens that stand for text, summed and divided by the
number of UTF-8 bytes those tokens decode to, and ``bpb`` is the same in bits (``loss_per_byte / ln 2``). The
special tokens have no bytes and are left out of both sums: ``[BOS]`` is only ever read, and the ``[EOS]`` that
ends a document is not charged, as lm-evaluation-harness's ``bits_per_byte`` scores a document's text after
``[BOS]`` and not its end (``-sum log p / sum bytes / ln 2`` over its rolling log-likelihoods). Unlike the loss
per token, it does not depend on the tokenizer, so runs with different vocabularies (BPE, bytes, HAT) compare.

``paths`` scores other text instead of the validation split: files read as ``data=text`` reads them (.txt,
.jsonl, .json, .parquet; the run's ``text_field``), tokenized with the run's own tokenizer and packed into the
run's ``block_size`` blocks; the keys are then ``perplexity/files/...``. A run whose data have no tokenizer
(the grammars) is refused.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.attention import CAUSAL, Attention, documents_of, padding_of
from lmlab.errors import UserError
from lmlab.evaluation.base import Evaluator
from lmlab.readout import model_device, pad_rows
from lmlab.settings import NonNegative, Optional, Positive

FILES = "files"  # the key infix of scores on eval.perplexity.paths


class Perplexity(Evaluator):
    name = "perplexity"

    def __init__(self, max_rows: Optional[Positive] = None, batch_size: Positive = 64, seed: NonNegative = 0,
                 paths: str | list[str] | None = None) -> None:
        self.max_rows, self.batch_size, self.seed = max_rows, batch_size, seed
        if paths is None or isinstance(paths, (str, os.PathLike)):
            self.paths = None if paths is None else [os.fspath(paths)]
        else:
            self.paths = [os.fspath(p) for p in paths]
        if self.paths == []:
            raise UserError("eval.perplexity.paths is an empty list: name at least one file, or null to score the "
                            "validation split.")

    def skip_reason(self, source, objective=None) -> str | None:
        if self.paths is not None and not callable(getattr(getattr(source, "tokenizer", None), "encode_flat", None)):
            raise UserError(f"eval.perplexity.paths scores text files and data {getattr(source, 'name', source)} has "
                            "no tokenizer to read them with: drop eval.perplexity.paths or evaluate a run trained on "
                            "text.")
        return None

    def __call__(self, module, datamodule, run_dir=None) -> dict[str, float]:
        if self.paths is not None:
            rows = self.file_rows(datamodule.source)
            return self._score(module, datamodule, self.sample(rows), f"{self.name}/{FILES}")
        split = datamodule.splits["validation"].with_format(None)
        out = self._score(module, datamodule, self.sample([list(r) for r in split["input_ids"]]), self.name)
        if "source" in split.column_names:
            groups: dict[str, list[list[int]]] = {}
            for ids, name in zip(split["input_ids"], split["source"]):
                groups.setdefault(str(name), []).append(list(ids))
            for name, rows in groups.items():
                out.update(self._score(module, datamodule, self.sample(rows), f"{self.name}/{name}"))
        return out

    def sample(self, rows: list[list[int]]) -> list[list[int]]:
        """All ``rows``, or ``max_rows`` of them drawn without replacement with ``seed`` (kept in order)."""
        if self.max_rows is None or self.max_rows >= len(rows):
            return rows
        keep = np.sort(np.random.default_rng(self.seed).choice(len(rows), self.max_rows, replace=False))
        return [rows[i] for i in keep]

    def file_rows(self, source) -> list[list[int]]:
        """The blocks of ``paths``, read as ``data=text`` reads files and tokenized with ``source``'s tokenizer."""
        from lmlab.data.text import TextSource

        try:
            reader = TextSource(paths=self.paths, tokenizer=source.tokenizer,
                                block_size=getattr(source, "block_size", 64),
                                text_field=getattr(source, "text_field", "text"))
            blocks = reader.pack(reader.read_documents())
        except UserError as error:
            raise UserError(str(error).replace("data.paths", "eval.perplexity.paths")) from error
        if len(blocks) == 0:
            raise UserError(f"eval.perplexity.paths hold fewer tokens than one block of {reader.block_size}: add text "
                            "to the files.")
        print(f"[lmlab] perplexity on {len(blocks)} blocks of {reader.block_size} tokens from {len(reader.files)} "
              "file(s)")
        return blocks.tolist()

    def _score(self, module, datamodule, rows: list[list[int]], prefix: str) -> dict[str, float]:
        result = module.objective.evaluate(module.model, rows, datamodule.source, self.batch_size)
        out = {f"{prefix}/loss": float(result["loss"]), f"{prefix}/ppl": math.exp(min(float(result["loss"]), 700.0))}
        for key in ("optimum", "gap"):
            if result.get(key) is not None:
                out[f"{prefix}/{key}"] = float(result[key])
        tokenizer = getattr(datamodule.source, "tokenizer", None)
        if callable(getattr(tokenizer, "byte_lengths", None)) and module.objective.attention == CAUSAL:
            nats, n_bytes = text_nll(module.model, rows, tokenizer.byte_lengths(), self.batch_size,
                                     doc_mask=getattr(datamodule.source, "doc_mask", False))
            if n_bytes:
                out[f"{prefix}/loss_per_byte"] = nats / n_bytes
                out[f"{prefix}/bpb"] = nats / n_bytes / math.log(2)
        out[f"{prefix}/rows"] = float(len(rows))
        return out


@torch.no_grad()
def text_nll(model, rows: list[list[int]], byte_lengths: np.ndarray, batch_size: int,
             doc_mask: bool = False) -> tuple[float, int]:
    """``(sum of -log p(token) in nats, sum of its bytes)`` over the tokens of ``rows`` that the model predicts
    (each after the ones before it in its row, causally, within its document with ``doc_mask``) and that stand
    for at least one byte."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    lengths = torch.as_tensor(byte_lengths, dtype=torch.long)
    nats, n_bytes = 0.0, 0
    try:
        for i in range(0, len(rows), batch_size):
            ids = pad_rows(rows[i : i + batch_size])
            inputs, targets = ids[:, :-1].to(device), ids[:, 1:]
            documents = documents_of(inputs) if doc_mask else None
            hidden = model(inputs, Attention(CAUSAL, padding=padding_of(inputs), documents=documents))
            text = lengths[targets] > 0  # PAD, EOS and the other special ids have no bytes
            logp = F.log_softmax(model.logits(hidden[text.to(device)]).double(), dim=-1)
            picked = logp.gather(1, targets[text].to(device)[:, None])
            nats -= float(picked.sum())
            n_bytes += int(lengths[targets][text].sum())
    finally:
        model.train(was_training)
    return nats, n_bytes
