"""The search's pruning rule: Optuna's asynchronous successive halving, after a few trials that run whole.

At epochs 1, r, r^2, ... (r the reduction factor) a trial goes on only if its validation loss there is among
the best 1/r of the losses every trial of the study had at that epoch (those it stopped included): most
settings are told apart after one epoch, and the few promising ones get the epochs. The first `startup`
trials run whole, so that a study's first trials are not stopped against almost nothing.
"""

from __future__ import annotations

import optuna
from optuna.pruners import BasePruner, SuccessiveHalvingPruner
from optuna.trial import FrozenTrial, TrialState


class HalvingPruner(BasePruner):
    """Successive halving from epoch 1 by `reduction_factor`, never before `startup` trials have run whole."""

    def __init__(self, startup: int, reduction_factor: int) -> None:
        self.startup = startup
        self.halving = SuccessiveHalvingPruner(min_resource=1, reduction_factor=reduction_factor)

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        # Asked first in any case: it records the trial's loss at each epoch where trials are compared, so
        # that the trials that ran whole are among those a later trial must beat.
        stopped = self.halving.prune(study, trial)
        whole = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return stopped and len(whole) >= self.startup
