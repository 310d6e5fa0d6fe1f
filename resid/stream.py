"""The residual stream as a data structure: streams, states, and ``add`` for steering.

The README's import path; the code lives in ``resid.core.stream``. ``Site`` and
``locate``, which lived here before the layered package, are hook-name facts now
(``resid.core.names``): they still import from here, with a DeprecationWarning.

>>> from resid.stream import add
"""

from resid.core import names as _names
from resid.core.deprecation import moved
from resid.core.stream import ResidualStream, State, States, add

__all__ = ["ResidualStream", "State", "States", "add"]
__getattr__ = moved(
    __name__,
    {
        "Site": (_names.Site, "resid.core.names.Site"),
        "locate": (_names.locate, "resid.core.names.locate"),
    },
)
