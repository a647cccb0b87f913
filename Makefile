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

.PHONY: setup demo test serve clinical-tools render deploy-check
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[server,test]'
	$(PY) -m wholebody.triton_server install
	touch $@

demo: setup
	$(PY) -m wholebody.demo $(if $(BUNDLE),--bundle $(BUNDLE))

test: setup clinical-tools
	$(PY) -m pytest

serve: setup
	$(PY) -m wholebody.triton_server serve

# Debian tools the clinical tests use: a real PACS (Orthanc with its DICOMweb plugin) and dcm2niix,
# the reference DICOM -> NIfTI converter. Installed with apt-get only when missing (CI runs as root
# on a fresh Debian machine); a package's own service is stopped again: the tests start their own.
CLINICAL_DEBS := orthanc orthanc-dicomweb dcm2niix
clinical-tools:
	@missing=$$(for p in $(CLINICAL_DEBS); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    echo "installing Debian packages:" $$missing; \
	    $$sudo apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing && \
	    { $$sudo service orthanc stop >/dev/null 2>&1 || true; }; \
	fi

# deploy/: render a kustomize overlay (gpu, cpu, gpu-x4) with the pinned kubectl of the [test] extra
# (Debian 12 has no current kubectl), and the offline checks of the images and manifests.
OVERLAY ?= gpu
render:
	@$(MAKE) --no-print-directory setup >&2
	@$(VENV)/bin/kubectl kustomize deploy/kubernetes/$(OVERLAY)

deploy-check: setup
	$(PY) -m pytest tests/test_deploy.py
