# wsigen — set-up, tests, benchmarks.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# CPU machines get the pinned CPU wheel; see README for the CUDA install.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-all bench lint clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c requirements.lock -e ".[dev]"
	@# Chromium for the headless browser test of `wsigen view` (skipped with a reason where absent);
	@# never fatal: no apt, no root or no network just leaves it out.
	-@command -v chromium >/dev/null || ! command -v apt-get >/dev/null || \
		{ (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null 2>&1 || \
		  echo "note: could not install chromium (apt-get failed); the browser test will be skipped"; }
	@# dciodvfy (Debian dicom3tools) validates the DICOM export in tests; optional: never fails install
	-@command -v dciodvfy > /dev/null || { command -v apt-get > /dev/null && \
		{ SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); $$SUDO apt-get update -q && \
		  $$SUDO apt-get install -y -q dicom3tools; } > /dev/null 2>&1; } || \
		echo "note: dciodvfy not installed (no apt-get or no permission); the DICOM validation test will be skipped"
	$(BIN)/wsigen --help > /dev/null && echo "wsigen installed in $(VENV)"

test:
	$(BIN)/python -m pytest -q -x -p no:cacheprovider

test-all:
	$(BIN)/python -m pytest -q -m "" -p no:cacheprovider

bench:
	$(BIN)/python benchmarks/run_all.py

lint:
	$(BIN)/ruff check wsigen tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
