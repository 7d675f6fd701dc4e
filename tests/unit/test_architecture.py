"""The layout's rules, checked on the source: no import circle, each layer imports
only below it, every producer task matches a registered worker task, and no test
module imports another (shared fixtures live in conftest.py files)."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import api
from api.protocol import tasks
from api.settings import Settings
from workers.factory import create_app
from workers.runtime import check_signature

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "workers")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(*, anywhere: bool) -> dict[str, set[str]]:
    """Module -> the project modules it imports: at import time, or also in functions."""
    graph: dict[str, set[Any]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = module_name(path)
            tree = ast.parse(path.read_text(), str(path))
            found: set[str] = set()
            for node in tree.body:
                if isinstance(node, ast.If):  # `if TYPE_CHECKING:` imports run nothing
                    continue
                if not anywhere and isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    continue
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Import):
                        found.update(alias.name for alias in sub.names)
                    elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                        # ``from pkg import mod`` depends on the submodule, not on the
                        # package's own __init__ (which every submodule runs first anyway).
                        found.update(("from", sub.module, alias.name) for alias in sub.names)
            graph[name] = found
    modules = set(graph)

    def resolve(entry: Any) -> set[str]:
        if isinstance(entry, str):
            return {entry}
        _, module, alias = entry
        return {f"{module}.{alias}"} if f"{module}.{alias}" in modules else {module}

    return {name: {m for e in deps for m in resolve(e) if m in modules and m != name}
            for name, deps in graph.items()}


def test_no_import_circle() -> None:
    graph = project_imports(anywhere=False)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            # A package's __init__ importing its own submodules is not a circle.
            if node != dep.rsplit(".", 1)[0] and state.get(dep) == 1:
                pytest.fail("import circle: " + " -> ".join([*path, node, dep]))
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("api", ("workers",)),
        ("api.protocol", ("api.core", "api.server", "api.store", "api.task", "api.disks",
                          "api.vms", "api.cli", "api.settings", "api.errors", "workers")),
        ("workers.engines", ("workers.tasks", "workers.runtime", "workers.host",
                             "workers.factory", "workers.devtools", "api.store")),
        ("workers.tasks", ("workers.factory", "workers.devtools")),
        ("workers.runtime", ("workers.factory", "workers.tasks", "workers.devtools")),
    ],
)
def test_each_layer_imports_only_below_it(layer: str, forbidden: tuple[str, ...]) -> None:
    graph = project_imports(anywhere=True)
    for module, deps in graph.items():
        if module == layer or module.startswith(layer + "."):
            bad = {d for d in deps for f in forbidden if d == f or d.startswith(f + ".")}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_engines_import_neither_celery_nor_redis() -> None:
    for path in sorted((REPO / "workers" / "engines").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in ("celery", "kombu", "redis"), (path, name)


def engine_modules() -> list[str]:
    """Every module of the engines, and the error tree they raise from."""
    paths = sorted((REPO / "workers" / "engines").rglob("*.py"))
    return ["workers.failures", *(module_name(path) for path in paths)]


def test_engines_load_neither_celery_nor_redis_even_indirectly() -> None:
    """An engine that reaches Celery, kombu or redis-py through any chain of imports
    (a helper module, a package's ``__init__``) fails to import here."""
    blocker = (
        "import importlib, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('celery', 'kombu', 'redis'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "for module in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(module)\n"
        "    except ImportError as exc:\n"
        "        print(module, exc)\n"
    )
    modules = engine_modules()
    assert "workers.engines.qemu_vm.lifecycle" in modules
    done = subprocess.run([sys.executable, "-c", blocker, *modules], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"engines that load a blocked package:\n{done.stdout}"


def test_no_module_is_over_600_lines() -> None:
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            lines = len(path.read_text().splitlines())
            assert lines <= 600, f"{path.relative_to(REPO)} has {lines} lines"


def imported_modules(source: str, module: str) -> set[str]:
    """Every module that ``module`` (of this source) imports, anywhere in it (in functions
    too), relative imports resolved; ``from pkg import name`` counts pkg.name as well, as
    name may be a module."""
    package = module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            origin = ((node.module or "") if node.level == 0
                      else ".".join(filter(None, (base, node.module))))
            found.add(origin)
            found.update(f"{origin}.{alias.name}" for alias in node.names)
    return found


def is_test_module(module: str) -> bool:
    return module.startswith("tests.") and module.rsplit(".", 1)[-1].startswith("test_")


def test_no_test_module_imports_another() -> None:
    """Tests share fixtures through conftest.py files and helpers through plain modules
    (tests/helpers.py and its kind), never through a test module: running, moving or
    deleting one test module never changes another."""
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for module in sorted(imported_modules(path.read_text(), module_name(path))):
            if is_test_module(module):
                offenders.append(f"{path.relative_to(REPO)} imports {module}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("source", [
    "from tests.integration.test_cli import cli_env",
    "import tests.integration.test_cli",
    "import tests.integration.test_cli as other",
    "from tests.integration import test_cli",
    "from .test_cli import cli_env",
    "from . import test_cli",
    "from ..integration.test_cli import cli_env",
    "def f() -> None:\n    from tests.integration.test_cli import cli_env",
])
def test_the_test_import_rule_sees_every_spelling(source: str) -> None:
    found = imported_modules(source, "tests.integration.conftest")
    assert "tests.integration.test_cli" in found, found
    assert not any(map(is_test_module, imported_modules(
        "from tests.helpers import qemu_io\nfrom tests.integration.conftest import x\n"
        "import tests.netns_helpers", "tests.integration.test_x")))


def test_every_task_spec_is_registered_by_the_worker_with_its_parameters(
        tmp_path: Path) -> None:
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", host="contract",
                              storage_root=tmp_path))
    app.loader.import_default_modules()
    registered = app.tasks
    for spec in tasks.ALL:
        assert spec.name in registered, f"no worker task {spec.name}"
        task = registered[spec.name]
        assert task.cancelable is spec.cancelable, spec.name


