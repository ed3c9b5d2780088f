"""Exceptions raised by pleas. Every message names what was wrong and what is allowed."""


class PleasError(Exception):
    """Base class of every error pleas raises on purpose."""


class UnsupportedOpError(PleasError):
    """The tracer met an operation that no handler knows how to permute."""


class SpecError(PleasError):
    """A permutation spec is inconsistent with a model or a state dict."""


class MergeInputError(PleasError, ValueError):
    """Invalid input to a merge: models, data, budget or options."""
