# The two commands a fresh machine needs: `make demo` and `make test`.
# Each makes (or reuses) a virtual environment in .venv and installs the project into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ldm-installed
# Nothing is ever fetched from a model hub: models are local folders.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo demo-control test reliability bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ldm-demo

# The demo's base model (trained first if absent), then a ControlNet and a T2I-Adapter on its shapes outlines.
demo-control: $(STAMP)
	$(BIN)/ldm-demo --control

test: $(STAMP)
	sh scripts/ensure_chromium.sh
	$(BIN)/python -m pytest tests

# The reliability battery R1-R10 (issue 10): every case, long ones included; figures into docs/reliability.md.
reliability: $(STAMP)
	rm -rf runs/reliability
	LDM_RELIABILITY=1 LDM_RELIABILITY_OUT=$(CURDIR)/runs/reliability $(BIN)/python -m pytest tests/reliability -q
	$(BIN)/python bench/reliability_report.py --rows runs/reliability --doc docs/reliability.md

bench: $(STAMP)
	$(BIN)/python bench/cache_speed.py --threads 1 --json runs/bench-cache/cache_speed.json

clean:
	rm -rf runs/demo .pytest_cache
