"""Stage 8, norms: running statistics recomputed after a merge (:mod:`.reset`), and BatchNorm folded
into the linear map before it (:mod:`.fold`); both read what the op handlers declared."""
from .fold import fold_batchnorm, norm_pairs
from .reset import reset_statistics, set_norm_statistics

__all__ = ["fold_batchnorm", "norm_pairs", "reset_statistics", "set_norm_statistics"]
