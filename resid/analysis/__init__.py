"""Reading a model and its runs: circuits (composition and copying scores) and detectors
(previous-token, induction, duplicate-token and BOS heads). Built on ``resid.core`` only.
(Decomposition, the logit lens and attribution moved into the core with the cache whose
methods they are: ``resid.core.decompose``, ``resid.core.lens``.)"""
