# UMBRELLA — `make demo` and `make test` install into .venv on first use, then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= dev
# the test suite also runs the 2-process DeepSpeed ZeRO-2 test (pure-Python install, ops not built)
# and writes to each tracker (tensorboard, wandb offline, mlflow)
TEST_EXTRAS ?= dev,deepspeed,tensorboard,wandb,mlflow
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

BROWSER_DIR := tests/serve/browser
NIIVUE_VERSION ?= 0.69.0

.PHONY: install demo test test-all lint bench clean-demo browser-deps niivue

# Reinstalls only when pyproject.toml changes (the stamp file records the last install).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[$(EXTRAS)]'
	@touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/umbrella demo

test: browser-deps
	@$(MAKE) --no-print-directory install EXTRAS=$(TEST_EXTRAS)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -m "not slow"

test-all: browser-deps
	@$(MAKE) --no-print-directory install EXTRAS=$(TEST_EXTRAS)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests

clean-demo:
	rm -rf umbrella-demo

bench: install
	$(PY) -m benchmarks.run_all

# The browser test drives Debian's chromium with playwright-core (npm; no browser download).
# Installed where possible: chromium only as root with apt-get (CI); otherwise the test skips
# and says why.
browser-deps:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	   >/dev/null) || echo "chromium was not installed: the browser test will skip"; fi
	@if ! command -v npm >/dev/null; then echo "npm not found: the browser test will skip"; \
	elif [ ! -d $(BROWSER_DIR)/node_modules/playwright-core ]; then \
	  (cd $(BROWSER_DIR) && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund \
	   --silent) || echo "npm ci failed: the browser test will skip"; fi

# Refresh the NiiVue bundle shipped with the page (src/umbrella/serve/static/vendor/).
niivue:
	tmp=$$(mktemp -d) && cd $$tmp && npm pack --silent @niivue/niivue@$(NIIVUE_VERSION) && \
	tar xzf niivue-niivue-$(NIIVUE_VERSION).tgz && \
	cp package/dist/niivue.umd.js $(CURDIR)/src/umbrella/serve/static/vendor/niivue.umd.js && \
	rm -rf $$tmp
