"""WRAP-style augmentation: rephrase pool rows with a local generator and mix them with the real data.

Maini et al. 2024, "Rephrasing the Web: A Recipe for Compute and Data-Efficient Language Modeling"
(arXiv 2401.16380). The paper rephrases C4 with an instruction-tuned LLM (Mistral-7B-Instruct, chunks of at
most 300 tokens) in four styles and trains on real : synthetic = 1 : 1. Offline variant implemented here
(no official code exists; see ALGORITHMS.md section 8):

* ``generator``: a local path, never a hub name (nothing downloads).
  - an **lmlab run directory** (its causal model, built with ``lmlab.run_dir.load_backbone``): the model speaks the
    pool's own token ids, so "rephrasing" is *regenerating the row conditioned on its prefix*: keep ``[BOS]``
    and the first ``prefix`` share of the row's words, then sample the rest from the model (``temperature``).
    A row that ends in ``[EOS]`` (a sentence of a synthetic grammar) is continued until the model writes
    ``[EOS]`` (at most as long as the longest rephrased row); a packed text block is refilled to its length.
    For a synthetic grammar this is a new sentence that shares the original's opening words and follows the
    grammar as far as the model has learned it — the closest token-level analogue of a paraphrase.
  - a **Hugging Face causal LM directory** (``config.json`` and tokenizer files; loaded with
    ``local_files_only=True``): the row is decoded to text with the data source's tokenizer (text sources
    only), wrapped in the WRAP prompt of ``style`` (easy, medium, hard, qa — the paper's prompts, after its
    system prompt), ``max_new_tokens`` are sampled, and the new text is encoded back with the source's
    tokenizer into ``[BOS] ids [EOS]`` (cut to the row's length).
* Mixing: with ``ratio`` = the synthetic share of the mixed data, ``n_syn = round(ratio * n / (1 - ratio))``
  rows of the pool (drawn without replacement while ``n_syn <= n``, seed ``seed``) are rephrased and added to
  all ``n`` real rows (``ratio: 0.5`` is the paper's 1 : 1). Synthetic rows get label ``-1`` for every task.
* Cached by ``Selector.run`` under the data key and this config, which includes the generator's weights
  file size and modification time (a retrained generator is a new cache entry). ``report`` holds
  ``real_rows``, ``synthetic_rows``, ``synthetic_fraction`` and ``synthetic_empty`` (generations that gave
  no tokens: ``[BOS] [EOS]``).

Over memory-mapped shards it materialises the pool (``Selector.on_shards``): its result holds new rows, so
it is no index over the shards; ``Selector.run`` loads a shard pool of at most ``MATERIALISE_ROWS`` rows and
refuses a larger one.
"""

from __future__ import annotations

import os
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets

from lmlab.attention import CAUSAL, Attention
from lmlab.errors import UserError
from lmlab.run_dir import MODEL, holds_model, load_backbone, model_args
from lmlab.selection.base import Selection, Selector
from lmlab.settings import Fraction, NonNegative, Optional, Positive, PositiveFloat, declared, keyless
from lmlab.vocab import BOS_ID, EOS_ID, MASK_ID, N_SPECIAL, PAD_ID

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the questions.")
STYLES = {
    "easy": "For the following paragraph give me a paraphrase of the same using a very small vocabulary and "
            "extremely simple sentences that a toddler will understand:",
    "medium": "For the following paragraph give me a diverse paraphrase of the same in high quality English "
              "language as in sentences on Wikipedia:",
    "hard": "For the following paragraph give me a paraphrase of the same using very terse and abstruse language "
            "that only an erudite scholar will understand. Replace simple words and phrases with rare and complex "
            "ones:",
    "qa": "Convert the following paragraph into a conversational format with multiple tags of \"Question:\" "
          "followed by \"Answer:\":",
}
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def _fingerprint(path: Path) -> list:
    stat = path.stat()
    return [path.name, stat.st_size, stat.st_mtime_ns]


def generator_kind(path: str) -> str:
    """``run`` for an lmlab run directory, ``hf`` for a Hugging Face model directory."""
    p = Path(os.path.expanduser(path))
    if holds_model(p):
        return "run"
    if (p / "config.json").is_file():
        return "hf"
    raise UserError(f"selection.generator={path!r} is neither a finished lmlab run (with a trained {MODEL}) nor a "
                    "local Hugging Face model directory (config.json): point it at one.")


# ----- generators -----

