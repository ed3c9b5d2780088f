"""``pleas``: PLeaS. Match units, merge the most similar pairs of each group (the rest of A and B kept),
then refit every linear map by least squares toward the permuted ensemble (docs/algorithm.md sections 2-4).

Calibration data from another dataset gives PLeaS-free: nothing changes but the data passed. With
``pleas.merge(matching="identity")`` unit i of A is merged with unit i of B: the least-squares refit
without permutations, the ablation that shows what the permutations add.
"""
from __future__ import annotations

import copy
import dataclasses

from ..errors import MergeInputError
from ..norms.fold import fold_batchnorm
from ..refit import RefitOptions
from . import stages
from .common import ALIGN_OPTIONS
from .options import Option
from .rebasin import aligned_partial_merge
from .registry import Method, Outcome, register_method


def folded(setup):
    """A setup whose sources have every BatchNorm fed by a linear map folded into it (private copies; the
    captures are rebound, not made again)."""
    models, programs = [], []
    for model, program in zip(setup.models, setup.programs):
        model = copy.deepcopy(model)
        fold_batchnorm(setup.graph, model.state_dict(keep_vars=True))
        models.append(model)
        programs.append(program.bind(model))
    graph = dataclasses.replace(setup.graph, program=programs[0])
    return dataclasses.replace(setup, models=models, programs=programs, graph=graph)


@register_method
class PLeaS(Method):
    name = "pleas"
    summary = "PLeaS: matching, partial merge of the most similar pairs, least-squares refit"
    options = ALIGN_OPTIONS + (
        Option("inputs", str, "propagated", "fit layers on the merged model's own activations ('propagated', "
               "measured 5-6 points better at 1x) or on the permuted ensemble's ('teacher', cheaper)",
               choices=("propagated", "teacher")),
        Option("ridge", float, 1e-2, "pull toward the partial-merge weights, relative to each layer's mean Gram "
               "diagonal (1e-2 measured best of 1e-4 ... 1e-1)", low=0.0),
        Option("mask", bool, True, "keep the zero blocks (A-only units never read B-only units)"),
        Option("refit", str, "exact", "closed-form solve, or Adam steps from the initialisation (the reference "
               "implementation's refit)", choices=("exact", "adam")),
        Option("oversample", int, 4, "samples kept per weight column of each layer", low=1),
        Option("min_rows", int, 4096, "least samples kept per layer", low=1),
        Option("adam_steps", int, 300, "Adam steps with refit='adam'", low=1),
        Option("adam_lr", float, 1e-3, "Adam learning rate with refit='adam'", low=0.0, low_open=True),
        Option("solver", str, "auto", "how each layer's least squares is solved: 'auto' (a float64 Gram where "
               "it fits max_memory, else the dual form on the rows when fewer rows than columns, else a float32 "
               "Gram), or force 'dense', 'rows' or 'float32'", choices=("auto", "dense", "rows", "float32")),
        Option("targets", str, "stream", "what a map that writes into a residual stream (through views or "
               "dropout only) is fitted to: the 'stream' after the add, which also corrects the error the merged "
               "stream carries from earlier layers (measured 0.03-0.10 bits per byte better on the benchmark's "
               "LMs at every budget), or its sources' 'output'", choices=("stream", "output")),
        Option("streaming", bool, False, "take the refit's targets while it runs, from the sources walked beside "
               "the merged model, instead of holding every layer's from the matching's pass: less memory where "
               "the targets are large (language models), the same merged weights, one more pass of the sources"),
        Option("distill_steps", int, 0, "after the refit, Adam steps on the whole merged model toward the sources' "
               "ensemble on the calibration inputs (src/pleas/refit/distill.py): what no linear map undoes, such as a "
               "norm over a side-by-side merge's joint width; the merge's zero blocks stay zero", low=0),
        Option("distill_lr", float, 3e-4, "Adam learning rate of the distillation steps (after a warm-up over the "
               "first tenth)", low=0.0, low_open=True),
        Option("distill_loss", str, "kl", "the distillation's loss: 'kl' on the softmax over the output's last "
               "axis (logits), or 'mse' summed over it (any output)", choices=("kl", "mse")),
        Option("distill_batch", int, 32, "samples per distillation step", low=1),
        Option("fold_bn", bool, False, "fold BatchNorm into the map before it, so the refit fits normalised "
               "pre-activations (no statistics reset then)"),
    )

    def refit_options(self, setup, reset: bool = True) -> RefitOptions:
        o = self.opts
        return RefitOptions(ridge=o["ridge"], mask=o["mask"], oversample=o["oversample"], min_rows=o["min_rows"],
                            method=o["refit"], inputs=o["inputs"], adam_steps=o["adam_steps"], adam_lr=o["adam_lr"],
                            seed=setup.seed, reset_norms=reset and not o["fold_bn"],
                            progress=setup.progress, solver=o["solver"], max_solve_bytes=setup.max_solve_bytes,
                            targets=o["targets"], streaming=o["streaming"])

    def run(self, setup):
        if not self.opts["mask"] and setup.effective_budget and setup.budget != 1.0:
            raise MergeInputError(
                f"mask=False with budget_metric={setup.budget_metric!r}: the refit would fill the zero blocks that an "
                "effective size leaves out; use mask=True or budget_metric 'params' or 'flops'"
            )
        if self.opts["fold_bn"]:
            setup = folded(setup)
        options = self.refit_options(setup)
        sampler = stages.target_sampler(setup, options) if options.inputs == "propagated" else None
        observer = stages.norm_observer(setup, refitted=True)
        riding = (observer,) if options.streaming else (sampler, observer)  # streamed targets: taken in the refit
        maps, allocation = aligned_partial_merge(setup, self.opts["allocation"], self.opts["merge_counts"],
                                                 observers=tuple(o for o in riding if o))
        norms = stages.norm_decision(setup, observer, refitted=True)
        options = self.refit_options(setup, reset=norms["norm_stats"] == "data")
        built = stages.build(setup, maps)
        entries = stages.refit(setup, built, options, sampler)
        if options.reset_norms and options.inputs == "teacher":  # the propagated refit sets them as it goes
            stages.reset_norms(setup, built, norms)
        report = {"refit": entries, **norms}
        if allocation:
            report["allocation"] = allocation
        model = stages.finished(setup, built)
        if self.opts["distill_steps"]:
            report["distill"] = stages.distill(setup, model, self.opts)
        return Outcome(model, built, report)
