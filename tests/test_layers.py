"""The import rules of docs/architecture.md ("Layers"), for every module, checked on the source (every import
statement, also inside functions):

- pages (``app.py`` and ``pages/``) import only Streamlit (and its canvas component), Plotly, NumPy, the
  standard library, ``storage.service``, ``ui`` and the pages' own helpers (``pages.common``, ``pages.signin``,
  ``pages.state``, ``pages.upload``, ``pages.canvas_aids`` and Annotate's panels ``pages.annotate_*``);
- ``ui/`` imports neither Streamlit nor the database, nor ``storage`` (the engine is fine);
- ``storage/`` never imports Streamlit, the pages or ``ui``;
- ``unet/`` imports neither Streamlit nor SQLAlchemy, nor any other layer of the app;
- ``web/`` (the HTTP checks in front of Streamlit) reaches the store only through ``storage.service``, and
  neither the engine, ``ui``, nor the pages; pages may use ``web.sessions`` (which session is signed in);
- ``domain/`` (the shared types: kinds, statuses, records) is a leaf: every layer may import it, and it
  imports only the standard library, NumPy and itself;
- ``bench/`` uses no private name of the project (a leading underscore): what a benchmark needs is public;
- no module outside ``tests/`` and the migrations is over 400 lines, and no folder (``tests/`` too) holds
  more than 20 modules;
- an import inside a function of the app says on its line why it is not at the top."""

from __future__ import annotations

import ast
import io
import re
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STREAMLIT = ("streamlit", "streamlit_drawable_canvas")
DATABASE = ("sqlalchemy", "alembic")

# what each layer may not import (a name forbids the module and everything below it)
FORBIDDEN = {
    "unet": (*STREAMLIT, *DATABASE, "storage", "ui", "pages", "app"),
    "storage": (*STREAMLIT, "ui", "pages", "app"),
    "ui": (*STREAMLIT, *DATABASE, "storage", "pages", "app"),
}
# what a page may import: everything else is refused
PAGE_ALLOWED = (*STREAMLIT, "plotly", "numpy", "storage.service", "ui", "domain", "pages.common", "pages.signin",
                "pages.state", "pages.upload", "pages.canvas_aids", "pages.annotate_panels", "pages.annotate_canvas",
                "pages.annotate_live", "pages.annotate_objects", "pages.annotate_review", "pages.annotate_conflicts",
                "web.sessions")
# the shared types: a leaf that every layer may import, and that imports nothing of the project
PROJECT = ("storage", "unet", "ui", "pages", "app", "web", "bench", "scripts", "tests")
# what the HTTP layer may import from the app: the service, and itself
WEB_ALLOWED_APP = ("storage.service", "web")
APP_PACKAGES = ("storage", "unet", "ui", "pages", "app", "web")


