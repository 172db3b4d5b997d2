# fastdense: set-up from a bare machine, then the README's commands.
#   make test   compile-check CUDA sources (if nvcc), build, lint (ruff), run the test suite
#   make demo   build, then `python -m fastdense demo`
#   make bench  build, then the pytest-benchmark suites (JSON in bench/results/)
#   make cuda-build  on a CPU-only machine: build fastdense._C with its CUDA kernels against
#               the GPU machines' CUDA torch in .venv-cuda, and check it (docs/cuda-build.md)
#   make gpu-check  on a GPU machine: build, GPU tests, compute-sanitizer, benchmark subset in one
#               time-boxed run, summary in $(GPU_CHECK_OUT) (docs/gpu-check.md); without a GPU, the CPU-side steps
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

SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp csrc/cuda/*.h)

.PHONY: all install test demo bench cuda-check cuda-build clean distclean

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

# cuda-build: fastdense._C with the CUDA kernels, compiled and linked on a
# machine without a GPU against the CUDA build of torch the GPU machines run
# (nothing is executed on a GPU). Its own venv and build folders, so the CPU
# build that `make test` uses is never touched. Output, and how a GPU run uses
# it: docs/cuda-build.md.
CUDA_VENV       := .venv-cuda
CUDA_PY         := $(CUDA_VENV)/bin/python
# The GPU machines' Python: the newest pyenv $(CUDA_PYVER).x, else python$(CUDA_PYVER) on PATH.
CUDA_PYVER      ?= 3.12
CUDA_PYTHON     ?= $(firstword $(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/$(CUDA_PYVER).*/bin/python$(CUDA_PYVER) \
                     $(shell pyenv root 2>/dev/null)/versions/$(CUDA_PYVER).*/bin/python$(CUDA_PYVER)))) \
                     $(shell command -v python$(CUDA_PYVER)))
CUDA_TORCH_SPEC ?= torch==2.11.0
CUDA_TORCH_CUDA ?= 13.0
CUDA_ARCH_LIST  ?= 9.0
# nvcc may be a wrapper outside its toolkit (/usr/local/bin/nvcc -> /usr/local/cuda-13.0),
# so the toolkit is the folder nvcc itself reports running from.
CUDA_TOOLKIT    ?= $(shell $(NVCC) --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's|^\#\$$ _HERE_=\(.*\)/bin$$|\1|p')
CUDA_PYTAG       = $(shell $(CUDA_PY) -c 'import sys; print("cp%d%d" % sys.version_info[:2])' 2>/dev/null)
CUDA_BUILD_LIB   = build/cuda-$(CUDA_PYTAG)

$(CUDA_VENV)/.deps:
	@test -n "$(CUDA_PYTHON)" || { echo "cuda-build: no python$(CUDA_PYVER) found (pyenv, PATH); pass CUDA_PYTHON=/path/to/python"; exit 1; }
	$(CUDA_PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install -q "$(CUDA_TORCH_SPEC)" numpy setuptools wheel ninja pybind11
	$(CUDA_PY) -c 'import sys, torch; print("torch", torch.__version__, "CUDA", torch.version.cuda); \
		sys.exit(None if torch.version.cuda == "$(CUDA_TORCH_CUDA)" else "cuda-build: this torch is not a CUDA $(CUDA_TORCH_CUDA) build")'
# fastdense itself, editable and without compiling: the check imports it with the built .so.
	FASTDENSE_NO_EXT=1 $(CUDA_PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

cuda-build: $(CUDA_VENV)/.deps
	@test -n "$(NVCC)" || { echo "cuda-build: nvcc not found"; exit 1; }
	@test -f "$(CUDA_TOOLKIT)/include/cuda_runtime_api.h" || { echo "cuda-build: no CUDA toolkit found from $(NVCC)"; exit 1; }
	CUDA_HOME=$(CUDA_TOOLKIT) FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCH_LIST)" \
		nice -n 10 $(CUDA_PY) setup.py build_ext --force --build-temp build/cuda-temp --build-lib $(CUDA_BUILD_LIB)
# --force: setuptools' up-to-date test ignores headers; ninja still recompiles only what changed.
# Host debug info (Python's CFLAGS carry -g) is 80% of the .so; symbols and cubins stay.
	objcopy --strip-debug $(CUDA_BUILD_LIB)/fastdense/_C.*.so
	CUDA_HOME=$(CUDA_TOOLKIT) $(CUDA_PY) tools/check_cuda_build.py --build-temp build/cuda-temp \
		--arch-list "$(CUDA_ARCH_LIST)" --cuda $(CUDA_TORCH_CUDA) $(CUDA_BUILD_LIB)/fastdense/_C.*.so

# gpu-check: the one-command GPU campaign (tools/gpu_check.py, docs/gpu-check.md). It runs under the
# machine's own Python (the GPU machines' python3 holds their CUDA torch), never `make install`,
# whose pinned CPU torch would replace it; here, under .venv's Python when there is one.
GPU_CHECK_OUT ?= build/gpu-check
GPU_CHECK_PY  ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
.PHONY: gpu-check
gpu-check:
	GPU_CHECK_OUT="$(GPU_CHECK_OUT)" $(GPU_CHECK_PY) tools/gpu_check.py

test: cuda-check install
	$(PY) -m ruff check .
	$(PY) -m pytest tests -q

demo: install
	$(PY) -m fastdense demo

bench: install
	$(PY) -m pytest bench -q --benchmark-json=bench/results/$$($(PY) -m fastdense device-name).json

clean:
	rm -rf build dist *.egg-info fastdense/_C*.so .pytest_cache .benchmarks $(VENV)/.installed
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(CUDA_VENV)
