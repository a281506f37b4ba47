# Set-up is part of every target: a fresh machine needs only python3 (>= 3.10) and make.
VENV := .venv
PY := $(VENV)/bin/python

# what the demo needs (no Triton: it is not used on a CPU machine), then the test tools
$(VENV)/.base: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[demo]"
	touch $@

$(VENV)/.installed: $(VENV)/.base
	$(PY) -m pip install -q -e ".[test,demo]"
	touch $@

$(VENV)/.asv: $(VENV)/.installed
	$(PY) -m pip install -q asv
	$(VENV)/bin/asv machine --yes >/dev/null
	touch $@

$(VENV)/.peers: $(VENV)/.asv
	$(PY) -m pip install -q geomloss regot scikit-learn
	touch $@

$(VENV)/.lint: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[lint]"
	touch $@

$(VENV)/.docs: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[docs]"
	touch $@

.PHONY: demo test test-all lint docs bench bench-full bench-check
demo: $(VENV)/.base
	$(PY) examples/demo.py

lint: $(VENV)/.lint
	$(VENV)/bin/ruff check otcore kernels tests benchmarks examples
	$(VENV)/bin/mypy  # otcore/, configured in pyproject.toml

# HTML from the docstrings into docs/_build/html, warnings as errors; -E: every page is read again,
# so a warning is never hidden by the previous build. The gallery runs every example (docs/gallery.rst:
# one command each, --quick where the full run takes minutes; about 2 min in all on a CPU): one that
# fails, outlives its timeout or saves no figure fails the build. Figures are staged under docs/_build.
docs: $(VENV)/.docs
	$(PY) -m sphinx -E -W --keep-going -q -b html -d docs/_build/doctrees docs docs/_build/html

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-all: $(VENV)/.installed
	$(PY) -m pytest -q -m "slow or not slow"

# asv against the installed project (otcore and its peers side by side), then the ratio table.
# bench: the quick profile (smallest problems of every comparison, under 10 min on 2 cores), which
# writes benchmarks/RESULTS_cpu.md; bench-full: OTCORE_BENCH=full, every size (benchmarks/problems.py),
# table printed only. BENCH='-b SinkhornCloud' narrows either run (asv's -b regex) and keeps the
# tracked table. forkserver: the suite is imported once, not once per parameter combination (the
# NVML check keeps torch.cuda.is_available() from initialising CUDA in the server before it forks).
ASV_RUN = PYTORCH_NVML_BASED_CUDA_CHECK=1 $(VENV)/bin/asv run --python=same --quick --launch-method forkserver \
	--show-stderr --set-commit-hash $$(git rev-parse HEAD) $(BENCH)
bench: $(VENV)/.peers
	OTCORE_BENCH=quick $(ASV_RUN)
	OTCORE_BENCH=quick $(PY) -m benchmarks.report --device cpu $(if $(BENCH),,--out benchmarks/RESULTS_cpu.md)

bench-full: $(VENV)/.peers
	OTCORE_BENCH=full $(ASV_RUN)
	OTCORE_BENCH=full $(PY) -m benchmarks.report --device cpu

# Cheap validation of the suite for CI: discovery and one small class without saving results.
bench-check: $(VENV)/.asv
	$(VENV)/bin/asv check --python=same
	$(VENV)/bin/asv run --python=same --quick --dry-run -b "Emd"
