"""The doctor: why *this* network does not train, with the evidence (docs/doctor.md).

``examine(model, batch, task, config)`` looks at a job before it trains — the model's structure
as one forward pass runs it, the first batch, the settings, and one forward/backward pass on a
copy — and returns a ``Report`` of findings, worst first. It leaves the model, its gradients,
buffers and the RNG streams exactly as they were.
"""

from trainkit.doctor.examine import examine
from trainkit.doctor.findings import CODES, Finding, Report

__all__ = ["CODES", "Finding", "Report", "examine"]
