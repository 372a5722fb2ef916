"""The package's shape: no import circle, every module imports on its own, small files and functions, and
docstrings on the public functions of the outer ring (training, lab, CLI, accounting, method declarations).

A function may run over the length limit only with its reason in its docstring, after the marker
``Long by design:``.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "peftkit"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
LONG_MARKER = "Long by design:"
# Over a limit today, in modules others are reshaping; each must be split (or given its reason) and then
# leave this list: the tests fail when a listed one is back within the limit, so the list only shrinks.
PENDING_FILES: set[str] = set()
PENDING_FUNCTIONS: set[str] = set()
CLI_PROTOCOL = (
    "add_parser",
    "run",
)  # every subcommand module's two functions, described in peftkit/cli/__init__
DOCUMENTED = (
    "peftkit/training/",
    "peftkit/lab/",
    "peftkit/cli/",
    "peftkit/accounting.py",
    "peftkit/method_spec.py",
)


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The peftkit modules ``name`` imports (at any depth of its code, ``if TYPE_CHECKING`` blocks aside)."""

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found: set[str | None] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(_without_type_checking(ast.parse(path.read_text()))):
        if isinstance(node, ast.Import):
            found |= {owner(a.name) for a in node.names if a.name.startswith("peftkit")}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            if module.startswith("peftkit"):
                found |= {
                    f"{module}.{a.name}" if f"{module}.{a.name}" in modules else owner(module)
                    for a in node.names
                }
    return {m for m in found if m and m != name}


def _without_type_checking(tree: ast.Module) -> ast.Module:
    class Drop(ast.NodeTransformer):
        def visit_If(self, node):
            if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                return node.orelse or None
            return self.generic_visit(node)

    return Drop().visit(tree)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (as the list of modules around it), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check itself finds one


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(
        _modules(), reverse=True
    )  # leaves first: a module that needs its importer to go first fails
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]


def test_no_file_over_the_limit():
    long = {
        str(p.relative_to(ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert set(long) == PENDING_FILES, f"files over {MAX_FILE_LINES} lines: {long} (pending: {PENDING_FILES})"


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_no_function_over_the_limit_without_a_reason():
    long = {
        f"{p.relative_to(ROOT)}:{f.name}": f.end_lineno - f.lineno + 1
        for p in sorted(PACKAGE.rglob("*.py"))
        for f in _functions(p)
        if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES
        and LONG_MARKER not in (ast.get_docstring(f) or "")
    }
    assert set(long) == PENDING_FUNCTIONS, (
        f"functions over {MAX_FUNCTION_LINES} lines without '{LONG_MARKER}' in the docstring: {long} "
        f"(pending: {PENDING_FUNCTIONS})"
    )


def test_public_functions_of_the_outer_ring_have_docstrings():
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = str(path.relative_to(ROOT))
        if not relative.startswith(DOCUMENTED):
            continue
        tree = ast.parse(path.read_text())
        for node in [*tree.body, *(n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body)]:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            if relative.startswith("peftkit/cli/") and node.name in CLI_PROTOCOL:
                continue
            decorators = {getattr(d, "id", getattr(d, "attr", "")) for d in node.decorator_list}
            if "property" in decorators or ast.get_docstring(node):
                continue
            missing.append(f"{relative}:{node.lineno} {node.name}")
    assert not missing, f"public functions without a docstring: {missing}"


def test_only_the_run_folder_spells_a_runs_file_names():
    names = {"config.yaml", "labels.json", "metrics.jsonl", "curves.png", "checkpoint", "checkpoint.previous"}
    names |= {
        "trainer_state.pt",
        "result.json",
        "lab_result.json",
        "worker.log",
        "train.lock",
    }  # ("adapter": a common word)
    spelled = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "training" / "layout.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef) and ast.get_docstring(node)
        }
        spelled += [
            f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings
        ]
    assert not spelled, f"a run's file names outside peftkit/training/layout.py: {spelled}"
