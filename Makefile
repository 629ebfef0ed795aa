# FedCart: `make demo` runs the main job on the bundled data, `make test` the whole suite.
# Both set up .venv first (python3 -m venv, then pip install of the project with every extra).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO_DIR ?= out/demo

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# The main job. Until the federated run lands, this is the central run: the baselines and
# the central FedCart model on UCI Online Retail, a signed bundle, and a JSON report.
demo: venv
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/fedcart-sim central --data uci --out $(DEMO_DIR)/bundle \
		--json $(DEMO_DIR)/central.json
	@echo "report: $(DEMO_DIR)/central.json  bundle: $(DEMO_DIR)/bundle"
	$(VENV)/bin/fedcart-device recommend --bundle $(DEMO_DIR)/bundle \
		--public-key $(DEMO_DIR)/signing.pub --cart 85123A,71053 --k 5

# pytest exits 5 when it collects no test: that is a failure here, never a pass.
test: venv
	$(PY) -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

lint: venv
	$(VENV)/bin/ruff check model_export secagg edge_client aggregator simulation bench tests
	$(VENV)/bin/mypy model_export secagg edge_client aggregator simulation

bench: venv
	$(PY) -m bench --json bench/results/latest.json

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