def test_a_body_whose_parameters_differ_from_its_spec_is_refused() -> None:
    spec = tasks.TaskSpec("x.y", ("path",), cancelable=True)

    def body(run: object, path: str, extra: int) -> None: ...

    with pytest.raises(TypeError, match=r"x\.y"):
        check_signature(spec, body)

    def optional_body(run: object, path: str = "") -> None: ...

    with pytest.raises(TypeError):
        check_signature(spec, optional_body)


def test_producer_kwargs_outside_the_spec_are_refused() -> None:
    with pytest.raises(TypeError, match="unknown"):
        tasks.DISK_CONVERT.check_kwargs({"path": "a", "destination": "b", "disk_type": 0,
                                         "force": True})
    with pytest.raises(TypeError, match="missing"):
        tasks.DISK_CONVERT.check_kwargs({"path": "a"})
    tasks.VM_GUEST_SHUTDOWN.check_kwargs({"name": "vm"})  # timeout_s is optional


def test_the_public_names_are_exactly_the_curated_ones() -> None:
    assert sorted(api.__all__) == sorted([
        "GuestOS", "HardDisk", "Settings", "TaskSnapshot", "VMHardDiskType", "VMStateEvent",
        "VMTask", "VMTaskResult", "VMVMState", "VirtualMachine", "VirtualServer", "errors",
    ])
    for name in api.__all__:
        assert getattr(api, name) is not None
    server_api = {name for name, _ in inspect.getmembers(api.VirtualServer)}
    for name in ("hosts", "ping", "get_task", "create_fixed_virtual_hard_disk",
                 "create_dynamic_virtual_hard_disk", "create_differencing_virtual_hard_disk",
                 "create_host_drive_virtual_hard_disk", "get_hard_disk",
                 "create_virtual_machine", "find_virtual_machine", "virtual_machines"):
        assert name in server_api, name


