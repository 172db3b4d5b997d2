"""Checks a fastdense._C that was built with CUDA on a machine without a GPU.

Run by `make cuda-build` with the python of its venv (.venv-cuda):

    python tools/check_cuda_build.py --build-temp build/cuda-temp --arch-list 9.0 --cuda 13.0 SO_FILE

Nothing here needs a GPU: the CUDA build of torch imports without one, and the
kernels' registrations are visible in the dispatcher. It fails (exit status 1,
the problems listed last) when

* a CUDA source (csrc/cuda/*.cu, csrc/cuda/*_bind.cpp) is not in the ninja
  build, or its object file is missing;
* a function that an object file defines is not in the .so (it was not linked);
* a .cu object, or the .so, lacks a cubin for an arch of the arch list, or
  carries cubins for other arches;
* the .so does not import with this torch, was built without CUDA, or an op
  that a *_bind.cpp registers has no CUDA kernel.

It prints the evidence on the way: the cubins, the symbols of each source and
`fastdense info`.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
problems: list[str] = []


def fail(msg: str) -> None:
    problems.append(msg)
    print(f"  PROBLEM: {msg}")


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def cuda_sources() -> list[str]:
    found = glob.glob(os.path.join(ROOT, "csrc/cuda/*.cu")) + glob.glob(os.path.join(ROOT, "csrc/cuda/*_bind.cpp"))
    return sorted(os.path.realpath(p) for p in found)


def ninja_objects(build_temp: str) -> dict[str, str]:
    """source -> object for every compile edge of torch's build.ninja."""
    path = os.path.join(build_temp, "build.ninja")
    if not os.path.exists(path):
        fail(f"{path} not found: was the extension built with --build-temp {build_temp}?")
        return {}
    objects = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"build (\S+): (\w+) (\S+)", line.replace("$:", ":").replace("$ ", " "))
            if m and m.group(2) != "phony":
                objects[os.path.realpath(m.group(3))] = m.group(1)
    return objects


def defined_functions(binary: str) -> set[str]:
    """Mangled names of the (strong, global or local) functions a binary defines."""
    names = set()
    for line in run("nm", "--defined-only", binary).splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "Tt":
            names.add(parts[2])
    return names


def demangle(names: list[str]) -> list[str]:
    return run("c++filt", *names).splitlines() if names else []


def find_cuobjdump() -> str | None:
    candidates = [os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "cuobjdump"), shutil.which("cuobjdump")]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        # Triton's wheel carries a cuobjdump next to its ptxas.
        candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def cubins(cuobjdump: str, binary: str) -> list[str]:
    """Arch of each cubin embedded in binary (sm_90, ...), one entry per cubin."""
    try:
        out = run(cuobjdump, "--list-elf", binary)
    except subprocess.CalledProcessError as exc:
        out = exc.stdout or ""
    return re.findall(r"\.(sm_\w+?)\.cubin", out)


def expected_arches(arch_list: str) -> set[str]:
    """TORCH_CUDA_ARCH_LIST ("9.0", "8.0;9.0+PTX", "9.0a") -> {"sm_90", ...}."""
    arches = set()
    for item in re.split(r"[;\s]+", arch_list.strip()):
        if item:
            major, minor = item.replace("+PTX", "").split(".")
            arches.add(f"sm_{major}{minor}")
    return arches


def check_objects(so: str, build_temp: str) -> dict[str, str]:
    print("== every CUDA source compiled and linked")
    objects = ninja_objects(build_temp)
    so_functions = defined_functions(so)
    built = {}
    for src in cuda_sources():
        rel = os.path.relpath(src, ROOT)
        obj = objects.get(src)
        if obj is None:
            fail(f"{rel} is not compiled by {build_temp}/build.ninja")
            continue
        if not os.path.exists(obj):
            fail(f"{rel}: object {obj} is missing")
            continue
        if os.path.getmtime(obj) > os.path.getmtime(so):
            fail(f"{rel}: object {obj} is newer than {so} (not relinked)")
        functions = defined_functions(obj)
        missing = sorted(functions - so_functions)
        if not functions:
            fail(f"{rel}: {obj} defines no function")
        elif missing:
            fail(f"{rel}: {len(missing)} of its {len(functions)} functions are not in the .so, e.g. "
                 f"{demangle(missing[:3])}")
        # The evidence worth reading: launchers, op implementations and registrations.
        shown = sorted(n for n in demangle(sorted(functions))
                       if ("fastdense::" in n or "(anonymous namespace)::" in n or "TORCH_LIBRARY" in n)
                       and "::operator" not in n and "lambda" not in n)
        print(f"  {rel}: {os.path.relpath(obj, ROOT)}, {len(functions)} functions, all in the .so"
              if not missing else f"  {rel}: {len(missing)} missing")
        for name in shown[:8]:
            print(f"      {name}")
        if len(shown) > 8:
            print(f"      ... {len(shown) - 8} more")
        built[src] = obj
    return built


