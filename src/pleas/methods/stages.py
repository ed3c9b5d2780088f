"""The stages a method is composed of, as plain functions of the merge's setup and each other's results.

In the order data flows: source statistics (one pass over the sources) -> matching -> allocation of the
budget -> group maps -> build (state-dict rewrite and model) -> refit -> norm statistics -> the result.
Each takes what it needs and returns a plain object; none changes the setup.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import distributed
from ..budget import (allocate_by_loss, allocate_merge_counts, merge_loss_tables, merged_widths, prefix_merge_counts,
                      uniform_merge_counts, zero_block_count)
from ..capture import capture
from ..errors import MergeInputError, SpecError
from ..groups import ModelGraph, PermutationSpec, analyze
from ..matching import Matching, activation_matching, weight_matching
from ..matching.activation import activation_matching_to_first
from ..rewrite import GroupMap, build_model, ensemble_map, resized, transform_state_dicts
from ..rewrite.maps import multi_partial_merge_map, partial_merge_map
from ..rewrite.rebuild import target_graph
from ..rewrite.heads import SeparateHeads
from ..rewrite.tied import fold_tied_output_scales
import warnings

from ..norms.observe import NormObserver, agreement
from ..norms.reset import reset_statistics
from ..refit import RefitOptions, TargetSampler, refit_layers, refit_propagated, refit_teacher
from ..setup import MergeSetup
from ..statistics import moments_observer, source_pass

ALLOCATIONS = ("uniform", "greedy", "measured", "downstream", "prefix")


# ------------------------------------------------------------------------------------------ statistics

def source_statistics(setup: MergeSetup, *, moments: str | None, observers: tuple = ()) -> dict | None:
    """One pass over the sources for every statistic asked: ``moments`` "full" (the stacked units'
    :class:`~pleas.statistics.Moments`, for ZipIt! and the downstream allocation), "cross" (what
    activation matching reads of two models) or None; ``observers`` ride along (the refit's targets)."""
    observer = None
    if moments is not None:
        observer = moments_observer(setup.spec, setup.n, setup.total_batches, setup.seed,
                                    cross=moments == "cross" and setup.n == 2)
    watching = ([observer] if observer else []) + list(observers)
    if watching:
        source_pass(setup.programs, setup.batches, watching, progress=setup.progress)
    return observer.moments if observer else None


# ------------------------------------------------------------------------------------------ matching

def match(setup: MergeSetup, moments: dict | None) -> Matching:
    """B's units matched to A's as ``setup.matching`` says: by activations (needs ``moments``), by
    weights (Git Re-Basin), or unit i with unit i ("identity")."""
    if setup.matching == "identity":
        found = Matching.identity(setup.spec, setup.n)
    elif setup.n > 2:
        found = _match_to_first(setup, moments)
    elif setup.matching == "weight":
        sd_a, sd_b = setup.state_dicts
        found = weight_matching(setup.spec, sd_a, sd_b, seed=setup.seed)
    else:
        found = activation_matching(setup.spec, moments)
    for name in setup.aligned:  # rotated into A's basis already: unit i pairs with unit i
        width = setup.spec[name].width
        found.perms[name] = torch.arange(width)
        stat = (moments or {}).get(name)
        found.similarity[name] = (torch.diagonal(stat.correlation(rows=slice(0, width), cols=slice(width, 2 * width)))
                                  if stat is not None and hasattr(stat, "cross") else torch.ones(width, dtype=torch.float64))
    return found


def needs_moments(setup: MergeSetup, allocation: str | None) -> str | None:
    """Which moments the matching and the allocation read: "full", "cross" or None."""
    if allocation == "downstream":
        return "full"
    return "cross" if setup.matching == "activation" else None


# ------------------------------------------------------------------------------------------ budget

def _match_to_first(setup: MergeSetup, moments: dict | None) -> Matching:
    """More than two models: each matched to model 0, by activations or (Git Re-Basin) by weights."""
    if setup.matching == "weight":
        sds = setup.state_dicts
        pairs = [weight_matching(setup.spec, sds[0], sd, seed=setup.seed) for sd in sds[1:]]
        perms = {g.name: torch.stack([p.perms[g.name] for p in pairs]) for g in setup.spec}
        sims = {g.name: torch.stack([p.similarity[g.name] for p in pairs]).mean(0) for g in setup.spec}
        return Matching(perms, sims)
    return activation_matching_to_first(setup.spec, moments, setup.n)


#: Allocations that read two models' statistics (a pair's merge loss).
PAIRWISE_ALLOCATIONS = ("downstream", "measured")


def default_allocation(setup: MergeSetup, allocation: str | None) -> str:
    """The allocation used: the one asked for, else uniform for dense budgets and downstream for effective
    ones (README, "Spreading the budget over groups"); uniform for more than two models."""
    if allocation is not None:
        if setup.n > 2 and allocation in PAIRWISE_ALLOCATIONS:
            raise MergeInputError(f"allocation={allocation!r} measures merging two models; with {setup.n} models use "
                                  "'uniform', 'greedy' or 'prefix'")
        return allocation
    return "downstream" if setup.effective_budget and setup.n == 2 else "uniform"


def merge_counts(setup: MergeSetup, allocation: str, matching: Matching, moments: dict | None,
                 given: dict | None = None) -> dict[str, int]:
    """k_g per group: ``given`` (checked), or from the budget with ``allocation``."""
    spec = setup.spec
    if given is not None:
        names = {g.name: g for g in spec}
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise MergeInputError(f"merge_counts names unknown groups {unknown[:5]}; groups: {list(names)[:10]}...")
        counts = {g.name: g.width for g in spec}
        for name, k in given.items():
            if not 0 <= int(k) <= names[name].width:
                raise MergeInputError(f"merge_counts[{name!r}]={k}; allowed: 0 to {names[name].width}")
            counts[name] = int(k)
        return counts
    if setup.budget == 1.0:
        return {g.name: g.width for g in spec}
    target = setup.target()
    if allocation in ("greedy", "measured"):
        weights = group_sensitivity(setup, matching) if allocation == "measured" else None
        return allocate_merge_counts(spec, matching.similarity, setup.sizes, setup.budget_metric, target,
                                     weights=weights)
    if allocation == "downstream":
        covariances = {g.name: moments[g.name].covariance() for g in spec}
        losses = merge_loss_tables(spec, setup.state_dicts, covariances, matching.perms, matching.similarity)
        return allocate_by_loss(spec, losses, setup.sizes, setup.budget_metric, target)
    if allocation == "prefix":
        return prefix_merge_counts(spec, setup.sizes, setup.budget_metric, target)
    return uniform_merge_counts(spec, setup.sizes, setup.budget_metric, target)


def partial_maps(spec: PermutationSpec, matching: Matching, counts: dict[str, int]) -> dict[str, GroupMap]:
    """PLeaS's layout per group: the k_g most similar pairs (or n-tuples) merged, the rest of every model kept."""
    return {g.name: multi_partial_merge_map(matching.perms[g.name].reshape(-1, g.width), matching.similarity[g.name],
                                            counts[g.name])
            for g in spec}


def ensemble_maps(setup: MergeSetup) -> dict[str, GroupMap]:
    return {g.name: ensemble_map(g.width, setup.n) for g in setup.spec}


# ------------------------------------------------------------------------------------------ building

@dataclass
class Built:
    """The merged network (before separate heads are split off), where its units sit (``target``), the
    maps it was built with (output axes included), and its capture once a stage needs it."""

    model: nn.Module
    target: PermutationSpec
    maps: dict[str, GroupMap]
    _graph: ModelGraph | None = field(default=None, repr=False)
    #: the capture of a model of the merged widths made to find ``target`` (its program runs this model too)
    _skeleton: ModelGraph | None = field(default=None, repr=False)

    def graph(self, setup: MergeSetup) -> ModelGraph:
        """The merged model's capture and analysis (made once; a merged model with the source's every shape
        runs the source's capture, and its analysis is the source's)."""
        if self._graph is None:
            if type(self.model) is type(setup.models[0]) and _same_tensors(setup.models[0], self.model):
                self._graph = dataclasses.replace(setup.graph, program=setup.graph.program.bind(self.model))
            elif self._skeleton is not None and _same_tensors(self._skeleton.program.gm, self.model):
                self._graph = dataclasses.replace(self._skeleton, program=self._skeleton.program.bind(self.model))
            else:
                self._graph = analyze(capture(self.model, setup.graph.program.example))
        return self._graph

    def tensors(self, setup: MergeSetup) -> dict[str, torch.Tensor]:
        """The tensors the merged model's capture runs with, by state-dict key (changes land in it)."""
        program = self.graph(setup).program
        return program.gm.state_dict(keep_vars=True) if program.frontend == "export" else \
            self.model.state_dict(keep_vars=True)

    def sync(self, setup: MergeSetup) -> None:
        """Copy what the stages changed in an exported capture's own tensors back into the model."""
        if self._graph is not None and self._graph.program.frontend == "export":
            self.model.load_state_dict(self._graph.program.gm.state_dict(), strict=False)


def _same_tensors(holder: nn.Module, model: nn.Module) -> bool:
    """Whether ``holder`` (a source model, or a captured program) has ``model``'s tensors by key and shape,
    so that a capture of it runs ``model``."""
    theirs, ours = holder.state_dict(), model.state_dict()
    return all(k in theirs and theirs[k].shape == t.shape for k, t in ours.items())


def build(setup: MergeSetup, maps: dict[str, GroupMap], state_dicts: list[dict] | None = None) -> Built:
    """Rewrite the sources' state dicts with ``maps`` (plus the separate heads' maps) into one model."""
    full = setup.full_maps(maps)
    spec = setup.merged_spec
    widths = {name: gm.width for name, gm in full.items()}
    try:
        # every width as in the source (1x): the units keep their places, and the source's own spec says where
        target = spec if all(widths.get(g.name, g.width) == g.width for g in spec.groups + spec.outputs) \
            else resized(spec, widths)
        skeleton = None
    except SpecError:  # interleaved groups: the architecture itself says where the units go
        skeleton = target_graph(setup.models[0], spec, widths, setup.graph.program.example)
        target = skeleton.spec.with_outputs() if setup.heads == "separate" else skeleton.spec
    state = transform_state_dicts(spec, state_dicts or setup.state_dicts, full, target=target)
    for problem in fold_tied_output_scales(setup.graph, spec, target, full, setup.n, state):
        warnings.warn(f"pleas: {problem}", stacklevel=3)
    return Built(build_model(setup.models[0], state, take=True).eval(), target, full, _skeleton=skeleton)


def finished(setup: MergeSetup, built: Built) -> nn.Module:
    """The model a user gets: in eval mode, separate heads split into a tuple of outputs."""
    built.sync(setup)
    model = built.model
    if setup.heads == "separate":
        model = SeparateHeads(model, [g.width for g in setup.spec.outputs for _ in range(setup.n)])
    return model.eval()


def distill(setup: MergeSetup, model: nn.Module, opts: dict) -> dict:
    """Distil the finished ``model`` toward the sources' ensemble in place (options ``distill_*``); the
    report entry (:mod:`pleas.refit.distill`)."""
    from ..refit.distill import distill as run

    return run(model, setup.models, setup.batches, steps=opts["distill_steps"], lr=opts["distill_lr"],
               batch_size=opts["distill_batch"], loss=opts["distill_loss"], separate=setup.heads == "separate",
               seed=setup.seed, progress=setup.progress)


# ------------------------------------------------------------------------------------------ refit and norms

def target_sampler(setup: MergeSetup, options: RefitOptions) -> TargetSampler:
    """A sampler of the propagated refit's targets made before the merged model exists, so that it rides
    along on the matching's pass over the sources."""
    return TargetSampler.for_budget(setup.graph, setup.budget, options, setup.total_batches)


def refit(setup: MergeSetup, built: Built, options: RefitOptions, sampler: TargetSampler | None = None) -> list[dict]:
    """Refit every linear map of the merged model by least squares (in place); the report entries."""
    graph = built.graph(setup)
    layers = refit_layers(setup.graph, graph, setup.merged_spec, built.target)
    params = built.tensors(setup)
    if options.inputs == "propagated":
        if sampler is not None and not sampler.batches and not options.streaming:
            sampler = None  # no pass over the sources ran with it
        return refit_propagated(setup.programs, graph.program, layers, graph.norms, built.maps, setup.batches,
                                params, options, sampler)
    return refit_teacher(setup.programs, layers, built.maps, setup.batches, params, options)


def norm_observer(setup: MergeSetup, *, refitted: bool = False) -> NormObserver | None:
    """The observer of the sources' norm inputs that ``norm_stats="auto"`` decides with for a refitted
    method (None when there is nothing to decide): give it to the method's pass over the sources."""
    if setup.norm_stats != "auto" or not setup.graph.norms or not refitted:
        return None
    return NormObserver(setup.graph.norms, setup.seed)


def norm_decision(setup: MergeSetup, observer: NormObserver | None = None, *, refitted: bool = False) -> dict:
    """Where the merged model's norm statistics come from: {"norm_stats": "data" | "sources" | "none",
    "norm_stats_reason": ...}. With "auto": for a method that does not refit the merged model
    (``refitted=False``) "data", since a merged unit's activations follow neither source's stored
    statistics (the variance collapse REPAIR corrects); for a refitted one, which fits the merged features
    to the sources', "data" when the calibration data's statistics at the sources' norms agree with their
    stored ones (:mod:`pleas.norms.observe`), else "sources", with a warning. Measured on the benchmark's
    domains/resnet18 pair: Git Re-Basin 0.10 mean accuracy with the sources' statistics, 0.52 with the data's."""
    if not setup.graph.norms:
        return {"norm_stats": "none", "norm_stats_reason": "the model has no running norm statistics"}
    if setup.norm_stats != "auto":
        return {"norm_stats": setup.norm_stats, "norm_stats_reason": "asked for"}
    if not refitted:
        return {"norm_stats": "data", "norm_stats_reason": "no refit: merged units follow neither source's stored "
                                                           "statistics, so they are recomputed on the data"}
    if observer is None or not observer.sums:
        observer = NormObserver(setup.graph.norms, setup.seed)
        source_pass(setup.programs, setup.batches, [observer], progress=setup.progress, desc="norm statistics")
    found = agreement(observer, setup.state_dicts)
    if found.agrees:
        return {"norm_stats": "data", "norm_stats_reason": f"the calibration data matches the sources' stored "
                                                             f"statistics ({found.describe()})"}
    warnings.warn(f"pleas: the calibration data's statistics differ from those the sources store ({found.describe()}): "
                  "the merged model keeps the sources' norm statistics (norm_stats='sources'); pass "
                  "norm_stats='data' to recompute them on this data", stacklevel=3)
    return {"norm_stats": "sources", "norm_stats_reason": f"the calibration data differs from the sources' stored "
                                                          f"statistics ({found.describe()})"}


def reset_norms(setup: MergeSetup, built: Built, decision: dict) -> int:
    """Recompute the merged model's norm statistics on the calibration data (REPAIR-style) when
    ``decision`` (:func:`norm_decision`) says so."""
    if decision["norm_stats"] != "data":
        return 0
    graph = built.graph(setup)
    if not graph.norms:
        return 0
    return reset_statistics(graph.program, graph.norms, setup.batches, built.tensors(setup), progress=setup.progress)


# ------------------------------------------------------------------------------------------ measured allocation

def group_sensitivity(setup: MergeSetup, matching: Matching, *, max_batches: int = 2) -> dict[str, float]:
    """Measured weight of each group for the greedy allocation: with every other group kept apart (the
    exact ensemble), merge all of group g's pairs and measure the relative squared change of the model's
    outputs on a few calibration batches, spread over g's pairs by their dissimilarity:
    w_g = change_g / sum_i (1 - s_g,i). One model build and forward per group. The batches are the first
    ``max_batches`` of the data over every rank of a process group (a rank without any of them computes
    on its own first batch with weight 0, so that every rank takes part in the same reductions)."""
    offset, _ = distributed.offset_and_total(len(setup.batches))
    batches = setup.batches[: max(max_batches - offset, 0)]
    weight = 1.0 if batches else 0.0
    batches = batches or setup.batches[:1]
    apart = ensemble_maps(setup)

    def outputs(maps):
        model = build(setup, maps).model
        with torch.no_grad():
            outs = [model(x) for x in batches]
        out = torch.cat([torch.cat(o, -1) if isinstance(o, tuple) else o for o in outs]).double()
        return out.reshape(len(out), -1)

    reference = outputs(apart)
    sums = torch.cat([reference.sum(0), reference.pow(2).sum()[None], torch.tensor([float(len(reference))],
                                                                                   dtype=torch.float64)]) * weight
    distributed.all_sum(sums)
    n = float(sums[-1])
    scale = float(sums[-2] - sums[:-2].pow(2).sum() / n) / (n * reference.shape[1]) or 1.0
    changes = torch.tensor([float((outputs({**apart, g.name: partial_merge_map(matching.perms[g.name],
                                                                               matching.similarity[g.name], g.width)})
                                   - reference).pow(2).sum()) * weight for g in setup.spec], dtype=torch.float64)
    distributed.all_sum(changes)
    weights = {}
    for g, change in zip(setup.spec, changes.tolist()):
        total = float((1 - matching.similarity[g.name].double().clamp(-1, 1)).sum()) or 1.0
        weights[g.name] = change / (n * reference.shape[1]) / scale / total
    return weights


def zero_blocks(setup: MergeSetup, built: Built) -> dict[str, int]:
    """Entries of the merged model that are zero by construction, per tensor."""
    return zero_block_count(setup.merged_spec, setup.state_dicts[0], built.maps, setup.n, built.target)


__all__ = ["ALLOCATIONS", "Built", "build", "default_allocation", "ensemble_maps", "finished", "group_sensitivity",
           "match", "merge_counts", "merged_widths", "needs_moments", "norm_decision", "norm_observer", "partial_maps",
           "refit", "reset_norms",
           "source_statistics", "target_sampler", "zero_blocks"]
