"""The PLeaS least-squares refit (ALGORITHM.md section 4), closed form from streamed float64 statistics.

Every Linear and dense Conv layer of the merged model is refitted so that it maps the *permuted
ensemble input* X~ to the *permuted ensemble output* Y~, both computed from the source models'
activations on the calibration data (teacher forcing):

    W = argmin_W ||X~ W^T - Y~||^2 + lambda ||W - W_0||^2     subject to the zero blocks,

with a conv seen as a linear map on unfolded patches and the bias as a constant input column. The
constraint splits the problem by output rows: a row owned by a set of models may only read input
columns that one of those models owns (A-only rows never read B-only inputs). Each row pattern is an
ordinary ridge regression solved from G = X~^T X~ and C = X~^T Y~, which are sums over samples and so
stream over batches. lambda = ridge * trace(G) / columns, relative to the data's own scale, pulls
under-determined layers toward the partial-merge initialisation W_0 rather than toward zero.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .gram import gram, quadratic_trace
from .graph import trace_graph
from .spec import Group, Member, PermutationSpec
from .norms import batchnorms
from .stats import source_pass, tapped
from .plans import unit_owners
from .transform import GroupMap, combine_activations


#: Products x^T x with fewer multiply-adds than this run in float64 (the rest in float32).
SMALL_PRODUCT = 1 << 24
#: Ridge solves over at least this many columns factor and solve in float32 (about twice as fast).
#: The ridge bounds the condition number of G + lam I by about P / ridge, and float32's backward
#: error changes the fitted objective by far less than the ridge itself does; a factorisation that
#: fails in float32 is redone in float64.
FLOAT32_SOLVE = 1024


@dataclass
class Layer:
    """One refittable layer: where it sits in the traced source graph and how its axes are grouped."""

    name: str  # module path
    module: nn.Module  # the source model's module (for kernel size, stride, ...)
    in_node: str
    out_node: str
    in_members: list[tuple[Group, Member]]
    out_members: list[tuple[Group, Member]]

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, (nn.Conv1d, nn.Conv2d))

    @property
    def unit_dim(self) -> int:
        return 1 if self.is_conv else -1


@dataclass
class LayerStats:
    """Streamed sums for one layer: G (P, P), C (P, m_out), sum of squared targets, sample count.

    With ``index``, the sums hold only those columns of the layer's P (a conv's taps that can ever
    read inside its input: on a 1x1 map a 3x3 conv has one), and every other column counts as never
    seen. Rows and weights are always given over all P columns. With ``initial`` (a flattened weight
    W_0, (m_out, P)), every update also adds ||X W_0^T - Y||^2 over its rows, the fit error of the
    starting weights, from the rows themselves: cheaper than the quadratic form with G afterwards."""

    gram: torch.Tensor
    cross: torch.Tensor
    target_sq: float = 0.0
    count: int = 0
    index: torch.Tensor | None = None
    columns: int | None = None  # P, when ``index`` holds fewer
    initial: torch.Tensor | None = None
    initial_sq: float = 0.0

    def __post_init__(self):
        self.columns = self.columns or self.gram.shape[0]
        self._lookup = None
        if self.index is not None:
            self._lookup = torch.full((self.columns,), -1, dtype=torch.long)
            self._lookup[self.index] = torch.arange(len(self.index))

    def local(self, cols: torch.Tensor) -> torch.Tensor:
        """Positions in G and C of the layer's columns ``cols``."""
        return cols if self._lookup is None else self._lookup[cols]

    def seen(self) -> torch.Tensor:
        """(P,) bool: the columns some sample reached."""
        if self.index is None:
            return self.gram.diagonal() > 0
        mask = torch.zeros(self.columns, dtype=torch.bool)
        mask[self.index[self.gram.diagonal() > 0]] = True
        return mask

    def scale(self) -> float:
        """trace(G) / P, the data's own scale for the ridge."""
        return float(self.gram.diagonal().sum()) / self.columns

    def update(self, x: torch.Tensor, y: torch.Tensor, blocks: list | None = None) -> None:
        """Add a batch of rows. Large products run in float32 (a few thousand rows each); the running
        sums are float64, so round-off does not grow with the dataset. ``blocks`` lists (rows, columns)
        pairs such that each row is zero outside its block's columns (conv rows grouped by which taps
        see padding; rows as indices, or a slice when they come grouped by block); each block then adds
        its own smaller product. Without blocks, columns that are zero in every row (such as kernel
        taps that only ever read padding) are skipped: they add nothing to G or C."""
        self.target_sq += float((y.double() ** 2).sum())
        self.count += x.shape[0]
        if blocks is None:
            self._add(x if self.index is None else x[:, self.index], y, None)
            return
        for rows, cols in blocks:
            xb, yb = (x[rows], y[rows]) if isinstance(rows, slice) else (x.index_select(0, rows), y.index_select(0, rows))
            self._add(xb.index_select(1, cols), yb, self.local(cols))

    def _add(self, x: torch.Tensor, y: torch.Tensor, cols: torch.Tensor | None) -> None:
        """Add rows x over G's positions ``cols`` (a tap block: its columns are the taps its rows
        read, so it is taken whole), or over every column, skipping those zero in every row."""
        active = cols
        if cols is None:
            active = (x != 0).any(0).nonzero().squeeze(1)
            if len(active) < x.shape[1]:
                x = x[:, active]
            else:
                active = None
        if x.shape[0] * x.shape[1] ** 2 < SMALL_PRODUCT:  # cheap: float64 throughout
            x, y = x.double(), y.double()
        if self.initial is not None:
            w0 = self.initial if self.index is None else self.initial[:, self.index]
            w0 = w0 if active is None else w0[:, active]
            r = torch.addmm(y, x, w0.T.to(x.dtype), beta=-1).flatten()  # X W_0^T - Y
            self.initial_sq += float(torch.dot(r, r))
        g, c = gram(x), (x.T @ y).double()
        if active is None:
            self.gram += g
            self.cross += c
        else:  # G[active, active] += g as row adds (a 2-D scatter with accumulation is far slower)
            rows = g.new_zeros(len(active), self.gram.shape[1]).index_copy_(1, active, g)
            self.gram.index_add_(0, active, rows)
            self.cross.index_add_(0, active, c)

    def initial_error(self) -> float:
        """||X W_0^T - Y||^2 / ||Y||^2 for the ``initial`` weight, summed over the updates."""
        return self.initial_sq / max(self.target_sq, 1e-30)

    def error(self, w: torch.Tensor) -> float:
        """||X W^T - Y||^2 / ||Y||^2 for a flattened weight w (m_out, P), from the sums alone."""
        if self.index is not None:
            w = w[:, self.index]
        seen = (self.gram.diagonal() > 0).nonzero().squeeze(1)  # unseen columns add nothing
        g, c = self.gram, self.cross
        if len(seen) < len(g):
            w, g, c = w[:, seen], g[seen[:, None], seen], c[seen]
        quad = quadratic_trace(w, g) - 2 * (w * c.T).sum() + self.target_sq
        return float(quad.clamp_min(0)) / max(self.target_sq, 1e-30)


