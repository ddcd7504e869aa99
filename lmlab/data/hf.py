"""Hugging Face datasets as a pre-training source: ``datasets.load_dataset`` by name, then the text pipeline.

``HFSource`` is ``TextSource`` (``lmlab/data/text.py``) with another reader: the documents come from
``load_dataset(name, config, split=split, data_files=..., revision=..., streaming=...)`` instead of local
files; splitting into train/validation/test, the tokenizers (``data/tokenizer``: bpe, byte, dna, protein, file),
packing into blocks, the labels CSV and the cache are the text source's own code.

* ``name``: a Hub dataset (``roneneldan/TinyStories``), a packaged loader with ``data_files`` (``json``,
  ``csv``, ``text``, ``parquet``), a local directory of data files, or a directory written by
  ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with ``load_from_disk``).
* ``streaming: true`` reads the corpus as a stream and stops after ``max_documents`` documents, so a large
  corpus is never downloaded or materialised in full; without streaming the split is loaded (and cached by
  ``datasets``) and its first ``max_documents`` documents are used (``null``: all of them).
* The cache key covers the config and, for local paths and ``data_files``, the size and modification time of
  every file; a Hub dataset is identified by name, config, split and ``revision`` (pin a revision for
  reproducible runs).

Nothing here forces offline mode: with internet, Hub names download as usual; without it (our machines), a Hub
name that is not in the local Hugging Face cache fails with one sentence.
"""

from __future__ import annotations

import glob
import itertools
import os
import tempfile
from pathlib import Path
from typing import Any

import datasets
from datasets import DatasetDict, Value, load_dataset, load_from_disk

from lmlab.data.text import Packing, TextSource, _fingerprint
from lmlab.errors import UserError
from lmlab.io import config_hash
from lmlab.settings import Optional, Positive, declared, plain

PACKAGED = {"json", "csv", "text", "parquet", "arrow", "webdataset", "imagefolder", "audiofolder"}


