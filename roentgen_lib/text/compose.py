"""Report sentences composed from finding specs (finding, side, severity), in report language.

Used three ways: the phantom world adds composed reports to IU-Xray's (which holds too few findings
per side for a model to learn them: 12 pneumothoraces in the demo training split), 04 asks a model
for every finding x side x severity, and 05 scores models on composed prompts with negations and on
phrasings that no training report uses.
"""

from __future__ import annotations

import numpy as np

SEVERITY_WORDS = {"small": "small", "moderate": "moderate", "large": "large"}
GRADE_WORDS = {"small": "mild", "moderate": "moderate", "large": "severe"}  # for heart size and edema
SPEC_SIDES = {"Pleural Effusion": ("left", "right", "bilateral"), "Pneumothorax": ("left", "right"),
              "Consolidation": ("left", "right"), "Cardiomegaly": (None,), "Edema": (None,)}
SEVERITIES = ("small", "moderate", "large")
NORMAL_PROMPT = "no acute cardiopulmonary process."
# What a composed report may deny besides its finding, per finding ("no pneumothorax. large left pleural effusion.").
NEGATIONS = {"Pleural Effusion": "no pneumothorax.", "Pneumothorax": "no pleural effusion.",
             "Consolidation": "no pleural effusion or pneumothorax.", "Cardiomegaly": "no pleural effusion or pneumothorax.",
             "Edema": "no pneumothorax."}
NORMAL_NEGATIONS = tuple(sorted(set(NEGATIONS.values())))  # what a composed normal report may deny
# Phrasings of the same findings that composed reports never use (05 checks none occurs in training).
HELD_OUT_PHRASINGS = (
    "there is a large pneumothorax on the left.",
    "there is a large pneumothorax on the right.",
    "layering left effusion, large.",
    "layering right effusion, large.",
    "moderate right pleural effusion without pneumothorax.",
    "moderate left pleural effusion without pneumothorax.",
    "bilateral pleural effusions, moderate in size.",
    "the cardiac silhouette is enlarged.",
    "no pneumothorax or effusion. enlarged cardiac silhouette.",
    "pulmonary vascular congestion with interstitial edema.",
    "heart size is normal. small right pleural effusion.",
    "lungs are clear. no pleural effusion or pneumothorax.",
)


class SpecError(ValueError):
    """A finding spec names a finding, side or severity that cannot be composed."""


def compose_prompt(finding: str, side: str | None = None, severity: str | None = None) -> str:
    """Report-style prompt for one finding spec, e.g. ("Pneumothorax", "right", "large") -> "large right pneumothorax."."""
    if finding not in SPEC_SIDES:
        raise SpecError(f"finding {finding!r} cannot be composed; allowed: {', '.join(SPEC_SIDES)}")
    if side not in SPEC_SIDES[finding]:
        raise SpecError(f"side {side!r} is not allowed for {finding}; allowed: {SPEC_SIDES[finding]}")
    if severity is not None and severity not in SEVERITIES:
        raise SpecError(f"severity {severity!r} is not one of {', '.join(SEVERITIES)}")
    words = {"Cardiomegaly": "cardiomegaly", "Edema": "pulmonary edema", "Pneumothorax": "pneumothorax",
             "Consolidation": "consolidation", "Pleural Effusion": "pleural effusions" if side == "bilateral" else "pleural effusion"}
    grade = (GRADE_WORDS if finding in ("Cardiomegaly", "Edema") else SEVERITY_WORDS).get(severity or "", "")
    return " ".join(w for w in (grade, side or "", words[finding]) if w) + "."


def negated_prompt(finding: str, side: str | None = None, severity: str | None = None) -> str:
    """The composed prompt preceded by a negation of another finding, as reports are written."""
    return f"{NEGATIONS[finding]} {compose_prompt(finding, side, severity)}"


def finding_specs(findings: tuple[str, ...] = tuple(SPEC_SIDES), severities: tuple[str, ...] = SEVERITIES) -> list[dict]:
    """Every (finding, side, severity) combination: the grid of 04's controllability gallery."""
    return [{"finding": f, "side": side, "severity": sev} for f in findings for side in SPEC_SIDES[f] for sev in severities]


def composed_reports(count: int, seed: int) -> list[str]:
    """`count` composed reports: a uniform draw over the specs and a normal report, half with a negation.

    Normal reports are negated too ("no pleural effusion or pneumothorax. no acute cardiopulmonary
    process."): without them every composed report that names a finding, even to deny it, shows one
    finding or another, and a model learns to draw an effusion for "no pleural effusion" alone.
    """
    specs = finding_specs()
    rng = np.random.default_rng([seed, 11])
    reports = []
    for _ in range(count):
        k = int(rng.integers(len(specs) + 1))
        negated = rng.random() < 0.5
        if k == len(specs):
            reports.append(f"{rng.choice(NORMAL_NEGATIONS)} {NORMAL_PROMPT}" if negated else NORMAL_PROMPT)
        else:
            reports.append((negated_prompt if negated else compose_prompt)(**specs[k]))
    return reports
