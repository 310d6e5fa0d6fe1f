"""Config checks its own fields: a bad value fails at construction, naming the field."""

import pytest

from resid.core.config import Config


def test_config_checks_its_own_fields():
    for bad in (dict(n_layers=True), dict(n_layers=2.0), dict(d_vocab=0), dict(n_ctx=-1),
                dict(layer_norm_eps=-1.0), dict(layer_norm_eps=float("nan")), dict(layer_norm_eps=0)):  # fmt: skip
        with pytest.raises(ValueError, match="must be a positive"):
            Config(**bad)
