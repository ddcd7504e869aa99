"""Tokenizers of the text sources (data=text, hf, dna, protein, and shards written from texts).

One small class per tokenizer, all with the same interface, chosen by the nested config group
``data/tokenizer`` (``lmlab/conf/data/tokenizer/*.yaml``: ``data/tokenizer=byte`` on the command line):

* ``Byte``: id = ``N_SPECIAL`` + byte value of the UTF-8 text; vocabulary 260. The byte-level models (HAT)
  read these ids.
* ``Chars``: one id per character of a fixed alphabet, from ``N_SPECIAL`` in alphabet order; lower case is
  upper-cased, every other ASCII letter becomes the ``unknown`` character, everything else (whitespace,
  digits, ``*`` stops, ``-`` gaps, non-ASCII) is dropped. Two alphabets:

  - ``DNA``: ``A C G T N`` (vocabulary 9), one token per nucleotide as in HyenaDNA (Nguyen et al. 2023,
    "HyenaDNA: Long-Range Genomic Sequence Modeling at Single Nucleotide Resolution", arXiv 2306.15794);
    IUPAC codes other than ACGT (R, Y, K, M, S, W, B, D, H, V) become ``N``.
  - ``Protein``: the 20 standard amino acids ``A C D E F G H I K L M N P Q R S T V W Y`` and ``X``
    (vocabulary 25), one token per residue as in PepMLM (Chen et al. 2023, "PepMLM: Target
    Sequence-Conditioned Generation of Peptide Binders via Masked Language Modeling", arXiv 2310.03842, on
    ESM-2's residue vocabulary) and the RiPP substrate models of Clark, Mi, Mitchell & Shukla 2024,
    "Substrate Prediction for RiPP Biosynthetic Enzymes via Masked Language Modeling and Transfer Learning"
    (arXiv 2402.15181); B, Z, J, U, O become ``X``.

* ``BPE``: a byte-level BPE model (Hugging Face ``tokenizers``) trained on the training documents, with
  ``[PAD] [BOS] [EOS] [MASK]`` as ids 0..3; ``vocab_size`` counts them (a small corpus may leave the top ids
  unused). Special-token strings inside a text are encoded as plain text.

* ``File``: a fixed byte-level BPE read from a ``tokenizer.json`` in the Hugging Face ``tokenizers`` format
  (as lmlab's ``BPE`` saves it and ``lmlab export`` writes it: ``[PAD] [BOS] [EOS] [MASK]`` as ids 0..3), or
  from a finished run's directory (its trained tokenizer, found by ``lmlab.data.text.run_tokenizer_file``).
  Nothing is learned from the documents, so runs and every text source of a ``data=mixture`` share its ids;
  the cache key holds the SHA-256 of the file's content. ``path: null`` reads ``SAMPLE_TOKENIZER``
  (``lmlab/data/sample/tokenizer.json``: ``BPE(1024)`` trained on the bundled sample corpus, one document per
  line, written by ``python -c "from lmlab.data.tokenizers import write_sample_tokenizer as w; w()"``).

Interface: ``vocab_size``; ``train(docs)`` (BPE only; a no-op for the others) and ``trained``;
``encode_flat(texts)`` -> the concatenated ids (int32) and each text's length; ``encode(texts)`` -> one id list
per text; ``decode(ids)`` -> text, special ids dropped; ``byte_lengths()`` -> the number of UTF-8 bytes each id
stands for (0 for the special ids; bits per byte); ``save(directory)`` / ``load(directory)`` for the
trained state (``tokenizer.json`` in a cache entry); ``config``, which goes into the cache key of a source;
``sample``, the bundled corpus a text source reads when ``data.paths`` is null; ``token_bytes()`` -> each ordinary
token id and the bytes it stands for (special tokens left out), for matching two vocabularies; ``to_hf()`` -> the
same ids as a ``transformers`` fast tokenizer (the trained BPE as it is; the byte tokenizer as a merge-free
byte-level BPE; an alphabet as a merge-free BPE over its letters behind a normaliser doing what its table does),
and ``Tokenizer.from_hf(directory, vocab_size, store)`` -> a checkpoint's ``tokenizer.json`` as a ``File`` tokenizer
(one in another layout than lmlab's gets ``[PAD] [BOS] [EOS] [MASK]`` as new ids 0..3: ``hf_layout``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from abc import ABC, abstractmethod
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.errors import UserError
from lmlab.settings import Optional, Positive
from lmlab.vocab import BOS_ID, N_SPECIAL

SAMPLES = Path(__file__).resolve().parent / "sample"
SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", "[MASK]"]
BYTE_VOCAB = N_SPECIAL + 256
TOKENIZER_FILE = "tokenizer.json"
SAMPLE_TOKENIZER = SAMPLES / TOKENIZER_FILE  # data/tokenizer=file's default: see write_sample_tokenizer


def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE (GPT-2) writes each byte as one printable character: printable Latin-1 bytes stand for
    themselves, the others for chr(256), chr(257), ... in byte order. Character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class Tokenizer(ABC):
    """The interface every tokenizer of a text source has (see the module docstring)."""

    name: str = "tokenizer"  # a short name for messages and saved markers
    sample: Path = SAMPLES / "tiny_corpus.txt"  # the corpus a text source reads when data.paths is null

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """The number of token ids, special tokens included."""

    @property
    def config(self) -> dict[str, Any]:
        """What determines the ids (part of a source's cache key)."""
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}"}

    @property
    def trained(self) -> bool:
        """Whether the tokenizer can encode (only a BPE model needs training first)."""
        return True

    def train(self, docs: list[str]) -> None:
        """Learn the vocabulary from ``docs`` (a no-op for tokenizers with a fixed vocabulary)."""

    @abstractmethod
    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts tokenized at once: the concatenated ids (int32) and each text's length (int64)."""

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS."""
        ids, lengths = self.encode_flat(list(texts))
        return [a.tolist() for a in np.split(ids, np.cumsum(lengths)[:-1])] if len(texts) else []

    @abstractmethod
    def decode(self, ids) -> str:
        """The text of a list of token ids; special tokens are dropped."""

    @abstractmethod
    def token_bytes(self) -> dict[int, bytes]:
        """Each ordinary token id and the UTF-8 bytes it stands for; special tokens (ids below ``N_SPECIAL``)
        are left out, as is any token that stands for no fixed byte string."""

    def byte_lengths(self) -> np.ndarray:
        """(vocab_size,) int64: the number of UTF-8 bytes each id stands for (``token_bytes``), 0 for the special
        ids (bits per byte)."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i, b in self.token_bytes().items():
            if i < self.vocab_size:
                lengths[i] = len(b)
        return lengths

    # ----- the transformers format -----

    def hf_backend(self):
        """A ``tokenizers.Tokenizer`` (before its special tokens) whose ids for any text equal this tokenizer's;
        a UserError for a tokenizer without one."""
        raise UserError(f"the run's tokenizer {self!r} has no Hugging Face counterpart: export a run trained with "
                        "data/tokenizer=bpe, byte, dna or protein.")

    def to_hf(self, model_max_length: int | None = None):
        """This tokenizer as a ``transformers`` fast tokenizer with the same ids: ``[PAD] [BOS] [EOS] [MASK]`` =
        0..3 as the pad, bos, eos and mask tokens, ``[BOS]`` prepended when special tokens are added (as lmlab's
        rows start), special-token strings in a text encoded as plain text."""
        from tokenizers import AddedToken, processors
        from transformers import PreTrainedTokenizerFast

        backend = self.hf_backend()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        bos = SPECIAL_TOKENS[BOS_ID]
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                               special_tokens=[(bos, BOS_ID)])
        if [backend.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(N_SPECIAL)):
            raise RuntimeError(f"{self!r} converted to a tokenizer whose special ids are not 0..{N_SPECIAL - 1}")
        kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
        return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]",
                                       eos_token="[EOS]", mask_token="[MASK]", add_bos_token=True,
                                       add_eos_token=False, split_special_tokens=True, padding_side="right",
                                       **kwargs)

    @staticmethod
    def from_hf(directory: str | os.PathLike, vocab_size: int, store: str | os.PathLike) -> File:
        """The tokenizer of a ``transformers`` checkpoint directory (its fast tokenizer's ``tokenizer.json``) as a
        fixed lmlab tokenizer (``File``) with ``vocab_size`` ids. A file that holds ``[PAD] [BOS] [EOS] [MASK]``
        as ids 0..3 (as ``to_hf`` writes it) is read as it is; any other gets them as new ids 0..3 before its own
        ids, all shifted by ``N_SPECIAL`` (``hf_layout``), written to ``store/<sha256>/tokenizer.json``."""
        path, backend, shift = _hf_tokenizer(directory)
        if shift:
            raw = path.read_bytes()
            path = Path(store).expanduser() / hashlib.sha256(raw).hexdigest()[:16] / TOKENIZER_FILE
            if not path.is_file():
                from lmlab.io import write_text

                path.parent.mkdir(parents=True, exist_ok=True)
                write_text(path, _shifted(json.loads(raw), path))
        return File(str(path), vocab_size)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the trained state into ``directory`` (a fixed vocabulary writes a marker naming itself)."""
        (Path(directory) / TOKENIZER_FILE).write_text(json.dumps({"lmlab_tokenizer": self.name}) + "\n")

    def load(self, directory: str | os.PathLike) -> None:
        """Read the state ``save`` wrote (nothing to read for a fixed vocabulary)."""

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "class")
        return f"{type(self).__name__}({settings})"


class Byte(Tokenizer):
    """UTF-8 bytes: id = ``N_SPECIAL`` + byte (vocabulary 260)."""

    name = "byte"

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        raw = [t.encode("utf-8") for t in texts]
        lengths = np.fromiter(map(len, raw), dtype=np.int64, count=len(raw))
        ids = np.frombuffer(b"".join(raw), dtype=np.uint8).astype(np.int32) + N_SPECIAL
        return ids, lengths

    def decode(self, ids) -> str:
        own = [int(i) for i in ids if i >= N_SPECIAL]
        return bytes(i - N_SPECIAL for i in own).decode("utf-8", errors="replace")

    def token_bytes(self) -> dict[int, bytes]:
        return {N_SPECIAL + b: bytes([b]) for b in range(256)}

    def hf_backend(self):
        """A merge-free byte-level BPE: id = ``N_SPECIAL`` + byte."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        vocab.update({c: N_SPECIAL + b for c, b in byte_level_alphabet().items()})
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        return backend


