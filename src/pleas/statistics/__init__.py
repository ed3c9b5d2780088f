"""Stage 3, statistics: sums over calibration samples, streamed in float64 (moments of the units at
each group's sites for matching; the refit's Grams live with the refit)."""
from .gram import gram, quadratic_trace
from .moments import CrossMoments, Moments, MomentsObserver, moments_observer, site_rows, site_samples
from .passes import collect_moments, source_pass

__all__ = ["CrossMoments", "Moments", "MomentsObserver", "collect_moments", "gram", "moments_observer", "quadratic_trace",
           "site_rows", "site_samples", "source_pass"]
