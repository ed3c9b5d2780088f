"""Solving a layer from its sampled rows instead of its Gram matrix, and choosing how each layer is solved.

A layer that reads P columns from N sampled rows, N < P, has a rank-N Gram matrix; forming it costs
8 P^2 bytes (5 GB for vgg11_bn's first classifier layer, P = 25,089) where the rows cost 4 N P. The ridge
problem of :mod:`.solve` is then solved exactly in its dual form (the push-through identity):

    (X^T X + lam I)^-1 (X^T Y + lam W0^T)  =  W0^T + X^T (X X^T + lam I)^-1 (Y - X W0^T),

an N x N system per row pattern of the zero-block constraint, in float64, never forming G or C. The
result is the same solution up to round-off (measured in docs/memory.md); it is cheaper in time too
(N^2 P instead of P^3). With N >= P the rows are larger than a float32 Gram, so such a layer that does
not fit in float64 accumulates its Gram in float32 instead (:func:`plan_layer`).
"""
from __future__ import annotations

import torch

from .solve import RefitOptions, choose_ridge, row_patterns

#: How a layer can be solved, in order of preference when it fits: the float64 Gram, the dual form on the
#: rows (only with fewer rows than columns), the float32 Gram.
SOLVERS = ("dense", "rows", "float32")


def solve_bytes(solver: str, p: int, m_out: int, n_rows: int) -> int:
    """Peak bytes of solving one layer of ``p`` columns, ``m_out`` outputs and ``n_rows`` sampled rows
    with ``solver``, beyond the rows themselves (X float32 (n_rows, p) and Y (n_rows, m_out), which every
    solver holds while it sums). Dense: G and C float64, a gathered block of G per row pattern and the
    float32 factorisation (G + lam I and its Cholesky factor) of large layers, and with held-out rows their
    own G: measured on vgg11_bn's 25,089-column layer, about five float64 Grams at the peak. Float32: G
    float32 and its factor, C float64. Rows: a float64 copy of X, the N x N kernel and its factor, the
    residuals."""
    if solver == "dense":
        return 8 * p * p * 5 + 8 * p * m_out * 2
    if solver == "float32":
        return 4 * p * p * 2 + 4 * p * p + 8 * p * m_out * 2
    if solver == "rows":
        return 8 * n_rows * p + 3 * 8 * n_rows * n_rows + 3 * 8 * n_rows * m_out + 8 * p * m_out
    raise ValueError(f"solver={solver!r}; allowed: {SOLVERS}")


def plan_layer(p: int, m_out: int, n_rows: int, limit: int | None, forced: str = "auto") -> str | None:
    """The solver of a layer under ``limit`` bytes (None: no limit): ``forced`` unless "auto"; else the
    rows' dual form when the layer has fewer rows than columns and it fits (the same solution, in N^2 P
    time and N P memory instead of P^3 and P^2), else the float64 Gram when it fits, else the float32
    Gram when it fits; None when nothing fits."""
    if forced != "auto":
        if forced not in SOLVERS:
            raise ValueError(f"solver={forced!r}; allowed: 'auto', {', '.join(map(repr, SOLVERS))}")
        return forced
    for solver in ("rows", "dense", "float32"):
        if solver == "rows" and n_rows >= p:
            continue
        if limit is None or solve_bytes(solver, p, m_out, n_rows) <= limit:
            return solver
    return None


#: Output rows of a weight handled at once when it is read or updated in float64 (bounds the temporaries).
ROW_CHUNK = 512


