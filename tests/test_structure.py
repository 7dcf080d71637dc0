"""The shape of the code: imports run one way (study/ uses core/ and models/, never the reverse, and no
entry point imports study/), and no two modules import each other, directly or around a circle.

Imports are read from the source with `ast` (every `import` anywhere in a file, those inside functions
included, since a deferred import is still a dependency); nothing is imported to find them.
"""
import ast
import functools
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("core", "models", "study")
SKIP_DIRS = {".venv", ".git", "__pycache__", "data", "runs", "demo", "mutants", "results", "docs"}


def python_files(root=ROOT):
    """Every .py file of the checkout (relative paths), outside the environment and the run folders."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        found += [os.path.relpath(os.path.join(folder, f), root) for f in sorted(files) if f.endswith(".py")]
    return found


def module_of(path):
    """The node of a file: its import name in a package (core.engine, study), else its path."""
    parts = path[:-3].split(os.sep)
    if parts[0] in PACKAGES:
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return path


def resolve(name, path, files):
    """The file a top-level import name refers to, from file `path`, or None (not this repository's):
    a package module, a module at the root, or a sibling file of a script folder (tests/, benchmarks/)."""
    parts = name.split(".")
    if parts[0] in PACKAGES:
        for n in range(len(parts), 0, -1):  # the longest prefix that is a file of the package
            for candidate in (os.path.join(*parts[:n]) + ".py", os.path.join(*parts[:n], "__init__.py")):
                if candidate in files:
                    return candidate
        return None
    folder = os.path.dirname(path)
    for candidate in ((os.path.join(folder, parts[0] + ".py"),) if folder and folder not in PACKAGES else ()) + \
            (parts[0] + ".py",):
        if candidate in files:
            return candidate
    return None


def statements(node):
    """Every statement under `node`, in functions, classes and blocks too (imports are statements; walking
    the statements only, not every expression, keeps this fast)."""
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        for child in getattr(node, field, None) or ():
            if isinstance(child, ast.AST):
                yield child
                yield from statements(child)


def imports(path, files, root=ROOT):
    """The repository files that file `path` imports, anywhere in it (`from core import engine`:
    core/engine.py; `from core.errors import UserError`: core/errors.py)."""
    with open(os.path.join(root, path), encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in statements(tree):
        if isinstance(node, ast.Import):
            targets = [resolve(a.name, path, files) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the file's own package
                package = module_of(path).split(".")[:None if path.endswith("__init__.py") else -1]
                module = ".".join(package[:len(package) - node.level + 1] + ([module] if module else []))
            base = resolve(module, path, files)
            targets = []
            for a in node.names:
                sub = resolve(f"{module}.{a.name}", path, files)
                targets.append(sub if sub and sub != base and not sub.endswith("__init__.py") else base)
        else:
            continue
        found |= {t for t in targets if t and t != path}
    return found


@functools.lru_cache(maxsize=None)
def graph(root=ROOT):
    """{file: the repository files it imports} (read once per root)."""
    files = set(python_files(root))
    return {path: imports(path, files, root) for path in files}


def cycles(edges):
    """The import circles: strongly connected components of more than one file, or a file importing itself
    (Tarjan's algorithm, iterative)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in edges:
                    continue
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in edges[node]:
                        found.append(sorted(component))
    return found


LIBRARY_AT_ROOT = {"data.py", "quantize.py"}  # modules at the root that the machinery imports, not commands


def entry_point(path):
    """The user's entry points: the scripts at the root (eval.py, train_*.py, hubconf.py), benchmarks/ and
    scripts/ (study/'s scripts are the study's own)."""
    return (os.sep not in path and path not in LIBRARY_AT_ROOT) or path.split(os.sep)[0] in ("benchmarks", "scripts")


def test_the_import_reader_finds_what_a_file_imports_and_a_circle(tmp_path):
    """The positive control: a small tree with a circle, a one-way import and a deferred one."""
    for folder in ("core", "study"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "core" / "a.py").write_text("from core.errors import X\n")
    (tmp_path / "core" / "errors.py").write_text("import os\n")
    (tmp_path / "study" / "one.py").write_text("from study import two\nfrom core import a\n")
    (tmp_path / "study" / "two.py").write_text("def f():\n    from study.one import g\n")
    (tmp_path / "tool.py").write_text("import study.two\nimport torch\n")
    edges = graph(str(tmp_path))
    j = os.path.join
    assert edges[j("study", "one.py")] == {j("study", "two.py"), j("core", "a.py")}
    assert edges[j("core", "a.py")] == {j("core", "errors.py")} and edges["tool.py"] == {j("study", "two.py")}
    assert cycles(edges) == [[j("study", "one.py"), j("study", "two.py")]]
    assert [p for p in edges if entry_point(p) and any(t.startswith("study" + os.sep) for t in edges[p])] == ["tool.py"]


def test_no_entry_point_and_nothing_in_core_or_models_imports_study():
    edges = graph()
    assert "eval.py" in edges and os.path.join("core", "engine.py") in edges  # the reader saw the tree
    bad = sorted(f"{path} imports {', '.join(sorted(t for t in targets if t.startswith('study' + os.sep)))}"
                 for path, targets in edges.items()
                 if (entry_point(path) or path.split(os.sep)[0] in ("core", "models"))
                 and any(t.startswith("study" + os.sep) for t in targets))
    assert not bad, "study/ is research code the entry points must not need:\n" + "\n".join(bad)


def test_no_import_circle_among_the_repositorys_modules():
    found = cycles(graph())
    assert not found, "import circles (each a set of files that import one another):\n" + \
        "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("package", ["core", "models"])
def test_core_and_models_import_no_entry_point(package):
    """The machinery below the entry points never reaches up to them (eval.py, train_*.py, hubconf.py)."""
    edges = graph()
    bad = sorted(f"{p} imports {t}" for p, targets in edges.items() if p.startswith(package + os.sep)
                 for t in targets if entry_point(t))
    assert not bad, "\n".join(bad)
