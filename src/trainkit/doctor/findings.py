"""What the doctor reports: findings with a code, a severity, where, the evidence, what is wrong,
the fix; and every check it ran, passed or not (``doctor.json``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")  # worst first

# Every code the doctor can report, with what it means: the one list (docs/doctor.md documents each rule).
CODES: dict[str, str] = {
    "loss_at_init": "the loss at initialisation is far above the chance level of the task",
    "vanishing_gradients": "the weight gradients shrink geometrically from the output back to the input",
    "dead_units": "most units of a ReLU-like layer output zero for every sample",
    "saturated_units": "most units of a sigmoid/tanh layer sit in its flat tails",
    "init_scale": "the activations' scale drifts geometrically with depth: the init does not suit the activation",
    "unnormalized_inputs": "the inputs are far from zero mean and unit scale",
    "batchnorm_after_dropout": "a BatchNorm normalises a Dropout's output directly",
    "dropout_on_output": "Dropout is applied to the model's output",
    "batchnorm_small_batch": "BatchNorm trains on micro-batches of fewer than 8 samples",
    "batchnorm_in_sequence_model": "BatchNorm inside a recurrent or attention model",
    "no_clipping_recurrent": "a recurrent model trains without gradient clipping",
    "no_warmup": "an attention model trains at a large lr without warmup",
    "nonfinite": "the loss or a gradient is NaN/inf",
}


@dataclass
class Finding:
    """One problem found: ``verified`` holds before/after figures once a fix was tried (else None)."""

    code: str
    severity: Severity
    where: str  # a module name, a setting (--flag) or "data"
    evidence: dict[str, Any]
    message: str  # what is wrong and why it hurts
    fix: str  # a flag or a code change
    verified: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown doctor code {self.code!r}; known: {', '.join(CODES)}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")


@dataclass
class Check:
    """A check that ran, with the figures it looked at."""

    name: str
    passed: bool
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    def check(self, name: str, passed: bool, **figures: Any) -> bool:
        self.checks.append(Check(name, bool(passed), {k: plain(v) for k, v in figures.items()}))
        return bool(passed)

    def add(self, code: str, severity: Severity, where: str, evidence: dict[str, Any], message: str, fix: str) -> None:
        """A finding, once per (code, where)."""
        if any(f.code == code and f.where == where for f in self.findings):
            return
        self.findings.append(Finding(code, severity, where, {k: plain(v) for k, v in evidence.items()}, message, fix))

    def problems(self) -> list[Finding]:
        """The findings of severity warning or error, worst first (what makes `trainkit doctor` exit 1)."""
        return [f for f in self.sorted() if f.severity != "info"]

    def sorted(self) -> list[Finding]:
        return sorted(self.findings, key=lambda f: SEVERITIES.index(f.severity))

    def codes(self) -> set[str]:
        return {f.code for f in self.problems()}

    def to_dict(self) -> dict[str, Any]:
        return {"findings": [asdict(f) for f in self.sorted()], "checks": [asdict(c) for c in self.checks]}

    def format(self) -> str:
        """The report as a person reads it: worst first, each with its evidence and fix."""
        if not self.findings:
            return f"doctor: nothing wrong found ({len(self.checks)} checks passed)"
        lines = [f"doctor: {len(self.problems())} problem(s), {len(self.findings) - len(self.problems())} note(s)"]
        for f in self.sorted():
            evidence = ", ".join(f"{k} {format_value(v)}" for k, v in f.evidence.items())
            lines += [f"  {f.severity.upper():7} {f.code} at {f.where}: {f.message}",
                      f"          evidence: {evidence}", f"          fix: {f.fix}"]  # fmt: skip
        return "\n".join(lines)


def plain(value: Any) -> Any:
    """JSON-ready: floats rounded to 4 significant digits, non-finite floats as strings."""
    if isinstance(value, float):
        return float(f"{value:.4g}") if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
