"""One merge in progress: validated inputs, private copies of the models, and cached statistics."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .calibration import Calibration
from .errors import MergeInputError
from .graph import build_spec, trace_graph
from .heads import SeparateHeads
from .plans import ensemble_map
from .rebuild import build_model
from .size import SizeModel
from .spec import PermutationSpec
from .stats import CrossMoments, Moments, collect_moments
from .transform import GroupMap, transform_state_dicts

HEADS = ("shared", "separate")
MATCHINGS = ("activation", "weight")


@dataclass
class MergeJob:
    """Everything a method needs. Built by :meth:`create`, which validates the inputs once."""

    models: list[nn.Module]
    spec: PermutationSpec
    data: Calibration
    budget: float
    heads: str = "shared"
    matching: str = "activation"
    seed: int = 0
    reset_norms: bool = True
    progress: bool = True
    budget_metric: str = "params"
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)
    #: Extra observers (see :func:`pleas.stats.source_pass`) that ride along on the moments pass.
    observers: list = field(default_factory=list, repr=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def create(
        cls,
        model_a: nn.Module,
        model_b: nn.Module,
        data: Any,
        *,
        budget: float,
        heads: str,
        matching: str,
        seed: int,
        device: str | torch.device,
        dtype: torch.dtype,
        batch_size: int,
        reset_norms: bool,
        progress: bool,
        budget_metric: str = "params",
    ) -> "MergeJob":
        from .size import METRICS

        if budget_metric not in METRICS:
            raise MergeInputError(f"budget_metric={budget_metric!r}; allowed: {METRICS}")
        if heads not in HEADS:
            raise MergeInputError(f"heads={heads!r}; allowed: {HEADS}")
        if matching not in MATCHINGS:
            raise MergeInputError(f"matching={matching!r}; allowed: {MATCHINGS}")
        for label, m in (("model_a", model_a), ("model_b", model_b)):
            if not isinstance(m, nn.Module):
                raise MergeInputError(f"{label} must be an nn.Module, got {type(m).__name__}")
        check_same_architecture(model_a, model_b)
        for label, m in (("model_a", model_a), ("model_b", model_b)):
            check_finite(m.state_dict(), label)
        models = [copy.deepcopy(m).to(device=device, dtype=dtype).eval() for m in (model_a, model_b)]
        calib = Calibration(data, batch_size=batch_size, device=device, dtype=dtype)
        example = next(iter(calib))
        for label, m in zip(("model_a", "model_b"), models):
            try:
                with torch.no_grad():
                    m(example[:2])
            except Exception as exc:  # the model's own error says what shape it wanted
                raise MergeInputError(
                    f"calibration batches of shape {tuple(example.shape)} do not fit {label}: {type(exc).__name__}: {exc}"
                ) from exc
        spec = build_spec(models[0], example[:2], copy_model=False)  # models[0] is the job's own copy
        if trace_graph(models[0]).code != trace_graph(models[1]).code:
            raise MergeInputError("model_a and model_b have the same tensors but different graphs (forward differs)")
        if heads == "separate" and not spec.outputs:
            raise MergeInputError("heads='separate' needs an output layer of its own (e.g. a Linear classifier)")
        return cls(models, spec, calib, float(budget), heads, matching, seed, reset_norms, progress, budget_metric)

    # --- cached statistics -----------------------------------------------------------------
    @property
    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        return [m.state_dict() for m in self.models]

    def moments(self, *, cross: bool = False) -> dict[str, Moments] | dict[str, CrossMoments]:
        """Moments of the stacked units of both models, per group (one pass over the data). With
        ``cross``, what activation matching needs is enough (:class:`pleas.stats.CrossMoments`, or
        the full moments when another method already gathered them)."""
        if "moments" in self._cache:
            return self._cache["moments"]
        key = "cross_moments" if cross else "moments"
        if key not in self._cache:
            # Enough positions per batch for stable correlations of the widest group, not every one.
            widest = max(g.width for g in self.spec)
            per_batch = max(32 * len(self.models) * widest // max(len(self.data), 1), 1024)
            self._cache[key] = collect_moments(
                self.models, self.spec, self.data, progress=self.progress, max_rows=per_batch, seed=self.seed,
                observers=self.observers, cross=cross,
            )
        return self._cache[key]

    def match(self):
        """The matching of B's units to A's (``self.matching`` decides how), cached."""
        if "matching" not in self._cache:
            from .matching import activation_matching, weight_matching

            if self.matching == "weight":
                sd_a, sd_b = self.state_dicts
                self._cache["matching"] = weight_matching(self.spec, sd_a, sd_b, seed=self.seed)
            else:
                self._cache["matching"] = activation_matching(self.spec, self.moments(cross=len(self.models) == 2))
        return self._cache["matching"]

    # --- sizes and building ----------------------------------------------------------------
    @property
    def merged_spec(self) -> PermutationSpec:
        """The spec the merged state dict is built over: with separate heads, the output axes too."""
        return self.spec.with_outputs() if self.heads == "separate" else self.spec

    def full_maps(self, maps: dict[str, GroupMap]) -> dict[str, GroupMap]:
        if self.heads == "separate":
            maps = dict(maps)
            for g in self.spec.outputs:
                maps[g.name] = ensemble_map(g.width, len(self.models))
        return maps

    @property
    def sizes(self) -> SizeModel:
        """Exact sizes of the merged model as a function of group widths (separate heads: both kept)."""
        if "sizes" not in self._cache:
            extra = {g.name: len(self.models) * g.width for g in self.spec.outputs} if self.heads == "separate" else {}
            self._cache["sizes"] = SizeModel(self.merged_spec, self.state_dicts[0], extra, len(self.models))
        return self._cache["sizes"]

    def size(self, widths: dict[str, int], metric: str | None = None) -> int:
        """Size of the merged model for these group widths, in ``metric`` (default: the budget's)."""
        return self.sizes.measure(metric or self.budget_metric, widths)

    def base_size(self, metric: str | None = None) -> int:
        """Size of one source model (plus the other sources' heads when heads are separate, so that
        ``budget`` measures the shared body)."""
        return self.size({g.name: g.width for g in self.spec}, metric)

    @property
    def effective_budget(self) -> bool:
        """Whether the budget leaves the zero blocks out (``effective_params`` / ``effective_flops``)."""
        return self.budget_metric.startswith("effective_")

    def target(self) -> float:
        return self.budget * self.base_size()

    def max_budget(self) -> float:
        """The largest reachable size: every unit of every model kept (dense, zero blocks included)."""
        return self.size({g.name: len(self.models) * g.width for g in self.spec}) / self.base_size()

    def check_budget(self) -> None:
        top = self.max_budget()
        if self.effective_budget:  # n models side by side: n x, but for shared tensors
            top = max(top, float(len(self.models)))
        if self.budget > top * (1 + 1e-9):
            raise MergeInputError(
                f"budget={self.budget:g} is out of range; reachable for this model: [1, {top:.4f}] "
                f"({self.budget_metric} of the two models side by side"
                f"{'' if self.effective_budget else ', dense'})"
            )

    def build(self, maps: dict[str, GroupMap]) -> nn.Module:
        spec = self.merged_spec
        state = transform_state_dicts(spec, self.state_dicts, self.full_maps(maps))
        model = build_model(self.models[0], state).eval()
        if self.heads == "separate":
            model = SeparateHeads(model, [g.width for g in self.spec.outputs for _ in self.models])
        return model


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    difference = architecture_difference(model_a.state_dict(), model_b.state_dict())
    if difference:
        raise MergeInputError(f"model_a and model_b have different architectures: {difference}")


def architecture_difference(sd_a: dict[str, torch.Tensor], sd_b: dict[str, torch.Tensor], a: str = "A",
                            b: str = "B", *, ordered: bool = True) -> str | None:
    """How two state dicts differ in their entries (names, and their order when ``ordered``) or shapes,
    naming them ``a`` and ``b``; None when they agree."""
    if (list(sd_a) != list(sd_b)) if ordered else (set(sd_a) != set(sd_b)):
        only_a, only_b = sorted(set(sd_a) - set(sd_b)), sorted(set(sd_b) - set(sd_a))
        return f"tensors only in {a} {only_a[:5]}, only in {b} {only_b[:5]}"
    for k in sd_a:
        if sd_a[k].shape != sd_b[k].shape:
            return f"{k} has shape {tuple(sd_a[k].shape)} in {a} and {tuple(sd_b[k].shape)} in {b}"
    return None


def check_finite(state_dict: dict[str, torch.Tensor], label: str) -> None:
    for k, t in state_dict.items():
        # A finite sum proves every entry finite (NaN and inf propagate); only a sum that is not
        # (an overflow, or a bad entry) needs the entry-by-entry check.
        if t.dtype.is_floating_point and not (torch.isfinite(t.sum()) or torch.isfinite(t).all()):
            raise MergeInputError(f"{label} has NaN or infinite values in {k!r}; refusing to merge")
