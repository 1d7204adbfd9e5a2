"""Task arithmetic with task vectors of a shared encoder: non-linear, NTK (tangent) and linear-layers-only modes.

Task vectors are named tensors (:mod:`taft.arithmetic.vectors`, algebra from :mod:`taft.delta`); the multi-task
setting, fine-tuning and evaluation live in :mod:`taft.arithmetic.suite`; task addition, negation and weight
disentanglement in :mod:`taft.arithmetic.experiments`; run-folder wrappers for the CLI in
:mod:`taft.arithmetic.runs`.
"""

from taft.arithmetic.experiments import (
    ADDITION_GRID,
    DISENTANGLE_GRID,
    AdditionResult,
    DisentanglementResult,
    NegationResult,
    TuneResult,
    choose_addition_alpha,
    choose_negation_alpha,
    disentanglement,
    normalized_accuracy,
    single_task_accuracy,
    task_addition,
    task_negation,
    tune,
)
from taft.arithmetic.modes import MODES, Mode, get_mode
from taft.arithmetic.suite import ArithmeticConfig, FinetuneResult, MultiTaskSuite
from taft.arithmetic.vectors import (
    TaskVector,
    TaskVectorError,
    apply,
    check_same_origin,
    combine,
    cosine_matrix,
    load_task_vector,
    save_task_vector,
    task_vector,
)

__all__ = [
    "ADDITION_GRID",
    "DISENTANGLE_GRID",
    "MODES",
    "AdditionResult",
    "ArithmeticConfig",
    "DisentanglementResult",
    "FinetuneResult",
    "Mode",
    "MultiTaskSuite",
    "NegationResult",
    "TaskVector",
    "TaskVectorError",
    "TuneResult",
    "apply",
    "check_same_origin",
    "choose_addition_alpha",
    "choose_negation_alpha",
    "combine",
    "cosine_matrix",
    "disentanglement",
    "get_mode",
    "load_task_vector",
    "normalized_accuracy",
    "save_task_vector",
    "single_task_accuracy",
    "task_addition",
    "task_negation",
    "task_vector",
    "tune",
]
