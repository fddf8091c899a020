"""The package's layers (DESIGN.md, "Package layout") hold: an AST walk over every module.

Every import counts, at module level or inside a function, so a lazy import cannot dodge a rule
or hide a circle.
"""
import ast
import functools
from pathlib import Path

import multigrounding

PACKAGE = Path(multigrounding.__file__).parent
SHARED = {"errors", "atomic", "devices", "settings", "__init__"}
# what each stage may import besides the shared utilities and itself
ALLOWED = {
    "shared": set(),
    "datasets": set(),
    "cache": {"datasets"},
    "pipeline": {"datasets", "cache"},
    "heads": {"cache"},
    "evaluation": {"datasets", "cache", "heads", "pipeline"},
    "top": {"datasets", "cache", "pipeline", "heads", "evaluation", "top"},
}
# evaluation reaches the frozen models only to ground one image
PIPELINE_IN_EVALUATION = {"multigrounding.evaluation.ground_image"}
# the command line (the multigrounding.cli package, every module of it) and the demo
CLICK_ALLOWED = {"multigrounding.cli", "multigrounding.demo"}


def may_import_click(module: str) -> bool:
    return module in CLICK_ALLOWED or module.startswith("multigrounding.cli.")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1:
        return "shared"
    if parts[1] in ("datasets", "cache", "pipeline", "heads", "evaluation"):
        return parts[1]
    return "shared" if parts[1] in SHARED else "top"


def imports_of(path: Path) -> set[str]:
    """Every module named by an import in the file (``from x import y`` counts x, and x.y when
    y is a module of the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if _is_module(candidate):
                    found.add(candidate)
    return found


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:]) if name.startswith("multigrounding.") else None
    if relative is None:
        return False
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


@functools.lru_cache(maxsize=1)
def graph() -> dict[str, set[str]]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        modules[module_name(path)] = imports_of(path)
    return modules


def test_each_stage_imports_only_the_layers_below_it():
    problems = []
    for module, imported in graph().items():
        stage = stage_of(module)
        for name in sorted(imported):
            if not name.startswith("multigrounding"):
                continue
            target = stage_of(name)
            if target in ("shared",) or target == stage or name == "multigrounding":
                continue
            if target not in ALLOWED[stage]:
                problems.append(f"{module} ({stage}) imports {name} ({target})")
            elif stage == "evaluation" and target == "pipeline" and module not in PIPELINE_IN_EVALUATION:
                problems.append(f"{module} imports {name}: only grounding one image may use the pipeline")
    assert not problems, "\n".join(problems)


def test_only_the_command_line_imports_click():
    users = {module for module, imported in graph().items()
             if any(name == "click" or name.startswith("click.") for name in imported)}
    strangers = {module for module in users if not may_import_click(module)}
    assert not strangers, strangers


def test_no_module_imports_itself_back_through_others():
    modules = set(graph())
    edges = {module: {name for name in imported if name in modules}
             for module, imported in graph().items()}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if nxt == node or _is_package_of(nxt, node):
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]) if nxt in trail else nxt)
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _is_package_of(package: str, module: str) -> bool:
    """A package's ``__init__`` importing its own modules (re-exports) is not a circle."""
    return module.startswith(package + ".")


def test_the_walk_sees_the_real_imports():
    """The rules above are only as good as the walk: it finds known edges, lazy ones included."""
    modules = graph()
    assert "multigrounding.cache.store" in modules["multigrounding.pipeline.driver"]
    assert "multigrounding.evaluation.phrase_pointing" in modules["multigrounding.cli.train"]  # lazy
    assert stage_of("multigrounding.heads.trainer") == "heads"
    assert stage_of("multigrounding.errors") == "shared" and stage_of("multigrounding.cli") == "top"
    assert stage_of("multigrounding.cli.train") == "top"
