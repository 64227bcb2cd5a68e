"""The package layout (DESIGN.md): core/ imports no stage; a stage imports only core (generate may
import train); webpairs/ (the command line) is on top. Every import counts, also the ones inside
functions, so that no two packages import each other."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("crawl", "filter", "pairing", "shards", "train", "generate", "browse")
PACKAGES = ("core", *STAGES, "webpairs")
ALLOWED = {"core": set(), "webpairs": set(PACKAGES), "generate": {"core", "train"}, **{s: {"core"} for s in STAGES if s != "generate"}}


def _imports(package: str) -> dict[str, set]:
    """Project package -> the files of `package` that import it."""
    found: dict[str, set] = {}
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    targets = [node.module]
                else:
                    continue
                for t in targets:
                    top = t.split(".")[0]
                    if top in PACKAGES and top != package:
                        found.setdefault(top, set()).add(os.path.relpath(path, ROOT))
    return found


def test_packages_import_only_the_floors_below():
    graph = {p: _imports(p) for p in PACKAGES}
    for package, imported in graph.items():
        wrong = {k: sorted(v) for k, v in imported.items() if k not in ALLOWED[package]}
        assert not wrong, f"{package}/ imports {wrong}"
    for a in PACKAGES:
        for b in graph[a]:
            assert a not in graph.get(b, {}), f"{a}/ and {b}/ import each other"
    assert set(graph["generate"]) == {"core", "train"}  # the trainer's sampling lives in train/diffusion.py
