"""The package's layout contracts: production code never imports the test helpers, and README's layout
section names exactly the package's modules and subpackages."""

import ast
import re
from pathlib import Path

import veomni_omni

PACKAGE = Path(veomni_omni.__file__).parent
README = PACKAGE.parent / "README.md"


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_production_code_never_imports_the_test_helpers():
    offenders = {
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if "testing" not in path.relative_to(PACKAGE).parts
        and any(name == "veomni_omni.testing" or name.startswith("veomni_omni.testing.") for name in _imported_modules(path))
    }
    assert not offenders, f"production modules import veomni_omni.testing: {sorted(offenders)}"


def test_readme_layout_matches_the_package():
    section = README.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    listed = set(re.findall(r"^  ([\w.]+/?)\s", block, flags=re.M))
    on_disk = {
        p.name + "/" if p.is_dir() else p.name
        for p in PACKAGE.iterdir()
        if (p.is_dir() and any(p.glob("*.py"))) or (p.suffix == ".py" and p.name != "__init__.py")
    }
    assert listed == on_disk, f"README layout lists {sorted(listed - on_disk)} not in the package; misses {sorted(on_disk - listed)}"
