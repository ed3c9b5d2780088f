"""``task_arithmetic``: for models fine-tuned from one shared base: theta_0 + scale * (tau_A + tau_B),
with tau_k = theta_k - theta_0 (Ilharco et al. 2023); ``scale=0.5`` gives the plain average of A and B."""
from .registry import register_method
from .same_base import BASE, SCALE, SameBaseMethod, same_base_merge
from .task_vectors import arithmetic


@register_method
class TaskArithmetic(SameBaseMethod):
    name = "task_arithmetic"
    summary = "models fine-tuned from one base: base + scale x the sum of the task vectors"
    options = (BASE, SCALE)

    def run(self, setup):
        return same_base_merge(setup, self.opts["base"], lambda vectors: arithmetic(vectors, self.opts["scale"]))
