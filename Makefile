# fastdense: set-up from a bare machine, then the README's commands.
#   make test   compile-check CUDA sources (if nvcc), build, run the test suite
#   make demo   build, then `python -m fastdense demo`
#   make bench  build, then the pytest-benchmark suites (JSON in bench/results/)
#   make clean  remove build outputs (keeps .venv; `make distclean` removes it too)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Pinned: on the CPU machines this resolves to the local CPU build; an
# unpinned torch would pull several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
NVCC   ?= $(shell command -v nvcc 2>/dev/null)
CUDA_ARCH ?= sm_90
MAX_JOBS ?= 2
export MAX_JOBS

SOURCES := $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.h csrc/cpu/*.h)

.PHONY: all install test demo bench cuda-check clean distclean

all: install

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: $(PY)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q setuptools wheel ninja pybind11
	touch $@

# Reinstalls (and rebuilds fastdense._C) when the build description or a C++/CUDA source changes.
$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml $(SOURCES)
	$(PIP) install -q --no-build-isolation -e ".[test]"
	touch $@

install: $(VENV)/.installed

cuda-check:
ifneq ($(NVCC),)
	@mkdir -p build/cuda-check
	@for f in $(wildcard csrc/cuda/*.cu); do \
		echo "nvcc -arch=$(CUDA_ARCH) -c $$f"; \
		$(NVCC) -arch=$(CUDA_ARCH) -std=c++17 -O3 -c $$f -o build/cuda-check/$$(basename $$f).o || exit 1; \
	done
else
	@echo "cuda-check: nvcc not found, skipping the CUDA compile check"
endif

test: cuda-check install
	$(PY) -m pytest tests -q

demo: install
	$(PY) -m fastdense demo

bench: install
	$(PY) -m pytest bench -q --benchmark-json=bench/results/$$($(PY) -m fastdense device-name).json

clean:
	rm -rf build dist *.egg-info fastdense/_C*.so .pytest_cache .benchmarks $(VENV)/.installed
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
