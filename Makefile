# Two commands on a fresh machine (Python 3.10+, pip, internet access to PyPI):
#   make demo   set up, then segment a real CT through a local Triton server on the CPU
#   make test   set up, then run the test suite against a real local Triton server
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13 comes from local disk on the team's machines; elsewhere pip fetches
# it from PyPI (add --index-url https://download.pytorch.org/whl/cpu to TORCH_SPEC for a CPU-only box).
TORCH_SPEC ?= torch==2.13.0
BUNDLE ?=

.PHONY: setup demo test serve render deploy-check
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m wholebody.triton_server install
	touch $@

demo: setup
	$(PY) -m wholebody.demo $(if $(BUNDLE),--bundle $(BUNDLE))

test: setup
	$(PY) -m pytest

serve: setup
	$(PY) -m wholebody.triton_server serve

# deploy/: render a kustomize overlay (gpu, cpu, gpu-x4) with the pinned kubectl of the [test] extra
# (Debian 12 has no current kubectl), and the offline checks of the images and manifests.
OVERLAY ?= gpu
render:
	@$(MAKE) --no-print-directory setup >&2
	@$(VENV)/bin/kubectl kustomize deploy/kubernetes/$(OVERLAY)

deploy-check: setup
	$(PY) -m pytest tests/test_deploy.py
