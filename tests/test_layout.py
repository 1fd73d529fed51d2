"""The house rules of the source tree (README, "Layout"), read from the code itself.

Imports are counted wherever they are written (inside functions too: an import there still ties
the two modules together); only those under `if TYPE_CHECKING:` are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["codecs", "streamer", "relay", "web"]  # each may import only those before it


def modules() -> dict[str, Path]:
    out = {}
    for folder in LAYERS:
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts
                     if p != "__init__"]
            out[".".join(["loa", folder, *parts])] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found & known


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle() -> None:
    assert cycles(graph()) == []


def test_layers_import_only_downwards() -> None:
    upward = [(m, d) for m, deps in graph().items() for d in deps
              if LAYERS.index(d.split(".")[1]) > LAYERS.index(m.split(".")[1])]
    assert upward == []


def test_the_cycle_check_sees_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_benchmarks_live_in_web_bench_only() -> None:
    bench_dir = ROOT / "web" / "bench"
    offenders = []
    for path in modules().values():
        if bench_dir in path.parents:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                    and "bench" in node.name.lower():
                offenders.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert offenders == []


def test_one_bench_error() -> None:
    defined = [str(p.relative_to(ROOT)) for p in modules().values()
               if "class BenchError" in p.read_text(encoding="utf-8")]
    assert defined == ["web/bench/errors.py"]


def imported_test_modules(path: Path) -> list[str]:
    """The test modules (tests/**/test_*.py) that `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        for name in names:
            parts = name.split(".")
            at = next((i for i, part in enumerate(parts) if part.startswith("test_")), None)
            if parts[0] == "tests" and at is not None:
                found.add(".".join(parts[:at + 1]))
    return sorted(found)


def test_no_test_module_imports_another() -> None:
    """What tests share lives in tests/helpers.py and the other shared modules, or conftest.py."""
    tests = ROOT / "tests"
    offenders = {str(p.relative_to(ROOT)): got for p in tests.rglob("*.py")
                 if (got := imported_test_modules(p))}
    assert offenders == {}


def test_the_test_import_check_sees_one(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import tests.relay.test_rtp\nfrom tests.web.test_api import x\n"
                     "from tests import test_layout\nfrom tests.helpers import until\n")
    assert imported_test_modules(probe) == ["tests.relay.test_rtp", "tests.test_layout",
                                            "tests.web.test_api"]


def test_every_package_is_listed_in_pyproject() -> None:
    """setuptools cannot discover packages under the package-dir mapping: a subpackage missing
    from [tool.setuptools] packages is left out of the wheel (and of a node installed from it)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(["loa", *p.parent.relative_to(ROOT).parts])
             for top in LAYERS
             for p in (ROOT / top).rglob("__init__.py")}
    assert found == listed, (sorted(found - listed), sorted(listed - found))
