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
# make demo RANDOM_WEIGHTS=1: random weights of the real architecture, no download of the released bundle
RANDOM_WEIGHTS ?=

.PHONY: setup demo test serve clinical-tools seg-readers viewer monailabel render deploy-check
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[server,test,evaluation]'
	$(PY) -m wholebody.triton_server install
	touch $@

demo: setup
	$(PY) -m demo $(if $(BUNDLE),--bundle $(BUNDLE)) $(if $(filter 1 yes true,$(RANDOM_WEIGHTS)),--random-weights)

# WHOLEBODY_REQUIRE_SEG_READERS: a DICOM-SEG reader that is missing fails its test instead of skipping it
test: setup clinical-tools seg-readers viewer monailabel
	WHOLEBODY_REQUIRE_SEG_READERS=1 WHOLEBODY_REQUIRE_VIEWER=1 $(PY) -m pytest

serve: setup
	$(PY) -m wholebody.triton_server serve

# Debian tools the clinical tests use: a real PACS (Orthanc with its DICOMweb plugin) and dcm2niix,
# the reference DICOM -> NIfTI converter; chromium, headless, which opens the OHIF viewer (docs/viewer.md); Node.js and npm for OHIF's DICOM-SEG readers (Debian's nodejs
# and npm only where no node/npm command is there: the team's machines have Node.js 20 and npm 11).
# Installed with apt-get only when missing (CI runs as root on a fresh Debian machine); a package's own
# service is stopped again: the tests start their own.
CLINICAL_DEBS := orthanc orthanc-dicomweb dcm2niix chromium dcmtk
CLINICAL_COMMANDS := node=nodejs npm=npm
clinical-tools:
	@missing=$$(for p in $(CLINICAL_DEBS); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done; \
	    for c in $(CLINICAL_COMMANDS); do command -v $${c%%=*} >/dev/null || echo $${c#*=}; done); \
	if [ -n "$$missing" ]; then \
	    sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    echo "installing Debian packages:" $$missing; \
	    $$sudo apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing && \
	    { $$sudo service orthanc stop >/dev/null 2>&1 || true; }; \
	fi

# The DICOM-SEG readers of tests/test_clinical_seg_readers.py that are not Python packages of the [test]
# extra: pydicom-seg in a virtualenv of its own (tests/readers/requirements-pydicom-seg.txt: it needs
# pydicom 2 and numpy 1) and dcmjs + @cornerstonejs/adapters (npm ci of tests/js/package-lock.json), both
# cached under .cache/seg-readers/ (remade when those files change). Needs PyPI and the npm registry.
seg-readers: setup clinical-tools
	$(PY) -m tests.seg_readers

# The OHIF viewer (npm pack of the @ohif/app pinned in viewer/ohif.json, its prebuilt dist/ rebased onto
# Orthanc's /viewer/), cached under .cache/ohif/; prints the Orthanc configuration fragment that serves it
# (ServeFolders plugin of Debian's orthanc). Needs the npm registry once. See docs/viewer.md.
viewer: setup clinical-tools
	$(PY) -m viewer --install

# 3D Slicer's MONAI Label module -> the Triton ensemble (docs/slicer.md): MONAI Label 0.8.5's server in a
# virtualenv of its own (slicer/requirements-monailabel.txt: it needs pydicom 2 and numpy 1), made once under
# .cache/monailabel/venv (remade when that file changes; ~5 min, 2.4 GiB, needs PyPI). Then:
#   python -m slicer.serve --studies DIR [-u TRITON_HOST:PORT]
monailabel: setup
	$(PY) -m slicer.venv

# deploy/: render a kustomize overlay (gpu, cpu, gpu-x4) with the pinned kubectl of the [test] extra
# (Debian 12 has no current kubectl), and the offline checks of the images and manifests.
OVERLAY ?= gpu
render:
	@$(MAKE) --no-print-directory setup >&2
	@$(VENV)/bin/kubectl kustomize deploy/kubernetes/$(OVERLAY)

deploy-check: setup
	$(PY) -m pytest tests/test_deploy.py
