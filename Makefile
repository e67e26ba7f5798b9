# Quick start: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch requirement used only when the venv has no torch yet. Keep a CUDA build you
# installed yourself: it satisfies pyproject's torch>=2.3 and is never replaced.
TORCH_SPEC ?= torch==2.13.0
# The exact versions of everything else (the lock); `make lock` refreshes it.
LOCK := envs/constraints.txt
CORES ?= all

.PHONY: demo demo-plate demo-pretrain test install install-bench lock clean-results report

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "keeping the installed torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	else \
		$(BIN)/python -m pip install -q -c $(LOCK) "$(TORCH_SPEC)"; \
	fi
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[test,bioimageio]'
	touch $@

# What the benchmarks compare against (MONAI, for bench/predict.py), at the lock's versions.
install-bench: install
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[test,bioimageio,bench]'

demo: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml
	@echo
	@$(BIN)/unetflow show results/summary.tsv

# The plate demo: a synthetic 4 x 6-well plate (2 fields per well, labels in each field, a
# clean twin plate), written before snakemake starts (plates are read when it plans).
DEMO_PLATE := data/demo_plate/plate.ome.zarr
demo-plate: install
	test -e $(DEMO_PLATE) || $(BIN)/unetflow demo-plate --output $(DEMO_PLATE) \
		--rows 4 --columns 6 --fields 2 --shape '[256, 256]' --seed 7
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) --configfile config/plate.yaml
	@echo
	@$(BIN)/unetflow show results/summary.tsv
	@echo; echo "per well (segmentation, results/plate_seg/metrics/plate_test_seg_wells.tsv):"
	@$(BIN)/unetflow show results/plate_seg/metrics/plate_test_seg_wells.tsv \
		--columns well,positions,unet.foreground_iou,otsu.foreground_iou,unet.f1,otsu.f1
	@echo; echo "per well (denoising, results/plate_denoise/metrics/plate_test_denoise_wells.tsv):"
	@$(BIN)/unetflow show results/plate_denoise/metrics/plate_test_denoise_wells.tsv \
		--columns well,positions,unet.psnr,gaussian.psnr,input.psnr,unet.ssim

# Learning from little data (README): a Noise2Void denoiser of the demo's noisy image, and a
# segmentation model fine-tuned from its encoder on 32 patches beside one from scratch.
demo-pretrain: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) --configfile config/pretrain.yaml
	@echo
	@$(BIN)/unetflow show results/summary.tsv

report: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --report report.html

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest

# Refresh the lock: the newest versions pyproject.toml allows, installed into a fresh venv
# without constraints; its header comment is kept. Then run `make test` and bring
# envs/unetflow.yaml in step (tests/test_envs.py names what differs).
lock:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q "$(TORCH_SPEC)"; \
	"$$tmp/venv/bin/python" -m pip install -q -e '.[test,bench,bioimageio]'; \
	grep '^#' $(LOCK) | grep -v '^# Made on Python' > "$$tmp/lock"; \
	"$$tmp/venv/bin/python" -c 'import sys; print("# Made on Python", sys.version.split()[0])' \
		>> "$$tmp/lock"; \
	"$$tmp/venv/bin/python" -m pip freeze --exclude-editable \
		| grep -Eiv '^(#|-e )|^(unetflow|torch|triton)==|^nvidia-' >> "$$tmp/lock"; \
	mv "$$tmp/lock" $(LOCK)

clean-results:
	rm -rf results logs benchmarks .snakemake data/demo data/demo_plate
