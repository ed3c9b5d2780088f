"""Running source models over the calibration data once, with every statistic riding along."""
from __future__ import annotations

from typing import Iterable

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..capture import Program


def source_pass(programs: list[Program], batches: Iterable, observers: list, *, progress: bool = True,
                desc: str = "activation statistics") -> int:
    """Run each captured model once over ``batches``, handing each batch's taps to every observer.

    An observer has ``nodes`` (the captured nodes it reads) and ``update(taps, index)``, where ``taps[i]``
    maps node names to model i's tensors and ``index`` is the batch's global index (its seeded samples
    depend on it alone); an observer with ``reduce()`` has its sums added up over the ranks of a process
    group at the end (:mod:`pleas.distributed`). Several statistics that need the source models'
    activations share one pass this way (the matching's moments and the refit's targets). Returns the
    batches seen."""
    batches = list(batches)
    offset, _ = distributed.offset_and_total(len(batches))
    nodes = sorted({n for o in observers for n in o.nodes})
    seen = 0
    with torch.no_grad():
        for i, batch in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
            taps = [program.run(batch, nodes)[1] for program in programs]
            for o in observers:
                o.update(taps, offset + i)
            seen += 1
    for o in observers:
        if hasattr(o, "reduce"):
            o.reduce()
    return seen


def collect_moments(models: list, spec, batches: Iterable, *, cross: bool = False, max_rows: int | None = None,
                    seed: int = 0, observers: list | None = None, progress: bool = True) -> dict:
    """Moments of the stacked units ``[model 0 units | model 1 units | ...]`` of every group of ``spec``
    (:class:`~pleas.statistics.Moments`, or with ``cross`` and two models
    :class:`~pleas.statistics.CrossMoments`), over ``batches``, with ``observers`` riding along.
    ``models`` are captured programs, or modules (captured here on the first batch; not modified)."""
    from ..capture import capture
    from .moments import MomentsObserver

    batches = list(batches)
    programs = [m if isinstance(m, Program) else capture(m, batches[0], copy_model=True) for m in models]
    collector = MomentsObserver(list(spec.groups), len(programs), max_rows, seed, cross)
    source_pass(programs, batches, [collector, *(observers or [])], progress=progress)
    return collector.moments
