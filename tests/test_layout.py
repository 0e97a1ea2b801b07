"""The import graph of the project (nano4d/, kernels/, train_*.py), read with ast: module-level and
function-level imports. No cycles; no upward imports (kernels never import nano4d; model files import only
torch, kernels and the standard library; data modules import only nano4d.cameras, nano4d.files and each other; nothing
imports a training script); no function-level imports of project modules."""
import ast
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FILES = ("nano4d.mum", "nano4d.geolrm", "nano4d.mim4d")
BOTTOM = ("nano4d.cameras", "nano4d.files")        # import no project module
# Function-level project imports that predate this test, in files owned elsewhere; remove entries as they go.
KNOWN_FUNCTION_LEVEL: set = set()


def _project_files() -> dict:
    files = glob.glob(os.path.join(ROOT, "nano4d", "**", "*.py"), recursive=True)
    files += glob.glob(os.path.join(ROOT, "kernels", "**", "*.py"), recursive=True)
    files += glob.glob(os.path.join(ROOT, "train_*.py"))
    mods = {}
    for f in files:
        rel = os.path.relpath(f, ROOT)[:-3].split(os.sep)
        if rel[-1] == "__init__":
            rel = rel[:-1]
        mods[".".join(rel)] = f
    return mods


def _imports(path: str, modname: str, mods: dict):
    """-> list of (imported module name, is_function_level, lineno) for every import in the file."""
    tree = ast.parse(open(path).read(), path)
    out = []
    is_pkg = path.endswith("__init__.py")

    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            func = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, in_func, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = modname.split(".") if is_pkg else modname.split(".")[:-1]
                    pkg = pkg[:len(pkg) - child.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    out.append((sub if sub in mods else base, in_func, child.lineno))
            visit(child, func)
    visit(tree, False)
    return out


def _resolve(name: str, mods: dict):
    """The project module an import refers to (longest known prefix), or None for third-party / stdlib."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        cand = ".".join(parts[:k])
        if cand in mods:
            return cand
    return None


def _graph():
    mods = _project_files()
    edges, func_level, external = {m: set() for m in mods}, [], {m: set() for m in mods}
    for m, f in mods.items():
        for name, in_func, line in _imports(f, m, mods):
            dep = _resolve(name, mods)
            if dep is None:
                external[m].add((name.split(".")[0], in_func))
                continue
            if dep == m or (m.startswith(dep + ".") and dep in ("nano4d", "kernels")):
                continue                                   # a package's own __init__ (e.g. nano4d)
            edges[m].add(dep)
            if in_func:
                func_level.append((m, dep, line))
    return mods, edges, func_level, external


def test_graph_sees_the_project():
    mods, edges, _, _ = _graph()
    assert {"nano4d.cameras", "nano4d.data.common", "nano4d.data.objects", "kernels", "train_mim4d"} <= set(mods)
    assert "nano4d.data.common" in edges["nano4d.data.objects"]          # the parser resolves from-imports


def test_no_import_cycles():
    _, edges, _, _ = _graph()
    state, stack, cycles = {}, [], []

    def dfs(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                dfs(v)
        stack.pop()
        state[u] = 2
    for m in sorted(edges):
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_upward_imports():
    mods, edges, _, external = _graph()
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for m, deps in edges.items():
        for d in deps:
            if d.startswith("train_"):
                bad.append(f"{m} imports the training script {d}")
            if m.startswith("kernels") and not d.startswith("kernels"):
                bad.append(f"{m} (kernels) imports {d}")
            if m in MODEL_FILES and not d.startswith("kernels"):
                bad.append(f"model file {m} imports {d} (only torch, kernels and the standard library)")
            if m.startswith("nano4d.data") and not (d in BOTTOM or d.startswith("nano4d.data")):
                bad.append(f"data module {m} imports {d} (only nano4d.cameras, nano4d.files and nano4d.data.*)")
            if m in BOTTOM:
                bad.append(f"{m} imports {d} (it is a bottom layer)")
    for m in MODEL_FILES:
        for name, _ in external[m]:
            if name not in stdlib and name != "torch":
                bad.append(f"model file {m} imports {name} (only torch, kernels and the standard library)")
    assert not bad, "\n".join(sorted(bad))


def test_no_function_level_project_imports():
    _, _, func_level, _ = _graph()
    found = {(m, d) for m, d, _ in func_level}
    new = sorted(f"{m}:{line} imports {d} inside a function" for m, d, line in func_level
                 if (m, d) not in KNOWN_FUNCTION_LEVEL)
    assert not new, "\n".join(new)
    gone = KNOWN_FUNCTION_LEVEL - found
    assert not gone, f"these function-level imports are gone; remove them from KNOWN_FUNCTION_LEVEL: {sorted(gone)}"
