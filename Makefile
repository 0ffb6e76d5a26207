# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test serve bench lint clean

$(STAMP): server/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the versions that lie on local disk (a CUDA build that also runs on the CPU)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e 'server[test,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m medsam_server.demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 server/tests MedSAMSlicer/Testing/Python

serve: $(STAMP)
	$(VENV)/bin/medsam serve

bench: $(STAMP)
	$(PY) bench/engine.py
	$(PY) bench/annotate.py
	$(PY) bench/server.py
	$(PY) bench/slicer_panel.py

lint: $(STAMP)
	$(VENV)/bin/ruff check server MedSAMSlicer bench

clean:
	rm -rf $(VENV) out
