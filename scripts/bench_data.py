"""Data preparation at size: lmlab's streaming preparation into shards against the ``tokenizers`` library alone.

A corpus of the requested sizes is generated (``.txt``, one document per line: 20 to 400 words drawn from a
Zipf law over a fixed synthetic vocabulary of 30k words), then each measurement runs in a fresh child process:

* ``lmlab``: ``lmlab.data.stream.prepare_shards`` on ``TextSource(paths=FILE, tokenizer=BPE(vocab_size=V),
  block_size=512, documents="line")``: read, split by hash, BPE trained on at most ``--sample-mb`` of training
  text, encode, pack, write shards and index.
* ``tokenizers``: the library's own ``Tokenizer.train([FILE])`` (the same byte-level BPE and special tokens)
  on the whole file, then ``encode_batch`` over chunks of ``--chunk`` lines, counting tokens (nothing kept).

Each row gives wall time (the work, imports excluded), tokens/s (tokens encoded / wall), the peak RSS of the
child (``resource.getrusage``: imports included) and the RSS after imports; the ratios compare lmlab with
``tokenizers`` at each size, and lmlab's whole preparation with the library's ``encode_batch`` rate alone (its
tokens / its wall time less its training time). ``--threads`` sets ``RAYON_NUM_THREADS`` (the library's
encoding and training threads) in both arms.

    python scripts/bench_data.py                         # 20 MB and 80 MB, one thread
    python scripts/bench_data.py --sizes 500 --threads 8 # larger
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(path: Path, size_mb: float, seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = np.array(["".join(rng.choice(letters, size=n)) for n in rng.integers(2, 11, size=30000)])
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    p /= p.sum()
    target, size = int(size_mb * 1e6), 0
    with open(path, "w") as f:
        while size < target:
            n = rng.integers(20, 401, size=100)
            words = vocab[rng.choice(len(vocab), size=int(n.sum()), p=p)]
            text = "\n".join(" ".join(d) for d in np.split(words, np.cumsum(n)[:-1])) + "\n"
            f.write(text)
            size += len(text)


def child_lmlab(path: str, vocab: int, sample_mb: float) -> dict:
    from lmlab.data.stream import prepare_shards
    from lmlab.data.text import TextSource
    from lmlab.data.tokenizers import BPE

    base = rss_mb()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as out:
        start = time.perf_counter()
        source = TextSource(paths=path, tokenizer=BPE(vocab_size=vocab), block_size=512, documents="line")
        prepare_shards(source, out, tokenizer_sample_bytes=int(sample_mb * 1e6))
        wall = time.perf_counter() - start
        tokens = json.loads((Path(out) / "index.json").read_text())["prepared"]["tokens"]
    return {"wall_s": wall, "tokens": tokens, "peak_mb": rss_mb(), "import_mb": base}


def child_tokenizers(path: str, vocab: int, chunk: int) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    base = rss_mb()
    start = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["[PAD]", "[BOS]", "[EOS]", "[MASK]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([path], trainer)
    trained = time.perf_counter() - start
    tokens = 0
    with open(path, encoding="utf-8") as f:
        while True:
            lines = [line.rstrip("\n") for _, line in zip(range(chunk), f)]
            if not lines:
                break
            tokens += sum(len(e.ids) for e in tok.encode_batch(lines, add_special_tokens=False))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "train_s": trained, "tokens": tokens, "peak_mb": rss_mb(), "import_mb": base}


def measure(arm: str, path: Path, args) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--child", arm, str(path), "--vocab", str(args.vocab),
           "--sample-mb", str(args.sample_mb), "--chunk", str(args.chunk)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{arm} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[20, 80], help="corpus sizes in MB")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--sample-mb", type=float, default=100.0, help="lmlab's tokenizer_sample_bytes, in MB")
    parser.add_argument("--chunk", type=int, default=10000, help="lines per encode_batch call (tokenizers arm)")
    parser.add_argument("--threads", type=int, default=1, help="RAYON_NUM_THREADS of both arms")
    parser.add_argument("--dir", default=None, help="where to write the corpora (default: a temporary directory)")
    parser.add_argument("--child", nargs=2, metavar=("ARM", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        arm, path = args.child
        result = (child_lmlab(path, args.vocab, args.sample_mb) if arm == "lmlab"
                  else child_tokenizers(path, args.vocab, args.chunk))
        print(json.dumps(result))
        return
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-data-", dir=args.dir) as scratch:
        print(f"vocab {args.vocab}, RAYON_NUM_THREADS={args.threads}, lmlab sample {args.sample_mb} MB")
        print(f"{'size MB':>8} {'arm':>10} {'wall s':>8} {'Mtok':>7} {'Mtok/s':>7} {'MB/s':>6} {'peak MB':>8} "
              f"{'import MB':>9}")
        for size in args.sizes:
            path = Path(scratch) / f"corpus-{size:g}.txt"
            generate(path, size)
            mb = path.stat().st_size / 1e6
            rows = {arm: measure(arm, path, args) for arm in ("lmlab", "tokenizers")}
            for arm, r in rows.items():
                print(f"{mb:8.1f} {arm:>10} {r['wall_s']:8.2f} {r['tokens'] / 1e6:7.2f} "
                      f"{r['tokens'] / r['wall_s'] / 1e6:7.3f} {mb / r['wall_s']:6.2f} {r['peak_mb']:8.0f} "
                      f"{r['import_mb']:9.0f}")
            a, b = rows["lmlab"], rows["tokenizers"]
            print(f"{mb:8.1f} {'ratio':>10} wall {a['wall_s'] / b['wall_s']:.2f}x, tokens/s "
                  f"{(a['tokens'] / a['wall_s']) / (b['tokens'] / b['wall_s']):.2f}x, peak RSS "
                  f"{a['peak_mb'] / b['peak_mb']:.2f}x, peak above imports "
                  f"{(a['peak_mb'] - a['import_mb']) / max(b['peak_mb'] - b['import_mb'], 1):.2f}x "
                  f"(lmlab/tokenizers; tokenizers trained in {b['train_s']:.1f} s)")
            encode_rate = b["tokens"] / (b["wall_s"] - b["train_s"])
            print(f"{mb:8.1f} {'ratio':>10} lmlab's tokens/s (everything) / the library's encode_batch rate alone "
                  f"({encode_rate / 1e6:.3f} Mtok/s): {(a['tokens'] / a['wall_s']) / encode_rate:.2f}x")
            path.unlink()


if __name__ == "__main__":
    main()