class Chars(Tokenizer):
    """One id per character of ``alphabet`` (upper-case ASCII letters), ``N_SPECIAL`` onwards in its order;
    other letters become ``unknown``, everything else is dropped."""

    def __init__(self, alphabet: str, unknown: str, name: str = "chars", sample: str | None = None) -> None:
        if (not isinstance(alphabet, str) or not alphabet or len(set(alphabet)) != len(alphabet)
                or not all(c.isascii() and c.isupper() for c in alphabet)):
            raise UserError(f"data.tokenizer.alphabet must be distinct upper-case ASCII letters, got {alphabet!r}: "
                            "fix data.tokenizer.alphabet.")
        if not isinstance(unknown, str) or unknown not in alphabet or len(unknown) != 1:
            raise UserError(f"data.tokenizer.unknown must be one letter of the alphabet {alphabet!r}, got "
                            f"{unknown!r}: fix data.tokenizer.unknown.")
        self.alphabet, self.unknown, self.name = alphabet, unknown, name
        if sample is not None:
            self.sample = SAMPLES / sample
        table = np.full(256, -1, dtype=np.int32)  # byte value -> token id (-1 = drop)
        for c in range(256):
            ch = chr(c)
            if ch.isascii() and ch.isalpha():
                table[c] = N_SPECIAL + alphabet.index(unknown)
        for i, ch in enumerate(alphabet):
            table[ord(ch)] = table[ord(ch.lower())] = N_SPECIAL + i
        self._table = table

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + len(self.alphabet)

    @property
    def config(self) -> dict[str, Any]:
        return {**super().config, "alphabet": self.alphabet, "unknown": self.unknown}

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = []
        for text in texts:
            raw = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8)
            ids = self._table[raw]
            encoded.append(ids[ids >= 0])
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        ids = np.concatenate(encoded).astype(np.int32) if encoded else np.zeros(0, dtype=np.int32)
        return ids, lengths

    def __repr__(self) -> str:
        return super().__repr__() if type(self) is Chars else f"{type(self).__name__}()"

    def decode(self, ids) -> str:
        alphabet = self.alphabet
        return "".join(alphabet[i - N_SPECIAL] for i in map(int, ids) if N_SPECIAL <= i < N_SPECIAL + len(alphabet))

    def token_bytes(self) -> dict[int, bytes]:
        """Each letter's id and the letter (the upper-case form the alphabet names)."""
        return {N_SPECIAL + i: c.encode() for i, c in enumerate(self.alphabet)}

    def hf_backend(self):
        """A merge-free BPE over the alphabet behind a normaliser that does what the table does: keep ASCII
        letters only, alphabet letters of either case as themselves, other letters as the unknown one."""
        from tokenizers import Regex, decoders, models, normalizers
        from tokenizers import Tokenizer as HFTokenizer

        vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        vocab.update({c: N_SPECIAL + i for i, c in enumerate(self.alphabet)})
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.normalizer = normalizers.Sequence([
            normalizers.Replace(Regex("[^A-Za-z]"), ""),
            *(normalizers.Replace(c.lower(), c) for c in self.alphabet),
            normalizers.Replace(Regex(f"[^{self.alphabet}]"), self.unknown),
        ])
        backend.decoder = decoders.Fuse()
        return backend


