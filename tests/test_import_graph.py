"""The shape of the house (docs/DEVELOPING.md, "Layout"): imports run one way.

- common/ has no import cycle between its modules, counting imports placed inside functions;
- nothing in common/ imports ``projects`` or a project package;
- importing common/ patches nothing in Detectron2 (``setup_queryseg`` does, at start-up);
- no file edits ``sys.path`` to import ``tools``/``demo`` (they are packages).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = os.path.join(REPO, "common")
PROJECT_PACKAGES = {
    p for p in os.listdir(os.path.join(REPO, "projects"))
    if os.path.isdir(os.path.join(REPO, "projects", p, p))
}  # fmt: skip


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[: -len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _common_modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(COMMON):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                out[_module_name(path)] = path
    return out


def _imports(path: str, module: str) -> set[str]:
    """Every module named by an import anywhere in the file (module or function level)."""
    is_pkg = path.endswith("__init__.py")
    package = module if is_pkg else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return names


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _common_modules()
    graph, raw = {}, {}
    for mod, path in modules.items():
        raw[mod] = _imports(path, mod)
        edges = set()
        for name in raw[mod]:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # the module and the packages it runs first
                target = ".".join(parts[:i])
                if target in modules and target != mod and not mod.startswith(target + "."):
                    edges.add(target)
        graph[mod] = edges
    return graph, raw


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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


def test_common_has_no_import_cycle():
    graph, _ = _graph()
    assert len(graph) > 20  # the walk found the library
    assert _cycles(graph) == []


def test_cycle_detection_sees_function_level_imports(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from common.engine import config\n")
    assert "common.engine.config" in _imports(str(mod), "common.modeling.m")
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def test_common_imports_no_project():
    _, raw = _graph()
    bad = {
        mod: sorted(n for n in names if n.split(".")[0] in PROJECT_PACKAGES | {"projects"})
        for mod, names in raw.items()
    }
    assert {m: n for m, n in bad.items() if n} == {}
    assert PROJECT_PACKAGES == {"knet", "queryinst", "fastinst", "embedmask"}


def test_common_does_not_name_its_projects():
    hits = []
    for mod, path in _common_modules().items():
        text = open(path).read()
        hits += [(mod, p) for p in PROJECT_PACKAGES if f'"{p}"' in text or f"'{p}'" in text]
    assert hits == []


def test_importing_common_patches_nothing():
    code = (
        "import detectron2.engine.defaults as d, detectron2.modeling.backbone.resnet as r\n"
        "ddp, dcn = d.create_ddp_model, r.DeformConv\n"
        "import common, common.ops, common.modeling, common.data, common.engine\n"
        "import common.convert.cli\n"
        "from common.engine import get_cfg\n"
        "get_cfg()\n"
        "assert d.create_ddp_model is ddp and r.DeformConv is dcn, 'patched on import'\n"
        "from common.engine import setup_queryseg\n"
        "setup_queryseg()\n"
        "assert d.create_ddp_model is not ddp and r.DeformConv is not dcn, 'setup did not patch'\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True)
    assert run.returncode == 0, run.stderr.decode()[-2000:]


#: the one allowed edit: the parity suite appends its own folder of reference implementations
#: (.parity_refs/, installed outside the venv on purpose; README, "Parity with the reference
#: implementations")
SYS_PATH_ALLOWED = {os.path.join("tests", "parity", "parity_refs.py")}


def test_no_file_edits_sys_path():
    edits = []
    for top in ("common", "projects", "tools", "demo", "tests", "train_net.py"):
        base = os.path.join(REPO, top)
        paths = [base] if base.endswith(".py") else [
            os.path.join(r, f) for r, _, fs in os.walk(base) for f in fs if f.endswith(".py")
        ]  # fmt: skip
        for path in paths:
            if os.path.abspath(path) == os.path.abspath(__file__):
                continue
            text = open(path).read()
            if "sys.path.insert" in text or "sys.path.append" in text:
                if os.path.relpath(path, REPO) not in SYS_PATH_ALLOWED:
                    edits.append(os.path.relpath(path, REPO))
    assert edits == []
