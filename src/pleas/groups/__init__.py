"""Stage 2, groups: the permutation groups of a captured model, read by walking it once with the op
handlers (:func:`analyze`), as plain data (:class:`PermutationSpec`)."""
from .analysis import ModelGraph, analyze
from .spec import Group, Member, PermutationSpec, Site, regular_index

__all__ = ["Group", "Member", "ModelGraph", "PermutationSpec", "Site", "analyze", "regular_index"]