@dataclass
class RefitOptions:
    ridge: float = 1e-3
    mask: bool = True
    oversample: int = 4
    min_rows: int = 4096
    method: str = "exact"  # or "adam"
    inputs: str = "teacher"  # or "propagated": layer by layer, on the merged model's own activations
    adam_steps: int = 300
    adam_lr: float = 1e-3
    seed: int = 0
    max_gram_bytes: int = 4 << 30
    max_frontier_bytes: int = 4 << 30
    reset_norms: bool = True
    progress: bool = True


@dataclass
class RefitReport:
    layers: list[dict] = field(default_factory=list)


def find_layers(source: nn.Module, spec: PermutationSpec) -> list[Layer]:
    """The Linear and dense Conv1d/Conv2d modules of ``source`` (each called once), in graph order."""
    gm = trace_graph(source)
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    layers = []
    modules = dict(source.named_modules())
    for target, nodes in calls.items():
        module = modules[target]
        if len(nodes) != 1 or not _refittable(module):
            continue
        node = nodes[0]
        weight = f"{target}.weight"
        members = spec.members_of(weight)
        layers.append(
            Layer(
                target,
                module,
                node.args[0].name,
                node.name,
                [(g, m) for g, m in members if m.axis == 1],
                [(g, m) for g, m in members if m.axis == 0],
            )
        )
    return layers


