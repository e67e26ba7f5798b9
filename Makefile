# Quick start: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch requirement used only when the venv has no torch yet. Keep a CUDA build you
# installed yourself: it satisfies pyproject's torch>=2.3 and is never replaced.
TORCH_SPEC ?= torch==2.13.0
CORES ?= all

.PHONY: demo test install clean-results report

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "keeping the installed torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	else \
		$(BIN)/python -m pip install -q "$(TORCH_SPEC)"; \
	fi
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml
	@echo
	@$(BIN)/unetflow show results/summary.tsv

report: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --report report.html

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest

clean-results:
	rm -rf results logs benchmarks .snakemake data/demo
