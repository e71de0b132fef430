# Both targets set up .venv from nothing, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a CUDA machine, see "Running on GPUs" in the README.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint clean image screenshots

# `make image`: the GPU image (renderers) and the CPU image (the head), deploy/Dockerfile. The pins come from
# pyproject.toml and TORCH_SPEC above, so the images cannot disagree with them (tests/test_k8s.py).
IMAGE ?= fluxbatch
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
RAY_VERSION := $(shell sed -n 's/.*"ray\[data,default\]==\([^"]*\)".*/\1/p' pyproject.toml)
TORCH_VERSION := $(patsubst torch==%,%,$(TORCH_SPEC))

# torch goes in with pip first (the CPU build from the machine's wheel folder, PIP_FIND_LINKS), then uv installs
# the rest: the same versions as pip resolves, in seconds where pip took about 60, and torch is already there, so
# uv never reaches for a CUDA build. --compile-bytecode as pip does: compiled at install, a library's invalid
# escape sequences never warn inside the suite, where warnings are errors.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m uv pip install --quiet --compile-bytecode --python $(PY) -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/fluxbatch demo demo-output

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

lint: setup
	$(VENV)/bin/ruff check .

# docs/terminal.png and docs/report.png from a fresh `fluxbatch demo` (needs Chromium: apt install chromium)
screenshots: setup
	$(PY) docs/screenshots.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache

image:
	@if ! docker info > /dev/null 2>&1; then \
		echo "make image: no Docker here (docker info failed), so no image was built; run it where Docker runs"; \
		exit 0; fi; \
	for variant in gpu cpu; do \
		docker build -f deploy/Dockerfile --build-arg VARIANT=$$variant --build-arg RAY_VERSION=$(RAY_VERSION) \
			--build-arg TORCH_VERSION=$(TORCH_VERSION) -t $(IMAGE):$(VERSION)-$$variant . || exit 1; \
	done
