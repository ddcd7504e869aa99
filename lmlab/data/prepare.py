"""``python -m lmlab.data.prepare OUT_DIR [data overrides...]``: write the data of a train config as memory-mapped
shards (the format of ``lmlab.data.shards``), for ``data=shards data.path=OUT_DIR``. ``data=text`` (without a
labels CSV) streams into the shards (``lmlab.data.stream``: bounded memory, resumable: rerun the same command after
an interruption); every other source is built in memory and written by ``lmlab.data.shards.write_shards``.

    python -m lmlab.data.prepare /data/corpus-shards data=text data.paths='corpus/*.jsonl'
    python -m lmlab.data.prepare /data/grammar-shards data=pcfg data.train_size=1000000
"""

from __future__ import annotations

import json
import sys

from lmlab.data.shards import INDEX, write_shards


def main(argv: list[str] | None = None) -> None:
    """``python -m lmlab.data.prepare OUT_DIR [data overrides...]``: write the data of a train config as shards."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return
    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(argv[1:]))
    source = instantiate(cfg.data)
    from lmlab.data.text import TextSource

    if isinstance(source, TextSource) and source.labels_csv is None:
        from lmlab.data.stream import prepare_shards

        out = prepare_shards(source, argv[0], progress=True)
    else:
        out = write_shards(source, argv[0], cache_dir=OmegaConf.select(cfg, "cache_dir"))
    index = json.loads((out / INDEX).read_text())
    counts = ", ".join(f"{k}: {v['rows']} rows" for k, v in index["splits"].items())
    print(f"[lmlab] wrote {counts} to {out}")


if __name__ == "__main__":
    main()
