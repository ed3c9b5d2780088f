"""Stage 5, budget: exact sizes of a rewritten model from its widths (:mod:`.size`), and the merge
counts k_g that meet a budget (:mod:`.allocate`)."""
from .allocate import (Item, allocate_by_loss, allocate_merge_counts, items_of, merge_loss_tables, merged_widths,
                       prefix_merge_counts, similarity_loss_tables, uniform_merge_counts)
from .size import METRICS, SizeModel, model_param_count, param_shape, zero_block_count

__all__ = ["METRICS", "Item", "SizeModel", "allocate_by_loss", "allocate_merge_counts", "items_of",
           "merge_loss_tables", "merged_widths", "model_param_count", "param_shape", "prefix_merge_counts",
           "similarity_loss_tables", "uniform_merge_counts", "zero_block_count"]
