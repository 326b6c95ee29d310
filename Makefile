# Two entry points (see README): `make lab` and `make test`.
# Everything is installed into .venv from this repository's own files.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -c constraints/local.txt
STAMP  := $(VENV)/.installed

.PHONY: setup browser lab test test-fast notebooks notebooks-run clean-venv

$(STAMP): pyproject.toml constraints/local.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## Open JupyterLab on notebooks/ (00, 04 and 05 run on the `chat` organism, the others on their own, unless
## QWEN35_LAB_MODEL names another model).
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

## Debian's chromium for the browser test: installed when missing and possible (as root, or with
## password-less sudo); otherwise the browser test is skipped and its reason gives the command.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; else SUDO=none; fi; \
	  if [ "$$SUDO" = none ] || ! command -v apt-get >/dev/null 2>&1; then \
	    echo "chromium is missing and cannot be installed here: the browser test will be skipped" \
	         "(install it with: sudo apt-get install -y chromium)"; \
	  else \
	    echo "installing Debian's chromium for the browser test"; \
	    $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium \
	      || echo "installing chromium failed: the browser test will be skipped"; \
	  fi; \
	fi

## Run every test: unit, parity, kernels under the Triton interpreter, notebooks (nbval), the browser;
## then execute every notebook with nbconvert (see notebooks-run).
test: $(STAMP) browser
	$(PY) -m pytest tests notebooks --nbval-lax -p no:cacheprovider $(PYTEST_ARGS)
	$(MAKE) notebooks-run

## Execute every notebook non-interactively with nbconvert, as papermill and CI runners do, into a
## temporary folder (the committed notebooks are left alone), with a per-cell timeout: a stalled cell
## fails the build instead of hanging it.
NB_TIMEOUT ?= 300
notebooks-run: $(STAMP)
	@out=$$(mktemp -d) && trap 'rm -rf "$$out"' EXIT && for nb in notebooks/*.ipynb; do \
	  echo "nbconvert --execute $$nb (per-cell timeout $(NB_TIMEOUT) s)"; \
	  $(VENV)/bin/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=$(NB_TIMEOUT) \
	    --output-dir "$$out" "$$nb" || exit 1; \
	done

test-fast: $(STAMP)
	$(PY) -m pytest tests -x -q -m "not slow" $(PYTEST_ARGS)

## Re-execute every notebook in place (commit them with their outputs).
notebooks: $(STAMP)
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace notebooks/*.ipynb

clean-venv:
	rm -rf $(VENV)
