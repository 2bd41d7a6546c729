"""Training, fine-tuning and evaluation of tissue models (``wsi-espnet train`` / ``evaluate``).

``train(TrainConfig) -> TrainResult`` writes a model card and weights that the segmentation
pipeline accepts directly; ``evaluate_model`` scores any model on labelled regions.
"""

from wsi_espnet.train.evaluate import confusion_matrix, evaluate_model, metrics_from_confusion
from wsi_espnet.train.loop import TrainConfig, TrainResult, train

__all__ = [
    "TrainConfig",
    "TrainResult",
    "confusion_matrix",
    "evaluate_model",
    "metrics_from_confusion",
    "train",
]
