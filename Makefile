# The user's verbs. Variables override: make shards URLS=cc3m.parquet DATA=/big/data BUDGET=1TB
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SICLIP := $(VENV)/bin/siclip
# The second environment, for the paper's own parts (extra siclip[mobileclip]: timm, open_clip, torchvision)
MC_VENV ?= .venv-mobileclip
MC_PY   := $(MC_VENV)/bin/python
DATA   ?= data/demo
INPUTS ?= data/demo-inputs
URLS   ?=
BUDGET ?= 1TB
ARGS   ?=
CONFIG ?= tiny
RUN    ?= $(CONFIG)
# The environment of the scale-out path (extras siclip[pyspark,ray]; Spark also needs a Java runtime)
SO_VENV ?= .venv-scaleout
SO_PY   := $(SO_VENV)/bin/python
comma   := ,
# albumentations (under img2dataset) asks the network for its own updates on every import; nothing else is set here:
# the user's verbs reach the Hugging Face hub unless HF_HUB_OFFLINE=1 is in the user's environment, and the tests
# (tests/conftest.py) and CI (.ci/run) run offline by themselves
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install install-mobileclip install-scaleout shards captions teacher train eval manifests bench \
	bench-real bench-peer bench-fit bench-gpu gpu-wheels ablations test test-mobileclip test-scaleout mutation demo clean-demo

# A virtual environment $(1) with the project and its extras $(2): torch first, pinned to the CPU build this project
# is tested with; a GPU user installs theirs before `make install`
define new_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip install -q torch==2.13.0
	$(1)/bin/python -m pip install -q -e ".[$(2)]"
	touch $@
endef

$(VENV)/.installed: pyproject.toml
	$(call new_venv,$(VENV),test)

install: $(VENV)/.installed

# torchvision must be built for the torch beside it: PyPI's does not import next to the CPU torch 2.13 above
# ('operator torchvision::nms does not exist'), so this environment takes torch 2.14.1 with torchvision 0.29.1
# (a CUDA build, ~5.6 GB, that runs on the CPU too). A GPU user installs a matching pair of theirs first.
$(MC_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(MC_VENV)
	$(MC_PY) -m pip install -q --upgrade pip
	$(MC_PY) -c "import torchvision" 2>/dev/null || $(MC_PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(MC_PY) -m pip install -q -e ".[mobileclip,test]"
	touch $@

install-mobileclip: $(MC_VENV)/.installed

# pyspark (a JVM's jars, ~490 MB) and ray (~240 MB) in an environment of their own: the main one stays light
$(SO_VENV)/.installed: pyproject.toml
	$(call new_venv,$(SO_VENV),pyspark$(comma)ray$(comma)test)

install-scaleout: $(SO_VENV)/.installed

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

# The quick benchmarks (bench/__main__.py), each against its baseline measured in the same run: one record each
bench: install
	$(PY) -m bench all $(ARGS)

# The whole pipeline on real images (Debian's emoji font, installed when missing): about 15-20 minutes on 2 cores;
# writes data/bench-real and data/bench-real-inputs; ends with one JSON line.
bench-real: install
	$(PY) -m bench real --json

# siclip against open_clip_train (bench/peer.py) on the same real shards: bench-real's emoji set and a variant of
# transparent PNGs listed by group; both tools at the same shape, batch, schedule and epochs, 3 seeds each; one
# eval path for both and each tool's own; about 35 minutes on 2 quiet cores; a table, then one JSON line of
# siclip/open_clip ratios with 95% bootstrap intervals over seeds. ARGS="--quick" (1 seed, 3 epochs),
# "--only siclip", "--sets transparent".
bench-peer: install-mobileclip
	$(MC_PY) -m bench peer --json $(ARGS)

# The ablation table on bench-real's data (prepared first if missing): 5 rows x 3 seeds, about 15 minutes with
# the data on 2 cores. Run names carry a digest of the code: after a change they train anew, replacing the old.
ablations: install
	$(PY) -m bench ablations

# How fast each model shape fits the same generated pairs, in one process with one optimizer, beside open_clip's
# CLIP of tiny_preln's shape (the mobileclip environment has open_clip): about 20 minutes on 2 cores.
bench-fit: install-mobileclip
	$(MC_PY) -m bench fit --json $(ARGS)

# The GPU figures (bench/gpu.py) on a machine with one CUDA GPU, in the mobileclip environment (open_clip_train's
# step is the baseline): siclip's step against open_clip_train's with MFU, the loader at 4/8/16 workers, each speed
# lever alone, captions in bf16; about 7 minutes on an H100. ARGS="--parts step,levers", "--peak-tflops 165".
bench-gpu: install-mobileclip
	$(MC_PY) -m bench gpu --device cuda --json $(ARGS)

# The wheels bench/gpu.sh installs on a machine whose python has torch, torchvision, timm, transformers and
# accelerate but not the rest (a lent GPU machine: Python 3.12, x86-64), into .whl/ (ignored by git; 8 MB)
GPU_WHEELS := dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2 tornado==6.6.1 zict==3.0.0 \
	ftfy==6.3.1 wcwidth==0.9.5 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing_extensions==4.16.0 open_clip_torch==3.3.0 webdataset==0.2.111 braceexpand==0.1.7
GPU_PYTHON ?= 3.12
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

test: install
	$(PY) -m pytest -q $(ARGS)

# The tests marked mobileclip (MCi0, open_clip teachers and inheritance, CoCa, paper.toml), which `make test`
# skips with the reason; here a broken extra is an error, not a skip.
test-mobileclip: install-mobileclip
	SICLIP_REQUIRE_MOBILECLIP=1 $(MC_PY) -m pytest -q -m mobileclip $(ARGS)

# The tests marked scaleout (stage 1 on Spark local[2] and a local Ray of 2 CPUs), which `make test` skips with the
# reason; here a missing extra is an error, not a skip.
test-scaleout: install-scaleout
	SICLIP_REQUIRE_SCALEOUT=1 $(SO_PY) -m pytest -q -m scaleout $(ARGS)

# Do the tests fail when the code breaks? mutmut over the modules with fast tests, and the hand-written breaks of
# tests/mutation/mutation.toml; prints what survived. Not in CI (an hour or more on 2 cores): ARGS="--only NAME".
mutation: install
	$(PY) -m pip install -q mutmut==3.8.1
	$(PY) tests/mutation/run.py $(ARGS)

# The whole method on a CPU, on generated scenes (demo/scenes.py): inputs (clean pairs, zero-shot folders)
# outside the data root; the web part served on 127.0.0.1 and downloaded into shards; a tiny captioner fitted
# on the clean pairs captions the shards; a pre-LN teacher trained, exported as a CLIPModel, its embeddings
# stored; the tiny SiCLIP student inherits from it and distils it; eval; the storage table. A rerun skips
# what is done.
DEMO_ZEROSHOT = $(foreach a,colour shape size,--imagefolder $(INPUTS)/zeroshot/$(a))
demo: install
	$(PY) -m demo --data $(DATA) --inputs $(INPUTS)
	$(PY) -m demo.fit --pairs $(INPUTS)/clean --out $(INPUTS)/captioner --steps 800
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

# docs/config.md from the config classes (siclip/docs.py); the test suite fails, saying so, when it is stale
.PHONY: docs
docs: install
	$(PY) -m siclip.docs
