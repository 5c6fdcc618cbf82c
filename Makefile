# Two commands on a fresh machine: `make demo` (set-up + the main job on the bundled sample) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; a machine that already has torch (e.g. a CUDA build) keeps its own.
TORCH_SPEC ?= torch==2.13.0
SAMPLE_IMAGE ?= hyportrait/assets/sample_portrait.jpg
SAMPLE_VIDEO ?= hyportrait/assets/sample_driving.mp4

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/hyportrait animate --image $(SAMPLE_IMAGE) --video $(SAMPLE_VIDEO) --out outputs/demo

# the web page's test drives a real headless Chromium (Debian's package; installed when missing, as root).
# Two pytest-xdist workers of one thread each (a test file stays on one worker, with its module fixtures):
# on 2 cores they overlap the suite's single-threaded stretches (interpreter starts, video coding, servers).
# A worker that dies fails the run at once (xdist's file scheduling can stall after a restart).
test: setup
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -n 2 --dist loadfile --no-loadscope-reorder --max-worker-restart 0

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs .pytest_cache .ruff_cache build *.egg-info
