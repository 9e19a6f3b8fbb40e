"""The conformance kit for strategy plugins: the checks behind `adapters check`, for a plugin's own tests.

Every check runs on tiny random models (``random:tiny``, a two-layer Llama, loaded for each task the
strategy declares and quantized each way it declares), on the CPU, in seconds::

    import adapters.testing

    def test_my_strategy_conforms():
        adapters.testing.assert_conforms("my-strategy")    # a registered name, or a strategy object

    # or one test per (task, quantization):
    @pytest.mark.parametrize("task, quantization", adapters.testing.cases(MyStrategy()))
    def test_my_strategy(task, quantization):
        adapters.testing.assert_conforms(MyStrategy(), tasks=[task], quantizations=[quantization])

`run_checks` returns a `CheckReport` (one `CheckResult` row per check, task and quantization, a
failed one with the traceback of what failed it); `assert_conforms` raises `ConformanceError` (an
AssertionError) with the failing rows. The `register_plugin` fixture registers a plugin for one
test and always unregisters it; load it with ``pytest_plugins = ["adapters.testing"]`` in a
conftest.py, or ``from adapters.testing import register_plugin`` there. `registered` is the same
as a context manager.

Modules: `checks` and `end_to_end` (every check, declared once with its scope and description;
`catalog.CHECKS` lists them), `harness` (the runs of the core's training session they share), `runner` (running them),
`report` (the results), `fixtures` (registering plugins for a test), `matrix` (`adapters matrix`).
The checks are described in docs/plugins.md.
"""
from .catalog import CELL_CHECKS, CHECKS, OPTIONAL_CHECKS
from .fixtures import plugin_for, register_plugin, registered
from .harness import LABELS, STEPS, TINY_MODEL
from .report import FAIL, PASS, SKIP, CheckReport, CheckResult, ConformanceError
from .runner import assert_conforms, cases, run_checks

__all__ = [
    "CELL_CHECKS", "CHECKS", "FAIL", "OPTIONAL_CHECKS", "LABELS", "PASS", "SKIP", "STEPS", "TINY_MODEL",
    "CheckReport", "CheckResult",
    "ConformanceError", "assert_conforms", "cases", "plugin_for", "register_plugin", "registered",
    "run_checks",
]
