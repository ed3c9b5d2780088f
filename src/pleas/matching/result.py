"""The result of matching model B's units to model A's."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..groups.spec import PermutationSpec


@dataclass
class Matching:
    """One entry per group.

    - ``perms[g]``: LongTensor (d,); ``perms[g][i]`` is the index of B's unit paired with A's unit i. For
      n > 2 models, (n - 1, d): row m - 1 holds model m's units matched to model 0's.
    - ``similarity[g]``: float64 (d,); the similarity of pair (i, perms[g][i]), higher = more alike
      (used to rank which pairs to merge first, docs/algorithm.md section 3).
    - ``sweeps``: coordinate-descent sweeps run (0 for one-shot matchers).
    - ``converged``: False if the matcher stopped at its iteration limit while still improving.
    """

    perms: dict[str, torch.Tensor]
    similarity: dict[str, torch.Tensor]
    sweeps: int = 0
    converged: bool = True

    def align(self, spec: PermutationSpec, sd_b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """B's state dict with its units reordered so that unit i of every group is A's unit i's twin."""
        from ..rewrite.transform import permute_state_dict

        return permute_state_dict(sd_b, spec, self.perms)

    @classmethod
    def identity(cls, spec: PermutationSpec, n_models: int = 2) -> "Matching":
        """Unit i of A with unit i of B (of every model) in every group (no alignment), all equally similar."""
        def perm(width):
            return torch.arange(width) if n_models == 2 else torch.arange(width).repeat(n_models - 1, 1)
        return cls({g.name: perm(g.width) for g in spec}, {g.name: torch.ones(g.width, dtype=torch.float64)
                                                           for g in spec})
