"""What the kit found: one `CheckResult` per check and place, gathered in a `CheckReport`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..text import aligned_table

PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass
class CheckResult:
    """One row of a report: a check, where it ran, and what it found."""

    check: str
    status: str  # "pass", "fail" or "skip"
    task: str | None = None
    quantization: str | None = None
    detail: str = ""
    # The formatted traceback of the exception that failed the check (None on pass and skip): where
    # in the plugin's code an unexpected error came from, which the one-line detail cannot say.
    traceback: str | None = None

    @property
    def where(self) -> str:
        """``check (task, quantization)``, or the check's name alone for a check that runs once."""
        return f"{self.check} ({self.task}, {self.quantization})" if self.task else self.check


@dataclass
class CheckReport:
    """Every check's result for one strategy."""

    strategy: str
    plugin: str
    supported_quantization: list[str]
    supported_tasks: list[str]
    supports_gradient_checkpointing: bool
    options: dict[str, Any]  # the config's defaults, as JSON values
    description: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == FAIL]

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        counts = {s: sum(r.status == s for r in self.results) for s in (PASS, FAIL, SKIP)}
        verdict = "PASSED" if self.passed else "FAILED"
        return (f"{self.strategy}: {verdict} ({counts[PASS]} passed, {counts[FAIL]} failed, "
                f"{counts[SKIP]} skipped)")

    def table(self, width: int = 110, failures_only: bool = False) -> str:
        """A plain-text table: check, task, quantization, result, detail."""
        rows = [r for r in self.results if r.status == FAIL or not failures_only]
        # A failure's detail is never cut short: it says what to fix.
        cells = [[r.check, r.task or "-", r.quantization or "-", r.status.upper() if r.status == FAIL else r.status,
                  r.detail if r.status == FAIL else _shorten(r.detail, width)] for r in rows]
        return aligned_table(cells, ["check", "task", "quantization", "result", "detail"])

    def tracebacks(self) -> str:
        """Each failed check's traceback under a line naming the check ("" when none failed)."""
        return "\n".join(f"--- {r.where}\n{r.traceback.rstrip()}" for r in self.failures if r.traceback)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["passed"] = self.passed
        return data


class ConformanceError(AssertionError):
    """A strategy failed the conformance kit; the message is the table of failing rows and their tracebacks."""

    def __init__(self, report: CheckReport) -> None:
        self.report = report
        message = f"{report.summary()}\n{report.table(width=400, failures_only=True)}"
        tracebacks = report.tracebacks()
        super().__init__(f"{message}\n\n{tracebacks}" if tracebacks else message)


def _shorten(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."
