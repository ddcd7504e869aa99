"""The items of the lmlab_tiny task (lmlab_tiny.jsonl next to this file) as a ``datasets.DatasetDict``
with one ``test`` split, read from the package without a download or the datasets cache. lm-eval calls
``load`` through the task YAML's ``custom_dataset``."""

import json
from pathlib import Path

import datasets


def load(**_metadata) -> datasets.DatasetDict:
    path = Path(__file__).with_name("lmlab_tiny.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
