"""Layers point one way: configs -> entries -> library -> data, model -> core, read from the source with ast.

Every import between podformer's modules is checked, at module level and inside functions alike: the
model and data layers never reach the training library or the configs, the library never the configs
or the entries, data never model; no two modules import each other, directly or through others; and an
import inside a function says why it is there (it defers a slow or optional library, not a cycle).
"""

from __future__ import annotations

import ast
import os

from tests.helpers import REPO

# Folder (or entry file) -> the package name it has installed (setup.py's package_dir).
ROOTS = {"model": "podformer.model", "data": "podformer.data", "configs": "podformer.configs", "podformer": "podformer"}
ENTRIES = ("train", "finetune")
# Layer -> the layers it may import (itself included).
ALLOWED = {
    "core": {"core"},
    "data": {"core", "data"},
    "model": {"core", "data", "model"},
    "library": {"core", "data", "model", "library"},
    "entries": {"core", "data", "model", "library"},
    "configs": {"core", "model", "configs"},
}


def layer(module: str) -> str:
    if module == "podformer" or module.startswith("podformer.core"):
        return "core"  # the package's __init__ only chooses JAX's platforms (podformer/core/platforms.py)
    for name in ("model", "data", "configs"):
        if module == f"podformer.{name}" or module.startswith(f"podformer.{name}."):
            return name
    return "entries" if module in {f"podformer.{e}" for e in ENTRIES} else "library"


def modules(repo: str = REPO) -> dict[str, str]:
    """podformer module name -> its source file, as installed."""
    out = {f"podformer.{e}": os.path.join(repo, f"{e}.py") for e in ENTRIES}
    for folder, package in ROOTS.items():
        for dirpath, dirnames, files in os.walk(os.path.join(repo, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(repo, folder))[:-3].replace(os.sep, ".")
                rel = rel.removesuffix("__init__").rstrip(".")
                out[f"{package}.{rel}" if rel else package] = os.path.join(dirpath, f)
    return out


def imports(path: str, known: dict[str, str]) -> list[tuple[str, int, bool, str]]:
    """(podformer module imported, line, inside a function?, the source line) for every import in ``path``."""
    with open(path) as f:
        source = f.read()
    lines = source.splitlines()
    tree = ast.parse(source)
    in_function = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            in_function |= {id(n) for n in ast.walk(fn) if n is not fn}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from podformer import model` imports the module podformer.model; `from podformer.x import y` x.
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
            ]
        else:
            assert not isinstance(node, ast.ImportFrom) or not node.level, f"{path}:{node.lineno}: relative import"
            continue
        for name in names:
            if name == "podformer" or name.startswith("podformer."):
                context = lines[node.lineno - 2] + lines[node.lineno - 1] if node.lineno > 1 else lines[0]
                out.append((name, node.lineno, id(node) in in_function, context))
    return out


def graph(repo: str = REPO) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the podformer modules it imports, the layering violations)."""
    known = modules(repo)
    edges, problems = {}, []
    for module, path in known.items():
        edges[module] = set()
        for name, line, in_function, context in imports(path, known):
            where = f"{os.path.relpath(path, repo)}:{line}"
            if name not in known:
                problems.append(f"{where}: imports {name}, which does not exist")
                continue
            if layer(name) not in ALLOWED[layer(module)]:
                problems.append(f"{where}: the {layer(module)} layer imports {name} ({layer(name)})")
            if in_function and "#" not in context:
                problems.append(f"{where}: imports {name} inside a function without a comment saying why")
            if name != module:
                edges[module].add(name)
    return edges, problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return found


def test_layers_point_one_way():
    edges, problems = graph()
    assert len(edges) > 80, sorted(edges)  # the walk found the whole package
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    edges, _ = graph()
    assert not cycles(edges)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A copy of the layout with a model module importing the library, a data module importing the
    model, a cycle between two library modules and an unexplained import in a function: each is found."""
    files = {
        "podformer/__init__.py": "",
        "podformer/core/__init__.py": "",
        "podformer/trainer.py": "from podformer import loop\n",
        "podformer/loop.py": "def f():\n    from podformer import trainer\n",
        "model/__init__.py": "",
        "model/gpt.py": "from podformer import trainer\n",
        "data/__init__.py": "",
        "data/special.py": "from podformer.model import gpt\n",
        "configs/__init__.py": "",
        "configs/gpt.py": "from podformer.model import gpt\n",
        "train.py": "from podformer import trainer\n",
        "finetune.py": "",
    }
    for name, text in files.items():
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text(text)
    edges, problems = graph(str(tmp_path))
    assert any("model/gpt.py:1: the model layer imports podformer.trainer" in p for p in problems), problems
    assert any("data/special.py:1: the data layer imports podformer.model.gpt" in p for p in problems), problems
    assert any("podformer/loop.py:2: imports podformer.trainer inside a function" in p for p in problems), problems
    assert len(problems) == 3, problems  # configs -> model and train -> library are allowed
    assert cycles(edges) == [["podformer.loop", "podformer.trainer"]]
