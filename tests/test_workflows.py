"""The recipes in workflows/ still import against the library, and read the example manifest."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, WORKFLOWS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports only: both recipes run their work under __main__
    return module


def test_segment_cohort_reads_the_example_manifest() -> None:
    jobs = load("segment_cohort").read_manifest(WORKFLOWS / "cohort_manifest.example.csv")
    assert [job.path for job in jobs] == [
        WORKFLOWS / "slides" / name for name in ("case-001.svs", "case-002.ndpi", "case-003.tif")
    ]
    assert [job.slide_mpp for job in jobs] == [None, None, 0.2527]


def test_python_api_recipe_imports() -> None:
    assert callable(load("python_api").main)


def test_sbatch_script_is_valid_bash_with_directives_before_commands() -> None:
    script = WORKFLOWS / "sbatch_segment.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    lines = script.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directives and max(directives) < first_command  # sbatch ignores #SBATCH after a command
