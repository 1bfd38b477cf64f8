"""The package's shape, as docs/architecture.md draws it: layers import downward only, no two
modules import each other (counting imports inside functions, which hide cycles from Python,
and the package __init__ files an import runs), and the run folder's file names are spelled in
one module (the run files' schema)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tiedmask"
BENCHMARKS = PACKAGE.parents[1] / "benchmarks"
LAYERS = ("core", "training", "analysis", "experiments")  # each may import the ones before it
RUN_FILES = {"config.json", "metrics.jsonl", "result.json", "checkpoint.json", "data.json", "requested.yaml",
             "tokenizer.json", "corpus.json"}
SPELLED_BY = {"training/run_schema.py"}  # the run files' schema; rundir.py and checkpoint.py export them
HF_FOLDER = {"training/lm.py": "config.json"}  # a save_pretrained folder's, not a run's


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports_of(path: Path) -> set[str]:
    """The tiedmask modules `path` imports, at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tiedmask"):
            target = node.module
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tiedmask"))
            continue
        else:
            continue
        # `from .deq import solvers` imports the module deq.solvers; `from .spec import X`, spec
        for alias in node.names:
            found.add(f"{target}.{alias.name}" if is_module(f"{target}.{alias.name}") else target)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules importing it runs: those it names, and the packages above each
    (importing a.b.c runs a/__init__ and a/b/__init__ first). The top package is left out: its
    __init__ gathers the public names, so every module would reach it."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        runs = set()
        for target in imports_of(path):
            parts = target.split(".")
            runs.update(".".join(parts[:n]) for n in range(2, len(parts) + 1))
        graph[module_name(path)] = runs - {module_name(path)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_two_modules_import_each_other_even_inside_functions():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_import_downward_only():
    def layer(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None

    upward = [f"{module} -> {target}" for module, targets in import_graph().items() for target in targets
              if layer(module) and layer(target) and LAYERS.index(layer(target)) > LAYERS.index(layer(module))]
    assert upward == []


def names_a_run_file(value, allowed: str | None) -> bool:
    """A constant that is a run file's name or a path or pattern ending in one ("*/config.json")."""
    return isinstance(value, str) and any(value == name or value.endswith("/" + name)
                                          for name in RUN_FILES - {allowed})


def test_run_file_names_are_spelled_in_one_module():
    spelled = []
    for path in [*PACKAGE.rglob("*.py"), *BENCHMARKS.glob("*.py")]:
        where = path.relative_to(PACKAGE).as_posix() if path.is_relative_to(PACKAGE) else path.name
        if where in SPELLED_BY:
            continue
        spelled += [f"{where}:{node.lineno} {node.value}" for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Constant) and names_a_run_file(node.value, HF_FOLDER.get(where))]
    assert spelled == []
