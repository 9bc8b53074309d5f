"""``train.class_weights: balanced``: cross-entropy weighted against skewed classes, the weights counted on the
training split (scikit-learn's ``balanced`` rule: n_rows / (n_classes * n_rows_of_class))."""
from __future__ import annotations

import numpy as np


def class_weights(labels, num_labels: int, mode: str = "none") -> list[float] | None:
    """One weight per class id 0..num_labels-1 (``balanced``), or None (``none``: plain cross-entropy)."""
    if mode == "none":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    classes = np.arange(num_labels)
    return [round(float(w), 6) for w in compute_class_weight("balanced", classes=classes, y=np.asarray(labels))]


def weighted_loss(weights: list[float] | None, label_smoothing: float = 0.0):
    """The Trainer's ``compute_loss_func`` for class weights (None without them: the model's own loss)."""
    if weights is None:
        return None
    import torch

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        w = torch.tensor(weights, dtype=torch.float32, device=logits.device)
        return torch.nn.functional.cross_entropy(logits.float(), labels.view(-1), weight=w,
                                                 label_smoothing=label_smoothing)

    return loss
