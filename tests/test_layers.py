"""The package's architecture, checked from its source: the import graph has no cycle, the data
path runs one way (a module imports only modules of its own layer or below), and the forward +
backward loop under Capture exists once."""
import ast
import re
from pathlib import Path

import pytest

import influence_nb

ROOT = Path(influence_nb.__file__).parent

# bottom to top; a module may import its own layer (without a cycle) or any layer below
LAYERS = [
    {"data", "task", "batching", "layers", "hooks", "store", "spill", "distributed", "checks", "quiet",
     "progress", "training", "demo", "demo.vocabulary", "demo.velnish", "demo.world", "demo.build",
     "demo.loader", "demo.finetune"},
    {"passes"},
    {"statistics"},
    {"curvature"},
    {"queries"},
    {"scoring", "projection", "tokens", "sketch", "trainer", "validate", "validate.agreement",
     "validate.toy", "validate.exact", "validate.bregman", "validate.counterfactual",
     "validate.replay", "validate.ensemble"},
    {"index", "search", "calibration", "plan"},
    {"results", "session", "retriever"},
    {"widgets", "view", "snapshot", "style", "charts", "magics", "rows", "__main__", "cli",
     "cli.__main__", "cli.main", "cli.core", "cli.inputs", "cli.fit", "cli.plan", "cli.sketch",
     "cli.score", "cli.search", "cli.validate", "cli.demo"},
]
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(path: Path, module: str) -> set[str]:
    """Package modules imported anywhere in the file (functions included), except under
    ``if TYPE_CHECKING:`` (annotations only: never executed)."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    package = [] if package == ["__init__"] else package
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from . import x / from ..data import y
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
                if node.module:
                    found.add(".".join(target))
                for alias in node.names:  # from . import distributed: a module
                    name = ".".join(target + [alias.name])
                    if (ROOT / Path(*name.split("."))).with_suffix(".py").exists() or \
                            (ROOT / Path(*name.split("."))).is_dir():
                        found.add(name)
            elif node.module and node.module.startswith("influence_nb"):
                found.add(node.module.removeprefix("influence_nb").lstrip(".") or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("influence_nb"):
                    found.add(alias.name.removeprefix("influence_nb").lstrip(".") or "__init__")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m or "__init__" for m in found} - {module}


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p, _module(p)) for p in ROOT.rglob("*.py")}


def test_every_module_has_a_layer():
    modules = set(_graph()) - {"__init__", "demo"}
    assert modules - set(LAYER) == set(), "give each new module a layer in tests/test_layers.py"


def test_import_graph_has_no_cycle():
    graph = {m: deps - {"__init__"} for m, deps in _graph().items()}
    state: dict[str, int] = {}

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " → ".join(path[path.index(d):] + [m, d])
                            if d in path else f"import cycle through {m} → {d}")
            if d not in state:
                walk(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [])


def test_layers_run_one_way():
    upward = [f"{m} (layer {LAYER[m]}) imports {d} (layer {LAYER[d]})"
              for m, deps in _graph().items() if m in LAYER
              for d in deps if d in LAYER and LAYER[d] > LAYER[m]]
    assert not upward, "\n".join(upward)
    assert "__init__" not in {d for m, deps in _graph().items() if m != "__init__" for d in deps}, \
        "a module imports the package itself (a hidden edge to the top)"


def test_the_capture_loop_exists_once():
    """Capture(...) is constructed only by the pass module: every computation over a corpus is
    a consumer of passes.corpus_pass (validate's references use plain autograd)."""
    def calls(name: str) -> list[str]:  # modules whose code (not docstrings) calls ``name``
        return sorted(_module(p) for p in ROOT.rglob("*.py") if any(
            isinstance(n, ast.Call) and name in (getattr(n.func, "id", None),
                                                 getattr(n.func, "attr", None))
            for n in ast.walk(ast.parse(p.read_text()))))

    assert calls("Capture") == ["passes"]
    # the autograd references: the exact Fisher's per-sequence gradients and the PBRF's solves
    assert calls("enable_grad") == ["passes", "validate.bregman", "validate.exact"]
    assert not any(re.search(r"\bCapture\(", p.read_text())
                   for p in (ROOT / "validate").glob("*.py"))


def test_the_checker_sees_edges():
    """The parser finds relative, absolute, aliased and function-level imports."""
    graph = _graph()
    assert {"passes", "store", "distributed", "layers", "task"} <= graph["curvature"]
    assert "retriever" in graph["session"]           # imported inside a method
    assert "data" in graph["demo.loader"]             # from ..data import Corpus
    assert "session" not in graph["retriever"]        # only under TYPE_CHECKING
