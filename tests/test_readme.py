"""The README's Python examples run as pasted, and print what their comments say."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    code = BLOCKS[index]
    if "diffusers" in code:
        pytest.importorskip("diffusers")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    printed = out.getvalue().splitlines()
    # A comment after a print names the output; torch.Size(...) and shape tuples must match exactly.
    expected = [m.group(1).strip() for line in code.splitlines()
                if line.lstrip().startswith("print(") and (m := re.search(r"#\s*(torch\.Size.*|\{'.*|\[.*)$", line))]
    for want in expected:
        assert any(want in line for line in printed), f"expected output {want!r} in {printed}"
