"""examples/adapters-ia3: a separate distribution, pip-installed, found by entry point and run by name."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import adapters

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "adapters-ia3"
TINY = ["--model", "random:tiny", "--seq-len", "32"]


def _adapters(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapters", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def ia3(tmp_path_factory):
    """`pip install ./examples/adapters-ia3` into a private target dir (from a copy, so that the build
    leaves nothing in the repository): the environment that sees it, with no allow-list set, and the copy."""
    tmp = tmp_path_factory.mktemp("ia3")
    source, site = tmp / "adapters-ia3", tmp / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("ADAPTERS_LOAD_PLUGINS", "ADAPTERS_STRICT_PLUGINS")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    env["ADAPTERS_STRICT_PLUGINS"] = "1"  # any trouble loading it fails the test instead of a warning
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env, source


@pytest.fixture(scope="module")
def installed(ia3):
    return ia3[0]


def test_the_example_uses_only_the_public_api():
    tree = ast.parse((EXAMPLE / "adapters_ia3.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "adapters" in imported
    assert not any(m.startswith("adapters.") for m in imported)  # nothing below the package
    used = {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "adapters"}
    assert used and used <= set(adapters.__all__) | {"hookimpl", "TASKS", "QUANTIZATIONS"}


def test_entry_point_discovery_finds_it(installed):
    code = ("import importlib.metadata as m, json; print(json.dumps([[e.name, e.value, e.dist.name] "
            "for e in m.entry_points(group='adapters')]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=installed, timeout=60)
    assert ["ia3", "adapters_ia3", "adapters-ia3"] in json.loads(done.stdout)
    plugins = {r["name"]: r for r in json.loads(_adapters("plugins", "--json", env=installed).stdout)}
    assert plugins["ia3"]["distribution"] == "adapters-ia3" and plugins["ia3"]["version"] == "0.1.0"
    assert plugins["ia3"]["strategies"] == ["ia3-auto"] and plugins["ia3"]["builtin"] is False


def test_strategies_lists_it_and_the_allow_and_block_lists_apply(installed):
    done = _adapters("strategies", "--json", env=installed)
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert rows["ia3-auto"]["plugin"] == "ia3"
    assert rows["ia3-auto"]["supported_quantization"] == ["fp4", "int8", "nf4", "none"]
    assert [o["name"] for o in rows["ia3-auto"]["options"]] == ["target_modules", "feedforward_modules"]
    assert {"lora", "prefix-tuning", "linear-probe", "full-finetune"} <= set(rows)
    for variable, value, listed in (("ADAPTERS_LOAD_PLUGINS", "adapters-ia3", True),
                                    ("ADAPTERS_LOAD_PLUGINS", "", False),
                                    ("ADAPTERS_DISABLE_PLUGINS", "adapters-ia3", False)):
        done = _adapters("strategies", "--json", env={**installed, variable: value})
        names = {r["name"] for r in json.loads(done.stdout)}
        assert ("ia3-auto" in names) is listed, (variable, value)


def test_train_runs_it_by_name_and_load_restores_it(installed, tmp_path):
    out = tmp_path / "ia3"
    done = _adapters("train", *TINY, "--strategy", "ia3-auto@nf4", "--max-steps", "2", "--batch-size", "2",
                     "--eval-batches", "1", "--output", str(out), "--json", env=installed)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["strategy"] == "ia3-auto" and summary["quantization"] == "nf4"
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"] // 100
    assert {"adapters.json", "adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "IA3"
    code = (f"import adapters; r = adapters.load({str(out)!r}); "
            "print(r.strategy.name, r.base.quantization, type(r.model).__name__)")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=installed, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split()[-3:-1] == ["ia3-auto", "nf4"]


def test_bench_runs_it_by_name(installed, tmp_path):
    out = tmp_path / "bench.json"
    done = _adapters("bench", *TINY, "--strategies", "ia3-auto", "--steps", "1", "--warmup", "0", "--output", str(out),
                     env=installed)
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = json.loads(out.read_text())["results"]
    assert result["strategy"] == "ia3-auto" and result["status"] == "ok", result


def test_plan_all_includes_it_with_its_own_estimate(installed):
    done = _adapters("plan", "--model", "random:llama-1b", "--strategies", "all", "--budget", "24GiB", "--json",
                     env=installed)
    assert done.returncode == 0, done.stderr
    plans = {p["strategy"]: p for p in json.loads(done.stdout)["plans"]}
    assert plans["ia3-auto"]["status"] == plans["ia3-auto@nf4"]["status"] == "ok"
    # k_proj and v_proj scale their 512 outputs, down_proj its 8192 inputs, in each of 16 layers
    assert plans["ia3-auto"]["trainable_parameters"] == 16 * (512 + 512 + 8192)
    assert plans["ia3-auto"]["peak_bytes"] < plans["lora"]["peak_bytes"]


def test_check_passes_it(installed):
    done = _adapters("check", "ia3-auto", env=installed)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("ia3-auto: PASSED")
    assert re.search(r"^memory-estimate .* pass .*measured", done.stdout, re.M)
    for task in ("causal-lm", "sequence-classification"):
        for quantization in ("none", "nf4", "fp4", "int8"):
            assert re.search(rf"^save-load +{task} +{quantization} +pass", done.stdout, re.M), (task, quantization)


def test_its_own_tests_pass_with_the_kit(ia3):
    env, source = ia3
    env = {**env, "ADAPTERS_LOAD_PLUGINS": ""}  # its tests register what they need
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=source, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "9 passed" in done.stdout
