"""The closed-form least-squares solve of one layer (docs/algorithm.md section 4), from streamed float64 sums.

A layer maps X~ to Y~ with W; the refit solves

    W = argmin_W ||X~ W^T - Y~||^2 + lambda ||W - W_0||^2     subject to the zero blocks,

with the bias as a constant input column. The constraint splits the problem by output rows: a row owned
by a set of models may only read input columns that one of those models owns (A-only rows never read
B-only inputs). Each row pattern is an ordinary ridge regression solved from G = X~^T X~ and C = X~^T Y~,
which are sums over samples and so stream over batches. lambda = ridge * trace(G) / columns, relative to
the data's own scale, pulls under-determined layers toward the partial-merge initialisation W_0 rather
than toward zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import distributed
from ..statistics.gram import gram, quadratic_trace

#: Products x^T x with fewer multiply-adds than this run in float64 (the rest in float32).
SMALL_PRODUCT = 1 << 24
#: Ridge solves over at least this many columns factor and solve in float32 (about twice as fast).
#: The ridge bounds the condition number of G + lam I by about P / ridge, and float32's backward
#: error changes the fitted objective by far less than the ridge itself does; a factorisation that
#: fails in float32 is redone in float64.
FLOAT32_SOLVE = 1024


@dataclass
class RefitOptions:
    """How layers are refitted. ``ridge``: pull toward W_0 relative to trace(G)/P; ``mask``: keep the zero
    blocks; ``oversample``/``min_rows``: samples kept per layer (max(oversample x columns, min_rows));
    ``method``: "exact" (closed form) or "adam" (``adam_steps`` steps of Adam at ``adam_lr`` from W_0);
    ``inputs``: "teacher" (the permuted ensemble's inputs) or "propagated" (the merged model's own)."""

    ridge: float = 1e-2
    mask: bool = True
    oversample: int = 4
    min_rows: int = 4096
    method: str = "exact"
    inputs: str = "propagated"
    adam_steps: int = 300
    adam_lr: float = 1e-3
    seed: int = 0
    max_gram_bytes: int = 4 << 30
    max_frontier_bytes: int = 4 << 30
    #: bytes one layer's solve may use (None: no bound): decides each layer's solver (:mod:`.rows_solve`)
    max_solve_bytes: int | None = None
    #: "auto" (by ``max_solve_bytes``), or force "dense" (float64 Gram), "rows" (dual form) or "float32"
    solver: str = "auto"
    reset_norms: bool = True  # set the norms' statistics on the merged model's own activations
    #: what a map that writes into a residual stream is fitted to: "output" (its sources' outputs) or
    #: "stream" (the sources' stream after the add, given the merged model's stream before it; :mod:`.stream`)
    targets: str = "stream"
    #: take the refit's targets while it runs, from the sources walked alongside the merged model, instead
    #: of holding every layer's from the matching's pass (:class:`pleas.refit.propagated.StreamedTargets`)
    streaming: bool = False
    progress: bool = True


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
        """The data's own scale for the ridge: trace(G) / min(P, samples), the mean nonzero eigenvalue of G
        when the samples span every column (then trace(G) / P), and when there are fewer samples than
        columns (then G has at most that many nonzero eigenvalues, and trace(G) / P would make the ridge
        vanish against them: an interpolating, wildly extrapolating fit)."""
        return float(self.gram.diagonal().sum()) / max(min(self.columns, self.count), 1)

    def reduce(self) -> None:
        """Sum over the ranks of a process group, in place (:mod:`pleas.distributed`)."""
        if not distributed.active():
            return
        numbers = torch.tensor([self.target_sq, self.count, self.initial_sq], dtype=torch.float64)
        distributed.all_sum(self.gram, self.cross, numbers)
        self.target_sq, self.count, self.initial_sq = float(numbers[0]), int(numbers[1]), float(numbers[2])

    def absorb(self, other: "LayerStats") -> None:
        """Add the sums of ``other`` (rows of the same layer, disjoint from these) to these, in place."""
        self.gram += other.gram
        self.cross += other.cross
        self.target_sq += other.target_sq
        self.count += other.count
        self.initial_sq += other.initial_sq

    def update(self, x: torch.Tensor, y: torch.Tensor, blocks: list | None = None) -> None:
        """Add a batch of rows. Large products run in float32 (a few thousand rows each); the running
        sums are float64, so round-off does not grow with the dataset. ``blocks`` lists (rows, columns)
        pairs such that each row is zero outside its block's columns (conv rows grouped by which taps
        see padding; rows as indices, or a slice when they come grouped by block); each block then adds
        its own smaller product. Without blocks, columns that are zero in every row (such as kernel
        taps that only ever read padding) are skipped: they add nothing to G or C."""
        self.target_sq += float(torch.linalg.vector_norm(y, dtype=torch.float64)) ** 2  # no float64 copy of y
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
            r = torch.addmm(y.to(x.dtype), x, w0.T.to(x.dtype), beta=-1).flatten()  # X W_0^T - Y
            self.initial_sq += float(torch.dot(r, r))
        c = (x.T @ y.to(x.dtype)).double()
        if active is None:
            gram(x, out=self.gram)  # added in place: no (P, P) temporary
            self.cross += c
        else:  # G[active, active] += g as one add at flat positions (2.5x faster than row adds or index_put_)
            g = gram(x).to(self.gram.dtype)
            flat = (active[:, None] * self.gram.shape[1] + active).view(-1)
            self.gram.view(-1).index_add_(0, flat, g.view(-1))
            self.cross.index_add_(0, active, c)

    def initial_error(self) -> float:
        """||X W_0^T - Y||^2 / ||Y||^2 for the ``initial`` weight, summed over the updates."""
        return self.initial_sq / max(self.target_sq, 1e-30)

    def errors(self):
        """A function of a flattened weight w (m_out, P) giving ||X W^T - Y||^2 / ||Y||^2 from the sums
        alone, with the blocks of G and C over the columns the data reached gathered once (for many
        weights, as in a ridge grid). Unseen columns add nothing."""
        seen = (self.gram.diagonal() > 0).nonzero().squeeze(1)
        g, c, cols = self.gram, self.cross, None
        if len(seen) < len(g):
            g, c = g[seen[:, None], seen], c[seen]
        if self.index is not None or len(seen) < len(self.gram):
            cols = seen if self.index is None else self.index[seen]

        def error(w: torch.Tensor) -> float:
            w = w if cols is None else w[:, cols]
            quad = quadratic_trace(w.to(g.dtype), g).double() - 2 * (w * c.T).sum() + self.target_sq
            return float(quad.clamp_min(0)) / max(self.target_sq, 1e-30)

        return error

    def error(self, w: torch.Tensor) -> float:
        """||X W^T - Y||^2 / ||Y||^2 for a flattened weight w (m_out, P), from the sums alone."""
        return self.errors()(w)


#: Ridge strengths tried for a layer with fewer samples than columns (:data:`pleas.refit.propagated.HELD_OUT_BELOW`), as multiples
#: of the asked ``ridge``: the one with the least error on held-out calibration rows is used.
RIDGE_GRID = (1.0, 10.0, 100.0, 1e3, 1e4)


def row_patterns(w0: torch.Tensor, own_out: torch.Tensor, own_in: torch.Tensor, seen: torch.Tensor,
                 mask: bool) -> tuple[torch.Tensor, list]:
    """The zero-block constraint of a weight W_0 (m_out, P): W_0 with its zero blocks zeroed (a copy only
    when there are any), and for each row pattern (the output rows owned by the same models) its rows and
    the columns they may read that the data reached (``seen``). Columns the data never reaches keep their
    initial weight: for them the ridge solution is W_0."""
    m_out, p = w0.shape
    keys = {} if mask else {None: list(range(m_out))}
    if mask:
        for i, key in enumerate(map(tuple, own_out.T.tolist())):
            keys.setdefault(key, []).append(i)
    start, patterns = w0, []
    for key, rows in keys.items():
        rows = torch.as_tensor(rows)
        allowed = torch.ones(p, dtype=torch.bool) if key is None else (torch.tensor(key)[:, None] & own_in).any(0)
        zero = (~allowed).nonzero().squeeze(1)
        if len(zero):
            start = w0.clone() if start is w0 else start
            start[rows[:, None], zero] = 0.0
        patterns.append((rows, (allowed & seen).nonzero().squeeze(1)))
    return start, patterns


class MaskedProblem:
    """One layer's ridge problem under the zero-block constraint, ready to solve at any strength: the
    output rows grouped by the models that own them (a row pattern), each with the input columns it may
    read that the data reached, and those columns' blocks of G and C gathered once (a ridge grid then
    gathers nothing again)."""

    def __init__(self, st: LayerStats, w0: torch.Tensor, own_out: torch.Tensor, own_in: torch.Tensor,
                 opt: RefitOptions):
        m_out, p = w0.shape
        self.st, self.w0, self.opt = st, w0, opt
        self.start, patterns = row_patterns(w0, own_out, own_in, st.seen(), opt.mask)
        self.patterns = []
        for rows, cols in patterns:
            if len(cols):
                local = st.local(cols)
                every_col = len(cols) == st.gram.shape[0]  # then ``local`` is 0 ... P-1 in order
                g = st.gram if every_col else st.gram[local[:, None], local]
                if len(rows) == m_out and len(cols) == p:  # one pattern over the whole weight: no gathers
                    rows = cols = None
                    self.patterns.append((rows, cols, g, st.cross, w0))
                    continue
                c = st.cross[:, rows] if every_col else st.cross[local[:, None], rows]
                self.patterns.append((rows, cols, g, c, w0[rows[:, None], cols]))

    def solve(self, lam: float) -> tuple[torch.Tensor, float]:
        """The ridge solution W (m_out, P) at strength ``lam``, and (exact solves) ||X W^T - Y||^2 over
        the rows of the sums."""
        exact = self.opt.method != "adam"
        whole = len(self.patterns) == 1 and self.patterns[0][0] is None
        w, quad = None if whole else self.start.clone(), self.st.target_sq
        for rows, cols, g, c, start in self.patterns:
            sol = _adam(g, c, start, lam, self.opt) if not exact else _ridge_solve(g, c, start, lam)
            if rows is None:
                w = sol.contiguous()
            else:
                w[rows[:, None], cols] = sol
            if exact:
                # The solution satisfies W (G + lam I) = C^T + lam W0, so W G W^T needs no product with G:
                # ||X W^T - Y||^2 = sum(lam (W0 - W) * W - W * C^T) + ||Y||^2 over the pattern.
                quad += float((lam * (start - sol) * sol - sol * c.T).sum())
        return w, quad


def masked_solve(st: LayerStats, w0: torch.Tensor, own_out: torch.Tensor, own_in: torch.Tensor, lam: float,
                 opt: RefitOptions) -> tuple[torch.Tensor, float]:
    """The ridge solution W (m_out, P) at strength ``lam`` under the zero-block constraint, and (exact
    solves) ||X W^T - Y||^2 over the rows of ``st`` (:class:`MaskedProblem`)."""
    return MaskedProblem(st, w0, own_out, own_in, opt).solve(lam)


def choose_ridge(error_at, base: float, strength: float) -> tuple[float, float | None]:
    """The :data:`RIDGE_GRID` factor whose solution at ``strength * factor`` has the least held-out error
    ``error_at(strength * factor)``, with that error; (``base``, None) when none beats ``base`` (the
    partial-merge weights' error). Stops past the best factor: larger ones only move back toward W_0."""
    best, previous = (base, None), None
    for f in RIDGE_GRID:
        e = error_at(strength * f)
        if e < best[0]:
            best = (e, f)
        if previous is not None and e > previous:
            break
        previous = e
    return best


def solve_layer(layer, st: LayerStats, params: dict, own_out: torch.Tensor, own_in: torch.Tensor,
                opt: RefitOptions, held: LayerStats | None = None) -> dict:
    """Solve one layer from its sums ``st`` and write the weights into ``params`` (in place).

    ``layer`` is the merged model's :class:`~pleas.ops.LinearMap`; ``own_out`` (n, m_out) and ``own_in``
    (n, P) say which source models own each output row and input column (the zero-block constraint).
    The ridge is ``opt.ridge`` times the data's scale (:meth:`LayerStats.scale`). With ``held`` (the sums
    of held-out rows, disjoint from ``st``'s), the strength is chosen from :data:`RIDGE_GRID` by the error
    on them of a fit to ``st``'s rows, the held-out rows are then added to ``st`` (in place) for the final
    solve, and a layer whose fit would be worse there than its partial-merge weights keeps them. Returns
    the layer's report entry: samples, columns, the relative ridge used, fit errors before and after, and
    on held-out rows."""
    w0 = layer.matrix(params)
    m_out, p = w0.shape
    entry = {"layer": layer.name, "columns": p}
    exact = opt.method != "adam"
    factor = 1.0
    if held is not None and held.count and exact and held.target_sq > 0:
        base = held.initial_error() if held.initial is not None else held.error(w0)
        problem = MaskedProblem(st, w0, own_out, own_in, opt)
        errors = held.errors()
        best = choose_ridge(lambda lam: errors(problem.solve(lam)[0]), base, opt.ridge * st.scale())
        del problem
        st.absorb(held)
        entry.update(heldout_rows=held.count, heldout_before=base, heldout_after=best[0])
        factor = best[1]
    elif held is not None:
        st.absorb(held)
    entry["rows"] = st.count
    before = st.initial_error() if st.initial is not None else st.error(w0)
    if factor is None:  # no strength beats the partial merge on rows it did not see
        entry.update(error_before=before, error_after=before, ridge=None, kept="its fit was worse on held-out rows")
        return entry
    lam = opt.ridge * factor * st.scale()
    w, quad = masked_solve(st, w0, own_out, own_in, lam, opt)
    after = max(quad, 0.0) / max(st.target_sq, 1e-30) if exact else st.error(w)
    layer.set_matrix(params, w)
    entry.update(error_before=before, error_after=after, ridge=opt.ridge * factor)
    return entry


def _ridge_solve(g: torch.Tensor, c: torch.Tensor, start: torch.Tensor, lam: float) -> torch.Tensor:
    """min_W ||X_J W^T - Y_rows||^2 + lam ||W - W0||^2 over the allowed columns J, from G_JJ (``g``),
    C_J,rows (``c``) and ``start`` = W0[rows, J]: (G_JJ + lam I) W^T = C_J,rows + lam W0^T, by Cholesky
    (float32 for large J, float64 otherwise or when float32 fails), least squares if both fail. ``g`` is
    left as it was. Returns W[rows, J]."""
    rhs = c + lam * start.T
    if g.dtype == torch.float32:  # a Gram summed in float32 (memory): factored in place of a copy
        g.diagonal().add_(lam)
        try:
            chol, info = torch.linalg.cholesky_ex(g)
            if int(info) == 0:
                return torch.cholesky_solve(rhs.float(), chol).double().T
            return torch.linalg.lstsq(g.double(), rhs).solution.T
        finally:
            g.diagonal().sub_(lam)
    if len(g) >= FLOAT32_SOLVE:
        g32 = g.float()
        g32.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(g32)
        del g32
        if int(info) == 0:
            return torch.cholesky_solve(rhs.float(), chol).double().T
    g.diagonal().add_(lam)
    try:
        chol, info = torch.linalg.cholesky_ex(g)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, chol).T
        return torch.linalg.lstsq(g, rhs).solution.T
    finally:
        g.diagonal().sub_(lam)


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
