# The project's two commands: `make demo` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.convmae-env-ok

.PHONY: install test demo benchmark clean

install: $(STAMP)

# Re-run the (idempotent) set-up whenever what it installs may have changed, and whenever a torch build is chosen
# (TORCH_SPEC / TORCH_INDEX_URL, see tools/setup_env.sh).
CHOSEN_TORCH := $(if $(TORCH_SPEC)$(TORCH_INDEX_URL),FORCE)
$(STAMP): setup.cfg setup.py pyproject.toml tools/setup_env.sh tools/install_mmcv.sh tools/install_detectron2.sh Makefile $(CHOSEN_TORCH)
	bash tools/setup_env.sh $(PYTHON) $(VENV)
	@touch $@

.PHONY: FORCE
FORCE:

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) tools/demo.py

benchmark: install
	$(PY) tools/benchmark.py

clean:
	rm -rf $(VENV) work_dirs demo_output
