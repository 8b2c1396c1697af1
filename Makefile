# Two entry points, each doing its own set-up in .venv on a fresh machine with Python 3.11:
#   make demo   writes demo/video.mp4 with the embedded demo model (no network, no GPU)
#   make test   runs the CPU test suite
# Both install the tested dependency set, constraints.txt; `make lock` refreshes it from the registry.
PYTHON ?= python3
VENV := .venv
# A pinned torch: on our CPU machines 2.13.0 is a local CPU build; elsewhere pip picks the matching wheel.
TORCH ?= torch==2.13.0
PROMPT ?= a red circle moves right on a blue background
PIP_FLAGS := -q -c constraints.txt
# Strict editable mode: the installed `wanrt` is a tree of links to our files, so the top-level folders can be
# namespace portions that never shadow an installed package. A new or removed file changes its folder's mtime,
# which re-links.
EDITABLE := --config-settings editable_mode=strict -e
PACKAGE_DIRS := _wanrt runtime kernels quant export bench testing runtime/demo_model

.PHONY: demo test lock clean

$(VENV)/.base: pyproject.toml constraints.txt $(PACKAGE_DIRS)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install $(PIP_FLAGS) "$(TORCH)"
	$(VENV)/bin/pip install $(PIP_FLAGS) $(EDITABLE) .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(VENV)/bin/pip install $(PIP_FLAGS) $(EDITABLE) ".[test]"
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/wanrt generate --prompt "$(PROMPT)" --base_seed 42 --out demo/video.mp4

test: $(VENV)/.test
	$(VENV)/bin/python -m pytest -q

# Resolve the newest allowed versions in a scratch venv, run the suite there, and only then write constraints.txt.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q "$(TORCH)"
	.venv-lock/bin/pip install -q $(EDITABLE) ".[test]"
	.venv-lock/bin/python -m pytest -q -x
	(echo "# The dependency set make test last passed with (Python 3.11, CPU). Refresh: make lock"; \
	 .venv-lock/bin/pip freeze --exclude-editable | sed 's/+cpu$$//') > constraints.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .venv-lock build demo
