"""Package structure: no import cycles between lungcad's modules (scripts/import_cycles.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_cycles", ROOT / "scripts" / "import_cycles.py")
import_cycles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_cycles)


def test_no_import_cycles():
    cycles = import_cycles.find_cycles(ROOT / "src" / "lungcad")
    assert not cycles, "import cycles (lazy and TYPE_CHECKING imports count):\n" + "\n".join(
        " -> ".join(c) for c in cycles)


def test_the_checker_sees_lazy_relative_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.sub import c\n")  # lazy
    (pkg / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import x\n")
    (pkg / "d.py").write_text("import pkg.a\n")  # imports into the cycle, not part of it
    assert import_cycles.find_cycles(pkg) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    (pkg / "sub" / "c.py").write_text("")
    assert import_cycles.find_cycles(pkg) == []
