"""The import structure of ldm: no cycles between its modules, and Triton only on demand.

A cycle works in Python only as long as the modules happen to be imported in one order, and
it makes the layers (kernels <- models <- config <- pipeline <- loader <- cli) unreadable. The
graph is read from the source, with the imports inside functions too (a lazy import still
ties two modules together).
"""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted((ROOT / "ldm").rglob("*.py"))}


def imported(node, importer):
    """The ldm modules an import statement names. `from package import name` counts as the
    submodule package.name when there is one, else as the package."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    package = node.module or ""
    if node.level:  # relative: from the importer's package, up level - 1 more
        here = importer.split(".")
        here = here if MODULES[importer].name == "__init__.py" else here[:-1]
        package = ".".join(here[: len(here) - node.level + 1] + ([package] if package else []))
    return [f"{package}.{a.name}" if f"{package}.{a.name}" in MODULES else package
            for a in node.names]


def import_graph():
    """{module: set of the ldm modules it imports, anywhere in its code}."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = {target for node in ast.walk(tree) for target in imported(node, name)
                       if target in MODULES and target != name}
    return graph


def find_cycle(graph):
    """One cycle as a list of modules [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []  # state: 1 on the current path, 2 finished

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_the_kernel_layering():
    """A check that the reader finds imports at all: the dispatchers' lazy imports included."""
    graph = import_graph()
    assert "ldm.kernels.flash_attention" in graph["ldm.kernels.attention"]
    assert graph["ldm.kernels.flash_attention"] == {"ldm.kernels.checks"}
    assert "ldm.kernels.switch" in graph["ldm.kernels.group_norm"]


def test_ldm_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_import_ldm_does_not_import_triton():
    """CPU users do not pay for Triton: the kernels import it on their first Triton call."""
    script = ("import sys, torch, ldm, ldm.kernels\n"
              "x = torch.randn(1, 2, 4, 8)\n"
              "ldm.kernels.attention(x, x, x)\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton'))\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
