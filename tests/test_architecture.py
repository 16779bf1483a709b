"""The shape of the package, checked: no import circles (every import counts, lazy and
``TYPE_CHECKING`` ones included), no function over a screen and a half, and a command
line that answers without importing torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import anomalyclip

PACKAGE = Path(anomalyclip.__file__).parent
LONGEST_FUNCTION = 100


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules ``path`` imports, wherever the import stands."""
    name = module_name(path)
    anchor = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
            found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    targets = set()
    for target in found:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target not in (name, "anomalyclip"):
            targets.add(target)
    return targets


def import_circles() -> list[list[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imports_of(path, set(paths)) for name, path in paths.items()}
    circles, done = [], set()
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for target in sorted(graph[node]):
                if target == start:
                    circles.append(trail)
                elif target not in trail and target not in done:
                    stack.append((target, [*trail, target]))
        done.add(start)
    return circles


def test_no_import_circles():
    assert import_circles() == []


def test_the_circle_check_finds_a_circle(monkeypatch):
    real = imports_of
    fake = {
        "anomalyclip.predictor": {"anomalyclip.maps"},
        "anomalyclip.maps": {"anomalyclip.predictor"},
    }

    def with_a_circle(path: Path, modules: set[str]) -> set[str]:
        return fake.get(module_name(path), real(path, modules))

    monkeypatch.setitem(globals(), "imports_of", with_a_circle)
    assert ["anomalyclip.maps", "anomalyclip.predictor"] in import_circles()


def test_no_function_is_longer_than_a_screen_and_a_half():
    long = [
        f"{path.relative_to(PACKAGE.parent)}:{node.name} {node.end_lineno - node.lineno + 1} lines"
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION
    ]
    assert long == []


def test_the_command_line_loads_without_torch():
    """``import anomalyclip.cli`` does not wait seconds for torch."""
    probe = "import anomalyclip.cli, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_building_the_parser_loads_no_torch():
    """Every command's parser, with its choices (dataset kinds, presets, bank dtypes),
    is built without torch: the lists it shows come from torch-free modules."""
    probe = (
        "import sys; from anomalyclip.cli import build_parser; parser = build_parser(); "
        "assert 'torch' not in sys.modules, 'torch loaded'; "
        "commands = parser._subparsers._group_actions[0].choices; "
        "assert {'predict', 'test', 'train', 'watch'} <= set(commands)"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_help_loads_no_torch():
    """``anomalyclip --help`` and a command's ``--help`` print their usage and exit 0
    without importing torch (``-X importtime`` lists every module imported)."""
    for argv in (["--help"], ["test", "--help"], ["predict", "--help"]):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "anomalyclip", *argv],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "usage: anomalyclip" in done.stdout
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
        assert "anomalyclip.cli" in imported
        assert "torch" not in imported, argv


def test_the_package_root_loads_its_names_on_first_use():
    code = (
        "import sys, anomalyclip; assert 'torch' not in sys.modules; "
        "from anomalyclip import AnomalyCLIP, PredictorSpec, assemble, inspect, MuSc; "
        "assert AnomalyCLIP.__module__ == 'anomalyclip.methods.anomalyclip.model'; "
        "assert callable(inspect) and callable(assemble); "
        "assert sorted(anomalyclip.__all__) == anomalyclip.__all__"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
