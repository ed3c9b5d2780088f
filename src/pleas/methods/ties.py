"""``ties``: TIES-merging (Yadav et al. 2023) of models fine-tuned from one shared base: each task vector
trimmed to its ``density`` fraction of largest entries, signs elected by the trimmed sum, the agreeing
entries averaged, times ``scale``, added to the base (:func:`pleas.methods.task_vectors.ties`)."""
from .options import Option
from .registry import register_method
from .same_base import BASE, SCALE, SameBaseMethod, same_base_merge
from .task_vectors import ties


@register_method
class TIES(SameBaseMethod):
    name = "ties"
    summary = "TIES-merging of models fine-tuned from one base: trim, elect sign, disjoint mean"
    options = (BASE, Option("density", float, 0.2, "fraction of each task vector kept", low=0.0, low_open=True,
                            high=1.0), SCALE)

    def run(self, setup):
        return same_base_merge(setup, self.opts["base"], lambda v: ties(v, self.opts["density"], self.opts["scale"]))
