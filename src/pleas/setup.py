"""The validated inputs of one merge: copies of the models (sharing their weights), their captures, the calibration
data and the settings every stage reads. Built once by :func:`prepare`; no stage changes it."""
from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .budget import METRICS, SizeModel
from .calibration import Calibration, PerModel
from .capture import Program, as_call, capture
from . import distributed
from .errors import MergeInputError, PleasError
from .groups import ModelGraph, PermutationSpec, analyze
from .rewrite.constraints import width_ties
from .rewrite.rebuild import tensor_memo
from .rewrite.maps import GroupMap, ensemble_map

HEADS = ("shared", "separate")
MATCHINGS = ("activation", "weight", "identity")
NORM_STATS = ("auto", "data", "sources")


@dataclass
class MergeSetup:
    """Everything the stages of a merge read. ``models`` are copies in eval mode (never the
    caller's modules; read-only weights shared with the caller's, :func:`sharing_copy`); ``programs[i]`` is the one capture of ``models[i]``; ``graph`` the analysis of model 0's."""

    models: list[nn.Module]
    programs: list[Program]
    graph: ModelGraph
    data: Calibration
    budget: float
    heads: str = "shared"
    matching: str = "activation"
    seed: int = 0
    norm_stats: str = "auto"
    progress: bool = True
    budget_metric: str = "params"
    batches: list = field(default_factory=list, repr=False)
    dtype: torch.dtype = torch.float32
    own_batches: list | None = field(default=None, repr=False)
    #: groups aligned by a rotation before the merge (their matching is then the identity): name -> what
    #: the report says of it
    aligned: dict[str, dict] = field(default_factory=dict)
    #: calibration batches over every rank of a process group (:mod:`pleas.distributed`); this rank's alone
    total_batches: int = 0
    #: bytes one layer's refit solve may use (from ``max_memory``; None: no bound), :mod:`pleas.memory`
    max_solve_bytes: int | None = None

    def __post_init__(self) -> None:
        self.total_batches = self.total_batches or len(self.batches)

    def batches_of(self, i: int) -> list:
        """Model i's own calibration batches (all of them when the data is shared)."""
        return self.own_batches[i] if self.own_batches is not None else self.batches

    @property
    def n(self) -> int:
        return len(self.models)

    @property
    def spec(self) -> PermutationSpec:
        return self.graph.spec

    @property
    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        return [m.state_dict() for m in self.models]

    @property
    def merged_spec(self) -> PermutationSpec:
        """The spec the merged state dict is built over: with separate heads, the output axes too."""
        return self.spec.with_outputs() if self.heads == "separate" else self.spec

    def full_maps(self, maps: dict[str, GroupMap]) -> dict[str, GroupMap]:
        """``maps`` plus, with separate heads, every output axis kept apart."""
        if self.heads == "separate":
            maps = dict(maps)
            for g in self.spec.outputs:
                maps[g.name] = ensemble_map(g.width, self.n)
        return maps

    @property
    def sizes(self) -> SizeModel:
        """Exact sizes of the merged model as a function of group widths (separate heads: all kept)."""
        if not hasattr(self, "_sizes"):
            extra = {g.name: self.n * g.width for g in self.spec.outputs} if self.heads == "separate" else {}
            self._sizes = SizeModel(self.merged_spec, self.state_dicts[0], extra, self.n)
        return self._sizes

    def size(self, widths: dict[str, int], metric: str | None = None) -> int:
        return self.sizes.measure(metric or self.budget_metric, widths)

    def base_size(self, metric: str | None = None) -> int:
        """Size of one source model (plus the other sources' heads when heads are separate, so that
        ``budget`` measures the shared body)."""
        return self.size({g.name: g.width for g in self.spec}, metric)

    @property
    def effective_budget(self) -> bool:
        return self.budget_metric.startswith("effective_")

    def target(self) -> float:
        return self.budget * self.base_size()

    def max_budget(self) -> float:
        """The largest reachable size: every unit of every model kept."""
        top = self.size({g.name: self.n * g.width for g in self.spec}) / self.base_size()
        return max(top, float(self.n)) if self.effective_budget else top

    def check_budget(self) -> None:
        top = self.max_budget()
        if self.budget > top * (1 + 1e-9):
            raise MergeInputError(
                f"budget={self.budget:g} is out of range; reachable for this model: [1, {top:.4f}] "
                f"({self.budget_metric} of the {self.n} models side by side"
                f"{'' if self.effective_budget else ', dense'})"
            )


