"""``pleas``: PLeaS. Match units, merge the most similar pairs of each group (the rest of A and B kept),
then refit every layer by least squares toward the permuted ensemble (ALGORITHM.md sections 2-4).

Calibration data from another dataset gives PLeaS-free: nothing changes but the data passed.
"""
from __future__ import annotations

from ..errors import MergeInputError
from ..norms import reset_batchnorm_stats
from ..refit import RefitOptions, TargetSampler, refit
from .rebasin import Rebasin
from .registry import register_method


@register_method
class PLeaS(Rebasin):
    """Options:

    - ``inputs``: ``"propagated"`` (default) fits layers in graph order, each on the activations the
      already-refitted merged model produces (BatchNorm statistics recomputed before each layer);
      ``"teacher"`` fits every layer independently on the permuted ensemble's inputs, in one pass
      over the data. Measured on the demo task (benchmarks/refit_variants.py), propagated wins by
      5-6 points at 1x; teacher forcing is several times cheaper on deep models.
    - ``ridge``: strength of the pull toward the partial-merge initialisation, relative to the mean
      diagonal of each layer's Gram matrix (1e-2 measured best of 1e-4 ... 1e-1).
    - ``mask``: keep the zero blocks (A-only units never read B-only units).
    - ``refit``: ``"exact"`` closed form, or ``"adam"`` steps from the initialisation on the same
      objective (the reference implementation's refit; ``adam_steps``, ``adam_lr``).
    - ``fold_bn``: fold BatchNorm into the preceding conv first; the refit then targets normalised
      pre-activations and no statistics are reset (measured worse with teacher forcing).
    - ``oversample``, ``min_rows``: each layer's statistics keep ``max(oversample * columns, min_rows)``
      samples (positions of a conv's output, rows of a Linear's), spread over the batches.
    - ``merge_counts``: k_g per group instead of the uniform fraction that meets ``budget``.
    """

    name = "pleas"

    def __init__(self, *, ridge: float = 1e-2, mask: bool = True, refit: str = "exact", oversample: int = 4, min_rows: int = 4096,
                 adam_steps: int = 300, adam_lr: float = 1e-3, fold_bn: bool = False, inputs: str = "propagated",
                 merge_counts=None, allocation: str | None = None):
        super().__init__(merge_counts=merge_counts, allocation=allocation)
        if refit not in ("exact", "adam"):
            raise MergeInputError(f"refit={refit!r}; allowed: 'exact', 'adam'")
        if inputs not in ("teacher", "propagated"):
            raise MergeInputError(f"inputs={inputs!r}; allowed: 'teacher', 'propagated'")
        if ridge < 0:
            raise MergeInputError(f"ridge={ridge} must be >= 0")
        self.options = dict(ridge=float(ridge), mask=bool(mask), method=refit, oversample=int(oversample), min_rows=int(min_rows),
                            adam_steps=int(adam_steps), adam_lr=float(adam_lr), inputs=inputs)
        self.fold_bn = bool(fold_bn)

    def plan(self, job):
        if not self.options["mask"] and job.effective_budget and job.budget != 1.0:
            raise MergeInputError(
                f"mask=False with budget_metric={job.budget_metric!r}: the refit would fill the zero blocks that an "
                "effective size leaves out; use mask=True or budget_metric 'params' or 'flops'"
            )
        if self.fold_bn:
            from ..fold import fold_batchnorm

            job.models = [fold_batchnorm(m)[0] for m in job.models]
        self._samples = None
        if self.options["inputs"] == "propagated":
            # The refit's targets are sampled during the matching's pass over the sources, if it makes one.
            sampler = TargetSampler.for_budget(job.models[0], job.merged_spec, job.budget, self.refit_options(job),
                                               len(job.data))
            job.observers.append(sampler)
        maps = super().plan(job)
        if self.options["inputs"] == "propagated":
            job.observers.remove(sampler)
            self._samples = sampler if sampler.batches else None  # None: no moments pass ran with it
        return maps

    def refit_options(self, job) -> RefitOptions:
        reset = job.reset_norms and not self.fold_bn
        return RefitOptions(seed=job.seed, progress=job.progress, reset_norms=reset, **self.options)

    def finish(self, job, model, maps):
        inner = getattr(model, "model", model)  # SeparateHeads wraps the merged network
        options = self.refit_options(job)
        report = refit(job.models, inner, job.merged_spec, job.full_maps(maps), job.data, options,
                       samples=getattr(self, "_samples", None))
        self._samples = None
        job.extra["refit"] = report.layers
        if options.reset_norms and options.inputs == "teacher":  # the propagated refit sets them as it goes
            reset_batchnorm_stats(model, job.data, progress=job.progress)
        return model
