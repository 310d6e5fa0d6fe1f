"""One ActivationCache: the cache run_with_cache hands out and one a user builds from
tensors are the same class, with the same analyses, giving the same numbers; the class is
as defined (nothing swaps it at import)."""

from __future__ import annotations

import torch

import resid
from resid.core.cache import ActivationCache


def test_a_cache_built_by_hand_decomposes_like_the_one_handed_out(tiny, tokens):
    """The issue's repro: ``resid.ActivationCache(...)`` then ``.stream(l, "pre").decompose()``
    raised AttributeError while the analyses lived in a subclass. The law: the parts sum to
    the stream (here checked against the cached stream itself, not the code's own sum)."""
    logits, cache = tiny.run_with_cache(tokens)
    assert type(cache) is resid.ActivationCache is ActivationCache
    mine = resid.ActivationCache({k: v.clone() for k, v in cache.items()}, tiny)
    for layer, where in [(1, "pre"), (1, "mid"), (None, "final")]:
        a = cache.stream(layer, where).decompose()
        b = mine.stream(layer, where).decompose()
        assert a.labels == b.labels and len(a.labels) > 3
        torch.testing.assert_close(a.components, b.components, rtol=0, atol=0)
        stream = mine.stream(layer, where).tensor
        torch.testing.assert_close(b.sum(), stream, atol=1e-4, rtol=1e-4)
    # the other analyses, on the hand-built cache: the last logit lens entry is the logits
    torch.testing.assert_close(mine.logit_lens()[-1], logits, atol=1e-4, rtol=1e-4)
    dla = mine.logit_attribution(" Paris")
    torch.testing.assert_close(dla.sum(), logits[..., 6342], atol=1e-4, rtol=1e-4)


def test_nothing_above_the_core_patches_the_model_or_the_cache():
    """Once everything is imported (every layer, the SAE package, the plots), every
    attribute of the model's and the cache's classes is still the core's own: defined in
    ``resid.core`` (a class attribute set from above at import would show up here)."""
    import resid.plots  # noqa: F401 - the top layers, imported for what they might do
    import resid.sae  # noqa: F401

    for cls in (resid.Model, resid.ActivationCache):
        for klass in cls.__mro__:
            if not klass.__module__.startswith("resid"):
                continue
            assert klass.__module__.startswith("resid.core."), klass
            for name, value in vars(klass).items():
                fn = getattr(value, "fget", value)  # a property's getter
                module = getattr(fn, "__module__", None)
                if callable(fn) and module is not None and module.startswith("resid"):
                    assert module.startswith("resid.core."), (klass, name, module)
    assert "cache_type" not in vars(resid.Model)