class DNA(Chars):
    """Nucleotides ``A C G T N`` (vocabulary 9); its sample corpus is ``lmlab/data/sample/dna.txt``."""

    def __init__(self) -> None:
        super().__init__("ACGTN", "N", name="dna", sample="dna.txt")


class Protein(Chars):
    """Amino acids ``A C D E F G H I K L M N P Q R S T V W Y`` and ``X`` (vocabulary 25); its sample corpus is
    ``lmlab/data/sample/protein.txt``."""

    def __init__(self) -> None:
        super().__init__("ACDEFGHIKLMNPQRSTVWYX", "X", name="protein", sample="protein.txt")


class BPE(Tokenizer):
    """Byte-level BPE trained on the training documents, ``[PAD] [BOS] [EOS] [MASK]`` as ids 0..3."""

    name = "bpe"

    def __init__(self, vocab_size: int = 1024) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, Integral) or vocab_size < BYTE_VOCAB:
            raise UserError(f"data.tokenizer.vocab_size={vocab_size!r} is too small for a byte-level BPE: set it "
                            f"to {BYTE_VOCAB} or more.")
        self._vocab_size = int(vocab_size)
        self.model = None  # the trained tokenizers.Tokenizer, after train() or load()

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def config(self) -> dict[str, Any]:
        return {**super().config, "vocab_size": self._vocab_size}

    @property
    def trained(self) -> bool:
        return self.model is not None

    def train(self, docs) -> None:
        """Train on ``docs``: a list, or any iterable of texts (streamed to the trainer, not held)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=self._vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(docs, trainer, length=len(docs) if hasattr(docs, "__len__") else None)
        tok.encode_special_tokens = True  # "[EOS]" written in a document is text, not the EOS id
        assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(N_SPECIAL))
        self.model = tok

    def _model(self):
        if self.model is None:
            raise RuntimeError("the BPE tokenizer is not trained yet: call train(), load() or the source's build()")
        return self.model

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self._model().encode_batch_fast(texts, add_special_tokens=False)
        id_lists = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int32, count=int(lengths.sum()))
        return ids, lengths

    def decode(self, ids) -> str:
        own = [int(i) for i in ids if i >= N_SPECIAL]
        return self._model().decode(own, skip_special_tokens=True)

    def token_bytes(self) -> dict[int, bytes]:
        """The bytes of each learned token: byte-level BPE writes each byte as one printable character
        (``byte_level_alphabet``); a token holding any other character (an added token) is left out."""
        table = byte_level_alphabet()
        out = {}
        for token, i in self._model().get_vocab(with_added_tokens=False).items():
            if i >= N_SPECIAL and all(c in table for c in token):
                out[i] = bytes(table[c] for c in token)
        return out

    def save(self, directory: str | os.PathLike) -> None:
        self._model().save(str(Path(directory) / TOKENIZER_FILE))

    def hf_backend(self):
        """The trained model itself (a copy)."""
        from tokenizers import Tokenizer as HFTokenizer

        return HFTokenizer.from_str(self._model().to_str())

    def load(self, directory: str | os.PathLike) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.model = HFTokenizer.from_file(str(Path(directory) / TOKENIZER_FILE))
        self.model.encode_special_tokens = True


class File(BPE):
    """A fixed tokenizer read from a ``tokenizer.json`` (Hugging Face ``tokenizers`` format) or a finished run's
    directory; the ids are the file's, ``[PAD] [BOS] [EOS] [MASK]`` being 0..3 (see the module docstring)."""

    name = "file"
    train = Tokenizer.train  # nothing to learn: the file fixes the vocabulary
    load = Tokenizer.load  # nor to restore from a cache entry: the file is read at construction

    def __init__(self, path: str | None = None, vocab_size: Optional[Positive] = None) -> None:
        """``path``: a tokenizer.json, a directory holding one, or a run directory; ``vocab_size``: the number
        of ids models get (``None``: the run's ``vocab_size`` for a run directory, else the file's own size)."""
        self.vocab_size_setting, self.model = vocab_size, None
        self.path, declared = self.resolve(path)
        self.run = self.path if self.path is not None and self.path.is_dir() else None
        if self.run is None:  # a run directory's file is found by the text source that holds this tokenizer
            self.read(self.path, declared)

    def read(self, path: Path, declared: int | None = None) -> None:
        """Read the tokenizer file ``path`` (``declared``: the vocabulary size a run directory's config gives)."""
        from tokenizers import Tokenizer as HFTokenizer

        self.path, self.run, vocab_size = path, None, self.vocab_size_setting
        raw = self.path.read_bytes()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        try:
            model = HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as error:  # not JSON, or not a tokenizers file
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"cannot read {str(self.path)!r} as a Hugging Face tokenizer.json ({detail}): fix "
                            "data.tokenizer.path.") from None
        if [model.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(N_SPECIAL)):
            raise UserError(f"the tokenizer {str(self.path)!r} does not hold {' '.join(SPECIAL_TOKENS)} as ids "
                            f"0..{N_SPECIAL - 1}, which lmlab's rows use: give data.tokenizer.path a tokenizer "
                            "written by lmlab (a run's, or `lmlab export`'s).")
        model.encode_special_tokens = True  # "[EOS]" written in a document is text, not the EOS id
        self.model = model
        own = model.get_vocab_size(with_added_tokens=True)
        size = vocab_size if vocab_size is not None else declared if declared is not None else own
        if isinstance(size, bool) or not isinstance(size, Integral) or size < own:
            raise UserError(f"data.tokenizer.vocab_size={size!r} is smaller than the {own} ids of "
                            f"{str(self.path)!r}: set it to {own} or more, or null.")
        self._vocab_size = int(size)

    @staticmethod
    def resolve(path: str | os.PathLike | None) -> tuple[Path, int | None]:
        """The tokenizer file ``path`` names: a file, or a directory holding a ``tokenizer.json`` (an export, a
        data cache entry, a shard directory), and ``None`` for the vocabulary size; a run directory is returned
        as it is (its trained tokenizer lies in its data cache, which ``lmlab.data.text.run_tokenizer_file``
        finds when the text source holding this tokenizer is built)."""
        if path is None:
            return SAMPLE_TOKENIZER, None
        if str(path).strip() == "":
            raise UserError("data.tokenizer.path is empty: give it a tokenizer.json, a finished run's directory, "
                            "or null for lmlab's sample tokenizer.")
        where = Path(os.path.expanduser(str(path)))
        if where.is_file():
            return where.resolve(), None
        if where.is_dir():
            from lmlab.run_dir import CONFIG

            if (where / CONFIG).is_file():  # a run: ``lmlab.data.text.run_tokenizer_file`` finds its file
                return where.resolve(), None
            if (where / TOKENIZER_FILE).is_file():
                return (where / TOKENIZER_FILE).resolve(), None
            raise UserError(f"the directory {str(path)!r} is neither a run directory nor holds a "
                            f"{TOKENIZER_FILE}: fix data.tokenizer.path.")
        raise UserError(f"the tokenizer file {str(path)!r} does not exist: fix data.tokenizer.path.")

    def _require_file(self) -> None:
        if self.run is not None:
            raise UserError(f"data.tokenizer.path={str(self.run)!r} is a run directory, whose tokenizer a text "
                            "source finds: use data/tokenizer=file inside data=text (or a mixture of text sources).")

    @property
    def vocab_size(self) -> int:
        self._require_file()
        return self._vocab_size

    def _model(self):
        self._require_file()
        return super()._model()

    @property
    def config(self) -> dict[str, Any]:
        self._require_file()
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", "sha256": self.sha256,
                "vocab_size": self._vocab_size}

    def __repr__(self) -> str:
        return f"File(path={str(self.path)!r})"


