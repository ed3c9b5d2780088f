"""``dare``: DARE (Yu et al. 2024) for models fine-tuned from one shared base: each task vector's entries
dropped at random with probability ``drop`` and the rest rescaled by 1 / (1 - drop)
(:func:`pleas.methods.task_vectors.dare`), then combined by task arithmetic (``combine="arithmetic"``:
scale x their sum) or by TIES's sign election and disjoint mean (``combine="ties"``, DARE's random drop in
place of TIES's magnitude trim, as the DARE paper and mergekit's ``dare_ties`` do)."""
from .options import Option
from .registry import register_method
from .same_base import BASE, SCALE, SameBaseMethod, same_base_merge
from .task_vectors import arithmetic, dare, ties


@register_method
class DARE(SameBaseMethod):
    name = "dare"
    summary = "DARE for models fine-tuned from one base: drop task-vector entries at random, rescale, combine"
    options = (BASE, Option("drop", float, 0.5, "probability of dropping each task-vector entry (the paper goes to "
                            "0.9 and beyond for large language models)", low=0.0, high=1.0, high_open=True),
               Option("combine", str, "arithmetic", "how the dropped vectors are combined: their sum (task "
                      "arithmetic) or TIES's sign election and disjoint mean", choices=("arithmetic", "ties")),
               SCALE)

    def run(self, setup):
        o = self.opts

        def combine(vectors):
            dropped = dare(vectors, o["drop"], setup.seed)
            return ties(dropped, 1.0, o["scale"]) if o["combine"] == "ties" else arithmetic(dropped, o["scale"])

        return same_base_merge(setup, o["base"], combine)
