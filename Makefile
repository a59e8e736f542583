# The user's verbs. Variables override: make shards URLS=cc3m.parquet DATA=/big/data BUDGET=1TB
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SICLIP := $(VENV)/bin/siclip
DATA   ?= data/demo
INPUTS ?= data/demo-inputs
URLS   ?=
BUDGET ?= 1TB
ARGS   ?=
CONFIG ?= tiny
RUN    ?= $(CONFIG)
export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled

.PHONY: install shards captions teacher train eval manifests bench bench-real ablations test demo clean-demo

# torch first, pinned to the CPU build this project is tested with; a GPU user installs theirs before `make install`
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

shards: install
	$(SICLIP) shards --config pipeline/shards.toml --urls "$(URLS)" --data $(DATA) --budget $(BUDGET) $(ARGS)

captions: install
	$(SICLIP) captions --data $(DATA) $(ARGS)

teacher: install
	$(SICLIP) teacher --data $(DATA) $(ARGS)

# a rerun continues the run where it stopped (or says it is finished)
train: install
	$(SICLIP) train --data $(DATA) --config $(CONFIG) --out $(RUN) --resume $(ARGS)

eval: install
	$(SICLIP) eval --data $(DATA) --run $(RUN) $(ARGS)

manifests: install
	$(SICLIP) manifest $(DATA) $(ARGS)

bench: install
	$(SICLIP) bench all $(ARGS)

# The whole pipeline on real images (Debian's emoji font, installed when missing): about 15-20 minutes on 2 cores;
# writes data/bench-real and data/bench-real-inputs; ends with one JSON line.
bench-real: install
	$(PY) bench/real.py

# The ablation table on bench-real's data (prepared first if missing): 5 rows x 3 seeds, about 30 minutes more.
ablations: install
	$(PY) bench/real.py --ablations

test: install
	$(PY) -m pytest -q $(ARGS)

# The whole method on a CPU, on generated scenes (pipeline/scenes.py): inputs (clean pairs, zero-shot folders)
# outside the data root; the web part served on 127.0.0.1 and downloaded into shards; a tiny captioner fitted
# on the clean pairs captions the shards; a pre-LN teacher trained, exported as a CLIPModel, its embeddings
# stored; the tiny SiCLIP student inherits from it and distils it; eval; the storage table. A rerun skips
# what is done.
DEMO_ZEROSHOT = $(foreach a,colour shape size,--imagefolder $(INPUTS)/zeroshot/$(a))
demo: install
	$(PY) -m pipeline.demo --data $(DATA) --inputs $(INPUTS)
	$(PY) -m captioning.fit --pairs $(INPUTS)/clean --out $(INPUTS)/captioner --steps 800
	$(SICLIP) captions --data $(DATA) --model $(INPUTS)/captioner --workers 1 --batch-size 64
	$(SICLIP) train --data $(DATA) --config demo_teacher --out demo-teacher --resume
	$(SICLIP) export --data $(DATA) --run demo-teacher
	$(SICLIP) teacher --data $(DATA) --teacher $(DATA)/runs/demo-teacher/clip --workers 1 --batch-size 64 \
	    --augmentations 2 --set crop_scale=[0.8,1.0] --set flip=false
	$(SICLIP) train --data $(DATA) --config demo --out demo --resume
	$(SICLIP) eval --data $(DATA) --run demo $(DEMO_ZEROSHOT) --retrieval
	$(SICLIP) manifest $(DATA)
	@echo "plots: $$(ls $(DATA)/runs/demo/plots/*.png $(DATA)/runs/demo-teacher/plots/*.png | tr '\n' ' ')"

clean-demo:
	rm -rf data/demo data/demo-inputs
