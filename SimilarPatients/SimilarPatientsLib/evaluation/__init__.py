"""What embeddings know: binary patient tasks, cohorts and patient aggregation, folds, classifiers,
metrics with intervals and permutation tests, the evaluation run and its report.

scikit-learn, torch and matplotlib come with the ``analysis`` extra.
"""

from .run import Evaluation, Settings, evaluate
from .tasks import PRESETS, Task

__all__ = ["PRESETS", "Evaluation", "Settings", "Task", "evaluate"]
