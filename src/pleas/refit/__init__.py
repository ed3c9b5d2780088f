"""Stage 7, refit: every linear map of the merged model refitted by least squares toward the permuted
ensemble (docs/algorithm.md section 4), teacher-forced (:mod:`.teacher`) or on the merged model's own
propagated activations (:mod:`.propagated`), each layer solved in closed form (:mod:`.solve`)."""
from .api import RefitReport, refit
from .layers import RefitLayer, refit_layers
from .propagated import TargetSampler, refit_propagated
from .solve import LayerStats, RefitOptions, solve_layer
from .teacher import refit_teacher

__all__ = ["LayerStats", "RefitLayer", "RefitOptions", "RefitReport", "refit", "TargetSampler", "refit_layers", "refit_propagated",
           "refit_teacher", "solve_layer"]