def _local_files(entry: str) -> list[Path]:
    """Files under a local path or glob (empty when ``entry`` is not local)."""
    expanded = os.path.expanduser(entry)
    if os.path.isfile(expanded):
        return [Path(expanded).resolve()]
    if os.path.isdir(expanded):
        return sorted(p.resolve() for p in Path(expanded).rglob("*") if p.is_file())
    if glob.has_magic(expanded):
        return sorted(Path(p).resolve() for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    return []


def _detail(error: BaseException) -> str:
    cause = error.__cause__ or error
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


class HFSource(TextSource):
    """Documents from ``datasets.load_dataset`` (or ``load_from_disk``), tokenized and packed like data=text."""

    @declared
    class Settings(Packing):
        name: Optional[str] = None
        config: Optional[str] = None
        split: str = "train"
        data_files: Any = None
        revision: Optional[str] = None
        streaming: bool = False
        max_documents: Optional[Positive] = None

    def setup(self) -> None:
        s = self.settings
        name, max_documents = s.name, s.max_documents
        if not isinstance(name, str) or not name:
            raise UserError("data=hf needs data.name: a Hugging Face dataset (data.name=roneneldan/TinyStories), "
                            "a local dataset directory, or a loader such as json with data.data_files.")
        if max_documents is not None and (isinstance(max_documents, bool) or not isinstance(max_documents, int)
                                          or max_documents < 1):
            raise UserError(f"data.max_documents must be a positive integer or null, got {max_documents!r}: "
                            "fix data.max_documents.")
        self.setup_packing()
        text = TextSource.Settings()  # what data=text reads and streams by default (self.files stays empty)
        self.documents, self.tokenizer_sample_bytes = "line", text.tokenizer_sample_bytes
        self.stream_above_bytes = text.stream_above_bytes
        data_files = plain(s.data_files)
        if data_files is not None and not isinstance(data_files, (str, list, dict)):
            raise UserError(f"data.data_files must be a path, a list of paths or a split -> paths map, got "
                            f"{data_files!r}: fix data.data_files.")
        self.files = []  # documents come from load_dataset, not from local text files
        self.dataset_name, self.subset, self.split, self.revision = name, s.config, s.split, s.revision
        self.data_files, self.streaming, self.max_documents = data_files, bool(s.streaming), max_documents
        self.setup_labels()
        for entry in self._data_file_entries():
            local = os.path.join(name, entry) if os.path.isdir(os.path.expanduser(name)) else entry
            if "://" not in entry and not _local_files(local):
                raise UserError(f"the data file {entry!r} does not exist: check data.data_files.")

    def _data_file_entries(self) -> list[str]:
        files = self.data_files
        if files is None:
            return []
        if isinstance(files, str):
            return [files]
        values = list(files.values()) if isinstance(files, dict) else files
        return [str(f) for v in values for f in ([v] if isinstance(v, str) else v)]

    @property
    def is_local(self) -> bool:
        return self.dataset_name in PACKAGED or os.path.exists(os.path.expanduser(self.dataset_name))

    @property
    def origin(self) -> str:
        return f"the dataset {self.dataset_name!r}"

    def cache_key(self) -> str:
        files: list = []
        if os.path.exists(os.path.expanduser(self.dataset_name)):
            files += [_fingerprint(p) for p in _local_files(self.dataset_name)]
        for entry in self._data_file_entries():
            files += [_fingerprint(p) for p in _local_files(entry)]
        labels = None if self.labels_csv is None else _fingerprint(self.labels_csv)
        digest = config_hash({"config": self.config, "files": files, "labels": labels})
        return f"{type(self).__module__}.{type(self).__name__}-{digest}"

    def _open(self, scratch: str):
        path = os.path.expanduser(self.dataset_name)
        if os.path.isdir(path) and any((Path(path) / f).exists() for f in
                                       ("dataset_dict.json", "dataset_info.json", "state.json")):
            data = load_from_disk(path)
            if isinstance(data, DatasetDict):
                if self.split not in data:
                    raise UserError(f"the dataset {self.dataset_name!r} has no split {self.split!r} (splits: "
                                    f"{', '.join(data)}): set data.split.")
                data = data[self.split]
            return data.to_iterable_dataset() if self.streaming else data
        kwargs = {"split": self.split, "streaming": self.streaming}
        if self.data_files is not None:
            kwargs["data_files"] = self.data_files
        if self.revision is not None:
            kwargs["revision"] = self.revision
        if self.is_local and not self.streaming:
            kwargs["cache_dir"] = scratch  # local files: datasets' own cache would only duplicate them
        return load_dataset(self.dataset_name, self.subset, **kwargs)

    def read_documents(self) -> list[str]:
        """The first ``max_documents`` non-blank documents of the split (all of them when ``null``)."""
        field, name = self.text_field, self.dataset_name
        quiet = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()
        try:
            with tempfile.TemporaryDirectory(prefix="lmlab-hf-") as scratch:
                try:
                    data = self._open(scratch)
                    names = getattr(data, "column_names", None)
                    if names is not None and field not in names:
                        raise UserError(f"the dataset {name!r} has no field {field!r} (fields: "
                                        f"{', '.join(names)}): set data.text_field.")
                    if not self.streaming:
                        if data.features[field] not in (Value("string"), Value("large_string")):
                            raise UserError(f"the field {field!r} of {name!r} is not text: set data.text_field "
                                            "to a text column.")
                        n = len(data) if self.max_documents is None else min(len(data), self.max_documents)
                        values = data.select(range(n))[field]
                    else:
                        values = []
                        for record in itertools.islice(iter(data), self.max_documents):
                            if field not in record:
                                raise UserError(f"the dataset {name!r} has no field {field!r} (fields: "
                                                f"{', '.join(record)}): set data.text_field.")
                            values.append(record[field])
                except UserError:
                    raise
                except Exception as error:  # unknown name offline, bad config/split, unreadable files
                    raise UserError(f"cannot load the Hugging Face dataset {name!r} ({_detail(error)}): check "
                                    "data.name, data.config and data.split (without internet only local paths and "
                                    "datasets already in the Hugging Face cache load).") from error
        finally:
            if not quiet:
                datasets.enable_progress_bars()
        if any(v is not None and not isinstance(v, str) for v in values):
            raise UserError(f"the field {field!r} of {name!r} is not text: set data.text_field to a text column.")
        docs = [d for d in values if d is not None and d.strip()]
        if not docs:
            raise UserError(f"the dataset {name!r} holds no text in {field!r}: check data.name and "
                            "data.text_field.")
        return docs
