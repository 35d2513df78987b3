"""The dependency direction trainer -> surrogate_server -> protos, and no import cycles.

Reads every module of the three packages with ``ast`` (imports inside functions count
too: a late import is still a dependency) and checks the graph of project modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("trainer", "surrogate_server", "protos")
# Layers from the top: a module may import only its own layer or those after it.
LAYERS = ("trainer", "surrogate_server", "protos")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules that ``path`` imports anywhere in its body."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: "from . import x" in package a.b is a.b.x
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    # A package's __init__ is not a dependency of its submodules' importers by itself.
    return {name: {t for t in _imports(path, name, known) if t not in PACKAGES} for name, path in modules.items()}


def test_lower_layers_never_import_higher_ones() -> None:
    wrong = []
    for module, targets in _graph().items():
        layer = LAYERS.index(module.split(".")[0])
        wrong += [f"{module} imports {t}" for t in targets if LAYERS.index(t.split(".")[0]) < layer]
    assert not wrong, "imports against trainer -> surrogate_server -> protos:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_real_edges() -> None:
    """Guards the walker itself: it must find the edges that certainly exist."""
    graph = _graph()
    assert "surrogate_server.source" in graph["trainer.guidance"]
    assert "protos.sdce.surrogate.v1.surrogate_pb2" in graph["surrogate_server.codec"]
    assert "trainer.xla" in graph["trainer.train"]  # a late import inside a function


def test_remote_guidance_needs_only_the_client_extra() -> None:
    """A trainer with --surrogate_endpoint imports no server-only package (FastAPI, uvicorn, ...)."""
    server_only = ["fastapi", "uvicorn", "msgpack", "prometheus_client", "grpc_health", "grpc_reflection"]
    code = "\n".join([
        "import sys",
        *[f"sys.modules[{name!r}] = None" for name in server_only],  # importing them now fails
        "import surrogate_server.client, trainer.train, trainer.models, trainer.cli",
        "from trainer.config import SurrogateConfig",
        "import torch",
        "from trainer.models import connect_surrogate",
        "client = connect_surrogate(SurrogateConfig(endpoint='127.0.0.1:9'), torch.device('cpu'))",
        "client.close()",
    ])
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
