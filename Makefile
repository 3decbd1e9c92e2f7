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

.PHONY: install demo test test-all lint bench clean-demo

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

test:
	@$(MAKE) --no-print-directory install EXTRAS=$(TEST_EXTRAS)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -m "not slow"

test-all:
	@$(MAKE) --no-print-directory install EXTRAS=$(TEST_EXTRAS)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests

clean-demo:
	rm -rf umbrella-demo

bench: install
	$(PY) -m benchmarks.run_all
