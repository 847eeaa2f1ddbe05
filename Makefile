# bbvi: every command a user or CI needs. `make install` builds ./.venv (Python 3.11).
PYTHON_BOOT ?= python3.11
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
JOBS        ?= 2

.PHONY: install test test-fast demo experiments bench lint clean docs verify-posteriordb

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	# The CPU wheel of torch lies on the build machines' disk; any other spec pulls a CUDA build.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev,rl]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -n $(JOBS) --durations=15 tests

# The suite less the tests marked slow (6 s or more each on 2 cores): a quick loop while working; `make test` runs all.
test-fast: install
	$(PY) -m pytest -n $(JOBS) -m "not slow" tests

demo: install
	$(PY) -m bbvi demo --out results

experiments: install
	$(PY) experiments/run_all.py --out results

# NUTS on every bundled posteriordb model against its Stan reference draws (hours on 2 cores; draws cached in
# results/nuts_cache); writes each row into models/posteriordb/VERIFIED.csv as it is verified (the record the
# yardstick reads NUTS's cost from) and skips the posteriors it holds: stop it any time, run it again to go on.
verify-posteriordb: install
	$(PY) experiments/verify_posteriordb.py --out results --record --missing

bench: install
	$(PY) experiments/bench.py --out results

lint: install
	$(PY) -m ruff check bbvi models experiments tests

# The API reference (pdoc, from the docstrings), the tutorials and the docs/*.md pages as HTML in docs/api/: open docs/api/index.html.
# bbvi.constraints comes with bbvi (its __all__); the module bbvi.fit is left out: bbvi.fit is the function.
DOCS_STAMP   := $(VENV)/.docs-installed
DOCS_MODULES := bbvi bbvi.plots bbvi.diagnostics bbvi.comparison bbvi.reference bbvi.estimators bbvi.families bbvi.flows bbvi.result

docs: install $(DOCS_STAMP)
	rm -rf docs/api
	$(PY) -m pdoc --template-directory docs/templates --output-directory docs/api $(DOCS_MODULES) '!bbvi\.fit$$'
	$(PY) docs/render_tutorials.py docs/api

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -e '.[docs]'
	touch $(DOCS_STAMP)

clean:
	rm -rf $(VENV) results build dist *.egg-info .pytest_cache .cache docs/api
