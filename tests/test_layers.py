"""The package's layering, read from its imports: nothing imports upwards, and only ``mitm`` knows mitmproxy."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "addon" / "scout_diff_cache"
# Lowest first. A module may import its own layer and the ones before it.
LAYERS: list[set[str]] = [
    {"text", "settings", "setting_checks", "memo"},
    {"git"},
    {"context"},
    {"chat"},
    {"observe", "view"},
    {"wiring", "preview", "launch"},
    {"mitm", "cli", "__main__"},
]
FRAMEWORK_FREE = {name for layer in LAYERS[:-1] for name in layer}
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 200


def part_of(module: Path) -> str:
    """The top-level part of the package a module belongs to: its sub-package, or its own name."""
    relative = module.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def layer_of(part: str) -> int:
    return next(index for index, names in enumerate(LAYERS) if part in names)


def imported_parts(module: Path) -> list[tuple[str, int]]:
    """(part of the package, line) for every import of the package's own modules; ("mitmproxy", line) too."""
    tree = ast.parse(module.read_text(encoding="utf-8"))
    package_parts = module.relative_to(PACKAGE).parts[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = [node.module or ""]
            else:
                base = package_parts[: len(package_parts) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
                names = [f"scout_diff_cache.{'.'.join(target) or '__init__'}"]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("scout_diff_cache."):
                found.append((name.split(".")[1], node.lineno))
            elif name.split(".")[0] == "mitmproxy":
                found.append(("mitmproxy", node.lineno))
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_part_has_a_layer() -> None:
    for module in MODULES:
        layer_of(part_of(module))  # StopIteration for a part nobody placed


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(module: Path) -> None:
    own = part_of(module)
    for part, line in imported_parts(module):
        if part == "mitmproxy":
            assert own not in FRAMEWORK_FREE, f"{module.name}:{line}: {own} must not import mitmproxy"
        elif part != "__init__":
            assert layer_of(part) <= layer_of(own), f"{module.name}:{line}: {own} imports {part}, a layer above"


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_classes_stay_small(module: Path) -> None:
    text = module.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{module.name} has {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            assert lines <= MAX_CLASS_LINES, f"{module.name}: class {node.name} has {lines} lines"


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a context module importing the mitm layer is reported."""
    fake = PACKAGE / "context" / "upward_probe_for_test.py"
    fake.write_text("from ..mitm.state import ScoutState\nimport mitmproxy.http\n", encoding="utf-8")
    try:
        assert imported_parts(fake) == [("mitm", 1), ("mitmproxy", 2)]
        with pytest.raises(AssertionError, match="imports mitm, a layer above"):
            test_imports_point_down(fake)
    finally:
        fake.unlink()


def test_every_sub_package_is_a_package() -> None:
    """A folder without ``__init__.py`` is left out of a non-editable install (the Dockerfile's ``pip install .``)."""
    folders = {module.parent for module in MODULES}
    assert [f for f in folders if not (f / "__init__.py").is_file()] == []
