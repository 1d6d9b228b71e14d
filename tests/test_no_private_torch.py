"""No private torch API in src/: nothing under torch._*, no underscore op of torch.ops, nothing reached by name
(getattr/hasattr with an underscore name). Such names change or vanish between torch releases without notice."""
from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

PRIVATE = [
    # torch._C, torch._dynamo, torch.ops.mkl._mkl_linear, torch.nn.functional._x, ... (dunders such as
    # torch.__version__ are public)
    re.compile(r"\btorch(?:\.\w+)*\._(?!_)\w*"),
    # import torch._C / from torch._C import ... / from torch.ops import _x
    re.compile(r"^\s*(?:import|from)\s+torch(?:\.\w+)*\._(?!_)"),
    re.compile(r"^\s*from\s+torch(?:\.\w+)*\s+import\s+.*\b_(?!_)\w+"),
    # getattr(torch.ops.mkl, "_mkl_linear"), hasattr(torch._C, "...")
    re.compile(r"\b(?:get|has)attr\(\s*torch(?:\.\w+)*\s*,\s*['\"]_(?!_)"),
]


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line, comments blanked out."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col]
    return list(enumerate(lines, start=1))


def private_uses(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for number, line in code_lines(path):
            if any(p.search(line) for p in PRIVATE):
                found.append(f"{path.relative_to(root.parent)}:{number}: {line.strip()}")
    return found


def test_src_uses_no_private_torch_api():
    found = private_uses(SRC)
    assert not found, "private torch API in src/ (use the public API):\n" + "\n".join(found)


@pytest.mark.parametrize("line", [
    "n = torch._C._storage_Use_Count(s._cdata)",
    "y = torch.ops.mkl._mkl_linear(x, w, w, None, 1)",
    "import torch._dynamo",
    "from torch._C import _get_tracing_state",
    "from torch.nn.functional import _canonical_mask",
    "ok = hasattr(torch.ops.mkl, '_mkl_linear')",
    "torch._foreach_add_(xs, ys)",
])
def test_the_check_catches_private_uses(tmp_path, line):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text(f"import torch\n# torch._C in a comment is fine\n{line}\n")
    assert private_uses(tmp_path / "src") == [f"src/m.py:3: {line}"]


def test_the_check_lets_public_uses_pass(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text(
        "import torch\nv = torch.__version__\ny = torch.nn.functional.linear(x, w)  # not torch._C\n"
        "from torch.nn import functional as F\n")
    assert private_uses(tmp_path / "src") == []
