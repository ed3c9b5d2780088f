"""Stage 4, matching: which unit of B pairs with which unit of A, per group (linear assignment on
activation correlations or on weights), or ZipIt!'s clustering of the stacked units."""
from .activation import activation_matching
from .assignment import assign_all, linear_assignment
from .result import Matching
from .weights import unit_cosine_similarity, weight_matching
from .zipit import zip_units

__all__ = ["Matching", "activation_matching", "assign_all", "linear_assignment", "unit_cosine_similarity",
           "weight_matching", "zip_units"]