def _refittable(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return m.groups == 1 and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
    return False


def refit(
    sources: list[nn.Module],
    merged: nn.Module,
    spec: PermutationSpec,
    maps: dict[str, GroupMap],
    batches,
    options: RefitOptions | None = None,
    samples: "TargetSampler | None" = None,
) -> RefitReport:
    """Refit every layer of ``merged`` (built from ``sources`` with ``maps`` over ``spec``) in place.

    For the propagated refit, ``samples`` may hold the targets already sampled during another pass
    over the sources (made by :meth:`TargetSampler.for_budget`); otherwise the refit samples them."""
    options = options or RefitOptions()
    layers = samples.layers if samples is not None else find_layers(sources[0], spec)
    params = dict(merged.named_parameters())
    report = RefitReport()
    n_batches = max(len(batches), 1) if hasattr(batches, "__len__") else 1
    if options.inputs == "propagated":
        report.layers = _refit_propagated(sources, merged, layers, maps, batches, params, options, samples)
        return report
    for chunk in _chunks(layers, params, options.max_gram_bytes):
        stats = _collect(sources, chunk, maps, batches, n_batches, params, options)
        for layer in chunk:
            report.layers.append(_solve_into(layer, stats[layer.name], params, maps, len(sources), options))
    return report


class TargetSampler:
    """Seeded samples of every layer's output in each source model, batch by batch: the propagated
    refit's targets. An observer of :func:`pleas.stats.source_pass`, so the samples can be taken in
    a pass over the sources that happens anyway (the matching's), before the merge maps exist; they
    are combined into the merged layout only when used. ``columns`` sets each layer's samples per
    batch (``oversample`` per weight column of the merged layer)."""

    def __init__(self, layers: list[Layer], columns: dict[str, int], options: RefitOptions, n_batches: int):
        self.layers = layers
        self.nodes = sorted({layer.out_node for layer in layers})
        self.limits = {layer.name: _row_limit(columns[layer.name], options, n_batches) for layer in layers}
        self.gen = torch.Generator().manual_seed(options.seed)
        self.picks: dict[str, list] = {layer.name: [] for layer in layers}
        self.rows: dict[str, list] = {layer.name: [] for layer in layers}
        self.batches = 0  # batches seen

    @classmethod
    def for_budget(cls, source: nn.Module, spec: PermutationSpec, budget: float, options: RefitOptions,
                   n_batches: int) -> "TargetSampler":
        """A sampler made before the merged model exists: a merged layer's input columns are taken
        as its source layer's times ``min(budget, 2)`` (exact at 1x)."""
        layers = find_layers(source, spec)
        params = dict(source.named_parameters())
        grow = min(max(budget, 1.0), 2.0)
        columns = {layer.name: math.ceil(_weight_columns(layer, params) * grow) for layer in layers}
        return cls(layers, columns, options, n_batches)

    def update(self, taps: list[dict]) -> None:
        self.batches += 1
        for layer in self.layers:
            ys = [t[layer.out_node] for t in taps]
            pick = _pick(layer, ys[0].shape, self.limits[layer.name], self.gen)
            self.picks[layer.name].append(pick)
            self.rows[layer.name].append([_sample_rows(layer, y, pick) for y in ys])

    def take(self, layer: Layer, maps, n_batches: int) -> tuple[list, torch.Tensor]:
        """The picks of ``layer`` for the first ``n_batches`` batches and the combined targets Y~ of
        all of them as one block of rows (and forget them)."""
        picks, rows = self.picks.pop(layer.name)[:n_batches], self.rows.pop(layer.name)[:n_batches]
        per_model = [torch.cat(r) for r in zip(*rows)]
        return picks, combine_activations(per_model, -1, layer.out_members, maps, torch.float32)


def _weight_columns(layer: Layer, params: dict) -> int:
    w = params[f"{layer.name}.weight"]
    return math.prod(w.shape[1:]) + (1 if f"{layer.name}.bias" in params else 0)


def _chunks(layers: list[Layer], params: dict, limit: int):
    """Split layers into passes whose Gram matrices fit in ``limit`` bytes (one layer at least)."""
    chunk, used = [], 0
    for layer in layers:
        p = _weight_columns(layer, params)
        size = 8 * p * p
        if chunk and used + size > limit:
            yield chunk
            chunk, used = [], 0
        chunk.append(layer)
        used += size
    if chunk:
        yield chunk


def _empty_stats(layer: Layer, params: dict, workspace: list | None = None,
                 index: torch.Tensor | None = None) -> LayerStats:
    """Zeroed sums for ``layer`` (over the columns ``index`` only, if given). With ``workspace`` (a
    one-element list), G and C are views of one float64 buffer kept across layers: zeroing memory
    already mapped is far cheaper than mapping a new Gram matrix per layer. Only for layers solved
    one at a time."""
    p = _weight_columns(layer, params)
    k = p if index is None else len(index)
    m_out = params[f"{layer.name}.weight"].shape[0]
    if workspace is None:
        gram, cross = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, m_out, dtype=torch.float64)
    else:
        need = k * k + k * m_out
        if workspace[0] is None or workspace[0].numel() < need:
            workspace[0] = torch.empty(need, dtype=torch.float64)
        buf = workspace[0][:need].zero_()
        gram, cross = buf[: k * k].view(k, k), buf[k * k :].view(k, m_out)
    return LayerStats(gram, cross, index=index, columns=p, initial=_flat_weight(layer, params).float())


