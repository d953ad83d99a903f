"""The package's layering, read from the source: who may import whom, no cycles, small files.

Every module under ``megacontext/`` is parsed with ``ast`` (nothing is imported), its
``megacontext.*`` imports resolved to modules (relative ones too; ``from pkg import sub`` to
the submodule ``pkg.sub``), and the rules checked:

- no import cycle, neither among the imports that run when a module is imported (module
  level, class bodies; not those deferred into functions or ``if TYPE_CHECKING:``), counting
  the package ``__init__`` an import of ``a.b.c`` runs first, nor once deferred ones count;
- the layers, over every import including deferred ones:
  ``rope``, ``spans`` and ``dtypes`` import nothing of the project; ``base``, ``gistnet`` and
  ``tree`` import only those three (and themselves), not each other; ``data`` does not import
  ``ingest``, ``allocator``, ``runtime``, ``training`` or ``evaluation``; LensNet's net and
  scorer (``megacontext.lens`` but ``lens.data``) import only the leaves, so the allocator
  imports them, and neither the allocator nor what it pulls in at import time reaches
  ``lens.data``, ``runtime``, ``evaluation``, ``training`` or ``bench``; only ``training``
  imports Lightning, and nothing outside ``training`` imports ``training`` (so nothing below it
  pulls Lightning in);
- every ``megacontext.*`` import names a module that exists;
- the helpers folded into one home stay there;
- no source file is longer than 600 lines.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megacontext"
MAX_LINES = 600
LIGHTNING = ("lightning", "pytorch_lightning")


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
PACKAGES = {_name(p) for p in PACKAGE.rglob("__init__.py")}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.Module):
    """``(node, deferred)`` for every import statement; deferred: inside a function or an
    ``if TYPE_CHECKING:`` block (it does not run when the module is imported)."""
    stack = [(node, False) for node in reversed(tree.body)]
    while stack:
        node, deferred = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, deferred
            continue
        inner = deferred or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend((n, True) for n in reversed(node.body))
            stack.extend((n, deferred) for n in reversed(node.orelse))
            continue
        stack.extend((n, inner) for n in reversed(list(ast.iter_child_nodes(node))))


def _resolve(module: str) -> str | None:
    """The longest existing module that ``module`` names (``a.b.attr`` → ``a.b``)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FILES:
            return ".".join(parts[:n])
    return None


@cache
def imports(name: str) -> tuple[tuple[str, bool, int], ...]:
    """``(target, deferred, line)`` of every import of ``name``; project targets are
    resolved module names, other targets their top-level package (``lightning``)."""
    path = FILES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if name in PACKAGES else name.rpartition(".")[0]
    out = []
    for node, deferred in _import_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub; `from mod import x` mod
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in FILES else module
                       for a in node.names]
        for target in targets:
            if target == "megacontext" or target.startswith("megacontext."):
                out.append((target, deferred, node.lineno))
            else:
                out.append((target.split(".")[0], deferred, node.lineno))
    return tuple(out)


def project_imports(name: str, *, deferred: bool = True) -> set[str]:
    """Resolved project modules ``name`` imports (with or without the deferred imports)."""
    return {_resolve(t) or t for t, d, _ in imports(name)
            if t.startswith("megacontext") and (deferred or not d)}


def _in(name: str, *layers: str) -> bool:
    return any(name == f"megacontext.{layer}" or name.startswith(f"megacontext.{layer}.")
               for layer in layers)


def _violations(sources, rule) -> list[str]:
    """``"a imports b (line n)"`` for every import of a module of ``sources`` that ``rule``
    (importer, imported) forbids."""
    out = []
    for name in sorted(FILES):
        if not sources(name):
            continue
        for target, _, line in imports(name):
            module = _resolve(target) or target
            if rule(name, module):
                out.append(f"{name} imports {module} (line {line})")
    return out


# -- the graph -----------------------------------------------------------------------------------

def test_every_project_import_names_an_existing_module():
    missing = [f"{name} imports {t} (line {line}), which does not exist"
               for name in sorted(FILES) for t, _, line in imports(name)
               if t.startswith("megacontext") and _resolve(t) is None]
    assert not missing, "\n".join(missing)
    assert len(FILES) > 40 and "megacontext.spans" in FILES  # the walk found the package


def _graph(deferred: bool = False) -> dict[str, set[str]]:
    """Import edges (those that run at import time, or all with ``deferred``); importing
    ``a.b.c`` runs ``a`` and ``a.b`` first, except the importer's own enclosing packages
    (already being imported)."""
    graph: dict[str, set[str]] = {}
    for name in FILES:
        own = {".".join(name.split(".")[:n]) for n in range(1, name.count(".") + 1)}
        edges = set()
        for target in project_imports(name, deferred=deferred):
            parts = target.split(".")
            edges |= {".".join(parts[:n]) for n in range(1, len(parts) + 1)} - own
        graph[name] = edges - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("deferred", [False, True], ids=["import-time", "with-deferred"])
def test_no_import_cycle(deferred):
    """No cycle among the imports that run at import time (one would fail or half-initialize
    a module), nor once the imports deferred into functions count (a cycle in the design)."""
    cycles = _cycles(_graph(deferred))
    assert not cycles, "modules importing each other: " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# -- the layers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("leaf", ["rope", "spans", "dtypes", "textio", "exports"])
def test_leaves_import_nothing_of_the_project(leaf):
    assert f"megacontext.{leaf}" in FILES
    bad = _violations(lambda n: _in(n, leaf), lambda a, b: b.startswith("megacontext"))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer", ["base", "gistnet", "tree"])
