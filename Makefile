# Two commands for a fresh machine (only python3.11+ and make needed): `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
FLASK := $(BIN)/flask --app app
HOST ?= 127.0.0.1
PORT ?= 5000
DEMO_STRIPE_PORT ?= 12111
# The embedded default: SQLite in ./instance, development secrets, the demo agency and fake Stripe
# (`rebill demo` serves the fake at STRIPE_API_BASE, seeds the demo agency and keeps usage flowing).
DEV := REBILL_ENV=development REBILL_DEMO=1 REBILL_TICK_SECONDS=10 STRIPE_API_BASE=http://127.0.0.1:$(DEMO_STRIPE_PORT) REBILL_PUBLIC_URL=http://$(HOST):$(PORT)

.PHONY: venv run test lint bench clean lock audit

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(DEV) $(FLASK) db upgrade
	@echo "Rebill is starting on http://$(HOST):$(PORT)  (portal demo: http://$(HOST):$(PORT)/app?demo=1)"
	$(DEV) bash -c 'trap "kill 0" EXIT; $(FLASK) rebill demo & $(FLASK) rebill scheduler & $(FLASK) run --host $(HOST) --port $(PORT)'

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 -q

# Benchmarks, not timed tests (bench/README.md): PostgreSQL at 127.0.0.1:5432 and Debian's wrk needed.
bench: $(STAMP)
	$(BIN)/python bench/billing_bench.py
	$(BIN)/python bench/webhook_bench.py

# The deployment lock: every runtime dependency pinned with its hashes, resolved from PyPI alone (this
# machine's pip configuration ignored). Re-run after changing dependencies in pyproject.toml.
lock: $(STAMP)
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(BIN)/pip-compile --quiet --generate-hashes --strip-extras \
		--allow-unsafe --no-emit-index-url --no-emit-find-links --index-url https://pypi.org/simple \
		--output-file requirements.txt pyproject.toml

# Known vulnerabilities in the pinned requirements.txt (pip-audit; .ci/audit.py says what it could not audit).
audit: $(STAMP)
	$(BIN)/python .ci/audit.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) instance .pytest_cache .ruff_cache .hypothesis
