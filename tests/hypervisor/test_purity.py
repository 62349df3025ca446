"""The hypervisor package stays pure, and it alone talks to libvirt."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "provisioning" / "hypervisor"
ALLOWED_TOP_LEVEL = {"libvirt", "lxml", "provisioning"}


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved inside its package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                names.add(node.module)
    return names


def test_it_imports_nothing_from_django_or_the_rest_of_the_project() -> None:
    import sys

    stdlib = sys.stdlib_module_names
    for path in sorted(PACKAGE.glob("*.py")):
        for module in imported_modules(path):
            top = module.split(".")[0]
            assert top != "django", f"{path.name} imports {module}"
            assert top in stdlib or top in ALLOWED_TOP_LEVEL, f"{path.name} imports {module}"
            if top == "provisioning":
                assert module.startswith("provisioning.hypervisor"), f"{path.name}: {module}"


def test_it_is_the_only_code_that_imports_libvirt() -> None:
    offenders = []
    for folder in ("provisioning", "vmportal"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if PACKAGE in path.parents:
                continue
            if any(m == "libvirt" or m.startswith("libvirt.") for m in imported_modules(path)):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_the_import_scanner_sees_relative_and_absolute_imports() -> None:
    # Guard against a scanner that passes because it sees nothing.
    found = imported_modules(PACKAGE / "operations.py")
    assert "libvirt" in found
    assert "provisioning.hypervisor.connection" in found