def test_storage_and_model_layers_import_only_the_leaves(layer):
    allowed = ("rope", "spans", "dtypes", "exports", layer)
    bad = _violations(lambda n: _in(n, layer),
                      lambda a, b: b.startswith("megacontext") and not _in(b, *allowed))
    assert not bad, "\n".join(bad)


def test_data_does_not_import_the_layers_above_it():
    above = ("ingest", "allocator", "runtime", "training", "evaluation")
    bad = _violations(lambda n: _in(n, "data"), lambda a, b: _in(b, *above))
    assert not bad, "\n".join(bad)


LENS_DATA = "megacontext.lens.data"


def _lens_net(name: str) -> bool:
    """LensNet's net and scorer: ``megacontext.lens`` but its training data."""
    return _in(name, "lens") and not _in(name, "lens.data")


def test_lens_net_and_scorer_import_only_the_leaves():
    """The allocator imports them (the scorer ``lens``), so they sit below it."""
    assert {"megacontext.lens", "megacontext.lens.model", "megacontext.lens.scorer",
            LENS_DATA} <= set(FILES)
    allowed = ("rope", "spans", "dtypes", "exports")
    bad = _violations(_lens_net, lambda a, b: b.startswith("megacontext")
                      and not (_in(b, *allowed) or _lens_net(b)))
    assert not bad, "\n".join(bad)


def _closure(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


@pytest.mark.parametrize("deferred", [False, True], ids=["import-time", "with-deferred"])
def test_importing_the_allocator_pulls_in_no_application(deferred):
    """``import megacontext.allocator`` (which imports LensNet) runs no LensNet data, runtime,
    evaluation, training or bench code, not even through a deferred import."""
    reached = _closure("megacontext.allocator", _graph(deferred))
    assert "megacontext.lens.scorer" in reached
    bad = sorted(m for m in reached
                 if m == LENS_DATA or _in(m, "runtime", "evaluation", "training", "bench"))
    assert not bad, bad


def test_only_training_imports_lightning():
    bad = _violations(lambda n: not _in(n, "training"), lambda a, b: b in LIGHTNING)
    assert not bad, "\n".join(bad)


def test_nothing_below_training_imports_training():
    """So no module outside ``training`` pulls Lightning in, even indirectly."""
    bad = _violations(lambda n: not _in(n, "training"), lambda a, b: _in(b, "training"))
    assert not bad, "\n".join(bad)


def test_rules_see_relative_and_deferred_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "megacontext"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("from .windows import W\n")
    (pkg / "data" / "windows.py").write_text(
        "from .. import spans\nW = 1\n"
        "def f():\n    from ..runtime import M\n    import lightning\n")
    (pkg / "spans.py").write_text("")
    (pkg / "runtime.py").write_text("import megacontext.data.windows\n")
    here = sys.modules[__name__]
    monkeypatch.setattr(here, "PACKAGE", pkg)
    monkeypatch.setattr(here, "FILES", {_name(p): p for p in pkg.rglob("*.py")})
    monkeypatch.setattr(here, "PACKAGES", {"megacontext", "megacontext.data"})
    imports.cache_clear()
    try:
        assert imports("megacontext.data") == (("megacontext.data.windows", False, 1),)
        assert set(imports("megacontext.data.windows")) == {
            ("megacontext.spans", False, 1), ("megacontext.runtime", True, 4),
            ("lightning", True, 5)}
        assert not _cycles(_graph())  # the runtime import is deferred
        assert _cycles(_graph(deferred=True)) == [["megacontext.data", "megacontext.data.windows",
                                                   "megacontext.runtime"]]
        assert _violations(lambda n: _in(n, "data"), lambda a, b: b in LIGHTNING)
    finally:
        imports.cache_clear()


# -- one home per helper -------------------------------------------------------------------------

def _definitions(name: str) -> set[str]:
    tree = ast.parse(FILES[name].read_text(encoding="utf-8"))
    out = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            out.add(node.name)
        elif isinstance(node, ast.Assign):
            out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
    return out


@pytest.mark.parametrize("helper, home", [
    ("recovery", "megacontext.substitution"),
    ("GIST_ROPES", "megacontext.working_context"),
    ("Compressor", "megacontext.gistnet.net"),
    ("node_centers", None),  # was twice, with two signatures: now megacontext.spans.centers
    ("centers", "megacontext.spans"),
    ("WindowLayout", "megacontext.data.windows"),
    ("TORCH_DTYPES", "megacontext.dtypes"),
    # LensNet in one home (was allocator/lens.py and lens_data.py)
    ("LensNet", "megacontext.lens.model"),
    ("node_features", "megacontext.lens.model"),
    ("ranking_loss", "megacontext.lens.model"),
    ("LensScorer", "megacontext.lens.scorer"),
    ("full_detail_values", "megacontext.lens.data"),
    ("HELD_OUT_FACT", "megacontext.lens.data"),
])
def test_folded_helpers_have_one_home(helper, home):
    homes = sorted(n for n in FILES if helper in _definitions(n))
    assert homes == ([home] if home else [])


def _dtype_maps(name: str) -> list[int]:
    """Lines of dict literals mapping dtype names to ``torch.<dtype>``."""
    tree = ast.parse(FILES[name].read_text(encoding="utf-8"))
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Dict)
            and any(isinstance(k, ast.Constant) and k.value in ("float16", "bfloat16")
                    for k in node.keys)
            and any(isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name)
                    and v.value.id == "torch" for v in node.values)]


def test_one_dtype_map():
    known = {"megacontext.dtypes"}
    found = {n: lines for n in FILES if (lines := _dtype_maps(n))}
    assert "megacontext.dtypes" in found
    assert set(found) <= known, {n: v for n, v in found.items() if n not in known}


# -- size ----------------------------------------------------------------------------------------

def test_no_source_file_over_600_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in FILES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them): {long}"
