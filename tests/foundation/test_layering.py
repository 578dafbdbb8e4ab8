"""The package layering of docs/architecture.md holds: the import-linter contract in
pyproject.toml is kept, and rebuilding any registered architecture never imports
`odekit.methods` (the registry's lazy imports are invisible to the static contract)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_layers_contract_is_kept() -> None:
    cli = pytest.importorskip("importlinter.cli")
    assert cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_architecture_registry_does_not_import_methods() -> None:
    code = (
        "import json, sys\n"
        "from odekit.models.registry import arch_names\n"
        "names = arch_names()\n"
        "print(json.dumps({'names': names, 'methods': sorted(m for m in sys.modules"
        " if m.startswith('odekit.methods'))}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert {"ron_student", "asnet", "odenet4", "cnf", "lenet300"} <= set(found["names"])
    assert found["methods"] == []
