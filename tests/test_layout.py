"""The shape of the code: no import cycle, function-local imports only for optional heavy
dependencies (each with a comment), every module importable in a fresh interpreter."""

import ast
import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("memlong_jax", "train", "convert", "bench", "experiments")
# bench/ imports JAX, torch and the library inside its worker functions on purpose: each
# configuration runs in its own subprocess whose peak RSS is measured, so nothing that inflates
# RSS may be imported at the top (bench/common.py's docstring).
LOCAL_IMPORT_PACKAGES = ("memlong_jax", "train", "convert", "experiments")
OPTIONAL_HEAVY = {"faiss", "torch", "matplotlib", "transformers"}


def module_files(root: pathlib.Path, packages=PACKAGES) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every .py file under `packages`."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def import_graph(root: pathlib.Path, packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules it imports (at any depth: a function-local import hides a
    cycle but does not remove it). `from pkg import name` points at `pkg.name` when that is a
    module, else at `pkg`."""
    modules = module_files(root, packages)
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[:len(name.split(".")) - node.level + is_package]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def local_imports(path: pathlib.Path) -> list[tuple[int, str, bool]]:
    """(line, top-level package, commented) of each import inside a function; an import counts
    as commented when its line, the line above, or another import of the same package in the
    same function carries a comment."""
    lines = path.read_text().splitlines()
    found = []
    for function in ast.walk(ast.parse("\n".join(lines), str(path))):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        by_package: dict[str, list[int]] = {}
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or "."]
            else:
                continue
            for package in {n.split(".")[0] for n in names}:
                by_package.setdefault(package, []).append(node.lineno)
        for package, numbers in by_package.items():
            commented = any("#" in lines[n - 1] or lines[n - 2].strip().startswith("#")
                            for n in numbers)
            found += [(n, package, commented) for n in numbers]
    return found


def test_no_import_cycle():
    assert cycles(import_graph(REPO)) == []


def test_the_cycle_check_finds_a_cycle(tmp_path):
    package = tmp_path / "memlong_jax"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from memlong_jax.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (package / "c.py").write_text("import memlong_jax.a\n")
    (package / "d.py").write_text("from memlong_jax import c\n")
    graph = import_graph(tmp_path, ("memlong_jax",))
    assert cycles(graph) == [["memlong_jax.a", "memlong_jax.c", "memlong_jax.sub.b"]]


def test_function_local_imports_are_commented_optional_heavy_dependencies():
    bad = [f"{path.relative_to(REPO)}:{line} imports {package}"
           + ("" if package in OPTIONAL_HEAVY else " (not an optional heavy dependency)")
           + ("" if commented else " (no comment saying why)")
           for path in module_files(REPO, LOCAL_IMPORT_PACKAGES).values()
           for line, package, commented in local_imports(path)
           if package not in OPTIONAL_HEAVY or not commented]
    assert bad == []


def test_the_local_import_check_sees_an_uncommented_import(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import os\n\n\ndef f():\n    import faiss  # optional\n    import json\n"
                    "\n\ndef g():\n    import torch\n")
    assert local_imports(path) == [(5, "faiss", True), (6, "json", False), (10, "torch", False)]


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(module_files(REPO))
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code, *names], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_readme_layout_names_every_module():
    readme = (REPO / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    words = set(re.findall(r"\w+", layout))
    missing = [name for name, path in module_files(REPO).items()
               if path.name != "__init__.py" and path.stem not in words]
    assert missing == []
