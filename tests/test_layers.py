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
    # 0 foundation: configuration, images in and decisions out, the seam, files, data
    "anomalyclip.utils": 0,
    "anomalyclip.config": 0,
    "anomalyclip.preprocess": 0,
    "anomalyclip.decoding": 0,
    "anomalyclip.postprocess": 0,
    "anomalyclip.predictor": 0,
    "anomalyclip.maps": 0,
    "anomalyclip.metrics": 0,
    "anomalyclip.visualize": 0,
    "anomalyclip.distributed": 0,
    "anomalyclip.data": 0,
    "anomalyclip.inputs": 0,
    "anomalyclip.hub": 0,
    # 1 the CLIP backbone and its loaders
    "anomalyclip.backbone": 1,
    # 2 AnomalyCLIP: prompts, model, checkpoints, the factory
    "anomalyclip.prompts": 2,
    "anomalyclip.model": 2,
    "anomalyclip.baselines": 2,
    "anomalyclip.losses": 2,
    "anomalyclip.checkpoint": 2,
    "anomalyclip.factory": 2,
    "anomalyclip.quantize": 2,
    # 3 scoring methods and engines behind the Predictor seam
    "anomalyclip.methods": 3,
    "anomalyclip.export": 3,
    "anomalyclip.feature_cache": 3,
    # 4 workflows
    "anomalyclip.inference": 4,
    "anomalyclip.inspection_files": 4,
    "anomalyclip.outputs": 4,
    "anomalyclip.report": 4,
    "anomalyclip.calibration": 4,
    "anomalyclip.evaluation": 4,
    "anomalyclip.evaluation_tables": 4,
    "anomalyclip.training": 4,
    "anomalyclip.training_checkpoints": 4,
    # 5 interfaces
    "anomalyclip.cli": 5,
    "anomalyclip.serving": 5,
    "anomalyclip.__main__": 5,
    "anomalyclip": 5,  # the package's public API re-exports everything
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
    tree = ast.parse("from anomalyclip.cli.options import build_model\nimport anomalyclip.model\n")
    targets = [target for _, target in imported(tree, "anomalyclip.backbone.loading")]
    assert targets == ["anomalyclip.cli.options", "anomalyclip.model"]
    assert [layer_of(t) for t in targets] == [5, 2]
    assert layer_of("anomalyclip.backbone.loading") == 1
