"""Training: batch sources, the schedule, the non-finite guard, checkpoints, the loop and the guide front end.

``train`` is the generic loop (any module and loss); ``fit`` trains an amortised guide on
simulations of its model and is what ``StructuredGuide.fit`` calls.
"""

from .batches import PoolSource, SimulationSource, TensorPool
from .checkpoint import Checkpointer
from .fit import fit
from .guard import NonFiniteGuard, TrainingError
from .loop import FitResult, train
from .schedule import Schedule, learning_rate_factor

__all__ = [
    "fit",
    "train",
    "FitResult",
    "TrainingError",
    "NonFiniteGuard",
    "Checkpointer",
    "Schedule",
    "learning_rate_factor",
    "PoolSource",
    "SimulationSource",
    "TensorPool",
]
