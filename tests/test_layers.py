"""Imports point one way: foundation < backbone < model < methods < workflows < interfaces.

A module may import its own layer and those below it, never one above (lazy imports
inside functions and ``TYPE_CHECKING`` blocks count too: they are dependencies all the
same). ``docs/architecture.md`` draws the same picture. A new module must be placed in a
layer here, so its place is a decision, not an accident.
"""

from __future__ import annotations

import ast
from pathlib import Path

import anomalyclip

PACKAGE = Path(anomalyclip.__file__).parent

LAYERS: dict[str, int] = {
    # 0 foundation: images in and decisions out, the seam, files, data, downloads
    "anomalyclip.utils": 0,
    "anomalyclip.preprocess": 0,
    "anomalyclip.input_settings": 0,
    "anomalyclip.colormaps": 0,
    "anomalyclip.decoding": 0,
    "anomalyclip.png_reduced": 0,
    "anomalyclip.postprocess": 0,
    "anomalyclip.predictor": 0,
    "anomalyclip.maps": 0,
    "anomalyclip.visualize": 0,
    "anomalyclip.distributed": 0,
    "anomalyclip.data": 0,
    "anomalyclip.inputs": 0,
    "anomalyclip.hub": 0,
    # 1 backbones and their loaders
    "anomalyclip.backbone": 1,
    # 2 scoring methods behind the Predictor seam, one folder each, and their assembly
    "anomalyclip.methods": 2,
    # 3 workflows
    "anomalyclip.inspection": 3,
    "anomalyclip.calibration": 3,
    "anomalyclip.evaluation": 3,
    # 4 interfaces
    "anomalyclip.cli": 4,
    "anomalyclip.serving": 4,
    "anomalyclip.__main__": 4,
    "anomalyclip": 4,  # the package's public API re-exports everything
}
# What a lower layer may take from the package root without importing its API.
ROOT_NAMES_ALLOWED = {"__version__"}


def layer_of(module: str) -> int:
    best = max(
        (name for name in LAYERS if module == name or module.startswith(name + ".")),
        key=len,
        default=None,
    )
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return LAYERS[best]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """(line, module) for every import of an anomalyclip module in ``tree``."""
    found = []
    package = module if module == "anomalyclip" or module.endswith(("cli", "serving")) else None
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("anomalyclip")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                anchor = (package or module).split(".")
                base = ".".join(anchor[: len(anchor) - node.level + 1] + [node.module])
            if not base.startswith("anomalyclip"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if base == "anomalyclip" and alias.name in ROOT_NAMES_ALLOWED:
                    continue
                is_module = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py")
                folder = PACKAGE.parent / candidate.replace(".", "/")
                found.append(
                    (node.lineno, candidate if is_module.exists() or folder.is_dir() else base)
                )
    return found


def test_every_import_points_down_or_sideways():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        own = layer_of(module)
        for line, target in imported(ast.parse(path.read_text()), module):
            if layer_of(target) > own:
                violations.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {module} (layer {own}) "
                    f"imports {target} (layer {layer_of(target)})"
                )
    assert not violations, "imports pointing up:\n" + "\n".join(violations)


def test_the_check_catches_an_upward_import():
    tree = ast.parse(
        "from anomalyclip.cli.options import build_model\n"
        "import anomalyclip.methods.anomalyclip.model\n"
    )
    targets = [target for _, target in imported(tree, "anomalyclip.backbone.loading")]
    assert targets == ["anomalyclip.cli.options", "anomalyclip.methods.anomalyclip.model"]
    assert [layer_of(t) for t in targets] == [4, 2]
    assert layer_of("anomalyclip.backbone.loading") == 1
