"""The import rules of DESIGN.md: unet/ imports neither Streamlit nor SQLAlchemy; storage/ never imports
Streamlit. Checked on the source (every import statement, also inside functions)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = {
    "unet": {"streamlit", "streamlit_drawable_canvas", "sqlalchemy", "alembic", "storage", "pages", "app"},
    "storage": {"streamlit", "streamlit_drawable_canvas", "pages", "app"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_rules_see_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import streamlit as st\n    from sqlalchemy.orm import Session\n")
    assert {"streamlit", "sqlalchemy"} <= imported_modules(bad)


@pytest.mark.parametrize("package", sorted(RULES))
def test_layer_imports(package):
    files = sorted((ROOT / package).rglob("*.py"))
    if package == "unet":
        assert files, "unet/ has no modules?"
    problems = [f"{f.relative_to(ROOT)} imports {sorted(imported_modules(f) & RULES[package])}"
                for f in files if imported_modules(f) & RULES[package]]
    assert not problems, "\n".join(problems)


def imported_full_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


# Pages are thin: widgets in, a call to the service, render out. No SQL, no training, no raw file store.
PAGE_FORBIDDEN = ("sqlalchemy", "alembic", "torch", "storage.db", "storage.models", "storage.api", "storage.files",
                  "storage.jobs", "storage.worker", "unet.train", "unet.model")


def test_pages_stay_thin():
    files = [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py"))]
    assert len(files) >= 7
    problems = [f"{f.relative_to(ROOT)} imports {name}" for f in files for name in sorted(imported_full_names(f))
                if any(name == bad or name.startswith(bad + ".") for bad in PAGE_FORBIDDEN)]
    assert not problems, "\n".join(problems)
