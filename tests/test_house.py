"""The package's dependency rule, checked by parsing every import (docs/architecture.md).

Rooms, lowest first: layers -> optimizers -> models -> training, data -> distribution, hub,
evaluation -> the command-line modules at the package root. A module may import its own room
and any lower one; no module imports another module's `_private` name.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "keras_glam"

RANK = {
    "layers": 0,
    "optimizers": 1,
    "models": 2,
    "training": 3,
    "data": 3,
    "distribution": 4,
    "hub": 4,
    "evaluation": 4,
}
# Shared helpers below every room (atomic files, hashing) and the package root's re-exports.
UNRANKED = {"utils", "version"}


def _imports(path):
    """(line, imported module, imported names) of every absolute keras_glam import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "keras_glam" or node.module.startswith("keras_glam."):
                yield node.lineno, node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("keras_glam."):
                    yield node.lineno, alias.name, []


def _violations(package=PACKAGE):
    found = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package.parent).with_suffix("")
        parts = relative.parts
        here = parts[1] if len(parts) > 2 else None  # None: a root module (CLI or __init__)
        for line, module, names in _imports(path):
            target_parts = module.split(".")
            there = target_parts[1] if len(target_parts) > 1 else None
            where = f"{relative}.py:{line}"
            if here in RANK and there is not None and there not in UNRANKED:
                if there not in RANK:
                    found.append(f"{where} imports {module}, above every room")
                elif RANK[there] > RANK[here]:
                    found.append(f"{where} imports {module} (room '{there}' is above '{here}')")
            for name in names:
                if name.startswith("_") and not name.startswith("__") and there != here:
                    found.append(f"{where} imports the private name {module}.{name}")
    return found


def test_imports_point_one_way_and_leave_private_names_alone():
    assert _violations() == []


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself can fail: an upward import and a private import are reported."""
    fake = tmp_path / "keras_glam"
    (fake / "layers").mkdir(parents=True)
    (fake / "layers" / "bad.py").write_text(
        "from keras_glam.training.trainer import Trainer\n"
        "from keras_glam.models.thing import _hidden\n"
    )
    found = _violations(fake)
    assert len(found) == 3, found
    assert "room 'training' is above 'layers'" in found[0]
    assert "private name keras_glam.models.thing._hidden" in found[2]


@pytest.mark.parametrize("room", sorted(RANK))
def test_every_room_exists(room):
    assert (PACKAGE / room / "__init__.py").is_file()
