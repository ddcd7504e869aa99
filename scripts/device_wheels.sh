#!/usr/bin/env bash
# Fetch into .whl/ the wheels that lmlab needs on a GPU machine beyond what its image already holds
# (torch, lightning, transformers, pyarrow, pandas, fsspec, huggingface-hub are there; hydra, omegaconf and
# datasets are not). Python 3.12, x86-64, pure-Python wheels; no dependency resolution (the image has them).
# Then run scripts/gpu_check.sh there with `.whl` carried. The wheels total about 1.3 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  hydra-core==1.3.2 omegaconf==2.3.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# antlr4 4.9.3 (omegaconf's parser runtime) is published as a source archive only: build its pure-Python wheel
"$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
