"""Stage 6, merge (the rewrite of the sources into one model): group maps (:mod:`.maps`), the state-dict rewrite they drive (:mod:`.transform`),
where the rewritten units sit (:mod:`.layout`), and the rebuilt model (:mod:`.rebuild`)."""
from .layout import resized
from .maps import (GroupMap, duplication_map, ensemble_map, identity_merge_map, partial_merge_map, permutation_map,
                   unit_owners)
from .rebuild import build_model, skeleton, target_spec
from .transform import combine_activations, permute_state_dict, rewrite_axis, transform_state_dicts

__all__ = [
    "GroupMap", "build_model", "combine_activations", "duplication_map", "ensemble_map", "identity_merge_map",
    "partial_merge_map", "permutation_map", "permute_state_dict", "resized", "rewrite_axis", "skeleton",
    "target_spec", "transform_state_dicts", "unit_owners",
]
