"""Start-up cost: the package, the `pipo` parser and the workflow helpers import without torch or transformers,
and `import pipo` alone still lets transformers' Auto classes load a PIPO checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "swift", "pandas", "mlflow")


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
