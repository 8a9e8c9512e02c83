"""The package's dependencies point one way (README, "How the code is laid out"):
read from the source with ast, so that a change that bends them fails here."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "codeq")


def _modules() -> dict:
    """{dotted module name: path} of every module of the package."""
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(ROOT))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _imports(path: str):
    """(codeq module imported, whether the import is inside a function) of every import statement."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names if a.name.split(".")[0] == "codeq")
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "codeq":
                for a in child.names:  # `from codeq import reference` imports the module codeq.reference
                    sub = f"{child.module}.{a.name}"
                    found.append((sub if sub in MODULES or sub == "codeq._C" else child.module, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


GRAPH = {m: sorted({target for target, _ in _imports(p) if target != m}) for m, p in MODULES.items()}


def test_no_import_of_codeq_inside_a_function():
    """Every dependency is declared at the top of its module: none hides a cycle."""
    bad = [(m, target) for m, p in MODULES.items() for target, in_function in _imports(p) if in_function]
    assert not bad, f"codeq imported inside a function: {bad}"


def test_the_import_graph_has_no_cycle():
    state = {}

    def walk(m, stack):
        state[m] = "open"
        for t in GRAPH.get(m, []):
            if state.get(t) == "open":
                pytest.fail(f"import cycle: {' -> '.join(stack[stack.index(t):] + [t])}")
            if t not in state:
                walk(t, stack + [t])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            walk(m, [m])


@pytest.mark.parametrize("leaf", ["codeq.registry", "codeq.reference", "codeq.errors", "codeq._io", "codeq._digest", "codeq._env"])
def test_leaves_import_nothing_of_codeq(leaf):
    assert GRAPH[leaf] == [], f"{leaf} imports {GRAPH[leaf]}"


def test_only_the_fallback_imports_the_reference():
    """codeq.reference is the oracle: the quantizers and loss terms fall back to it
    where the kernels do not run; nothing else in the package may lean on it."""
    users = sorted(m for m, targets in GRAPH.items() if "codeq.reference" in targets)
    assert users == ["codeq.losses", "codeq.quantizers"], users


@pytest.mark.parametrize("module", ["codeq.report", "codeq.export", "codeq.onnx_export", "codeq.checkpoint", "codeq.models"])
def test_report_and_export_do_not_need_the_trainer(module):
    """Everything a checkpoint needs to become a model again lives below the trainer."""
    def reach(m, seen):
        for t in GRAPH.get(m, []):
            if t not in seen:
                seen.add(t)
                reach(t, seen)
        return seen

    trainer = sorted(t for t in reach(module, set()) if t == "codeq.train" or t.startswith("codeq.train."))
    assert not trainer, f"{module} reaches {trainer}"
