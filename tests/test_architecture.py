"""The package's layers (docs/architecture.md): no import cycle, no import of a higher layer, and an import
inside a function only where the imported module needs an optional heavy dependency (MindSpore, Triton)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "convmixer_pt"
# Bottom to top; a module may import modules of its own layer or of lower ones.
LAYERS = [
    ("errors", "files", "variants", "runtime", "data"),
    ("fast.kernels",),
    ("fast",),
    ("model", "mindspore"),
    ("weights",),
    ("factory", "timm_models", "mindcv"),
    ("evaluation", "export"),
    ("train",),
    ("cli",),
    ("",),  # the package's public API
]
HEAVY = ("mindspore", "mindcv", "triton")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    """The index of the most specific LAYERS prefix that `module` falls under."""
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".") or prefix == "") and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, module
    return best


def resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The package modules an import statement in `module` loads (empty for outside packages)."""
    if isinstance(node, ast.Import):
        return [a.name.removeprefix("convmixer_pt.") for a in node.names if a.name.startswith("convmixer_pt")]
    if node.level == 0:
        if not (node.module or "").startswith("convmixer_pt"):
            return []
        base = node.module.removeprefix("convmixer_pt").lstrip(".")
    else:
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)] if node.level > 1 else package
        base = ".".join(package + ([node.module] if node.module else [])).strip(".")
    subs = [f"{base}.{alias.name}".strip(".") for alias in node.names]
    out = [sub for sub in subs if sub in MODULES]
    if len(out) < len(subs):  # names defined in `base` itself, not submodules of it
        out.append(base)
    return out


def imports(module: str) -> tuple[set[str], set[str], set[str]]:
    """(package modules imported at module level, those imported inside functions, outside top-level
    packages imported at module level)."""
    tree = ast.parse(MODULES[module].read_text())
    top: set[str] = set()
    local: set[str] = set()
    outside: set[str] = set()
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    inner = {id(n) for f in functions for n in ast.walk(f) if isinstance(n, ast.Import | ast.ImportFrom)}
    type_checking = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and ast.unparse(block.test) == "TYPE_CHECKING" for n in ast.walk(block)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom) or id(node) in type_checking:
            continue
        targets = resolve(module, node)
        (local if id(node) in inner else top).update(targets)
        if id(node) not in inner:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if node.level == 0 else []
            outside.update(n.split(".")[0] for n in names)
    return top, local, outside


GRAPH = {m: imports(m) for m in MODULES}


def test_every_import_resolves_to_a_module_of_the_package() -> None:
    for module, (top, local, _) in GRAPH.items():
        for target in top | local:
            assert target in MODULES, f"{module} imports {target}, which is not a module of the package"


def test_no_import_cycle() -> None:
    edges = {m: {t for t in top | local if t != m} for m, (top, local, _) in GRAPH.items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_no_module_imports_a_higher_layer() -> None:
    for module, (top, local, _) in GRAPH.items():
        for target in top | local:
            assert layer(target) <= layer(module), f"{module} (layer {layer(module)}) imports {target} " \
                                                   f"(layer {layer(target)})"


def heavy(module: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether importing `module` imports MindSpore or Triton."""
    top, _, outside = GRAPH[module]
    return bool(outside & set(HEAVY)) or any(heavy(t, seen | {module}) for t in top - seen - {module})


def test_imports_inside_functions_are_only_for_heavy_optional_dependencies() -> None:
    for module, (_, local, _) in GRAPH.items():
        for target in local:
            assert heavy(target), f"{module} imports {target} inside a function, but {target} needs neither " \
                                  "MindSpore nor Triton: import it at the top"


def test_the_layer_table_is_what_the_package_holds() -> None:
    """A new top-level module or package gets a layer here and in docs/architecture.md."""
    tops = {m.split(".")[0] for m in MODULES if m} | {"fast.kernels"}
    assert tops == {p for prefixes in LAYERS for p in prefixes if p}
