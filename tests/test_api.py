"""The package's shape: a lazy public API, light commands that never import torch, the launcher."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import adapters

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "benchmarks" / "results" / "cpu-2core-default-suite.json"
HEAVY = ("torch", "transformers", "peft", "accelerate", "matplotlib")


def imported_after(code: str, *argv: str) -> dict:
    """Run ``code`` in a fresh interpreter; which heavy modules it imported, its exit code and output.

    ``code`` may call the CLI's ``main`` (which exits): the exit is caught so the check still runs.
    """
    script = (
        "import json, sys, io, contextlib\n"
        "out = io.StringIO()\ncode = 0\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n" + "".join(f"        {line}\n" for line in code.splitlines()) +
        "    except SystemExit as exc:\n        code = exc.code or 0\n"
        f"print(json.dumps({{'heavy': [m for m in {HEAVY!r} if m in sys.modules], 'code': code, "
        "'out': out.getvalue()}))\n"
    )
    env = {**os.environ, "ADAPTERS_LOAD_PLUGINS": ""}
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_adapters_imports_no_heavy_library():
    assert imported_after("import adapters")["heavy"] == []


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["compare", str(REPORT), str(REPORT)],
    ["report", str(REPORT), "--format", "markdown"],
    ["strategies"],
    ["strategies", "--json"],
    ["plugins"],
])
def test_light_commands_never_import_torch(argv):
    result = imported_after(f"from adapters.cli import main\nmain({argv!r})")
    assert result["code"] == 0, result
    assert result["heavy"] == [], f"`adapters {' '.join(argv)}` imported {result['heavy']}"
    assert result["out"].strip()


def test_strategies_lists_the_builtins_without_transformers():
    result = imported_after("from adapters.cli import main\nmain(['strategies', '--json'])")
    names = {s["name"] for s in json.loads(result["out"])}
    assert {"lora", "qlora", "prefix-tuning", "linear-probe", "full-finetune"} <= names
    assert "transformers" not in result["heavy"]


def test_every_public_name_resolves_and_none_is_shadowed_by_a_submodule():
    for name in adapters.__all__:
        assert getattr(adapters, name) is not None, name
    # `import adapters.<x>` sets the attribute <x> on the package: a public name that were also a
    # submodule's name would turn into the module once anything imported it (train vs train.py).
    submodules = {p.stem for p in (ROOT / "adapters").glob("*.py")} | \
        {p.parent.name for p in (ROOT / "adapters").glob("*/__init__.py")}
    assert not set(adapters.__all__) & submodules


def test_submodules_stay_reachable_as_attributes():
    assert "random:tiny" in adapters.models.MODELS
    with pytest.raises(AttributeError):
        adapters.no_such_thing  # noqa: B018


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = sorted(".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.glob("adapters*/**/__init__.py"))
    assert sorted(config["packages"]) == found
    assert config["packages"] and all((ROOT / "plugins" / f"{m}.py").exists() for m in config["py-modules"])


def test_the_distribution_has_a_name_of_its_own():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == adapters.__distribution__ == "adapters-lab"  # PyPI's `adapters` is AdapterHub's
    assert project["scripts"]["adapters"] == "adapters_lab:main"


def test_launcher_runs_the_cli():
    proc = subprocess.run([sys.executable, "-c", "import adapters_lab; adapters_lab.main()", "--version"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "version" in proc.stdout


@pytest.mark.parametrize("init", [
    '__version__ = "1.3.0"\n',  # AdapterHub's adapters, importable
    'raise ImportError("cannot import name X from transformers")\n',  # ... or broken in this environment
])
def test_launcher_names_a_shadowing_adapters_package_in_one_line(init, tmp_path):
    fake = tmp_path / "adapters"
    fake.mkdir()
    (fake / "__init__.py").write_text(init)
    launcher = ROOT / "adapters_lab"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(launcher.parent)])}
    proc = subprocess.run([sys.executable, "-c", "import adapters_lab; adapters_lab.main()", "strategies"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(fake / "__init__.py") in lines[0] and "cannot share an environment" in lines[0]
    assert "pip uninstall adapters adapters-lab" in lines[0]
