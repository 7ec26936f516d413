"""Training losses by objective: the registry train.py and finetune.py read (data.objective -> Loss).

Each loss returns normalised contributions so that gradient accumulation over micro-batches gives exactly
the full-batch mean (denominators come from the whole global batch): podformer/loss_base.py has the type
and the causal LM, podformer/objective_losses.py the other objectives.
"""

from __future__ import annotations

from podformer import objective_losses
from podformer.loss_base import Loss, causal_lm, token_cross_entropy  # noqa: F401 (re-exported)

LOSSES: dict[str, Loss] = {"causal_lm": causal_lm, **objective_losses.LOSSES}
