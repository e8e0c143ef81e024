"""``dfpo bench noisy``: the noisy-supervision benchmark, a grid of algorithms x supervision x seeds.

Every cell of the grid trains one algorithm (or a DFPO ablation) on one domain under one kind of supervision with
one seed, at the same budget as every other cell (steps, prompts, samples, response length, evaluation), then
evaluates the final policy greedily on the benchmarks of its domain and of the domains paired with it: the
benchmarks of the domain it trained on are in-domain (ID), the others out-of-domain (OOD), the cross-domain
protocol of DFPO's and DVPO's papers (train on math, evaluate math and science; train on science, evaluate
science and math).

Scales (:data:`SCALES`) fix the model, the domains with their benchmarks, and the shared budget:

- ``tiny``: the embedded tiny model; domains ``add`` and ``sub`` (2-4 term chains of 2-digit additions, of
  subtractions, with worked steps), each with a 2-, 3- and 4-term benchmark, so values vary widely with the
  prompt's difficulty and along the worked steps;
- ``smollm2``: SmolLM2-135M-Instruct; domains ``math`` (sums of two 1- or 2-digit numbers, three worked examples;
  evaluated on held-out sums and GSM8K), ``science`` (SciQ, ARC-Easy, ARC-Challenge, OpenBookQA)
  and ``dialogue`` (CoQA, trained on the learned reward model's scores, evaluated by F1 against the gold answers).

The grid is resumable: each finished cell is a JSON file under ``OUT/cells/``, written atomically, and is skipped
when the same command runs again; a cell interrupted mid-run continues from its last checkpoint. Each cell runs in
its own process (``workers`` at a time). ``OUT`` then holds ``grid.json`` (command, machine, versions, settings),
``cells.csv``, ``summary.md`` (per-benchmark accuracy with ID, OOD and ALL averages as mean ± 95% interval over
seeds, paired comparisons of DFPO against each baseline, the critics' explained variance against its ceiling)
and PNG plots (learning curves with seed bands, final accuracy with intervals).

Tuning is the same for every variant: none by default (the scale's shared settings), or with ``tune=a,b,..`` each
variant picks its actor learning rate from that list on its own tuning seed under clean rewards, by the true
training reward of its last steps (never by a benchmark).
"""

from dfpo.experiments.noisy.grid import ABLATIONS, MAIN_ALGOS, SCALES, NoisyConfig, Scale
from dfpo.experiments.noisy.report import write_report
from dfpo.experiments.noisy.runner import CellFailed, run_noisy

__all__ = ["ABLATIONS", "MAIN_ALGOS", "SCALES", "CellFailed", "NoisyConfig", "Scale", "run_noisy", "write_report"]