class RowsProblem:
    """One layer's ridge problem under the zero-block constraint, from its rows X (N, P) and targets
    Y (N, m_out): the dual-form counterpart of :class:`pleas.refit.solve.MaskedProblem`. Each row
    pattern's kernel X_J X_J^T (float64) is formed once, so a ridge grid factors only N x N systems, and
    its error on held-out rows (:meth:`held_error`) is read from N x N products without forming a weight.
    Weights stay in their own dtype; products with them run in float64 a few hundred rows at a time. The
    problem keeps no reference to ``w0`` unless W_0 has no zero blocks (then it is its starting point)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, own_out: torch.Tensor,
                 own_in: torch.Tensor, opt: RefitOptions):
        m_out, p = w0.shape
        self.shape, self.opt = (m_out, p), opt
        self.start, patterns = row_patterns(w0, own_out, own_in, (x != 0).any(0), opt.mask)
        self.owns_start = self.start is not w0  # a private copy (W_0 with its zero blocks zeroed)
        self.patterns = [[rows, cols] for rows, cols in patterns if len(cols)]
        self.target_sq = float(torch.linalg.vector_norm(y, dtype=torch.float64)) ** 2
        self.count = len(x)
        self.trace = float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2  # trace(X^T X)
        covered = torch.zeros(m_out, dtype=torch.bool)
        for rows, _ in self.patterns:
            covered[rows] = True
        self.rest = (~covered).nonzero().squeeze(1)  # rows reading no seen column: their fit error stays W_0's
        self.rest_sq = self._residual_sq(x.double(), y, self.rest)
        for pattern in self.patterns:
            rows, cols = pattern
            xj = x.index_select(1, cols).double() if len(cols) < p else x.double()
            resid = y.index_select(1, rows).double() - _times_t(xj, self.start, rows, cols)  # Y - X W_0^T, (N, rows)
            pattern += [xj, xj @ xj.T, resid]

    def _residual(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Y[:, rows] - X start[rows]^T (x float64, every column)."""
        return y.index_select(1, rows).double() - _times_t(x, self.start, rows, torch.arange(self.shape[1]))

    def _residual_sq(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> float:
        """||Y[:, rows] - X start[rows]^T||^2 (x float64, every column)."""
        if not len(rows):
            return 0.0
        r = self._residual(x, y, rows)
        return float((r * r).sum())

    def scale(self) -> float:
        """trace(G) / min(P, N), as :meth:`pleas.refit.solve.LayerStats.scale`."""
        return self.trace / max(min(self.shape[1], self.count), 1)

    def _alphas(self, lam: float):
        """Each pattern's dual coefficients (N, rows) at strength ``lam``, with the pattern."""
        for pattern in self.patterns:
            k, resid = pattern[3], pattern[4]
            system = k.clone()
            system.diagonal().add_(max(lam, 1e-12 * float(k.diagonal().mean()) + 1e-300))
            chol, info = torch.linalg.cholesky_ex(system)
            alpha = torch.cholesky_solve(resid, chol) if int(info) == 0 else torch.linalg.lstsq(system, resid).solution
            yield pattern, alpha

    def solve(self, lam: float, *, inplace: bool = False) -> tuple[torch.Tensor, float]:
        """The ridge solution W (m_out, P) at strength ``lam`` and ||X W^T - Y||^2 over the rows. With
        ``inplace`` the problem's own copy of W_0 becomes W (no second copy of the weight); the problem
        cannot be solved again after that."""
        if self.start is None:
            raise RuntimeError("this RowsProblem was solved in place already")
        w = self.start if inplace and self.owns_start else self.start.clone()
        if inplace:
            self.start = None
        quad = self.rest_sq
        for (rows, cols, xj, k, resid), alpha in self._alphas(lam):
            whole = len(cols) == w.shape[1]
            for lo in range(0, len(rows), ROW_CHUNK):
                r = rows[lo:lo + ROW_CHUNK]
                delta = (alpha[:, lo:lo + ROW_CHUNK].T @ xj).to(w.dtype)  # (chunk, J): X_J^T alpha, transposed
                if whole:
                    w.index_add_(0, r, delta)
                else:
                    w[r[:, None], cols] += delta
            after = resid - k @ alpha  # Y - X W^T over the pattern
            quad += float((after * after).sum())
        return w, quad

    def held_error(self, x: torch.Tensor, y: torch.Tensor):
        """A function of the strength giving ||X W^T - Y||^2 / ||Y||^2 on other rows (x, y) of the solution W
        at that strength, the same as :func:`row_errors` of :meth:`solve`'s W: X W^T = X S^T + X_J X_J'^T
        alpha per pattern (S: W_0 with its zero blocks zeroed), so only (N_held, N) products are formed."""
        x64 = x.double()
        total = max(float(torch.linalg.vector_norm(y, dtype=torch.float64)) ** 2, 1e-30)
        fixed = self._residual_sq(x64, y, self.rest)
        cross = []
        for rows, cols, xj, _, _ in self.patterns:
            # (N_held, N) products with the fit rows, and the held-out rows' residuals of S (N_held, rows)
            cross.append((x64.index_select(1, cols) @ xj.T, self._residual(x64, y, rows)))
        del x64

        def error(lam: float) -> float:
            quad = fixed
            for ((kh, base), (_, alpha)) in zip(cross, self._alphas(lam)):
                r = base - kh @ alpha
                quad += float((r * r).sum())
            return quad / total

        return error


def _times_t(x: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x @ w[rows][:, cols]^T in float64 (x: float64 (N, len(cols))), ROW_CHUNK rows of w at a time."""
    out = torch.empty(x.shape[0], len(rows), dtype=torch.float64)
    whole = len(cols) == w.shape[1]
    for lo in range(0, len(rows), ROW_CHUNK):
        block = w.index_select(0, rows[lo:lo + ROW_CHUNK])
        block = block if whole else block.index_select(1, cols)
        out[:, lo:lo + ROW_CHUNK] = x @ block.double().T
    return out


def row_errors(x: torch.Tensor, y: torch.Tensor):
    """A function of a weight W (m_out, P) giving ||X W^T - Y||^2 / ||Y||^2 on the rows (x, y)."""
    y = y.double()
    total = max(float((y * y).sum()), 1e-30)

    x = x.double()
    every = torch.arange(x.shape[1])

    def error(w: torch.Tensor) -> float:
        r = y - _times_t(x, w, torch.arange(w.shape[0]), every)
        return float((r * r).sum()) / total

    return error


def solve_layer_rows(layer, x: torch.Tensor, y: torch.Tensor, params: dict, own_out: torch.Tensor,
                     own_in: torch.Tensor, opt: RefitOptions, held: torch.Tensor | None = None) -> dict:
    """:func:`pleas.refit.solve.solve_layer` from the rows X (N, P) and targets Y (N, m_out) themselves
    (the dual form: :class:`RowsProblem`), with the same ridge rule, held-out choice of its strength
    (``held``: (N,) booleans, the held-out rows) and report entry."""
    w0 = layer.matrix(params, params[layer.weight].dtype)  # its own dtype: products run in float64 in chunks
    entry = {"layer": layer.name, "columns": w0.shape[1]}
    factor = 1.0
    before_all = row_errors(x, y)(w0)
    if held is not None and bool(held.any()) and bool((~held).any()):
        fit = RowsProblem(x[~held], y[~held], w0, own_out, own_in, opt)
        base = row_errors(x[held], y[held])(w0)
        best = choose_ridge(fit.held_error(x[held], y[held]), base, opt.ridge * fit.scale())
        del fit
        entry.update(heldout_rows=int(held.sum()), heldout_before=base, heldout_after=best[0])
        factor = best[1]
    entry["rows"] = len(x)
    if factor is None:
        entry.update(error_before=before_all, error_after=before_all, ridge=None,
                     kept="its fit was worse on held-out rows")
        return entry
    problem = RowsProblem(x, y, w0, own_out, own_in, opt)
    del w0  # the problem holds its own copy of it (or W_0 itself, when it has no zero blocks)
    w, quad = problem.solve(opt.ridge * factor * problem.scale(), inplace=True)
    layer.set_matrix(params, w)
    entry.update(error_before=before_all, error_after=max(quad, 0.0) / max(problem.target_sq, 1e-30),
                 ridge=opt.ridge * factor)
    return entry
