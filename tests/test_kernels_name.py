"""The checkout's kernels/ folder must not take the name of the Hugging Face
``kernels`` package.

Run from the repository root, Python finds ./kernels first for ``import kernels``;
transformers >= 5.25 imports that package whenever it is installed, and every
diffusers model failed to import in a checkout (kernels/__init__.py steps aside).
"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code, *, env_path=None, flags=()):
    env = {"PATH": "/usr/bin:/bin"}
    if env_path is not None:
        env["PYTHONPATH"] = str(env_path)
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_bare_import_from_the_root_finds_the_other_package(tmp_path):
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("CUDAProperties = 'the other package'\n")
    res = _run("import kernels; print(kernels.CUDAProperties); print(kernels.__file__)", env_path=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["the other package", str(other / "__init__.py")]


def test_bare_import_without_another_package_says_where_the_kernels_are():
    # -S: no site-packages, so no other package named kernels can be found
    res = _run("import kernels", flags=("-S",))
    assert res.returncode != 0
    assert "fastdense.kernels" in res.stderr


def test_fastdense_kernels_still_resolves_to_this_folder():
    import fastdense.kernels as fk

    assert Path(fk.__file__).resolve() == ROOT / "kernels" / "__init__.py"