def check_model(model: Any, label: str) -> None:
    if not isinstance(model, nn.Module):
        raise MergeInputError(f"{label} must be an nn.Module, got {type(model).__name__}")
    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            raise MergeInputError(f"{label} has tensors on the 'meta' device (e.g. {name!r}): it holds no weights; "
                                  "load its weights before merging")


def check_same_architecture(model_a: nn.Module, model_b: nn.Module, labels: tuple[str, str] = ("model_a", "model_b")) -> None:
    difference = architecture_difference(model_a.state_dict(), model_b.state_dict(), "A", "B")
    if difference:
        raise MergeInputError(f"{labels[0]} and {labels[1]} have different architectures: {difference}")


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


def _same_code(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models run the same forward: modules of the same classes (and, for Hugging Face models,
    the same config)."""
    if [type(m) for m in a.modules()] != [type(m) for m in b.modules()]:
        return False
    config_a, config_b = getattr(a, "config", None), getattr(b, "config", None)
    if config_a is None and config_b is None:
        return True
    return config_a is not None and config_b is not None and config_a.to_dict() == config_b.to_dict()


def _constant(batches: list) -> bool:
    """Whether every calibration sample equals the first (data identity, so an exact comparison)."""
    def tensors(batch):
        return [batch] if isinstance(batch, torch.Tensor) else [v for v in batch.values() if isinstance(v, torch.Tensor)]

    first = [t[:1] for t in tensors(batches[0])]
    return all(bool((t == f).all()) for batch in batches for t, f in zip(tensors(batch), first))


def _example(batch: Any, n: int = 2) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    return {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    dtypes = {t.dtype for t in model.state_dict().values() if t.dtype.is_floating_point}
    return dtypes.pop() if len(dtypes) == 1 else None


def sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose tensors share the model's storage: its own modules (their train/eval mode)
    and its own Parameter objects (their ``requires_grad`` and ``.grad``), the caller's weights. A conversion
    (``.to`` another dtype or device) replaces the copy's tensors only. Nothing writes into a source's
    weights in place; a stage that changes them copies first (:func:`pleas.methods.pleas.folded`,
    :func:`align_stream`), so the merge holds no second copy of sources it only reads."""
    return copy.deepcopy(model, tensor_memo(model, lambda t: t.detach()))


def prepare(models: list[nn.Module], data: Any, **options) -> MergeSetup:
    """Validate the inputs once, copy and capture the models (each exactly once), and return the setup
    (options: those of :func:`_prepare`). In a process group (:mod:`pleas.distributed`), every rank fails
    when any does, when any rank's calibration shard is empty, or when the ranks' models differ; the
    setup then counts the batches of every rank (``total_batches``)."""
    setup, error = None, None
    try:
        setup = _prepare(models, data, **options)
    except PleasError as exc:
        error = exc
    distributed.raise_if_any(error)
    if distributed.active():
        distributed.check_shards(setup.data.samples())
        distributed.same_everywhere(distributed.fingerprint([m.state_dict() for m in setup.models]), "the models")
    setup.total_batches = distributed.offset_and_total(len(setup.batches))[1]
    return setup


def _prepare(models: list[nn.Module], data: Any, *, budget: float, heads: str, matching: str, seed: int,
             device: str | torch.device, dtype: torch.dtype | None, batch_size: int, norm_stats: str,
             progress: bool, budget_metric: str = "params", labels: list[str] | None = None) -> MergeSetup:
    labels = labels or [f"model_{chr(ord('a') + i)}" for i in range(len(models))]
    if budget_metric not in METRICS:
        raise MergeInputError(f"budget_metric={budget_metric!r}; allowed: {METRICS}")
    if heads not in HEADS:
        raise MergeInputError(f"heads={heads!r}; allowed: {HEADS}")
    if matching not in MATCHINGS:
        raise MergeInputError(f"matching={matching!r}; allowed: {MATCHINGS}")
    if norm_stats not in NORM_STATS:
        raise MergeInputError(f"norm_stats={norm_stats!r}; allowed: {NORM_STATS}")
    for label, m in zip(labels, models):
        check_model(m, label)
    for label, m in zip(labels[1:], models[1:]):
        check_same_architecture(models[0], m, (labels[0], label))
    for label, m in zip(labels, models):
        check_finite(m.state_dict(), label)
    if dtype is None:
        dtype = _model_dtype(models[0]) or torch.float32
    elif not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise MergeInputError(f"dtype={dtype!r}; allowed: a floating-point torch.dtype such as torch.float32")
    copies = [sharing_copy(m).to(device=device, dtype=dtype).eval() for m in models]
    own = None
    if isinstance(data, PerModel):
        data = data.ordered(labels)
        if len(data.parts) != len(models):
            raise MergeInputError(f"per_model data has {len(data.parts)} parts for {len(models)} models; give one per model")
        parts = [Calibration(d, batch_size=batch_size, device=device, dtype=dtype) for d in data.parts]
        own = [p.batches() for p in parts]
        data = [b for p in own for b in p]
    calib = Calibration(data, batch_size=batch_size, device=device, dtype=dtype)
    example = _example(calib.first)
    for label, m in zip(labels, copies):
        try:
            args, kwargs = as_call(example)
            with torch.no_grad():
                m(*args, **kwargs)
        except Exception as exc:  # the model's own error says what it wanted
            shape = tuple(calib.first.shape) if isinstance(calib.first, torch.Tensor) else \
                {k: tuple(v.shape) for k, v in calib.first.items() if isinstance(v, torch.Tensor)}
            raise MergeInputError(
                f"calibration batches of shape {shape} do not fit {label}: {type(exc).__name__}: {exc}"
            ) from exc
    programs = [capture(copies[0], example)]
    for label, model in zip(labels[1:], copies[1:]):
        if programs[0].frontend == "export" and _same_code(copies[0], model):
            # An export costs seconds: a model of the same class and config runs the same program.
            programs.append(programs[0].bind(model))
            continue
        program = capture(model, example)
        if program.signature() != programs[0].signature():
            raise MergeInputError(f"{labels[0]} and {label} have the same tensors but different graphs (forward differs)")
        programs.append(program)
    graph = analyze(programs[0])
    graph.spec.require_groups()
    for names in width_ties(models[0], graph.spec):
        graph.spec.tie(names)
    samples = calib.samples()
    if samples < 2 or _constant(calib.batches()):
        warnings.warn(f"pleas: the calibration data holds {'one sample' if samples < 2 else 'one input repeated'}: "
                      "statistics from it say nothing about other inputs; pass varied inputs from the models' "
                      "domains (hundreds or more)", stacklevel=3)
    if heads == "separate" and not graph.spec.outputs:
        raise MergeInputError("heads='separate' needs an output layer of its own (e.g. a Linear classifier)")
    for note in graph.spec.notes:
        warnings.warn(f"pleas: {note}", stacklevel=3)
    return MergeSetup(copies, programs, graph, calib, float(budget), heads, matching, seed, norm_stats, progress,
                      budget_metric, calib.batches(), dtype, own)


RESIDUALS = ("permutation", "orthogonal")


def align_stream(setup: MergeSetup) -> None:
    """Rotate model B's residual stream onto model A's (``residual="orthogonal"``, two models): every
    RMSNorm weight on the stream folded into the maps that read it (both models), then B's stream rotated
    by the orthogonal Procrustes solution on the stream's cross-covariance (:mod:`pleas.rewrite.rotate`,
    :mod:`pleas.matching.orthogonal`). Both models compute the same functions as before; the setup's
    models and programs are replaced by private copies holding the new weights, and the stream group is recorded in ``setup.aligned`` so
    that matching pairs its units as they now stand."""
    from .matching.orthogonal import cross_covariance, procrustes
    from .rewrite.rotate import fold_norm_weights, norm_readers, rotate_group, stream_group
    from .statistics import MomentsObserver, source_pass

    if setup.n != 2:
        raise MergeInputError(f"residual='orthogonal' aligns two models; got {setup.n}")
    group = stream_group(setup.spec, setup.models[0])
    states = [dict(m.state_dict()) for m in setup.models]
    readers = norm_readers(setup.graph, group, states[0])
    observer = MomentsObserver([group], 2, max(32 * 2 * group.width // max(setup.total_batches, 1), 1024),
                               setup.seed, cross=True)
    source_pass(setup.programs, setup.batches, [observer], progress=setup.progress, desc="residual stream")
    stat = observer.moments[group.name]
    cov = cross_covariance(stat)
    rotation = procrustes(cov)
    before = float(torch.diagonal(cov).sum())
    for state in states:
        fold_norm_weights(readers, setup.spec, state)
    states[1] = rotate_group(setup.spec, group, rotation, states[1], list(readers))
    models = [copy.deepcopy(m) for m in setup.models]  # prepare's copies share the caller's weights
    for model, state in zip(models, states):
        model.load_state_dict(state)
    setup.models = models
    setup.programs = [program.bind(model) for program, model in zip(setup.programs, models)]
    setup.graph = dataclasses.replace(setup.graph, program=setup.programs[0])
    setup.aligned[group.name] = {
        "how": "orthogonal", "norms_folded": sorted(readers),
        "cross_covariance_trace": {"before": before, "after": float(torch.diagonal(cov @ rotation.T).sum())},
    }