def _flat_weight(layer: Layer, params: dict) -> torch.Tensor:
    """The layer's weight as (m_out, P) float64, the bias (if any) as its last column."""
    weight = params[f"{layer.name}.weight"].detach()
    w = weight.double().reshape(weight.shape[0], -1)
    bias = params.get(f"{layer.name}.bias")
    return w if bias is None else torch.cat([w, bias.detach().double()[:, None]], 1)


def _reachable_columns(layer: Layer, in_shape: tuple, bias: bool) -> torch.Tensor | None:
    """A conv's columns (channel x tap [+ bias]) whose tap reads inside an input of ``in_shape`` at
    some output position, or None when every one does (and for Linear layers)."""
    if not layer.is_conv:
        return None
    kernel, stride, pad, dil = _conv_geometry(layer.module)
    size = (1, in_shape[-1]) if len(in_shape) == 3 else tuple(in_shape[-2:])
    ok = []
    for d in range(2):
        out = (size[d] + 2 * pad[d] - dil[d] * (kernel[d] - 1) - 1) // stride[d] + 1
        pos = torch.arange(out)[:, None] * stride[d] + torch.arange(kernel[d])[None, :] * dil[d] - pad[d]
        ok.append(((pos >= 0) & (pos < size[d])).any(0))
    taps = (ok[0][:, None] & ok[1][None, :]).flatten().nonzero().squeeze(1)
    if len(taps) == kernel[0] * kernel[1]:
        return None
    c = in_shape[1]
    cols = (torch.arange(c)[:, None] * (kernel[0] * kernel[1]) + taps[None, :]).reshape(-1)
    return torch.cat([cols, torch.tensor([c * kernel[0] * kernel[1]])]) if bias else cols


def _row_limit(columns: int, options: RefitOptions, n_batches: int) -> int:
    return math.ceil(max(options.oversample * columns, options.min_rows) / max(n_batches, 1))


def _collect(sources, layers, maps, batches, n_batches, params, options) -> dict[str, LayerStats]:
    """Stream every layer's G and C on the permuted ensemble's inputs and outputs (teacher forcing)."""
    nodes = sorted({n for layer in layers for n in (layer.in_node, layer.out_node)})
    stats = {layer.name: _empty_stats(layer, params) for layer in layers}
    gen = torch.Generator().manual_seed(options.seed)
    with ExitStack() as stack, torch.no_grad():
        runs = [stack.enter_context(tapped(m, nodes)) for m in sources]
        for x in tqdm(batches, desc="least-squares statistics", disable=not options.progress, leave=False):
            taps = [run(x)[1] for run in runs]
            for layer in layers:
                st = stats[layer.name]
                xr, yr, blocks = _rows(layer, [t[layer.in_node] for t in taps], [t[layer.out_node] for t in taps],
                                       maps, _row_limit(st.columns, options, n_batches), gen,
                                       bias=f"{layer.name}.bias" in params)
                st.update(xr, yr, blocks)
    return stats


def _refit_propagated(sources, merged, layers, maps, batches, params, options, samples) -> list[dict]:
    """Fit layers in graph order, each on the activations the merged model (with the layers before it
    refitted and, with ``options.reset_norms``, its BatchNorm statistics recomputed) produces at its
    input.

    The targets Y~ do not depend on the merged model: a :class:`TargetSampler` takes them in a pass
    over the source models (the matching's, when the method passes ``samples``). Then the merged
    model runs once, node by node, over all the calibration batches at once (:class:`_Frontier`): a
    layer is refitted when the walk reaches it, from the inputs the refitted layers before it
    produced, and a BatchNorm takes the exact statistics of its inputs before it normalises them.
    One pass of the sources and one of the merged model, whatever the depth.
    """
    frontier = _Frontier(merged, batches, options.max_frontier_bytes)
    if samples is None:
        columns = {layer.name: _weight_columns(layer, params) for layer in layers}
        samples = TargetSampler(layers, columns, options, len(frontier.batches))
        source_pass(sources, frontier.batches, [samples], progress=options.progress, desc="least-squares targets")
    by_node = {layer.out_node: layer for layer in layers}
    entries, workspace = [], [None]  # one Gram buffer for every layer
    bar = tqdm(total=len(layers), desc="least-squares refit", disable=not options.progress, leave=False)
    with torch.no_grad():
        for node in frontier.nodes():
            layer = by_node.get(node.name)
            if layer is not None:
                xs = frontier.values(layer.in_node)
                bias = f"{layer.name}.bias" in params
                st = _empty_stats(layer, params, workspace, _reachable_columns(layer, tuple(xs[0].shape), bias))
                picks, yr = samples.take(layer, maps, len(frontier.batches))
                xr, yr, blocks = _merged_rows(layer, xs, picks, yr, bias)
                st.update(xr, yr, blocks)
                entries.append(_solve_into(layer, st, params, maps, len(sources), options))
                bar.update()
            elif options.reset_norms:
                frontier.reset_norm(node)
            if len(entries) == len(layers) and not (options.reset_norms and frontier.norms_after(node)):
                break  # nothing left to change
            frontier.advance(node)
    bar.close()
    return entries


