"""Reading a run: decompositions, lenses and attribution, circuits, detectors. Built on
``resid.core`` only."""
