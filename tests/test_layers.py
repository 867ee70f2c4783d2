"""Imports point one way: core <- sql <- io <- model <- inference <- tables <- spark <- pipeline <- jobs.

pyspark/delta only in tables/, spark/ and pipeline/; torch/open_clip never in core/ or io/.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mumic_batch"

LAYERS = ["core", "sql", "io", "model", "inference", "tables", "spark", "pipeline"]
SPARK_LIBS = {"pyspark", "delta"}
TORCH_LIBS = {"torch", "torchvision", "open_clip", "safetensors"}
FORBIDDEN_LIBS = {
    "core": SPARK_LIBS | TORCH_LIBS | {"boto3", "botocore"},
    "sql": SPARK_LIBS | TORCH_LIBS,
    "io": SPARK_LIBS | TORCH_LIBS,
    "model": SPARK_LIBS,
    "inference": SPARK_LIBS,
    "tables": TORCH_LIBS,
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def layer_files(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_point_down(layer):
    allowed_below = set(LAYERS[: LAYERS.index(layer) + 1])
    for path in layer_files(layer):
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert top not in FORBIDDEN_LIBS.get(layer, set()), f"{path.relative_to(ROOT)} imports {name}"
            parts = name.split(".")
            if top == "mumic_batch" and len(parts) > 1 and parts[1] in LAYERS:
                assert parts[1] in allowed_below, f"{path.relative_to(ROOT)} imports {name} (upward)"


def test_config_is_pure():
    names = {n.split(".")[0] for n in imported_modules(PACKAGE / "config.py")}
    assert not names & (SPARK_LIBS | TORCH_LIBS)


def test_every_layer_has_code():
    for layer in LAYERS:
        assert any(p.name != "__init__.py" for p in layer_files(layer)), layer
