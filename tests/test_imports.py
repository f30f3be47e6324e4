"""Start-up cost: the package, the `pipo` parser and the workflow helpers import without torch or transformers,
and `import pipo` alone still lets transformers' Auto classes load a PIPO checkpoint. The import graph: each
package imports only from the floors below it (README's package map)."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "swift", "pandas", "mlflow")

# The floors of the house, ground first: a module may import from its own floor's packages only within its
# package (the ground floor counts as one), and from any floor below. `pipo.cli` assembles every sub-command
# by name (importlib), so it is not in this graph.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("pipo",),  # the package root and its plain modules: errors, jsonl, lazy, chat, provenance, tracking
    ("pipo.model",),
    ("pipo.engine", "pipo.data"),
    ("pipo.train", "pipo.eval"),
    ("pipo.serve", "pipo.report"),
    ("pipo.cli",),
    ("pipo.workflow",),
)


def run_python(code: str) -> str:
    """stdout of `code` in a fresh interpreter that imports this checkout's `pipo`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("code,forbidden", [
    ("import pipo", HEAVY),
    ("import pipo.cli; pipo.cli.build_parser()", HEAVY),  # every sub-command's parser
    ("import pipo.workflow", HEAVY),
    ("import pipo.engine; pipo.engine.METHODS", HEAVY),
    ("import pipo.model.sampling", ("triton",)),  # the sampler imports its Triton kernel only when it runs it
])
def test_light_imports(code, forbidden):
    loaded = set(json.loads(run_python(f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))")))
    assert not loaded.intersection(forbidden), f"`{code}` imported {sorted(loaded.intersection(forbidden))}"


def test_generate_help_needs_no_torch():
    out = run_python("import sys\nfrom pipo.cli import main\ntry:\n    main(['generate', '--help'])\n"
                     "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    assert "--conf-threshold" in out and out.strip().endswith("False")


@pytest.fixture(scope="module")
def pipo_checkpoint(pipo_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auto") / "pipo"
    pipo_model("llama", "linear").save_pretrained(path)
    return path


@pytest.mark.parametrize("first", ["pipo", "transformers"])
def test_plain_import_pipo_registers_the_auto_classes(pipo_checkpoint, first):
    """Whether transformers' auto modules load after `import pipo` (README order) or before it."""
    imports = ["import pipo", "import transformers.models.auto.modeling_auto"]
    code = "\n".join(imports if first == "pipo" else imports[::-1]) + f"""
import sys
from transformers import AutoConfig, AutoModelForCausalLM
assert "pipo.model.modeling" not in sys.modules  # so the lookup below goes through `pipo._auto`
config = AutoConfig.from_pretrained({str(pipo_checkpoint)!r})
model = AutoModelForCausalLM.from_pretrained({str(pipo_checkpoint)!r})
from pipo.model.modeling import PIPOForCausalLM
assert type(model) is PIPOForCausalLM and type(config) is type(model.config), (type(model), type(config))
print(type(model).__name__)
"""
    assert run_python(code).strip() == "PIPOForCausalLM"


def package_of(module: str) -> str:
    """The floor entry a module belongs to: `pipo.model.pairs` -> `pipo.model`; the ground floor's plain
    modules (`pipo.jsonl`) -> `pipo`; `pipo.report`, `pipo.cli`, `pipo.workflow` -> themselves."""
    parts = module.split(".")
    for entry in (".".join(parts[:2]), parts[0]):
        if any(entry in floor for floor in FLOORS):
            return entry
    raise AssertionError(f"{module}: on no floor of FLOORS; add it")


def floor_of(package: str) -> int:
    return next(i for i, floor in enumerate(FLOORS) if package in floor)


def pipo_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute `pipo` import, also inside functions, except type-only ones."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            return
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "pipo":
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "pipo")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def upward_imports(root: Path) -> list[str]:
    """`file:line: importer -> imported` for each import of a package on the same or a higher floor."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        own = package_of(module)
        for line, target in pipo_imports(ast.parse(path.read_text(encoding="utf-8"))):
            other = package_of(target)
            if other != own and floor_of(other) >= floor_of(own):
                bad.append(f"{path.relative_to(root.parent)}:{line}: {own} -> {other}")
    return bad


def test_every_import_goes_down_the_floors():
    """model, engine and data never import eval, report or workflow; the ground floor imports nothing above it."""
    assert upward_imports(REPO / "pipo") == []


def test_an_upward_import_is_reported(tmp_path):
    for name, text in (("errors.py", ""), ("model/__init__.py", ""), ("model/pairs.py", "import pipo.report\n"),
                       ("report.py", "def f():\n    from pipo.eval import metrics\n"),
                       ("eval/__init__.py", ""), ("eval/metrics.py", "from pipo.errors import PIPOError\n")):
        (tmp_path / "pipo" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pipo" / name).write_text(text)
    assert upward_imports(tmp_path / "pipo") == ["pipo/model/pairs.py:1: pipo.model -> pipo.report"]