class RunGenerator:
    """Regenerates rows from their prefix with the causal model of an lmlab run (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, prefix: float = 0.5, temperature: float = 1.0,
                 batch_size: int = 64) -> None:
        self.model, self.prefix, self.temperature, self.batch_size = model, prefix, temperature, batch_size

    @classmethod
    def from_run(cls, run_dir: str, **kwargs: Any) -> RunGenerator:
        path = Path(os.path.expanduser(run_dir))
        trained = model_args(path)["attention"]
        if trained != CAUSAL:
            raise UserError(f"the generator run {run_dir!r} was trained with {trained} attention: rephrasing "
                            "samples left to right, give a run trained with objective=clm.")
        return cls(load_backbone(path), **kwargs)

    @torch.no_grad()
    def generate(self, rows: list[list[int]], seed: int) -> list[list[int]]:
        model = self.model.eval()
        vocab = model.vocab_size
        if any(t >= vocab for r in rows for t in r):
            raise UserError(f"the generator's vocabulary ({vocab} ids) does not cover the pool's token ids: "
                            "give a generator run trained on the same data (or the same tokenizer).")
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(int(seed))
        longest = max((len(r) for r in rows), default=0)
        out: list[list[int]] = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            prompts, limits, sentence = [], [], []
            for r in batch:
                r = [t for t in r if t != PAD_ID]
                is_sentence = len(r) > 1 and r[-1] == EOS_ID
                body = r[1:-1] if is_sentence else r[1:]
                keep = min(len(body), max(1, int(self.prefix * len(body)))) if body else 0
                prompts.append([BOS_ID, *body[:keep]])
                limits.append(longest if is_sentence else len(r))
                sentence.append(is_sentence)
            width = max(limits + [len(p) for p in prompts])
            ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
            for i, p in enumerate(prompts):
                ids[i, :len(p)] = torch.tensor(p)
            cur = torch.tensor([len(p) for p in prompts])
            limit = torch.tensor(limits)
            is_sent = torch.tensor(sentence)
            active = cur < limit
            banned = torch.tensor([PAD_ID, BOS_ID, MASK_ID])
            while bool(active.any()):
                t = int(cur.max())  # every row's last position lies inside the window
                hidden = model(ids[:, :t].to(device), Attention(CAUSAL))
                rows_idx = torch.arange(len(batch))
                logits = model.logits(hidden[rows_idx, (cur - 1).clamp(min=0).to(device)]).float().cpu()
                logits[:, banned] = -torch.inf
                probs = torch.softmax(logits / max(self.temperature, 1e-6), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=g).squeeze(1)
                write = active.clone()
                ids[rows_idx[write], cur[write]] = nxt[write]
                cur = cur + write.long()
                ended = is_sent & (nxt == EOS_ID) & write
                active = active & ~ended & (cur < limit)
            for i in range(len(batch)):
                row = ids[i, : int(cur[i])].tolist()
                if sentence[i] and row[-1] != EOS_ID:
                    row = row[: max(1, limits[i] - 1)] + [EOS_ID]
                out.append(row)
        return out


class HFGenerator:
    """WRAP prompts through a local Hugging Face causal LM; text in and out through the data source."""

    def __init__(self, path: str, source: Any, style: str = "medium", max_new_tokens: int = 64,
                 temperature: float = 1.0, batch_size: int = 8) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not (callable(getattr(source, "decode", None)) and callable(getattr(source, "encode", None))):
            raise UserError("a Hugging Face generator rephrases text: use a text source (data=text or data=hf), "
                            "or an lmlab run as selection.generator for token sources.")
        path = os.path.expanduser(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        except Exception as error:
            raise UserError(f"cannot load the Hugging Face model in {path!r} ({str(error).splitlines()[0][:200]}): "
                            "give a directory written by save_pretrained with its tokenizer.") from error
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.tokenizer.padding_side = "left"
        self.source, self.style = source, style
        self.max_new_tokens, self.temperature, self.batch_size = max_new_tokens, temperature, batch_size

    def prompt(self, text: str) -> str:
        return f"{SYSTEM} USER: {STYLES[self.style]}\n{text}\nASSISTANT:"

    @torch.no_grad()
    def generate(self, rows: list[list[int]], seed: int) -> list[list[int]]:
        torch.manual_seed(int(seed))
        out: list[list[int]] = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            prompts = [self.prompt(self.source.decode(r)) for r in batch]
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True)
            gen = self.model.generate(**enc, do_sample=True, temperature=self.temperature,
                                      max_new_tokens=self.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id)
            texts = self.tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for r, ids in zip(batch, self.source.encode([t.strip() for t in texts])):
                out.append([BOS_ID, *ids[: max(0, len(r) - 2)], EOS_ID])
        return out


# ----- the selector -----

class Rephrase(Selector):
    """All real rows plus rephrased rows, ``ratio`` of the mix being synthetic (see the module docstring)."""

    @declared
    class Settings(Selector.Settings):
        generator: Optional[str] = None
        ratio: float = 0.5
        style: str = "medium"
        prefix: Fraction = 0.5
        temperature: PositiveFloat = 1.0
        max_new_tokens: Positive = 64
        batch_size: Positive = keyless(64)  # rows generated at once: the same rows either way
        seed: NonNegative = 0

    def setup(self) -> None:
        s = self.settings
        if not s.generator:
            raise UserError("selection=rephrase needs selection.generator: an lmlab run directory (trained with "
                            "objective=clm) or a local Hugging Face model directory.")
        generator = os.fspath(s.generator)
        kind = generator_kind(generator)
        ratio, prefix = s.ratio, s.prefix
        if isinstance(ratio, bool) or not isinstance(ratio, Real) or not 0 <= ratio < 1:
            raise UserError(f"selection.ratio (the synthetic share of the mix) must lie in [0, 1), got {ratio!r}: "
                            "e.g. selection.ratio=0.5 for the paper's 1:1.")
        if s.style not in STYLES:
            raise UserError(f"unknown selection.style {s.style!r}: choose one of {', '.join(STYLES)}.")
        if isinstance(prefix, bool) or not isinstance(prefix, Real) or not 0 <= prefix < 1:
            raise UserError(f"selection.prefix must lie in [0, 1), got {prefix!r}: e.g. selection.prefix=0.5.")
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(s, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise UserError(f"selection.{name} must be a positive integer, got {value!r}.")
        root = Path(os.path.expanduser(generator)).resolve()
        self.weights = [root / MODEL] if kind == "run" else [root / f for f in HF_WEIGHTS if (root / f).exists()]
        self.generator, self.kind, self.ratio, self.style = str(root), kind, float(ratio), s.style
        self.prefix, self.temperature = float(prefix), float(s.temperature)
        self.max_new_tokens, self.batch_size, self.seed = int(s.max_new_tokens), int(s.batch_size), int(s.seed)

    @property
    def config(self) -> dict[str, Any]:
        """The settings, the generator as its resolved directory and the size and time of its weight files."""
        files = [_fingerprint(w) for w in self.weights]
        return {**super().config, "generator": self.generator, "generator_files": files}

    def make_generator(self):
        if self.kind == "run":
            return RunGenerator.from_run(self.generator, prefix=self.prefix, temperature=self.temperature,
                                         batch_size=self.batch_size)
        return HFGenerator(self.generator, self.source, style=self.style, max_new_tokens=self.max_new_tokens,
                           temperature=self.temperature, batch_size=min(self.batch_size, 16))

    def n_synthetic(self, n_real: int) -> int:
        return int(round(self.ratio * n_real / (1 - self.ratio)))

    def select(self, pool: Dataset, target: Dataset | None, workdir: Path, generator=None) -> Selection:
        n = len(pool)
        n_syn = self.n_synthetic(n)
        if n_syn == 0:
            return Selection(pool, None, {"real_rows": n, "synthetic_rows": 0, "synthetic_fraction": 0.0,
                                          "synthetic_empty": 0})
        rows = pool.with_format(None)["input_ids"]
        rng = np.random.default_rng(self.seed)
        picks = rng.choice(n, size=n_syn, replace=n_syn > n) if n_syn else np.zeros(0, dtype=np.int64)
        generated = (generator or self.make_generator()).generate([rows[i] for i in picks], self.seed) if n_syn else []
        empty = sum(1 for r in generated if not any(t >= N_SPECIAL for t in r))
        columns: dict[str, Any] = {"input_ids": generated}
        for name in pool.column_names:
            if name != "input_ids":
                columns[name] = [-1] * len(generated)
        synthetic = Dataset.from_dict(columns, features=pool.features)
        report = {"real_rows": n, "synthetic_rows": len(generated),
                  "synthetic_fraction": len(generated) / max(1, n + len(generated)), "synthetic_empty": empty}
        return Selection(concatenate_datasets([pool, synthetic]), None, report)