def imports(path: Path) -> set[str]:
    """The full names of the modules a file imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    inside = path.is_relative_to(ROOT)
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1]) if inside else ""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join([*base, *([node.module] if node.module else [])]))
            elif node.module:
                names.add(node.module)
    return names


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def page_violations(path: Path) -> list[str]:
    return [name for name in sorted(imports(path)) if name != "__future__"
            and name.split(".")[0] not in sys.stdlib_module_names and not _under(name, PAGE_ALLOWED)]


def layer_violations(package: str, path: Path) -> list[str]:
    return [name for name in sorted(imports(path)) if _under(name, FORBIDDEN[package])]


def test_the_rules_see_violations(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import streamlit as st\n    from sqlalchemy.orm import Session\n"
                   "    from unet.training.train import train\n    import storage.db\n"
                   "    from storage.service import Neuroseg\n"
                   "    import pandas\n    import json\n")
    assert page_violations(bad) == ["pandas", "sqlalchemy.orm", "storage.db", "unet.training.train"]
    assert layer_violations("ui", bad) == ["sqlalchemy.orm", "storage.db", "storage.service", "streamlit"]
    assert layer_violations("unet", bad) == ["sqlalchemy.orm", "storage.db", "storage.service", "streamlit"]


def test_a_page_that_imports_the_engine_or_the_database_fails(tmp_path):
    """The rule as a page would break it: a copy of a real page with one more import."""
    page = (ROOT / "pages" / "train.py").read_text()
    assert page_violations(ROOT / "pages" / "train.py") == []
    for extra, name in (("from unet.network.config import PRESETS", "unet.network.config"),
                        ("import storage.db", "storage.db"),
                        ("from storage.settings import Settings", "storage.settings")):
        copy = tmp_path / "train.py"
        copy.write_text(page.replace("import streamlit as st\n", f"import streamlit as st\n{extra}\n", 1))
        assert page_violations(copy) == [name]


def test_pages_import_only_the_service_and_ui():
    files = [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py"))]
    assert len(files) >= 7
    problems = [f"{f.relative_to(ROOT)} imports {name}" for f in files for name in page_violations(f)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_imports(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules?"
    problems = [f"{f.relative_to(ROOT)} imports {name}" for f in files for name in layer_violations(package, f)]
    assert not problems, "\n".join(problems)


def web_violations(path: Path) -> list[str]:
    return [name for name in sorted(imports(path)) if _under(name, APP_PACKAGES) and not _under(name, WEB_ALLOWED_APP)]


def test_the_http_layer_reaches_the_store_only_through_the_service(tmp_path):
    files = sorted((ROOT / "web").rglob("*.py"))
    assert files, "web/ has no modules?"
    problems = [f"{f.relative_to(ROOT)} imports {name}" for f in files for name in web_violations(f)]
    assert not problems, "\n".join(problems)
    bad = tmp_path / "bad.py"
    bad.write_text("from storage.auth.accounts import session_actor\nfrom storage.service import RIGHTS\n"
                   "import unet.exchange.io\n")
    assert web_violations(bad) == ["storage.auth.accounts", "unet.exchange.io"]


def domain_violations(path: Path) -> list[str]:
    return [name for name in sorted(imports(path)) if name != "__future__" and (
        _under(name, PROJECT) or (name.split(".")[0] not in sys.stdlib_module_names
                                  and not _under(name, ("numpy", "domain"))))]


def test_the_shared_types_are_a_leaf(tmp_path):
    files = sorted((ROOT / "domain").rglob("*.py"))
    assert len(files) >= 3, "domain/ has no modules?"
    problems = [f"{f.relative_to(ROOT)} imports {name}" for f in files for name in domain_violations(f)]
    assert not problems, "\n".join(problems)
    bad = tmp_path / "bad.py"
    bad.write_text("from storage.records import UserError\nimport sqlalchemy\nimport numpy as np\n"
                   "from domain.kinds import RunKind\nimport enum\n")
    assert domain_violations(bad) == ["sqlalchemy", "storage.records"]


def private_uses(path: Path) -> list[str]:
    """Private names (one leading underscore) a file takes from the project: imported by name, or reached as
    an attribute of anything but ``self``/``cls``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and _under(node.module, (*PROJECT, "domain")):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        elif (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
              and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append(f"….{node.attr} (line {node.lineno})")
    return found


def test_benchmarks_use_only_public_names(tmp_path):
    files = sorted((ROOT / "bench").glob("*.py"))
    assert files, "bench/ has no modules?"
    problems = [f"{f.relative_to(ROOT)} uses {name}" for f in files for name in private_uses(f)]
    assert not problems, "\n".join(problems)
    bad = tmp_path / "bad.py"
    bad.write_text("from bench.loop import _wait, score\nfrom storage.service import Neuroseg\n"
                   "def f(svc):\n    return svc._tx(len), self._own, svc.__class__\n")
    assert private_uses(bad) == ["bench.loop._wait", "…._tx (line 4)"]


# ---- the house's size and import rules (issue 28): each with a check that it fires --------------------------------

MAX_LINES = 400
MAX_MODULES = 20
CODE_EXCLUDED = ("tests", "migrations")  # tests and Alembic migrations are not rooms of the app


def code_files() -> list[Path]:
    """Every Python module of the project outside ``tests/`` and the migrations."""
    return [p for p in sorted(ROOT.rglob("*.py")) if not set(p.relative_to(ROOT).parts) & {*CODE_EXCLUDED, ".venv"}
            and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]


def too_long(files: list[Path], limit: int = MAX_LINES) -> list[str]:
    return [f"{f.name if not f.is_relative_to(ROOT) else f.relative_to(ROOT)}: {n} lines"
            for f in files if (n := len(f.read_text(encoding="utf-8").splitlines())) > limit]


def crowded(files: list[Path], limit: int = MAX_MODULES) -> list[str]:
    folders: dict[Path, int] = {}
    for f in files:
        folders[f.parent] = folders.get(f.parent, 0) + 1
    return [f"{folder}: {n} modules" for folder, n in sorted(folders.items()) if n > limit]


def test_no_module_is_over_400_lines(tmp_path):
    files = code_files()
    assert len(files) > 50 and not any("tests" in f.parts for f in files)
    problems = too_long(files)
    assert not problems, f"split these by what belongs together (≤ {MAX_LINES} lines):\n" + "\n".join(problems)
    big = tmp_path / "big.py"
    big.write_text("x = 1\n" * (MAX_LINES + 1))
    small = tmp_path / "small.py"
    small.write_text("x = 1\n" * MAX_LINES)
    assert too_long([big, small]) == [f"big.py: {MAX_LINES + 1} lines"]


def test_no_folder_holds_more_than_20_modules(tmp_path):
    tests = sorted((ROOT / "tests").rglob("*.py"))
    assert len(tests) > 30
    problems = crowded(code_files() + tests)
    assert not problems, f"give these folders rooms (≤ {MAX_MODULES} modules each):\n" + "\n".join(problems)
    files = [tmp_path / "room" / f"m{i}.py" for i in range(MAX_MODULES + 1)] + [tmp_path / "other" / "a.py"]
    assert crowded(files) == [f"{tmp_path / 'room'}: {MAX_MODULES + 1} modules"]
    assert crowded(files[1:]) == []


def unexplained_imports(path: Path) -> list[str]:
    """Imports inside a function without a reason: a comment of a few words on the import's first or last line
    (``import torch  # the server process never loads torch``). ``noqa`` and ``type:`` comments are no reason."""
    source = path.read_text(encoding="utf-8")
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            text = re.sub(r"\b(noqa|type:)\S*(\s*:?\s*[\w,]+)?", "", token.string.lstrip("#")).strip()
            comments[token.start[0]] = text
    found = []
    for fn in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    reason = comments.get(node.lineno) or comments.get(node.end_lineno) or ""
                    if len(reason.split()) < 3:
                        found.append(f"line {node.lineno}")
    return sorted(set(found), key=lambda s: int(s.split()[1]))


def test_an_import_inside_a_function_says_why(tmp_path):
    files = [f for f in code_files() if f.relative_to(ROOT).parts[0] in (*APP_PACKAGES, "app.py", "domain")]
    assert len(files) > 50
    problems = [f"{f.relative_to(ROOT)} {where}" for f in files for where in unexplained_imports(f)]
    assert not problems, ("move these imports to the top of the module, or say on the import's line why it "
                          "must stay inside the function:\n" + "\n".join(problems))
    bad = tmp_path / "bad.py"
    bad.write_text("import json\n\n\ndef f():\n    import torch  # keeps torch out of the server process\n"
                   "    import numpy  # noqa: F401\n    from os import (\n        path,\n    )\n"
                   "    import zarr  # lazy\n    return json\n")
    assert unexplained_imports(bad) == ["line 6", "line 7", "line 10"]


GPU_MACHINE = {"torch", "numpy", "scipy", "skimage", "sklearn", "tifffile"}  # all a lent GPU machine has


def bench_imports(start: str) -> tuple[dict[str, set[str]], set[str]]:
    """What running ``start`` imports: every import of a bench module (its functions run), the module-level
    imports of the project's other modules (a lazy import inside one is for a path bench.gpu never takes).
    Returns (third-party top-level name → the modules importing it, the project's modules reached)."""
    def file_of(module: str) -> Path | None:
        for path in (ROOT / (module.replace(".", "/") + ".py"), ROOT / module.replace(".", "/") / "__init__.py"):
            if path.is_file():
                return path
        return None

    third: dict[str, set[str]] = {}
    seen: set[str] = set()
    todo = [start]
    while todo:
        module = todo.pop()
        if module in seen or (path := file_of(module)) is None:
            continue
        seen.add(module)
        tree = ast.parse(path.read_text())
        nodes = ast.walk(tree) if module.startswith("bench.") else (
            n for top in tree.body for n in ast.walk(top)
            if not isinstance(top, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))
        for node in nodes:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for name in names:
                top = name.split(".")[0]
                if top in PROJECT or top == "domain":
                    todo.append(name)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    third.setdefault(top, set()).add(module)
    return third, seen


def test_bench_gpu_needs_only_what_a_gpu_machine_has():
    """bench.gpu runs on a lent GPU machine: torch, NumPy, SciPy, scikit-image, scikit-learn and tifffile, and
    nothing of storage/ (issue 30)."""
    third, reached = bench_imports("bench.gpu")
    assert {"torch", "numpy"} <= set(third), "the walk found the imports"
    assert set(third) <= GPU_MACHINE, {k: sorted(v) for k, v in third.items() if k not in GPU_MACHINE}
    assert not [m for m in reached if m.split(".")[0] in ("storage", "ui", "pages", "web", "domain")]
    assert "bench.quality" in reached and "unet.training.device_batches" in reached
    third_cli, _ = bench_imports("unet.cli")
    assert "zarr" in third_cli  # (the walk would see what a GPU machine lacks)
