"""The shape of the package (STYLE.md): dependencies point one way, the CLI alone parses arguments, FP8 numerics
import nothing of ours, and every job shares one run layer."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "linglab"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """linglab modules imported anywhere in the file, function-level imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("linglab")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("linglab"):
            modules = {f"{node.module}.{a.name}" for a in node.names}
            found |= {m for m in modules if (PACKAGE.parent / (m.replace(".", "/") + ".py")).is_file()} or {node.module}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_cycles_in_linglab():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if dep == "linglab" or dep.endswith("__init__"):
                continue
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_fp8_numerics_import_nothing_of_ours():
    assert not _imports(PACKAGE / "fp8.py")


def test_only_the_cli_builds_argument_parsers():
    offenders = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
                 if p.name != "cli.py" and ("argparse" in p.read_text() or "add_argument(" in p.read_text())]
    assert not offenders, f"argparse outside linglab/cli.py: {offenders}"


def test_no_job_imports_run_plumbing_from_train():
    """Pretraining, SFT, RL and the sweep share linglab.run; nothing reaches into train.py for it."""
    plumbing = {"prepare_run_dir", "checkpoint_dirs", "save_checkpoint", "rng_state", "set_rng_state", "resolve_device",
                "truncate_metrics", "make_optimizer", "build_data"}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "linglab.train":
                taken = {a.name for a in node.names} & plumbing
                assert not taken, f"{path.name} imports {taken} from linglab.train"


def test_one_checkpoint_writer_and_one_optimizer_builder():
    sources = {p: p.read_text() for p in PACKAGE.rglob("*.py")}
    writers = [p.name for p, s in sources.items() if "torch.save(" in s]
    assert writers == ["run.py"], f"torch.save outside the run layer: {writers}"
    builders = [p.name for p, s in sources.items() if "torch.optim.AdamW(" in s]
    assert builders == ["run.py"], f"AdamW built outside the run layer: {builders}"
