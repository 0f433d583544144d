"""The house: the package has no import circle, docs/design.md lists every module, the loop fits on one screen, a run
imports no library it does not use, the docs import and run only modules that exist."""

import ast
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

from ds_distill.core.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ds_distill"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def import_names(node: ast.AST, package: str) -> tuple[list[str], list[str]]:
    """For an import statement of a module in ``package``: the modules it names (relative imports resolved) and, for
    ``from M import a, b``, the dotted ``M.a``, ``M.b`` (modules or not: the caller decides); ``([], [])`` for any
    other node."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names], []
    if not isinstance(node, ast.ImportFrom):
        return [], []
    base = node.module or ""
    if node.level:  # relative: from the importing module's package
        up = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(up + ([base] if base else []))
    return [base], [f"{base}.{a.name}" for a in node.names]


def imported(path: Path, known: set[str]) -> set[str]:
    """Every ds_distill module ``path`` imports, at any depth (function-level and ``TYPE_CHECKING`` imports count), with
    the packages whose ``__init__`` that import runs; ``from pkg import name`` counts ``pkg.name`` when it is a
    module."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    own_packages = {".".join(package.split(".")[:i]) for i in range(2, len(package.split(".")) + 1)}
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        modules_named, from_names = import_names(node, package)
        for name in modules_named + [n for n in from_names if n in known]:
            parts = name.split(".")
            # Importing a.b.c runs a/__init__ and a/b/__init__ first, except the importer's own packages: they are
            # loaded before the importer runs, so reaching a sibling through them is no circle.
            ancestors = {".".join(parts[:i]) for i in range(2, len(parts))} - {package, *own_packages}
            out |= {n for n in ancestors | {name} if n in known}
    out.discard(me)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods) - {"ds_distill"}
    return {m: imported(p, known) for m, p in mods.items() if m != "ds_distill"}


def test_no_import_circle_counting_function_level_and_type_checking_imports():
    assert cycles(import_graph()) == []


def test_the_circle_check_finds_a_planted_circle():
    graph = import_graph()
    graph["ds_distill.common"] = graph["ds_distill.common"] | {
        "ds_distill.core.trainer"
    }  # the ground floor reaching up
    assert any("ds_distill.common" in c and "ds_distill.core.trainer" in c for c in cycles(graph))


def test_the_ground_floor_imports_nothing_of_ours():
    assert import_graph()["ds_distill.common"] == set()


def test_design_doc_lists_every_module_and_no_other():
    """docs/design.md's layout table names each module by its path, once; a module added or removed without the doc
    fails here."""
    doc = (ROOT / "docs" / "design.md").read_text()
    listed = re.findall(r"^\| `(ds_distill/[\w/]+\.py)` \|", doc, flags=re.M)
    on_disk = sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py"))
    assert sorted(set(listed)) == on_disk, (
        f"missing from docs/design.md: {sorted(set(on_disk) - set(listed))}; "
        f"listed but gone: {sorted(set(listed) - set(on_disk))}"
    )
    assert len(listed) == len(set(listed)), "a module is listed twice"


def test_the_loop_fits_on_one_screen():
    lines = inspect.getsource(Trainer.fit).splitlines()
    assert len(lines) <= 50, f"Trainer.fit is {len(lines)} lines"


def test_no_test_module_imports_another():
    """Shared test code lives in tests/helpers.py, tests/launch.py, tests/tiny.py and the fixtures, not in a test_*
    module: importing one would collect its tests twice and tie two unrelated files together."""
    found = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "tests" else [node.module]
            found += [f"{path.name}: {n}" for n in names if n and n.startswith("tests.test_")]
    assert not found, found


