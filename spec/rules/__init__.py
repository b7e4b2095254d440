"""The rules catalogue: every invariant a valid qcow2 image obeys, and its evaluation.

``RULES`` names each invariant once (id, one-line statement, where the spec or QEMU says so,
and how ``qemu-img check`` counts a violation). ``evaluate(img)`` walks a parsed image and
returns one ``Finding`` per violation. The catalogue is data: docs/spec.md is rendered from it.
"""

from __future__ import annotations

from spec.rules.catalogue import RULES, RULES_BY_ID, Finding, Rule, Severity
from spec.rules.check import check
from spec.rules.evaluate import Evaluation, evaluate, run

__all__ = ["RULES", "RULES_BY_ID", "Evaluation", "Finding", "Rule", "Severity", "check", "evaluate", "run"]
