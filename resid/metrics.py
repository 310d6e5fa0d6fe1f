"""Metrics for patching: logit difference, log-probability, probability, KL to the clean run.

The README's import path; the code lives in ``resid.interventions.metrics``.

>>> from resid.metrics import as_metric
"""

from resid.interventions.metrics import (
    Metric,
    MetricFn,
    as_metric,
    kl_to_clean,
    log_prob,
    logit_diff,
    normalized,
    prob,
)

__all__ = [
    "Metric",
    "MetricFn",
    "as_metric",
    "kl_to_clean",
    "log_prob",
    "logit_diff",
    "normalized",
    "prob",
]
