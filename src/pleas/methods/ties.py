"""``ties``: TIES-merging (Yadav et al. 2023) of models fine-tuned from one shared base: each task
vector trimmed to its ``density`` fraction of largest entries, signs elected by the trimmed sum, the
agreeing entries averaged, times ``scale``, added to the base (:func:`pleas.task_vectors.ties`)."""
from __future__ import annotations

from ..errors import MergeInputError
from ..task_vectors import ties
from .registry import register_method
from .task_arithmetic import SameBase


@register_method
class TIES(SameBase):
    name = "ties"

    def __init__(self, *, base=None, density: float = 0.2, scale: float = 1.0):
        super().__init__(base=base, scale=scale)
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise MergeInputError(f"density={density!r}; allowed: 0 < density <= 1 (the fraction of each task vector kept)")
        self.density = float(density)

    def combine(self, vectors):
        return ties(vectors, self.density, self.scale)
