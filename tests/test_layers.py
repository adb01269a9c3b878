"""The code's layers, checked from the import graph: the pages, then workflows, then providers and
storage, then configuration and errors; nothing imports upward, services/ never imports gradio, and
no two modules import each other in a circle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES, WORKFLOWS, PARTS, BASE = 4, 3, 2, 1
WORKFLOW_MODULES = {"services.studio", "services.training", "services.compare", "services.captioning", "services.caller",
                    "services.access", "services.targets"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    files = [ROOT / "app.py", *ROOT.glob("components/**/*.py"), *ROOT.glob("services/**/*.py"),
             *ROOT.glob("tools/**/*.py")]
    return {module_name(p): p for p in files}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that ``path`` imports, at the top or inside a function (lazy imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def layer(module: str) -> int:
    if module == "app" or module.startswith("components"):
        return PAGES
    if module in WORKFLOW_MODULES:
        return WORKFLOWS
    if module.startswith(("services.providers", "services.storage", "services.engine")):
        return PARTS
    if module in ("services.config", "services.errors", "services"):
        return BASE
    raise AssertionError(f"{module} is in no layer: add it to one in {__file__}")


def graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()
            if not name.startswith("tools")}


def test_every_import_points_down_or_across_never_up():
    upward = sorted(f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, deps in graph().items() for b in deps
                    if layer(b) > layer(a))
    assert upward == []


def test_storage_knows_nothing_of_providers_and_services_nothing_of_gradio():
    g = graph()
    assert sorted(f"{a} -> {b}" for a, deps in g.items() if a.startswith("services.storage")
                  for b in deps if b.startswith("services.providers")) == []
    uses_gradio = [p for p in ROOT.glob("services/**/*.py") if "gradio" in {
        n.split(".")[0] for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else
                  [node.module or ""] if isinstance(node, ast.ImportFrom) else [])}]
    assert uses_gradio == []


def test_there_is_no_import_cycle():
    g = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for start in sorted(g):
        if start not in state:
            visit(start, [start])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_the_engine_imports_no_provider():
    """The trainer is shared by the local provider and Hugging Face jobs: it knows neither."""
    assert sorted(f"{a} -> {b}" for a, deps in graph().items() if a.startswith("services.engine")
                  for b in deps if b.startswith("services.providers")) == []


# What the pages may import from services/: the Python API and the records it hands out.
PAGE_ENTRY_POINTS = {"services.studio", "services.caller", "services.config", "services.errors",
                     "services.providers.base"}
PACKAGES = {"services", "services.storage", "services.providers", "services.engine"}  # docstrings only
# The one exception: the visitor's identity. Hosted, the server mints each visitor's cookie and reads it
# back (``VisitorGate``, ``owner_for``) before any Studio call can be made for them: that is storage of
# the identity layer's own, below Studio, not a step of the workflow.
IDENTITY_IMPORTS = {"components.identity -> services.storage.visitors"}


def test_the_pages_import_only_the_services_entry_points():
    reached = {f"{a} -> {b}" for a, deps in graph().items() if a == "app" or a.startswith("components")
               for b in deps if b.startswith("services") and b not in PAGE_ENTRY_POINTS | PACKAGES}
    assert sorted(reached - IDENTITY_IMPORTS) == []  # go through Studio or base.py's types instead
    assert sorted(IDENTITY_IMPORTS - reached) == []  # gone: take it off the list


def provider_name_tests(source: str, label: str, names: set[str]) -> list[str]:
    """Where ``path`` tests a provider's name: a string constant that is a registered provider key, used
    where it decides something: compared (``==``, ``in``, also inside a tuple, list or set compared with),
    a dict literal's key, a subscript (``providers["local"]``), the key of ``.get``/``.pop``/``.setdefault``,
    or a ``match`` case. Text that merely mentions a provider (messages, docstrings) is not a test of it."""
    found: list[str] = []

    def named(node) -> list[ast.Constant]:
        items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return [n for n in items if isinstance(n, ast.Constant) and n.value in names]

    for node in ast.walk(ast.parse(source)):
        hits: list[ast.Constant] = []
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                hits += named(operand)
        elif isinstance(node, ast.Dict):
            hits += [hit for key in node.keys if key is not None for hit in named(key)]
        elif isinstance(node, ast.Subscript):
            hits += named(node.slice)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("get", "pop", "setdefault") and node.args:
            hits += named(node.args[0])
        elif isinstance(node, ast.MatchValue):
            hits += named(node.value)
        found += [f"{label}:{hit.lineno} {hit.value!r}" for hit in hits]
    return found


def test_no_provider_name_is_tested_outside_the_providers():
    """Each provider answers for itself (services/providers/registry.py): the workflows and the pages
    ask it, never its name."""
    from services.providers import registry

    names = set(registry.BY_KEY)
    files = [ROOT / "app.py", *ROOT.glob("components/**/*.py"),
             *(p for p in ROOT.glob("services/**/*.py") if not p.is_relative_to(ROOT / "services" / "providers"))]
    assert [hit for p in sorted(files)
            for hit in provider_name_tests(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)), names)] == []


def test_the_provider_name_scan_finds_a_test_of_a_name():
    sample = ('if key == "local" or key in ("cometapi", "x"):\n    d = {"huggingface": 1}\n'
              'p = providers["local"]; providers.get("cometapi")\nlog("local")\nLOCAL_OWNER = "local"\n')
    hits = provider_name_tests(sample, "sample", {"local", "cometapi", "huggingface"})
    assert sorted(hits) == ["sample:1 'cometapi'", "sample:1 'local'", "sample:2 'huggingface'",
                            "sample:3 'cometapi'", "sample:3 'local'"]
