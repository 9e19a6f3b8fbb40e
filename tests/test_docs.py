"""docs/plugins.md: the contract reference is generated, and its DoRA example, as written, passes the kit.

Built-ins, examples and the guide's plugins use only the public API (`adapters.<name>` in `__all__`).
"""
from __future__ import annotations

import importlib.util
import re
import runpy
from pathlib import Path

import pytest

import adapters
import adapters.testing

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "plugins.md"


def block(text: str, marker: str) -> str:
    """The fenced code block right after ``<!-- marker -->``."""
    match = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)\n```", text, re.S)
    assert match, f"no block marked {marker}"
    return match.group(1) + "\n"


def test_the_contract_reference_is_generated_from_the_docstrings():
    renderer = runpy.run_path(str(ROOT / "scripts" / "contract_docs.py"))
    text = DOCS.read_text()
    assert renderer["updated"](text) == text, "docs/plugins.md is out of date: run python scripts/contract_docs.py"
    for name in ("Strategy", "StrategyBase", "SavesOwnFormat", "DeclaresTrainable", "EstimatesMemory",
                 "ModelShape", "LinearShape", "RunShape", "StrategyMemory", "PeftStrategy", "match_targets"):
        assert f"### `adapters.{name}`" in text, name
        assert getattr(adapters, name).__doc__.splitlines()[0].strip() in text, name


@pytest.fixture(scope="module")
def dora(tmp_path_factory):
    path = tmp_path_factory.mktemp("dora") / "adapters_dora.py"
    path.write_text(block(DOCS.read_text(), "docs-dora-module"))
    spec = importlib.util.spec_from_file_location("adapters_dora", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_guides_dora_example_passes_every_check_with_its_memory_estimate(dora):
    report = adapters.testing.run_checks(dora.Dora())
    assert report.passed, report.table(failures_only=True)
    memory = [r for r in report.results if r.check == "memory-estimate"]
    assert [r.status for r in memory] == ["pass"], memory
    # It is really DoRA: PEFT's magnitude vectors train beside A and B.
    base = adapters.load_base_model("random:tiny")
    model = dora.Dora().apply(base.model, dora.DoraOptions())
    assert any("lora_magnitude_vector" in n for n, _ in adapters.trainable_parameters(model))


def public_names_used(text: str) -> set[str]:
    return set(re.findall(r"\badapters\.(\w+)", text))


@pytest.mark.parametrize("path", sorted([*ROOT.glob("plugins/*.py"), ROOT / "examples/adapters-ia3/adapters_ia3.py"]),
                         ids=lambda p: p.name)
def test_builtins_and_examples_use_only_the_public_api(path):
    text = path.read_text()
    assert public_names_used(text) <= set(adapters.__all__), public_names_used(text) - set(adapters.__all__)
    assert not re.search(r"^\s*(from adapters\.|import adapters\.|from adapters_)", text, re.M)


def test_the_guides_plugins_use_only_the_public_api():
    text = DOCS.read_text()
    for marker in ("docs-plugin-module", "docs-dora-module", "docs-renderer-module", "docs-reader-module"):
        code = block(text, marker)
        assert public_names_used(code) <= set(adapters.__all__), marker
        assert "adapters_lora" not in code and "from adapters" not in code, marker


def test_every_test_named_in_the_reliability_map_exists():
    """docs/reliability.md maps the 25 cases to tests; a renamed or removed test must not leave a stale row."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = (root / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"`(test_\w+)::(test_\w+)`", text))
    assert len(named) > 60
    missing = [f"{module}::{name}" for module, name in sorted(named)
               if not re.search(rf"^def {name}\(", (root / "tests" / f"{module}.py").read_text(), re.M)]
    assert not missing, missing
    rows = re.findall(r"^\| (\d+) \|", text, re.M)
    assert rows == [str(i) for i in range(1, 26)]
