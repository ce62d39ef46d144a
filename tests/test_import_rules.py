"""The import rules of docs/ARCHITECTURE.md hold: every import of one of our packages from another
is allowed by that document's table. The table is the rule; this test only reads it."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def import_rules(text: str) -> dict[str, set[str]]:
    """package -> allowed targets (a package, or a dotted module), from the "Import rules" table."""
    section = text.split("## Import rules", 1)[1].split("\n## ", 1)[0]
    rules = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        rules[cells[0].strip("`")] = set(re.findall(r"`([\w.]+)`", cells[1]))
    return rules


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module_parts = [package, *path.relative_to(ROOT / package).with_suffix("").parts]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module_parts[: len(module_parts) - node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            # `from pkg import module` imports pkg.module
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


def allowed(target: str, rules: set[str]) -> bool:
    return any(target == rule or target.startswith(rule + ".") for rule in rules)


def violations(rules: dict[str, set[str]]) -> list[str]:
    ours = set(rules)
    problems = []
    for package, allowed_targets in rules.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, module in imported_modules(path, package):
                top = module.split(".")[0]
                if top not in ours or top == package:
                    continue
                # `from engine import x` names engine.x, which may be a module or a symbol of engine/__init__
                if not (allowed(module, allowed_targets) or allowed(module.rsplit(".", 1)[0], allowed_targets)):
                    problems.append(f"{path.relative_to(ROOT)}:{line}: {package} imports {module}")
    return problems


def test_the_table_names_every_package():
    rules = import_rules(DOC.read_text())
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"}
    assert packages == set(rules), (
        f"packages without a rule: {packages - set(rules)}; rules without a package: {set(rules) - packages}"
    )


def test_every_import_follows_the_table():
    problems = violations(import_rules(DOC.read_text()))
    assert not problems, "forbidden imports (docs/ARCHITECTURE.md, Import rules):\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("package", "module", "line"),
    [
        ("kv_transfer", "router.config.RouterConfig", "from router.config import RouterConfig"),
        ("router", "engine.engine", "import engine.engine"),
        ("engine", "protos.common_pb2", "from protos import common_pb2"),
    ],
)
def test_a_forbidden_edge_is_caught(tmp_path, monkeypatch, package, module, line):
    """The check fails on a forbidden edge: a copy of the tree with one planted import."""
    planted = tmp_path / package
    planted.mkdir()
    (planted / "__init__.py").write_text("")
    (planted / "planted.py").write_text(line + "\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    rules = import_rules(DOC.read_text())
    assert violations(rules) == [f"{package}/planted.py:1: {package} imports {module}"]
