# lmlab: `make demo` runs the default job, `make test` runs the test suite; both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Without a GPU, install the CPU build of PyTorch (seconds, not GB) from PyTorch's CPU index; TORCH_INDEX= keeps
# pip to the indexes it is configured with (a mirror, or PIP_FIND_LINKS naming a folder of wheels).
TORCH_CPU ?= torch==2.13.0
TORCH_INDEX ?= --extra-index-url https://download.pytorch.org/whl/cpu

.PHONY: install demo test bench gpu-check lint clean reproduce-paper docs docs-check mutate

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install "torch>=2.3,<3"; \
	else $(PIP) install $(TORCH_CPU) $(TORCH_INDEX); fi
	$(PIP) install -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/lmlab train

# the floors of docs/architecture.md (import-linter), then the test suite
test: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest

# the README's default-job table and docs/downstream.md's walk-through, rendered from fresh runs (docs-check: compare)
docs: install
	$(PY) scripts/render_docs.py
	$(PY) scripts/walkthrough.py

docs-check: install
	$(PY) scripts/render_docs.py --check
	$(PY) scripts/walkthrough.py --check

# On any machine with a CUDA GPU: the GPU benchmark and the CLI on the GPU (scripts/gpu_check.sh; PARTS="bench cli
# paper" picks the parts), logged to gpu_check_out/gpu_check.log
gpu-check: install
	PYTHON=$(PY) bash scripts/gpu_check.sh $(PARTS)

# CPU speed benchmarks (docs/benchmarks.md)
bench: install
	$(PY) scripts/bench_speed.py
	$(PY) scripts/bench_models.py
	$(PY) scripts/bench_data.py

# Rerun "Same Pre-training Loss, Better Downstream" (Liu et al., ICML 2023) and write a claim-by-claim report.
# PROFILE=cpu (default: small HMM and PCFG, seeds 0-9; SEEDS=10-19 OUT=<dir> for an independent rerun),
# PROFILE=long (the same-loss regime on a CPU: parents at <= 0.02 nats, seeds 0-4) or
# PROFILE=gpu GRAMMAR=path/to/rule_deep_mlm.txt, the paper's grammar: pcfg/rule_deep_mlm.txt in the code released
# with the paper (GitHub Liuhong99/implicitbiasmlmcode). ONLY=continue runs one claim (and the runs it needs),
# DATA=pcfg one data set, DRY_RUN=1 prints the jobs and the expected wall time.
reproduce-paper: install
	$(PY) scripts/reproduce_paper.py --profile $(or $(PROFILE),cpu) $(if $(GRAMMAR),--grammar $(GRAMMAR)) \
		$(if $(SEEDS),--seeds $(SEEDS)) $(if $(OUT),--out $(OUT)) $(if $(ONLY),--only $(ONLY)) \
		$(if $(DATA),--data $(DATA)) $(if $(DRY_RUN),--dry-run)

# ruff, and the floors of docs/architecture.md (import-linter's contracts in pyproject.toml): an import only goes down
lint: install
	$(VENV)/bin/ruff check lmlab tests scripts hydra_plugins
	$(VENV)/bin/lint-imports

# Mutation testing (mutmut) of the modules whose numbers are published, each with only its own tests; prints the
# kill rate per module (docs/testing.md). MODULES="stats dedup" runs some of them (scripts/mutate.py --list).
mutate: install
	nice $(PY) scripts/mutate.py --max-children 2 $(MODULES)

clean:
	rm -rf runs outputs multirun build/mutate
