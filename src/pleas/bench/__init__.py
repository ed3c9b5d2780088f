"""``pleas bench``: the benchmark suite. Trains pairs of source models on small real tasks, merges them with
every method at every budget, and writes BENCHMARKS.md, plots and the raw results.

Modules: :mod:`.tasks` (tasks, architectures, source models, calibration data), :mod:`.free_data`
(PLeaS-free's calibration data), :mod:`.free_ablation` (PLeaS with free data in one stage only),
:mod:`.measure` (forward floor, peak memory), :mod:`.run` (the merges),
:mod:`.aggregate` (summaries over seed pairs), :mod:`.findings` (the paper's claims checked),
:mod:`.report` (BENCHMARKS.md), :mod:`.plots` (PNGs), :mod:`.suite` (all of it, and the output files).
"""