#: Samples of the first batch that the frontier runs to estimate its memory per sample.
PROBE_SAMPLES = 8


class _Frontier:
    """The merged model's traced graph run node by node over every calibration batch at once.

    It holds each batch's live values (those a later node still reads), so a node can be changed (a
    layer refitted, a norm's statistics set) after everything before it has run on all the data and
    before anything after it runs. Memory is the calibration set's largest live activations: when
    that would exceed ``max_bytes`` (estimated on a few samples of the first batch), only the first batches that fit
    are used.
    """

    def __init__(self, model: nn.Module, batches, max_bytes: int):
        model.eval()  # BatchNorm normalises by the statistics the walk sets, never by the batch's
        self.gm = trace_graph(model)  # shares the model's modules: changes land in the model
        self.modules = dict(self.gm.named_modules())
        self.norm_ids = {id(m) for m in batchnorms(model)}
        self._order = [n for n in self.gm.graph.nodes if n.op != "output"]
        self._position = {n.name: i for i, n in enumerate(self._order)}
        self._last_use = {n.name: max((self._position.get(u.name, len(self._order)) for u in n.users), default=-1)
                          for n in self._order}
        self._last_norm = max((i for i, n in enumerate(self._order) if self._is_norm(n)), default=-1)
        batches = iter(batches)
        first = next(batches)
        probe = first[:PROBE_SAMPLES]  # live memory grows with the batch: a few samples tell it
        per_sample = self._peak_live_bytes(probe) / probe.shape[0]
        budget = max(int(max_bytes // max(per_sample, 1.0)), first.shape[0])
        self.batches, used = [first], first.shape[0]
        for x in batches:
            if used + x.shape[0] > budget:
                break
            self.batches.append(x)
            used += x.shape[0]
        self.env: list[dict] = [{} for _ in self.batches]

    def nodes(self) -> list[fx.Node]:
        """Every node but the output, in graph order."""
        return self._order

    def values(self, name: str) -> list[torch.Tensor]:
        return [env[name] for env in self.env]

    def norms_after(self, node: fx.Node) -> bool:
        return self._position[node.name] < self._last_norm

    def advance(self, node: fx.Node) -> None:
        """Run ``node`` on every batch, then drop the values no later node reads."""
        for x, env in zip(self.batches, self.env):
            env[node.name] = self._run(node, env, x)
            self._drop_dead(env, self._position[node.name])

    def _drop_dead(self, env: dict, here: int) -> None:
        for name in [k for k in env if self._last_use[k] <= here]:
            del env[name]

    def reset_norm(self, node: fx.Node) -> None:
        """Set a BatchNorm node's running statistics to the mean and (unbiased) variance of its inputs
        over every batch (sums in float64 across batches)."""
        if not self._is_norm(node):
            return
        module = self.modules[node.target]
        xs = self.values(node.args[0].name)
        dims = [d for d in range(xs[0].dim()) if d != 1]
        shape = [-1 if d == 1 else 1 for d in range(xs[0].dim())]
        # Sums of x - shift in float32 per batch (the shift, a rough per-channel mean, removes the
        # cancellation of E[x^2] - E[x]^2), added in float64: several times faster than var_mean.
        shift = xs[0].mean(dims).reshape(shape)
        count, total, sq = 0, 0.0, 0.0
        for x in xs:
            d = x - shift
            total = total + d.sum(dims).double()
            sq = sq + torch.square(d).sum(dims).double()
            count += x.numel() // x.shape[1]
        if count < 2:
            return
        mean = total / count
        var = (sq - count * mean**2).clamp_min(0) / (count - 1)
        module.running_mean.copy_((mean + shift.flatten().double()).to(module.running_mean.dtype))
        module.running_var.copy_(var.to(module.running_var.dtype))

    def _is_norm(self, node: fx.Node) -> bool:
        return node.op == "call_module" and id(self.modules[node.target]) in self.norm_ids

    def _run(self, node: fx.Node, env: dict, x: torch.Tensor):
        if node.op == "placeholder":
            return x
        args = fx.node.map_arg(node.args, lambda n: env[n.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
        if node.op == "get_attr":
            obj = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise ValueError(f"cannot run node {node.name} ({node.op})")

    def _peak_live_bytes(self, x: torch.Tensor) -> int:
        """The largest total size of the activations alive at once while one batch runs through."""
        env, peak = {}, 0
        with torch.no_grad():
            for node in self.nodes():
                env[node.name] = self._run(node, env, x)
                live = sum(v.numel() * v.element_size() for k, v in env.items() if isinstance(v, torch.Tensor)
                           and not isinstance(v, nn.Parameter))
                peak = max(peak, live)
                self._drop_dead(env, self._position[node.name])
        return peak


def _rows(layer: Layer, xs: list, ys: list, maps, limit: int, gen: torch.Generator, *, bias: bool):
    """Design rows (samples, P) and targets (samples, m_out) of the permuted ensemble, float32, at
    most ``limit`` seeded random samples, and the row blocks of a conv (see :func:`_tap_blocks`)."""
    pick = _pick(layer, ys[0].shape, limit, gen)
    x, blocks = _inputs(layer, xs, pick, maps, bias=bias)
    return x, _targets(layer, ys, pick, maps), blocks


def _pick(layer: Layer, out_shape: tuple, limit: int, gen: torch.Generator):
    """Seeded random samples of a layer's output: conv positions (batch, row, col), or Linear rows."""
    if layer.is_conv:
        shape = (out_shape[0], out_shape[1], 1, out_shape[2]) if len(out_shape) == 3 else out_shape
        return _positions(shape, limit, gen)
    n = math.prod(out_shape[:-1])
    return torch.randperm(n, generator=gen)[:limit] if n > limit else torch.arange(n)


def _sample_rows(layer: Layer, y: torch.Tensor, pick) -> torch.Tensor:
    """One model's output at the picked samples: (samples, units)."""
    if layer.is_conv:
        y = y.unsqueeze(2) if y.dim() == 3 else y
        return y[pick[0], :, pick[1], pick[2]]
    return y.reshape(-1, y.shape[-1])[pick]


def _targets(layer: Layer, ys: list, pick, maps) -> torch.Tensor:
    """Y~ at the picked samples: (samples, m_out), float32."""
    rows = [_sample_rows(layer, y, pick) for y in ys]
    return combine_activations(rows, -1, layer.out_members, maps, torch.float32)


def _inputs(layer: Layer, xs: list, pick, maps, *, bias: bool, merged: bool = False):
    """X~ at the picked samples (samples, P) float32, and a conv's row blocks. Samples are picked
    before the source models' copies are combined (the merge is linear along the units), so full
    activations are combined only when the patches would repeat their entries anyway. With
    ``merged`` (Linear layers only), ``xs`` holds the merged model's own activation, already in the
    merged layout (:func:`_merged_rows` gathers a conv's)."""
    if layer.is_conv:
        xs = [x.unsqueeze(2) if x.dim() == 3 else x for x in xs]  # Conv1d as a Conv2d of height 1
        if len(pick[0]) * math.prod(layer.module.kernel_size) >= xs[0][:, 0].numel():
            x = _patches(layer.module, combine_activations(xs, 1, layer.in_members, maps, torch.float32), pick)
        else:
            x = combine_activations([_patches(layer.module, x, pick) for x in xs], 1, layer.in_members, maps,
                                    torch.float32)
        blocks = _tap_blocks(layer.module, x.shape[1], xs[0].shape[2:], pick, bias)
        x = x.flatten(1)
    else:
        blocks = None
        rows = [x.reshape(-1, x.shape[-1])[pick] for x in xs]
        x = rows[0] if merged else combine_activations(rows, -1, layer.in_members, maps, torch.float32)
    if bias:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    return x.float(), blocks


def _merged_rows(layer: Layer, xs: list, picks: list, y: torch.Tensor, bias: bool):
    """X at the picked samples of every batch of the merged model's own input activations ``xs``, as
    one block of rows (samples, P) float32, the targets ``y`` of those samples (reordered with X), and a
    conv's row blocks over all of them: one product per block for the whole calibration set instead
    of one per batch. A conv's rows are written grouped by tap block (targets reordered alike), so
    each block's rows are one slice."""
    if not layer.is_conv:
        x = torch.cat([_inputs(layer, [x], pick, None, bias=bias, merged=True)[0] for x, pick in zip(xs, picks)])
        return x, y, None
    conv = layer.module
    xs = [x.unsqueeze(2) if x.dim() == 3 else x for x in xs]  # Conv1d as a Conv2d of height 1
    c, size = xs[0].shape[1], tuple(xs[0].shape[2:])
    joined = tuple(torch.cat([p[i] for p in picks]) for i in range(3))
    blocks = _tap_blocks(conv, c, size, joined, bias)
    dest = None
    if blocks is not None:
        order = torch.cat([rows for rows, _ in blocks])
        dest = torch.empty_like(order)
        dest[order] = torch.arange(len(order))
        y = y[order]
        edges = [0, *torch.tensor([len(rows) for rows, _ in blocks]).cumsum(0).tolist()]
        blocks = [(slice(lo, hi), cols) for lo, hi, (_, cols) in zip(edges[:-1], edges[1:], blocks)]
    kernel = _conv_geometry(conv)[0]
    p = c * kernel[0] * kernel[1]
    out = torch.empty(len(joined[0]), p + int(bias), dtype=torch.float32)
    patches = out[:, :p].unflatten(1, (c, *kernel))
    at = 0
    for x, pick in zip(xs, picks):
        rows = _patches(conv, x.float(), pick)
        if dest is None:
            patches[at : at + len(rows)] = rows
        else:
            patches.index_copy_(0, dest[at : at + len(rows)], rows)
        at += len(rows)
    if bias:
        out[:, p] = 1.0
    return out, y, blocks


def _positions(out_shape: tuple, limit: int, gen: torch.Generator):
    """Seeded random output positions (batch, row, col) of a conv output of shape (N, C, H, W)."""
    n, _, ho, wo = out_shape
    total = n * ho * wo
    pick = torch.randperm(total, generator=gen)[:limit] if total > limit else torch.arange(total)
    rest = pick % (ho * wo)
    return pick // (ho * wo), rest // wo, rest % wo


def _conv_geometry(conv: nn.Module):
    if conv.weight.dim() == 3:
        return (1, *conv.kernel_size), (1, *conv.stride), (0, *conv.padding), (1, *conv.dilation)
    return conv.kernel_size, conv.stride, conv.padding, conv.dilation


def _tap_blocks(conv: nn.Module, c: int, size: tuple, pick, bias: bool) -> list | None:
    """Group patch rows by which kernel taps fall inside the input (the others read zero padding).

    Returns (rows, columns) pairs over the flattened (C, kh, kw) [+ bias] columns, or None when every
    row sees every tap. On small maps most rows see few taps, and each group's product is far smaller.
    """
    kernel, stride, pad, dil = _conv_geometry(conv)
    if pad[0] == 0 and pad[1] == 0:
        return None
    h, w = size
    _, oy, ox = pick
    iy = oy[:, None] * stride[0] + torch.arange(kernel[0])[None, :] * dil[0] - pad[0]
    ix = ox[:, None] * stride[1] + torch.arange(kernel[1])[None, :] * dil[1] - pad[1]
    valid = ((iy >= 0) & (iy < h))[:, :, None] & ((ix >= 0) & (ix < w))[:, None, :]  # (P, kh, kw)
    keys = valid.flatten(1)
    if bool(keys.all()):
        return None
    taps = kernel[0] * kernel[1]
    if taps < 63:  # each row's pattern as one integer, first tap most significant: sorts as the rows do
        codes = (keys.long() << torch.arange(taps - 1, -1, -1)).sum(1)
        _, first, inverse = _unique_first(codes)
        patterns = keys[first]
    else:
        patterns, inverse = torch.unique(keys, dim=0, return_inverse=True)
    blocks = []
    for i, pattern in enumerate(patterns):
        cols = (torch.arange(c)[:, None] * taps + pattern.nonzero().squeeze(1)[None, :]).reshape(-1)
        if bias:
            cols = torch.cat([cols, torch.tensor([c * taps])])
        blocks.append(((inverse == i).nonzero().squeeze(1), cols))
    return blocks


def _unique_first(values: torch.Tensor):
    """The sorted distinct values of a 1-D tensor, the position of one occurrence of each, and
    every entry's index among them."""
    unique, inverse = torch.unique(values, return_inverse=True)
    first = torch.empty(len(unique), dtype=torch.long).scatter_(0, inverse, torch.arange(len(values)))
    return unique, first, inverse


def _patches(conv: nn.Module, x: torch.Tensor, pick) -> torch.Tensor:
    """The input patches (P, C, kh, kw) that ``conv`` reads at output positions ``pick``."""
    kernel, stride, pad, dil = _conv_geometry(conv)
    b, oy, ox = pick
    xp = F.pad(x, (pad[1], pad[1], pad[0], pad[0]))
    rows = oy[:, None] * stride[0] + torch.arange(kernel[0])[None, :] * dil[0]  # (P, kh)
    cols = ox[:, None] * stride[1] + torch.arange(kernel[1])[None, :] * dil[1]  # (P, kw)
    return xp[b[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _solve_into(layer: Layer, st: LayerStats, params: dict, maps, n: int, opt: RefitOptions) -> dict:
    weight = params[f"{layer.name}.weight"]
    bias = params.get(f"{layer.name}.bias")
    m_out = weight.shape[0]
    w0 = _flat_weight(layer, params)
    kernel = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    p = w0.shape[1]
    own_out = unit_owners(layer.out_members, m_out, maps, n, side="out")
    n_in = weight.shape[1]
    own_in = unit_owners(layer.in_members, n_in, maps, n, side="in").repeat_interleave(kernel, dim=1)
    if bias is not None:
        own_in = torch.cat([own_in, torch.ones(n, 1, dtype=torch.bool)], 1)
    before = st.initial_error() if st.initial is not None else st.error(w0)
    lam = opt.ridge * st.scale()
    seen = st.seen()
    exact = opt.method != "adam"
    if exact:
        st.gram.diagonal().add_(lam)  # every row pattern solves with G_JJ + lam I; undone below
    quad = st.target_sq  # ||X W^T - Y||^2 after the solve, accumulated per pattern (exact solves)
    w = w0.clone()
    patterns = {} if opt.mask else {None: torch.arange(m_out)}
    if opt.mask:
        for i, key in enumerate(map(tuple, own_out.T.tolist())):
            patterns.setdefault(key, []).append(i)
    for key, rows in patterns.items():
        rows = torch.as_tensor(rows)
        allowed = torch.ones(p, dtype=torch.bool) if key is None else (torch.tensor(key)[:, None] & own_in).any(0)
        w[rows[:, None], (~allowed).nonzero().squeeze(1)] = 0.0
        # Columns the data never reaches keep their initial weight: for them the ridge solution is W_0.
        cols = (allowed & seen).nonzero().squeeze(1)
        if len(cols):
            start = w0[rows[:, None], cols]
            sol, c = _ridge_solve(st, rows, cols, start, lam, opt)
            w[rows[:, None], cols] = sol
            if exact:
                # The solution satisfies W (G + lam I) = C^T + lam W0, so W G W^T needs no product with G:
                # ||X W^T - Y||^2 = sum(lam (W0 - W) * W - W * C^T) + ||Y||^2 over the pattern.
                quad += float((lam * (start - sol) * sol - sol * c.T).sum())
    if exact:
        st.gram.diagonal().sub_(lam)
        after = max(quad, 0.0) / max(st.target_sq, 1e-30)
    else:
        after = st.error(w)
    with torch.no_grad():
        weight.copy_(w[:, : weight[0].numel()].reshape(weight.shape).to(weight.dtype))
        if bias is not None:
            bias.copy_(w[:, -1].to(bias.dtype))
    return {"layer": layer.name, "rows": st.count, "columns": p, "error_before": before, "error_after": after}


def _ridge_solve(st: LayerStats, rows, cols, start, lam: float, opt: RefitOptions):
    """min_W ||X_J W^T - Y_rows||^2 + lam ||W - W0||^2 over the allowed columns J: (G_JJ + lam I) W^T =
    C_J,rows + lam W0^T, with ``start`` = W0[rows, J]. Cholesky in float64, where ``st.gram`` already
    holds the lam I; Adam on the same objective when ``opt.method == 'adam'``. Returns W[rows, J] and
    C_J,rows."""
    local = st.local(cols)
    every_col = len(cols) == st.gram.shape[0]  # then ``local`` is 0 ... P-1 in order
    g = st.gram if every_col else st.gram[local[:, None], local]
    c = st.cross[:, rows] if every_col else st.cross[local[:, None], rows]
    if opt.method == "adam":
        return _adam(g, c, start, lam, opt), c
    rhs = c + lam * start.T
    if len(cols) >= FLOAT32_SOLVE:
        chol, info = torch.linalg.cholesky_ex(g.float())
        if int(info) == 0:
            return torch.cholesky_solve(rhs.float(), chol).double().T, c
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol).T, c
    return torch.linalg.lstsq(g, rhs).solution.T, c


def _adam(g, c, start, lam: float, opt: RefitOptions) -> torch.Tensor:
    """Adam steps from W_0 on the same objective, written with G and C: grad = 2 (W G - C^T + lam (W - W0)).
    Stopping early regularises like the reference implementation's refit."""
    w = start.clone().requires_grad_(True)
    adam = torch.optim.Adam([w], lr=opt.adam_lr)
    scale = 1.0 / max(float(g.diagonal().mean()), 1e-30)
    for _ in range(opt.adam_steps):
        adam.zero_grad()
        grad = 2 * (w.detach() @ g - c.T + lam * (w.detach() - start)) * scale
        w.grad = grad
        adam.step()
    return w.detach()
