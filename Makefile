# Two commands do all the set-up: `make demo` and `make test` (see README.md).
# The install is exact: requirements.lock pins every distribution with its sha256 (`make lock` refreshes it),
# and it runs again only when the lock, pyproject.toml or TORCH_SPEC changes (a stamp file keyed on their hash).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LOCK   := requirements.lock
# Empty: torch comes from the lock, the CPU build (torch==2.13.0+cpu). GPU users name their build, which is
# installed first and the lock's torch line skipped, e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>".
TORCH_SPEC ?=
STAMP  := $(VENV)/.installed-$(shell (cat $(LOCK) pyproject.toml; echo '$(TORCH_SPEC)') | sha256sum | cut -c1-16)
# Run every tool from the venv without asking the user to activate it (dvc stages call `latentforge`).
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install lock chromium demo timeseries test bench clean

install: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(strip $(TORCH_SPEC)),)
	$(BIN)/python -m pip install -q --require-hashes -r $(LOCK)
else
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	grep -v '^torch==' $(LOCK) > $(VENV)/lock-without-torch.txt
	$(BIN)/python -m pip install -q --require-hashes -r $(VENV)/lock-without-torch.txt
endif
	# The project itself, from the working tree: its dependencies are all in the lock.
	$(BIN)/python -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

# Re-resolve pyproject.toml (dev extra, CPU torch) into requirements.lock with pip, which reads this machine's
# wheel folder and constraints as the install does; for Python 3.11 on linux x86_64 (tools/lock.py checks).
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python tools/lock.py torch==2.13.0

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
