"""Building many long-lived objects at once without the cyclic garbage collector's passes.

Loading a cohort's records (and encoding them for a dataset) makes hundreds of thousands of small
objects (a ``Record``, its ``ImageRef``, path, turns, tuples: about eight tracked objects per
record) that stay alive and hold no reference cycles, so a collection can free none of them. Yet
CPython (3.11) runs a full collection, a pass over every tracked object in the process, each time
the objects that survived into the oldest generation grow by a quarter. A process that already
holds ~430,000 objects (torch, transformers) saw no full pass while loading 4,500 records and
three (1.1-1.4 s, a fifth of dataset start-up) while loading 45,000, each over the whole heap:
the step from "none" to "several" made start-up super-linear between the two scales.

``long_lived()`` follows the CPython documentation of ``gc.freeze``: the collector is off while
the block builds its objects (a pass could free nothing), and when the block created many of them
(``freeze_min`` tracked objects, net; 100,000 is about 12,000 records) they are moved to the
permanent generation with ``gc.freeze()``, so later passes skip them (and a DataLoader worker
forked afterwards does not touch their pages: copy-on-write sharing is kept). Below that
threshold the block only runs with the collector off; after it the collector is as it was.

What ``gc.freeze()`` costs: it freezes every object tracked at that moment, not only the block's;
a reference cycle among frozen objects is never collected (acyclic ones, such as records, are
still freed by reference counting when dropped). It is done once per large load, which is what a
training or evaluation process does; small loads (tests, a few thousand records) never freeze.
``gc.unfreeze()`` hands the frozen objects back to the oldest generation.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager

FREEZE_MIN_OBJECTS = 100_000


@contextmanager
def long_lived(freeze_min: int | None = None):
    """Run the block with the cyclic collector off; freeze what exists if it made ``freeze_min``
    (default ``FREEZE_MIN_OBJECTS``) or more tracked objects, net, and ended normally. Nested
    blocks defer to the outermost; when the collector is already off (the caller's choice)
    nothing is changed."""
    if not gc.isenabled():
        yield
        return
    freeze_min = FREEZE_MIN_OBJECTS if freeze_min is None else freeze_min
    gc.disable()
    before = gc.get_count()[0]  # tracked allocations minus deallocations since the last pass
    try:
        yield
        if gc.get_count()[0] - before >= freeze_min:
            gc.freeze()
    finally:
        gc.enable()
