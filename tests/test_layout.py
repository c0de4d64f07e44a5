"""The house in wings: each wing imports only from the wings below it (DESIGN.md)."""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlx_glm4v"

# Lower numbers are further down the data's way; a module may import from its own wing and from
# lower ones. Wings on the same floor know nothing of each other.
FLOORS = {
    "errors": 0,
    "models": 1,
    "inputs": 1,
    "generation": 2,
    "checkpoints": 2,
    "tuning": 3,
    "serving": 3,
    "documents": 3.5,  # above the engine (regions become its requests), below the server
    "server": 4,
    "terminal": 5,
    "commands": 5.5,  # one module per command (or family); cli.py registers them
    "cli": 6,
    "__main__": 7,
    "__init__": 7,
}


def wing_of(module: list) -> str:
    """The wing a module (its dotted name under the package, as a list) belongs to."""
    return module[0] if module else "__init__"


def imports(path: Path):
    """(line, the imported module's dotted name under the package) for each import of ours."""
    module = list(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = base + (node.module.split(".") if node.module else [node.names[0].name])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlx_glm4v"):
            target = node.module.split(".")[1:] or [node.names[0].name]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1:] for a in node.names if a.name.startswith("mlx_glm4v.")]
            yield from ((node.lineno, n) for n in names)
            continue
        else:
            continue
        yield node.lineno, target


def test_every_module_is_in_a_wing():
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        assert wing_of(parts) in FLOORS, f"{path.relative_to(PACKAGE)} is in no wing of FLOORS"


def test_no_wing_imports_from_above_or_beside_it():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        wing = wing_of(parts)
        for line, target in imports(path):
            other = wing_of(target)
            if other not in FLOORS:  # e.g. `from mlx_glm4v import load`: the door, from inside
                wrong.append(
                    f"{path.relative_to(PACKAGE)}:{line} ({wing}) imports {other} from the top"
                )
            elif other != wing and FLOORS[other] >= FLOORS[wing]:
                wrong.append(
                    f"{path.relative_to(PACKAGE)}:{line} ({wing}) imports {'.'.join(target)}"
                )
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule is checked on real source: a model module importing the engine, and a generation
    module importing the public API from the top, are both caught."""
    fake = tmp_path / "mlx_glm4v"
    (fake / "models").mkdir(parents=True)
    (fake / "generation").mkdir()
    (fake / "models" / "bad.py").write_text("from ..serving.engine import Engine\n")
    (fake / "generation" / "bad.py").write_text("x = 1\nfrom mlx_glm4v import load\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    try:
        test_no_wing_imports_from_above_or_beside_it()
    except AssertionError as e:
        assert "models/bad.py:1 (models) imports serving.engine" in str(e)
        assert "generation/bad.py:2 (generation) imports load from the top" in str(e)
    else:
        raise AssertionError("an upward import went unnoticed")


def test_public_names_resolve_from_the_package():
    """Every name the package offers imports from its top, whatever wing holds it; `generate` and
    `convert` stay the functions after their modules are imported."""
    import mlx_glm4v
    import mlx_glm4v.checkpoints.convert  # noqa: F401
    import mlx_glm4v.generation.generate  # noqa: F401

    for name in mlx_glm4v.__all__:
        assert getattr(mlx_glm4v, name) is not None, name
    assert callable(mlx_glm4v.generate) and callable(mlx_glm4v.convert)
    assert mlx_glm4v.distributed.__name__ == "mlx_glm4v.serving.distributed"
    from mlx_glm4v import Constraint, batch_generate, generate, load, split_reply  # noqa: F401
