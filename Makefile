# FedCart: `make demo` runs the main job on the bundled data, `make test` the whole suite.
# Both set up .venv first (python3 -m venv, then pip install of the project with every extra).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO_DIR ?= out/demo
DEMO_ARGS ?= --epsilon 8 --rounds 10
SWEEP_DIR ?= out/sweep
SWEEP_ARGS ?= --epsilons 2,8 --dp-rounds 10

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv demo sweep test lint bench clean chromium api-docs

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# The main job: a private federated deployment on the bundled UCI data (one device per
# customer, the real aggregator, SecAgg+ and DP at epsilon 8): the two statistics rounds that
# give the model its item-item table, then 10 training rounds; against the central baselines
# and the centrally trained model (the no-privacy reference). Report: $(DEMO_DIR)/index.html.
# Then a device recommends from the federated model, offline, after checking its signature.
demo: venv
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/fedcart-sim run --data uci $(DEMO_ARGS) --report $(DEMO_DIR)
	$(VENV)/bin/fedcart-device recommend --bundle $(DEMO_DIR)/model/bundle \
		--public-key $(DEMO_DIR)/model/signing.pub --cart 85123A,71053 --k 5
	@echo "report: $(DEMO_DIR)/index.html (and report.md, metrics.json, PNG plots)"

# The privacy-utility table: the same deployment without DP and at epsilon 2 and 8, one
# report (about 25 minutes on 2 cores: three runs of two whole-population rounds each).
sweep: venv
	rm -rf $(SWEEP_DIR)
	$(VENV)/bin/fedcart-sim sweep --data uci $(SWEEP_ARGS) --report $(SWEEP_DIR)
	@echo "report: $(SWEEP_DIR)/index.html"

# The report test opens the report in Debian's chromium (headless).
chromium:
	@command -v chromium >/dev/null || { \
		echo "installing Debian's chromium for the report rendering test"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# pytest exits 5 when it collects no test: that is a failure here, never a pass.
test: venv chromium
	$(PY) -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

lint: venv
	$(VENV)/bin/ruff check fedcart bench tests
	$(VENV)/bin/mypy fedcart

# The device library's API reference, HTML from fedcart.edge_client's docstrings (pdoc), in
# $(API_DOCS); tests/test_device_app.py regenerates it and fails if the committed one differs.
# PYTHONHASHSEED=0: a default that is a set (DevicePolicy.norms) prints in a fixed order.
API_DOCS ?= docs/api
api-docs: venv
	rm -rf $(API_DOCS)
	PYTHONHASHSEED=0 $(PY) -m pdoc --no-show-source --no-search -o $(API_DOCS) \
		fedcart.edge_client '!fedcart\.edge_client\..*'

bench: venv
	$(PY) -m bench --json bench/results/latest.json

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
