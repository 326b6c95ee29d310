# Two entry points (see README): `make lab` and `make test`.
# Everything is installed into .venv from this repository's own files.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -c constraints/local.txt
STAMP  := $(VENV)/.installed

.PHONY: setup lab test test-fast notebooks clean-venv

$(STAMP): pyproject.toml constraints/local.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## Open JupyterLab on notebooks/ (the notebooks run on the `tiny` organism unless
## QWEN35_LAB_MODEL names another model).
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

## Run every test: unit, parity, kernels under the Triton interpreter, notebooks (nbval).
test: $(STAMP)
	$(PY) -m pytest tests notebooks --nbval-lax -p no:cacheprovider $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest tests -x -q -m "not slow" $(PYTEST_ARGS)

## Re-execute every notebook in place (commit them with their outputs).
notebooks: $(STAMP)
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace notebooks/*.ipynb

clean-venv:
	rm -rf $(VENV)
