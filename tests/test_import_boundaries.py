"""Architecture boundaries, checked on the source's AST (nothing is imported to check it).

- idstitch.core is pure: it imports nothing from idstitch outside idstitch.core, nothing that does
  I/O or reads the clock or randomness, and never calls datetime.now / utcnow / today.
- idstitch.storage does not import the engine or the edges (cli, ingest, bench).
- the engine layer (engine, group_commit, config) does not import the edges (cli, ingest, http, bench, sim).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "idstitch"

IMPURE_MODULES = frozenset(
    {
        "os",
        "io",
        "sqlite3",
        "socket",
        "random",
        "secrets",
        "time",
        "uuid",
        "pathlib",
        "subprocess",
        "threading",
    }
)
CLOCK_CALLS = frozenset({"now", "utcnow", "today"})
STORAGE_FORBIDDEN = ("idstitch.engine", "idstitch.cli", "idstitch.ingest", "idstitch.bench")
ENGINE_FORBIDDEN = ("idstitch.cli", "idstitch.ingest", "idstitch.http", "idstitch.bench", "idstitch.sim")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, source: str | None = None) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative ones resolved."""
    tree = ast.parse(source if source is not None else path.read_text(encoding="utf-8"), str(path))
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            yield node.lineno, target
            # `from idstitch import engine` imports idstitch.engine
            for alias in node.names:
                yield node.lineno, f"{target}.{alias.name}"


def clock_calls(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    tree = ast.parse(source if source is not None else path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in CLOCK_CALLS:
            found.append((node.lineno, ast.unparse(node)))
    return found


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def core_violations(path: Path, source: str | None = None) -> list[str]:
    problems = []
    for line, name in imports(path, source):
        top = name.split(".")[0]
        # `from idstitch import core` names the package itself: fine
        if top == "idstitch" and name != "idstitch" and not within(name, "idstitch.core"):
            problems.append(f"{path.name}:{line} imports {name}")
        if top in IMPURE_MODULES:
            problems.append(f"{path.name}:{line} imports {name} (I/O, clock or randomness)")
    problems += [f"{path.name}:{line} calls {call}" for line, call in clock_calls(path, source)]
    return problems


def forbidden_imports(path: Path, forbidden: tuple[str, ...], source: str | None = None) -> list[str]:
    return [
        f"{path.name}:{line} imports {name}"
        for line, name in imports(path, source)
        if any(within(name, package) for package in forbidden)
    ]


def python_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


CORE_FILES = python_files(PACKAGE / "core")
STORAGE_FILES = python_files(PACKAGE / "storage")


def test_the_layout_is_where_the_checks_look() -> None:
    assert len(CORE_FILES) >= 5
    assert (PACKAGE / "core" / "resolve.py") in CORE_FILES
    assert (PACKAGE / "storage" / "base.py") in STORAGE_FILES
    assert (PACKAGE / "engine.py").is_file()


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda path: path.name)
def test_core_is_pure(path: Path) -> None:
    assert core_violations(path) == []


@pytest.mark.parametrize("path", STORAGE_FILES, ids=lambda path: path.name)
def test_storage_does_not_import_engine_or_edges(path: Path) -> None:
    assert forbidden_imports(path, STORAGE_FORBIDDEN) == []


@pytest.mark.parametrize("name", ["engine.py", "group_commit.py", "config.py"])
def test_engine_layer_does_not_import_edges(name: str) -> None:
    assert forbidden_imports(PACKAGE / name, ENGINE_FORBIDDEN) == []


# --- the checker itself catches what it should ------------------------------------------------

FAKE_CORE = PACKAGE / "core" / "fake.py"


@pytest.mark.parametrize(
    "source",
    [
        "import os",
        "import os.path",
        "from time import monotonic",
        "import random as r",
        "from uuid import uuid4",
        "from pathlib import Path",
        "import idstitch.storage.base",
        "from idstitch.engine import Engine",
        "from idstitch import config",
        "from .. import engine",
        "from ..storage import base",
        "from datetime import datetime\nx = datetime.now()",
        "import datetime\nx = datetime.datetime.utcnow()",
        "from datetime import date\nx = date.today()",
    ],
)
def test_checker_finds_core_violations(source: str) -> None:
    assert core_violations(FAKE_CORE, source) != []


@pytest.mark.parametrize(
    "source",
    [
        "from idstitch.core.errors import InvalidEvent",
        "from .errors import InvalidEvent",
        "from . import errors",
        "import hashlib, re, math\nfrom datetime import datetime, timedelta",
        "from __future__ import annotations",
    ],
)
def test_checker_allows_pure_imports(source: str) -> None:
    assert core_violations(FAKE_CORE, source) == []


def test_checker_finds_edge_imports() -> None:
    fake_storage = PACKAGE / "storage" / "fake.py"
    assert forbidden_imports(fake_storage, STORAGE_FORBIDDEN, "from ..engine import Engine") != []
    assert forbidden_imports(fake_storage, STORAGE_FORBIDDEN, "from idstitch import cli") != []
    assert forbidden_imports(fake_storage, STORAGE_FORBIDDEN, "from idstitch.core import graph") == []
    fake_engine = PACKAGE / "engine.py"
    assert forbidden_imports(fake_engine, ENGINE_FORBIDDEN, "from idstitch.sim.population import x") != []
    assert forbidden_imports(fake_engine, ENGINE_FORBIDDEN, "from .http import app") != []
    assert forbidden_imports(fake_engine, ENGINE_FORBIDDEN, "from idstitch.storage.base import Store") == []