def test_a_producer_needs_neither_the_cli_nor_the_worker_dependencies() -> None:
    """``pip install vmtask`` (celery, kombu, redis) is enough for ``from api import ...``

    (click comes with Celery itself.)
    """
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('rich', 'qemu', 'flower', 'workers'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from api import VirtualServer, errors\n"
        "VirtualServer('redis://127.0.0.1:1/0', host='h').close()\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", blocker], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_create_virtual_machine_takes_the_contract_order() -> None:
    """DESIGN.md's signature, positionally: a caller may pass any of these by position."""
    parameters = list(inspect.signature(api.VirtualServer.create_virtual_machine).parameters)
    assert parameters[:9] == ["self", "name", "memory_mb", "disks", "undoable", "guest_agent",
                              "cpus", "network", "port_forwards"]


def source_trees() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), str(path)))
            for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))]


def test_workers_do_not_import_the_producers_store() -> None:
    """What both sides do with a record is `api.protocol`'s; `api.store` is the producer's."""
    graph = project_imports(anywhere=True)
    for module, deps in graph.items():
        if module.startswith("workers."):
            assert "api.store" not in deps, f"{module} imports api.store"


# The one registry of scripts, with its call path (for pipelines too).
SCRIPT_REGISTRY = {REPO / "api" / "scripts.py"}


def test_scripts_are_sent_only_by_the_registry() -> None:
    """No ``register_script``, ``.eval(`` or ``.evalsha(`` outside `api.scripts`: every
    script goes through one named wrapper, with the answer to NOSCRIPT."""
    found = []
    for path, tree in source_trees():
        if path in SCRIPT_REGISTRY:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = (node.func.attr if isinstance(node.func, ast.Attribute)
                        else node.func.id if isinstance(node.func, ast.Name) else "")
                if name in ("register_script", "eval", "evalsha", "script_load"):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    assert not found, found


def test_each_script_call_names_the_arguments_of_its_script() -> None:
    """``scripts.<name>(...)`` and ``scripts.<name>.queue(pipe, ...)`` with keywords its
    script declares, and every one it needs (`Lua.arguments` checks the same at run
    time; here every call site is checked, run by a test or not)."""
    from api.scripts import Scripts

    specs = {spec.name: spec for spec in Scripts.specs()}
    checked, wrong = 0, []
    for path, tree in [*source_trees(), *((p, ast.parse(p.read_text())) for p in
                                          sorted((REPO / "tests").rglob("*.py")))]:
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            func = node.func
            name = (func.attr if func.attr in specs else func.value.attr
                    if func.attr == "queue" and isinstance(func.value, ast.Attribute)
                    and func.value.attr in specs else None)
            if name is None or any(k.arg is None for k in node.keywords):
                continue  # ``**finish_arguments(...)``: checked where it is built
            try:
                specs[name].arguments({k.arg: "x" for k in node.keywords if k.arg})
            except TypeError as exc:
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno} {exc}")
            checked += 1
    assert checked > 25 and not wrong, wrong


def test_transfer_fields_are_spelled_only_by_their_schema() -> None:
    """A module that reads or writes a transfer hash names its fields by
    `api.protocol.transfer`; the Lua scripts that read it spell the same ``abort``."""
    from api.protocol import scripts, transfer

    found = []
    for path, tree in source_trees():
        if path == REPO / "api" / "protocol" / "transfer.py":
            continue
        source = ast.unparse(tree)
        if "keys.transfer(" not in source and "api.protocol.transfer" not in source \
                and "import transfer" not in source:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in transfer.FIELDS:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.JoinedStr) and "done." in ast.unparse(node):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} done.<index>")
    assert not found, found
    for name in ("vm_move", "vm_move_abort"):
        assert f"'{transfer.ABORT}'" in scripts.load(name), name