# ----- checkpoints of other tokenizers (``Tokenizer.from_hf``) -----

HF_ROLES = ("pad_token", "bos_token", "eos_token", "mask_token")  # the roles of [PAD] [BOS] [EOS] [MASK]


def _hf_tokenizer(directory: str | os.PathLike):
    """(the checkpoint's tokenizer.json, it read by ``tokenizers``, whether its ids are shifted by N_SPECIAL)."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(directory).expanduser() / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"{str(directory)!r} holds no {TOKENIZER_FILE}: save the checkpoint's fast tokenizer there "
                        "(tokenizer.save_pretrained), as `lmlab export` does.")
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception:  # not a tokenizers file
        raise UserError(f"cannot read {str(path)!r} as a Hugging Face tokenizer.json: save the checkpoint's fast "
                        "tokenizer there (tokenizer.save_pretrained).") from None
    return path, backend, [backend.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(N_SPECIAL))


def hf_layout(directory: str | os.PathLike) -> tuple[int, dict[int, int | None]]:
    """How lmlab's ids relate to those of the checkpoint's tokenizer: ``(shift, rows)``. ``shift`` is 0 for a
    tokenizer in lmlab's layout (``[PAD] [BOS] [EOS] [MASK]`` = 0..3), else ``N_SPECIAL`` (lmlab id = its id +
    ``N_SPECIAL``); ``rows`` gives each new special id the checkpoint's id of the token in the same role
    (``tokenizer_config.json``'s ``pad_token``, ``bos_token``, ...; GPT-2's ``<|endoftext|>`` for BOS and EOS), or
    None where it names none: the rows of the embedding and LM head that the new ids start from."""
    _, backend, shift = _hf_tokenizer(directory)
    if not shift:
        return 0, {}
    settings = Path(directory).expanduser() / "tokenizer_config.json"
    config = json.loads(settings.read_text()) if settings.is_file() else {}
    rows: dict[int, int | None] = {}
    for i, role in enumerate(HF_ROLES):
        token = config.get(role)
        token = token.get("content") if isinstance(token, dict) else token
        rows[i] = backend.token_to_id(token) if isinstance(token, str) else None
    return N_SPECIAL, rows


def _shifted(spec: dict[str, Any], where: Path) -> str:
    """A tokenizer.json (parsed) with every id moved up by ``N_SPECIAL`` and lmlab's special tokens at 0..3 (in the
    model's vocabulary too: ``tokenizers`` gives an added token outside it the next free id), its post-processor,
    padding and truncation dropped (lmlab adds BOS and EOS itself)."""
    model = spec.get("model") or {}
    kind = model.get("type")
    taken = set(SPECIAL_TOKENS) & ({t["content"] for t in spec.get("added_tokens", [])} |
                                   set(model["vocab"] if isinstance(model.get("vocab"), dict) else
                                       (p for p, _ in model.get("vocab") or [])))
    if taken or kind not in ("BPE", "WordPiece", "WordLevel", "Unigram"):
        why = f"it holds {', '.join(sorted(taken))} at other ids" if taken else f"its model is {kind}"
        raise UserError(f"lmlab cannot give the tokenizer of {where.name} its special ids ({why}): import a "
                        "checkpoint whose tokenizer is a BPE, WordPiece, WordLevel or Unigram model.")
    if kind == "Unigram":
        model["vocab"] = [[t, 0.0] for t in SPECIAL_TOKENS] + model["vocab"]
        if model.get("unk_id") is not None:
            model["unk_id"] += N_SPECIAL
    else:
        model["vocab"] = {**{t: i for i, t in enumerate(SPECIAL_TOKENS)},
                          **{t: i + N_SPECIAL for t, i in model["vocab"].items()}}
    for token in spec.get("added_tokens", []):
        token["id"] += N_SPECIAL
    spec["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)] + \
        spec.get("added_tokens", [])
    spec["post_processor"] = spec["padding"] = spec["truncation"] = None
    return json.dumps(spec, ensure_ascii=False)


def write_sample_tokenizer() -> None:
    """Write ``SAMPLE_TOKENIZER``: ``BPE(1024)`` trained on the bundled sample corpus, one document per line."""
    bpe = BPE(1024)
    bpe.train([line for line in Tokenizer.sample.read_text(encoding="utf-8").splitlines() if line.strip()])
    bpe.save(SAMPLES)
