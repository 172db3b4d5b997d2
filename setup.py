"""Build of fastdense and its extension fastdense._C.

* C++ CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp) are always compiled.
* CUDA kernels (csrc/cuda/*.cu, csrc/cuda/*_bind.cpp) join when the installed
  torch has CUDA and CUDA_HOME is found, or when FORCE_CUDA=1.
* FASTDENSE_NO_EXT=1 gives a pure-Python install (torch/triton backends only).
* TORCH_CUDA_ARCH_LIST and MAX_JOBS are read by torch.utils.cpp_extension.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    if os.environ.get("FASTDENSE_NO_EXT", "") == "1":
        print("fastdense: FASTDENSE_NO_EXT=1, building without fastdense._C")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++17"]
    link = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # at::parallel_for is an inline template whose OpenMP pragmas only take
        # effect in code compiled with -fopenmp; without it the CPU kernels run
        # on one thread. libgomp.so.1 is the runtime torch itself loads.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    with_cuda = os.environ.get("FORCE_CUDA", "") == "1" or (
        torch.version.cuda is not None and CUDA_HOME is not None
    )
    if with_cuda:
        sources += _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*_bind.cpp")
        # No --use_fast_math: no kernel calls expf/erff/logf, and what it would
        # change (flush-to-zero on every fp32 op, approximate division in the
        # DTF's mean and dh) gains nothing in these memory-bound kernels but
        # makes them differ from the reference on GPUs we test only rarely.
        ext = CUDAExtension(
            "fastdense._C",
            sources,
            define_macros=[("FASTDENSE_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension("fastdense._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    print(f"fastdense: building fastdense._C ({'C++ CPU + CUDA' if with_cuda else 'C++ CPU only'})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["fastdense", "fastdense.*"]) + ["fastdense.kernels"],
    package_dir={"fastdense.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
