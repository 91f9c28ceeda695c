# Two commands do all the set-up: `make demo` and `make test` (see README.md).
# The install is skipped when pyproject.toml has not changed (a stamp file keyed on its hash).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build by default; GPU users override, e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>".
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed-$(shell (cat pyproject.toml; echo '$(TORCH_SPEC)') | sha256sum | cut -c1-16)
# Run every tool from the venv without asking the user to activate it (dvc stages call `latentforge`).
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install chromium demo timeseries test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, so that no later requirement pulls the multi-GB CUDA build.
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]' $(word 1,$(TORCH_SPEC))
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	# A family whose newest version fails its promotion gates (params registry.policies) is not champion, so a
	# later stage (train_text) fails too; the other families still run (--keep-going), then `latentforge gates`
	# names the family and the figure.
	dvc repro --keep-going || { latentforge gates; exit 1; }
	latentforge gates
	latentforge models
	# Serve the champions, call every endpoint (images -> demo/), then keep serving the page until Ctrl-C.
	latentforge serve --params-store --demo demo

# The time-series anomaly pipeline (examples/timeseries): the LSTM autoencoder on aeon's bundled KDD-TSAD 135.
timeseries: install
	dvc repro examples/timeseries/dvc.yaml
	cd examples/timeseries && latentforge models

test: install chromium
	$(BIN)/python -m pytest

# The page test drives Debian's chromium (Playwright never downloads a browser here).
chromium:
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

bench: install
	@mkdir -p bench/results
	@set -e; for f in bench/*.py; do \
	  [ -e "$$f" ] || { echo "bench/: no benchmarks yet"; break; }; \
	  echo "== $$f"; $(BIN)/python "$$f"; \
	done

clean:
	rm -rf $(VENV) .pytest_cache
