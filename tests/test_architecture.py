"""The package's shape: no import cycle, at most 8 layers, and the billing mode read in one place.

The import graph of agent/ is built with `ast` from every `import agent...` and `from agent... import
...` (and relative imports), at module level or inside a function, so a cycle cannot hide in a
lazy import. A module's layer is the longest chain of imports below it: 0 for a module that imports
no agent module, 1 + the highest layer it imports otherwise.

`python tests/test_architecture.py [PATH_TO_AGENT]` prints the layers, the longest chain and the
cycles of any checkout (e.g. an older one).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

AGENT = Path(__file__).resolve().parent.parent / "agent"
MAX_LAYER = 8  # `agent.__main__ -> agent.cli -> a command -> ... -> agent.errors`: 8 imports
# The one place that reads the config's `mode:` (and SaaS mode its own section); the config
# itself. Everything else is handed the Mode (agent/modes/mode.py) chosen there.
MODE_READERS = ("agent.config", "agent.modes.choose", "agent.modes.saas")


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the package at `root` (the agent/ folder) by dotted name."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement brings in (relative ones resolved)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]


def import_graph(root: Path = AGENT) -> dict[str, set[str]]:
    """Module -> the agent modules it imports. `from agent.x import y` counts as importing
    agent.x.y when that is a module, else agent.x."""
    names = module_names(root)
    graph: dict[str, set[str]] = {}
    for module, path in names.items():
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            found = _imported(node, module, is_package)
            if isinstance(node, ast.ImportFrom) and found:
                prefix, members = found[0], found[1:]
                modules = [m for m in members if m in names]
                found = modules if len(modules) == len(members) else [prefix, *modules]
            for name in found:
                while name and name not in names:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    deps.add(name)
        graph[module] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def layers(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's layer. A cycle's modules share one layer (the cycle counted as one node),
    so an older, cyclic graph can still be measured."""
    component = {m: m for m in graph}
    for members in cycles(graph):
        for m in members:
            component[m] = members[0]
    done: dict[str, int] = {}

    def layer(c: str) -> int:
        if c not in done:
            done[c] = -1  # in progress (a cycle is one node: never re-entered)
            below = {component[d] for m in graph if component[m] == c for d in graph[m]} - {c}
            done[c] = 1 + max((layer(d) for d in below), default=-1)
        return done[c]

    return {m: layer(component[m]) for m in graph}


def longest_chain(graph: dict[str, set[str]], layer: dict[str, int]) -> list[str]:
    """One chain of imports as long as the top module's layer, top first."""
    top = max(graph, key=lambda m: (layer[m], m))
    chain = [top]
    while graph[chain[-1]]:
        below = [d for d in graph[chain[-1]] if d not in chain]
        if not below:
            break
        chain.append(max(below, key=lambda d: (layer[d], d)))
    return chain


def report(graph: dict[str, set[str]]) -> str:
    layer = layers(graph)
    lines = [f"{len(graph)} modules, layers 0..{max(layer.values())}"]
    for n in range(max(layer.values()) + 1):
        at = sorted(m for m in graph if layer[m] == n)
        lines.append(f"  layer {n} ({len(at)}): {', '.join(at)}")
    lines.append("longest chain: " + " -> ".join(longest_chain(graph, layer)))
    for members in cycles(graph):
        lines.append("cycle: " + ", ".join(members))
    return "\n".join(lines)


def test_no_import_cycle() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, (
        "import cycles:\n" + "\n".join(", ".join(c) for c in found) + "\n" + report(graph)
    )


def test_at_most_eight_layers() -> None:
    graph = import_graph()
    layer = layers(graph)
    over = sorted(m for m in graph if layer[m] > MAX_LAYER)
    assert not over, f"modules above layer {MAX_LAYER}: {', '.join(over)}\n" + report(graph)


def test_the_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The graph is only as good as what it finds: module and function level, `import x`, `from x
    import y`, a module imported by name from its package, relative imports."""
    pkg = tmp_path / "agent"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("import agent.low\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "sub" / "c.py").write_text("from agent.sub import b\nfrom ..low import x\n")
    (pkg / "top.py").write_text("from agent.sub.c import thing\n")
    graph = import_graph(pkg)
    assert graph["agent.sub.a"] == {"agent.low"}
    assert graph["agent.sub.b"] == {"agent.sub.a"}
    assert graph["agent.sub.c"] == {"agent.sub.b", "agent.low"}
    assert graph["agent.top"] == {"agent.sub.c"}
    assert layers(graph)["agent.top"] == 4
    (pkg / "low.py").write_text("from agent import top\n")
    assert cycles(import_graph(pkg)) == [["agent.low", "agent.sub.a", "agent.sub.b", "agent.sub.c",
                                          "agent.top"]]  # fmt: skip


def _reads_the_mode(node: ast.AST) -> bool:
    """`<config>.mode`, or `<config>.saas is (not) None`: asking which mode a config is."""

    def configish(value: ast.AST) -> bool:
        name = value.id if isinstance(value, ast.Name) else getattr(value, "attr", "")
        return name in ("config", "cfg", "new", "old") or name.endswith("config")

    if isinstance(node, ast.Attribute) and node.attr == "mode":
        return configish(node.value)
    if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute):
        left = node.left
        none = any(isinstance(c, ast.Constant) and c.value is None for c in node.comparators)
        return left.attr == "saas" and none and configish(left.value)
    return False


def test_the_mode_is_read_in_one_place() -> None:
    """A mode is chosen once, at the top (modes.choose.mode_for), and handed down as a Mode."""
    readers = []
    for module, path in module_names(AGENT).items():
        if module.startswith(MODE_READERS):
            continue
        tree = ast.parse(path.read_text(), str(path))
        readers += [f"{module}:{n.lineno}" for n in ast.walk(tree) if _reads_the_mode(n)]
    assert not readers, f"the config's mode read outside agent/modes/choose.py: {readers}"


def test_every_module_imports_on_its_own() -> None:
    """Each module imported first, in a fresh set of agent modules: a package __init__ that
    imports its own modules could otherwise hide a cycle the graph above does not show."""
    names = [m for m in module_names(AGENT) if m != "agent.__main__"]
    script = (
        "import importlib, sys\n"
        "bad = []\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'agent' or m.startswith('agent.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=AGENT.parent,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


if __name__ == "__main__":
    print(report(import_graph(Path(sys.argv[1]) if len(sys.argv) > 1 else AGENT)))
