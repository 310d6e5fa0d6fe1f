"""Deprecated: ``resid.compare``, a module of the flat layout, is now ``resid.io.compare``
(the reference models it built are in ``resid.io.references``).

Every name it had still imports from here, with a ``DeprecationWarning`` naming its
new place."""

from resid.core.deprecation import forwarded
from resid.io import compare as _new
from resid.io import references as _references

__getattr__, __all__ = forwarded(
    __name__,
    _new,
    {
        "random_hf_gpt2": (_references.random_hf_gpt2, "resid.io.references.random_hf_gpt2"),
        "hf_tokenizer": (_references.hf_tokenizer, "resid.io.references.hf_tokenizer"),
    },
)
