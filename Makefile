# Two entry points, each doing its own set-up in .venv on a fresh machine with Python 3.11:
#   make demo   writes demo/video.mp4 with the embedded demo model (no network, no GPU)
#   make test   runs the CPU test suite
PYTHON ?= python3
VENV := .venv
# A pinned torch: on our CPU machines 2.13.0 is a local CPU build; elsewhere pip picks the matching wheel.
TORCH ?= torch==2.13.0
PROMPT ?= a red circle moves right on a blue background

.PHONY: demo test clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/wanrt generate --prompt "$(PROMPT)" --base_seed 42 --out demo/video.mp4

test: $(VENV)/.test
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) demo
