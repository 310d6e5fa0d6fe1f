"""Changing a run: metrics, patching (single patches, sweeps and the engine that runs
them), path and attribution patching. Built on ``resid.core`` and ``resid.analysis``."""
