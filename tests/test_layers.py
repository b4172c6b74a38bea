"""The package layering of docs/INTERFACES.md, read from the import statements (function-level ones too):
models/ and data/ stand alone, models/ knows no sharding library, pretrain/ has no import cycle, and each
pretrain/ module imports only its own row of the documented layer table and those below it."""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imports(package: str) -> dict[str, set[str]]:
    """Module -> the modules it imports (absolute names, `from a import b` as a.b where that is a module)."""
    graph = {}
    for path in sorted((REPO / package).rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    is_module = (REPO / (full.replace(".", "/") + ".py")).exists()
                    deps.add(full if is_module else node.module)
        graph[module] = deps - {module}
    return graph


def top_levels(graph: dict[str, set[str]]) -> set[str]:
    return {dep.split(".")[0] for deps in graph.values() for dep in deps}


@pytest.mark.parametrize("package, forbidden", [
    ("models", {"pretrain", "data", "deepspeed", "fairscale"}),
    ("data", {"pretrain", "models"}),
])
def test_lower_packages_import_nothing_above_them(package, forbidden):
    assert not top_levels(imports(package)) & forbidden


def test_pretrain_has_no_import_cycle():
    graph = imports("pretrain")
    graph = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            assert state.get(dep) != 1, " -> ".join([*path, module, dep])
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def documented_layers() -> list[list[str]]:
    """The pretrain/ layer table of docs/INTERFACES.md, top row first: the module names of each row."""
    text = (REPO / "docs" / "INTERFACES.md").read_text()
    table = text.split("## pretrain/", 1)[1].split("```\n", 2)[1]
    return [[name.strip().rstrip("/") for name in re.split(r"\s{2,}", line)[0].split(",")]
            for line in table.splitlines() if line.strip()]


def test_pretrain_modules_import_only_their_layer_and_below():
    rows = documented_layers()
    graph = {m: deps for m, deps in imports("pretrain").items() if m != "pretrain"}

    def row_of(module: str) -> int:
        hits = [i for i, names in enumerate(rows) for name in names
                if module == f"pretrain.{name}" or module.startswith(f"pretrain.{name}.")]
        assert len(hits) == 1, f"{module} is in {len(hits)} rows of the layer table in docs/INTERFACES.md"
        return hits[0]

    for module, deps in graph.items():
        row_of(module)  # every module has its row
        for dep in sorted(deps & graph.keys()):
            assert row_of(dep) >= row_of(module), f"{module} imports {dep}, a layer above it (docs/INTERFACES.md)"