def trainer_writes(source: str) -> list[str]:
    """``trainer.X = ...``, ``trainer.X += ...``, ``del trainer.X`` in ``source``: writes of the trainer's state."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        else:
            continue
        for target in targets:
            for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "trainer":
                    found.append(f"{t.lineno}: trainer.{t.attr}")
    return found


def test_nothing_writes_trainer_state():
    """Callbacks, rounds and the wiring read the trainer (runtime.callbacks.Trainer is a read-only view); decisions go
    back through return values (on_eval, should_stop, on_stop's exit code) and the trainer's own methods."""
    writes = {name: trainer_writes(path.read_text()) for name, path in modules().items()}
    assert {name: found for name, found in writes.items() if found} == {}


def test_the_writes_check_finds_planted_writes():
    planted = "def f(trainer):\n    trainer.exit_code = 75\n    trainer.step += 1\n    del trainer.student, trainer.x\n"
    assert trainer_writes(planted) == ["2: trainer.exit_code", "3: trainer.step", "4: trainer.student", "4: trainer.x"]


# Libraries a plain training run does not use: peft, matplotlib and wandb are imported inside the functions that need
# them (LoRA, plots, the wandb monitor), the others by nothing of ours (a vLLM teacher is reached over HTTP), so
# ``import ds_distill.train`` and every run's start-up skip them (issue 28's start-up split).
LAZY_LIBRARIES = {"peft", "matplotlib", "scipy", "sklearn", "vllm", "trl", "wandb", "tensorboard", "requests"}


def eager_imports(module: str, mods: dict[str, Path]) -> set[str]:
    """The top-level names of every library importing ``module`` runs: the statements executed at import (module and
    class bodies; not function bodies, not ``if TYPE_CHECKING:`` blocks), followed through our own modules and the
    packages whose ``__init__`` they run."""
    seen: set[str] = set()
    libraries: set[str] = set()

    def executed(tree: ast.AST):
        for node in ast.iter_child_nodes(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                yield from (n for child in node.orelse for n in [child, *executed(child)])
                continue
            yield node
            yield from executed(node)

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        package = name if mods[name].name == "__init__.py" else name.rpartition(".")[0]
        for node in executed(ast.parse(mods[name].read_text())):
            modules_named, from_names = import_names(node, package)
            for full in modules_named + from_names:
                parts = full.split(".")
                if parts[0] != "ds_distill":
                    libraries.add(parts[0])
                    continue
                for i in range(1, len(parts) + 1):  # a.b.c runs a/__init__ and a/b/__init__ first
                    if ".".join(parts[:i]) in mods:
                        visit(".".join(parts[:i]))

    visit(module)
    return libraries


def test_a_run_does_not_import_libraries_it_does_not_use():
    libraries = eager_imports("ds_distill.train", modules())
    assert {"torch", "transformers", "deepspeed", "datasets"} <= libraries  # what a run does use: the walk finds them
    assert libraries & LAZY_LIBRARIES == set()


def doc_references(text: str) -> list[tuple[str, list[str]]]:
    """``(module, names)`` for each ``from ds_distill.X import A, B`` and ``python -m ds_distill.X`` (names empty) in a
    document's text."""
    found = [
        (m, [n.strip() for n in names.split(",")])
        for m, names in re.findall(r"from (ds_distill[\w.]*) import ([\w, ]+)", text)
    ]
    return found + [(m.rstrip("."), []) for m in re.findall(r"python -m (ds_distill[\w.]*)", text)]


def unresolved(references: list[tuple[str, list[str]]]) -> list[str]:
    """The references whose module is missing, whose ``-m`` target cannot run (a package without ``__main__``), or
    whose names the module lacks."""
    bad = []
    for module, names in references:
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:  # a parent package is missing too
            spec = None
        if spec is None:
            bad.append(f"no module {module}")
        elif (
            not names
            and spec.submodule_search_locations is not None
            and not importlib.util.find_spec(f"{module}.__main__")
        ):
            bad.append(f"python -m {module}: a package without __main__")
        else:
            bad += [f"{module} has no {n}" for n in names if not hasattr(importlib.import_module(module), n)]
    return bad


def test_the_docs_name_only_modules_and_names_that_exist():
    """Every import and entry point that README.md and docs/*.md show resolves: a module moved without its docs fails
    here."""
    references = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        references += doc_references(path.read_text())
    assert ("ds_distill.train", []) in references and any(names for _, names in references)  # the scan finds both kinds
    assert unresolved(references) == []


def test_the_docs_check_finds_planted_misses():
    planted = 'python -c "from ds_distill.tracking import hardest_examples"\n`python -m ds_distill.data`\n'
    planted += "from ds_distill.extras.tracking import hardest_examples, nowhere\nfrom ds_distill.gone.x import y\n"
    assert unresolved(doc_references(planted)) == [
        "no module ds_distill.tracking",
        "ds_distill.extras.tracking has no nowhere",
        "no module ds_distill.gone.x",
        "python -m ds_distill.data: a package without __main__",
    ]