def check_cubins(so: str, objects: dict[str, str], arch_list: str) -> None:
    print("== device code")
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        fail("no cuobjdump found (CUDA_HOME/bin, PATH or triton/backends/nvidia/bin)")
        return
    want = expected_arches(arch_list)
    print(f"  cuobjdump: {cuobjdump}; TORCH_CUDA_ARCH_LIST={arch_list!r} -> {sorted(want)}")
    total = 0
    for src, obj in objects.items():
        if not src.endswith(".cu"):
            continue
        found = cubins(cuobjdump, obj)
        total += len(found)
        print(f"  {os.path.relpath(src, ROOT)}: cubins {found}")
        if set(found) != want:
            fail(f"{os.path.relpath(src, ROOT)}: cubins for {sorted(set(found))}, expected {sorted(want)}")
    in_so = cubins(cuobjdump, so)
    print(f"  {os.path.basename(so)}: {len(in_so)} cubins {sorted(set(in_so))}")
    print("  " + run(cuobjdump, "--list-elf", so).strip().replace("\n", "\n  "))
    if set(in_so) != want or len(in_so) != total:
        fail(f"the .so holds {len(in_so)} cubins for {sorted(set(in_so))}; "
             f"the .cu objects hold {total} for {sorted(want)}")
    try:
        ptx = run(cuobjdump, "--list-ptx", so).strip()
    except subprocess.CalledProcessError:
        ptx = ""
    print(f"  PTX: {ptx or 'none'}" + ("" if "+PTX" in arch_list else " (none expected without +PTX)"))


def check_import(so: str, cuda: str) -> None:
    print("== import with the CUDA build of torch (no GPU needed)")
    import torch

    print(f"  torch {torch.__version__}, CUDA {torch.version.cuda}, device visible: {torch.cuda.is_available()}")
    if torch.version.cuda != cuda:
        fail(f"torch.version.cuda is {torch.version.cuda}, expected {cuda}")
    print("  libraries the .so needs: " + ", ".join(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]",
                                                                  run("readelf", "-d", so))))
    # Loaded under its package name before fastdense is imported, so that
    # fastdense/_ext.py picks this file up and the source tree stays as it is.
    spec = importlib.util.spec_from_file_location("fastdense._C", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["fastdense._C"] = module

    import fastdense
    from fastdense import _ext, cli

    if _ext._C is not module:
        fail(f"fastdense did not load {so}: {_ext.load_error}")
        return
    print(f"  fastdense._C.built_with_cuda() = {module.built_with_cuda()}")
    if not module.built_with_cuda():
        fail("fastdense._C.built_with_cuda() is False")
    registered = []
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc/cuda/*_bind.cpp"))):
        with open(path) as f:
            registered += re.findall(r'm\.impl\(\s*"(\w+)"', f.read())
    if not registered:
        fail("no m.impl(...) found in csrc/cuda/*_bind.cpp")
    for op in registered:
        try:
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdense::{op}", "CUDA")
        except RuntimeError:  # no schema declares the op
            has = False
        if not has:
            fail(f"fastdense::{op} has no CUDA kernel")
    print(f"  CUDA kernels registered for the {len(registered)} ops of csrc/cuda/*_bind.cpp: {registered}")
    print("== fastdense info")
    cli.print_info()
    del fastdense


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("so", help="the built extension, e.g. "
                                   "build/cuda-cp312/fastdense/_C.cpython-312-x86_64-linux-gnu.so")
    parser.add_argument("--build-temp", required=True, help="the --build-temp of the build (holds build.ninja)")
    parser.add_argument("--arch-list", default="9.0", help="the TORCH_CUDA_ARCH_LIST of the build")
    parser.add_argument("--cuda", default="13.0", help="the CUDA version torch must have been built with")
    args = parser.parse_args()
    so = os.path.realpath(args.so)
    if not os.path.exists(so):
        print(f"check_cuda_build: {args.so} does not exist", file=sys.stderr)
        return 1
    print(f"checking {os.path.relpath(so, ROOT)} ({os.path.getsize(so) / 2**20:.1f} MiB)")
    objects = check_objects(so, os.path.realpath(args.build_temp))
    check_cubins(so, objects, args.arch_list)
    check_import(so, args.cuda)
    if problems:
        print(f"\ncheck_cuda_build: FAILED, {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"\ncheck_cuda_build: OK ({os.path.relpath(so, ROOT)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
