"""The shape of the code: the modules import each other one way only, as README's architecture
diagram draws it (lazy imports inside functions included), model.py imports none of ours, and
each module and function is short enough to read."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem for p in ROOT.glob("*.py")}


def our_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        found |= {name.split(".")[0] for name in names} & MODULES
    return found - {path.stem}


def readme_rows() -> list[set[str]]:
    """The diagram's rows, top (the whole method) to bottom (foundations), as sets of module names."""
    readme = (ROOT / "README.md").read_text()
    diagram = readme.split("## Architecture", 1)[1].split("```")[1]
    return [set(re.findall(r"(\w+)\.py", line)) for line in diagram.strip().splitlines()]


def test_every_module_imports_only_from_the_rows_below_its_own():
    rows = readme_rows()
    placed = set().union(*rows)
    assert MODULES == placed, f"modules missing from the README's diagram: {MODULES - placed}"
    for level, row in enumerate(rows):
        below = set().union(*rows[level + 1:])
        for module in row:
            wrong = our_imports(ROOT / f"{module}.py") - below
            assert not wrong, f"{module}.py imports {sorted(wrong)}, which are not below it in the diagram"


def test_model_imports_none_of_ours():
    assert our_imports(ROOT / "model.py") == set()


def test_modules_and_functions_stay_short_enough_to_read():
    """The course's measures: model.py reads in one sitting (330 lines), every other module in
    400 (the benchmark's in 450), and no function runs over 60 lines."""
    for path in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py")]:
        source = path.read_text()
        limit = 330 if path.name == "model.py" else 450 if path.parent.name == "bench" else 400
        assert source.count("\n") <= limit, f"{path.name}: {source.count(chr(10))} lines, more than {limit}"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.name}: {node.name}() is {length} lines, more than 60"
