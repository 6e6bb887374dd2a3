"""Which package may import which (docs/architecture.md, "Layering"):

    common   <- everything (imports none of the others)
    storage  <- node, cli
    node     <- cli
    molre    <- cli, and node only lazily where the model is used (ALLOWED_LAZY)

The service (node/, storage/) must start without the ML stack: importing any of its modules
loads neither molre nor torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "storage", "node", "cli", "molre")
#: what each package may import at all (module level or inside a function)
MAY_IMPORT = {
    "common": set(),
    "storage": {"common"},
    "node": {"common", "storage", "molre"},  # molre: lazily, ALLOWED_LAZY only
    "cli": {"common", "storage", "node", "molre"},
    "molre": {"common"},
}
#: node modules that import molre inside a function, and why
ALLOWED_LAZY = {
    "node/worker.py",  # the model interface: runs in the inference process
    "node/notify.py",  # finding codes from the catalog (no torch)
    "node/pull.py",  # dataset export (`molre-node dataset pull`): manifest and labels
}


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "migrations" not in p.parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level package, at module level?) of every import statement in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module_level = {id(n) for n in tree.body}
    module_level |= {
        id(n) for top in tree.body if isinstance(top, (ast.If, ast.Try)) for n in ast.walk(top)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out += [(n.split(".")[0], id(node) in module_level) for n in names]
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_what_it_may(package: str) -> None:
    wrong = []
    for path in _modules(package):
        rel = path.relative_to(ROOT).as_posix()
        for top, module_level in _imports(path):
            if top not in PACKAGES or top == package:
                continue
            if top not in MAY_IMPORT[package]:
                wrong.append(f"{rel} imports {top}")
            elif package == "node" and top == "molre" and (module_level or rel not in ALLOWED_LAZY):
                wrong.append(
                    f"{rel} imports molre"
                    + (" at module level" if module_level else " (not in ALLOWED_LAZY)")
                )
    assert not wrong, "\n".join(wrong)


def test_service_modules_load_neither_molre_nor_torch() -> None:
    names = [
        p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
        for pkg in ("common", "storage", "node")
        for p in _modules(pkg)
    ]
    names = [n.removesuffix(".__init__") for n in names]
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "                        if m.split('.')[0] in ('molre', 'torch'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [], "loaded by node/storage"
    assert len(names) > 30  # the scan found the modules


def test_the_scan_sees_a_violation(tmp_path: Path) -> None:
    """The AST scan finds module-level and function-level imports (the test can fail)."""
    f = tmp_path / "m.py"
    f.write_text("import node.x\ndef f():\n    from molre.catalog import C\n")
    assert _imports(f) == [("node", True), ("molre", False)]
