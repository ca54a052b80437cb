"""The layout keeps its promises (docs/architecture.md): imports go one way, no module reaches into
another's private names, and the pure modules stay pure. Read from the source with ``ast``, so the
check covers imports that only run inside functions or under ``TYPE_CHECKING`` too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"dc_broker": ROOT / "broker" / "dc_broker", "dc_token": ROOT / "client" / "dc_token"}
#: modules that must never reach trio, httpx, anyio, click, sockets or sqlite, however indirectly
PURE = [
    "dc_token.protocol",
    "dc_token.connection",
    "dc_token.cache",
    "dc_token.errors",
    "dc_broker.errors",
    "dc_broker.tokens",
    "dc_broker.idp.oidc",
    "dc_broker.idp.proxies",
    "dc_broker.sessions.flows",
    "dc_broker.sessions.states",
    "dc_broker.sessions.policy",
    "dc_broker.access.rules",
    "dc_broker.config",
    "dc_broker.config.values",
    "dc_broker.proxy.rules",
    "dc_broker.sessions.schedule",
    "dc_broker.observe.counters",
    "dc_broker.observe.health",
    "dc_token.pages",
    "dc_broker.budget",
]
IMPURE = {"trio", "httpx", "anyio", "click", "socket", "sqlite3", "msgpack_numpy"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _imports(path: Path, *, top_level_only: bool) -> list[tuple[str, list[str]]]:
    """(module, names) for every ``from X import names`` / ``import X`` in the file. Top level
    includes ``if TYPE_CHECKING:`` and ``try:`` blocks; otherwise function bodies count too."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, list[str]]] = []

    def note(node: ast.AST) -> None:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            note(node)
            if isinstance(node, ast.If):
                walk(node.body)
                walk(node.orelse)
            elif isinstance(node, ast.Try):
                walk(node.body)

    if top_level_only:
        walk(tree.body)
    else:
        for node in ast.walk(tree):
            note(node)
    return found


def _graph(*, top_level_only: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        deps = set()
        for module, names in _imports(path, top_level_only=top_level_only):
            deps.update(f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES)
            if module in MODULES:
                deps.add(module)
        # a submodule naming its own package is Python's order anyway (the package runs first)
        graph[name] = {d for d in deps if not name.startswith(d + ".") and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
    return found


def test_the_layout_is_what_the_architecture_names() -> None:
    for name in [*PURE, "dc_broker.idp.transport", "dc_broker.access.identity", "dc_broker.access.authorize"]:
        assert name in MODULES, name


@pytest.mark.parametrize("top_level_only", [True, False], ids=["at-import", "anywhere"])
def test_no_import_cycle(top_level_only: bool) -> None:
    assert _cycles(_graph(top_level_only=top_level_only)) == []


def test_no_module_imports_another_modules_private_names() -> None:
    private = [
        f"{name} imports {module}.{n}"
        for name, path in MODULES.items()
        for module, names in _imports(path, top_level_only=False)
        for n in names
        if n.startswith("_") and module in MODULES and n != "__version__"
    ]
    assert private == []


def test_the_client_never_imports_the_broker() -> None:
    graph = _graph(top_level_only=False)
    assert [
        f"{m} -> {d}"
        for m, deps in graph.items()
        if m.startswith("dc_token")
        for d in deps
        if d.startswith("dc_broker")
    ] == []


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_reach_no_io_library(name: str) -> None:
    graph = _graph(top_level_only=True)
    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(graph[module])
    reached = {
        module.split(".")[0]
        for m in seen
        for module, _ in _imports(MODULES[m], top_level_only=True)
        if module.split(".")[0] in IMPURE
    }
    assert reached == set(), f"{name} reaches {sorted(reached)} through {sorted(seen - {name})}"


#: docs/architecture.md's import order, top to bottom: a module may import its own layer and those below
ORDER = ["cli", "daemon", "serve", "access.authorize", "sessions", "idp", "config", "access.rules", "errors"]
BOTTOM = ["store", "vault", "tokens", "secret"]


def _layer(module: str, order: list[str]) -> int | None:
    rest = module.removeprefix("dc_broker.")
    found = [i for i, layer in enumerate(order) if rest == layer or rest.startswith(layer + ".")]
    return max(found, key=lambda i: len(order[i])) if found else None


@pytest.mark.parametrize("order", [ORDER, BOTTOM], ids=["layers", "bottom"])
def test_imports_follow_the_stated_order(order: list[str]) -> None:
    """No module imports one above its own layer, anywhere (a function's import counts too): e.g.
    config (below idp) must not reach dc_broker.idp.proxies for the proxy setting's check."""
    graph = _graph(top_level_only=False)
    upward = [
        f"{m} -> {d}"
        for m, deps in sorted(graph.items())
        if (low := _layer(m, order)) is not None
        for d in sorted(deps)
        if (high := _layer(d, order)) is not None and high < low
    ]
    assert upward == []


def test_the_config_values_touch_no_file_and_only_the_editing_commands_load_tomlkit() -> None:
    """``dc_broker.config`` (what the pure modules import) is values only: no os, no TOML reader;
    tomlkit is imported by ``config.edit`` alone, and that only inside the commands that edit."""
    for name in ("dc_broker.config", "dc_broker.config.values"):
        reached = {m.split(".")[0] for m, _ in _imports(MODULES[name], top_level_only=False)}
        assert not reached & {"os", "tomllib", "tomlkit", "pathlib", "io", "shutil"}, (name, reached)
    importers = {
        name
        for name, path in MODULES.items()
        for m, _ in _imports(path, top_level_only=False)
        if m == "tomlkit" or m.startswith("tomlkit.")
    }
    assert importers == {"dc_broker.config.edit"}
    at_import = {name for name, deps in _graph(top_level_only=True).items() if "dc_broker.config.edit" in deps}
    assert at_import == set()  # only inside a command's body
    inside = {name for name, deps in _graph(top_level_only=False).items() if "dc_broker.config.edit" in deps}
    assert inside == {"dc_broker.cli.files"}


def test_every_module_says_what_it_owns() -> None:
    """A module docstring on every module and package (docs/architecture.md points at them)."""
    missing = [name for name, path in MODULES.items() if not ast.get_docstring(ast.parse(path.read_text()))]
    assert missing == []
