"""Triton kernels of fastdense, installed as ``fastdense.kernels``.

One module per op family; each holds the @triton.jit kernels, the host
launchers ``forward``/``backward`` that follow the op's tensor contract, and
``compile_specs(...)``: what a call of a given size would compile on a GPU
(the launchers run on meta tensors, see ``_launch``), which
tests/kernels/test_sm90_compile.py builds for Hopper on any machine.
Importing this package requires triton.
"""

if __name__ == "kernels":
    # This folder is only ever meant to be imported as fastdense.kernels (setup.py
    # maps it). From a checkout's root, Python puts the current directory first on
    # sys.path, and a bare ``import kernels`` lands here instead of the Hugging Face
    # ``kernels`` package that transformers imports when it is installed (a
    # dependency of transformers >= 5.25), which then fails. Step aside: load the
    # package that owns the name from the rest of sys.path and let it replace this
    # module (the import system returns whatever sys.modules holds afterwards).
    import importlib as _importlib
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _saved_path = list(_sys.path)
    _this = _sys.modules.pop(__name__)
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    try:
        _sys.modules[__name__] = _importlib.import_module("kernels")
    except ImportError as _e:
        _sys.modules[__name__] = _this
        raise ImportError(
            "no package named 'kernels' outside this checkout: fastdense's Triton kernels "
            "are imported as fastdense.kernels"
        ) from _e
    finally:
        _sys.path[:] = _saved_path
