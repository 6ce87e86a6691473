"""A model's predictions, and the classification metrics computed from them: pure functions of tensors,
checked against scikit-learn in tests. Evaluate and the training loop both score through here."""

from __future__ import annotations

import dataclasses
from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from stages.core.contract import PREDICT_BATCH
from stages.core.pinning import pinned_cpu


@dataclasses.dataclass(frozen=True)
class Scores:
    loss: float  # mean cross-entropy
    accuracy: float


@torch.no_grad()
@pinned_cpu()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Logits (N, classes) in float32 for all `images`, `batch_size` at a time (by default the model's
    `predict_batch`, or PREDICT_BATCH); on the CPU through the pinned products and convolutions."""
    batch_size = batch_size or getattr(model, "predict_batch", PREDICT_BATCH)
    model.eval()
    return torch.cat([model(batch).float() for batch in images.split(batch_size)])


def score(logits: torch.Tensor, labels: torch.Tensor) -> Scores:
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return Scores(loss, accuracy)


class CalibrationRow(TypedDict):
    bin_upper: float  # the bin holds confidences in (bin_upper - 1/bins, bin_upper]
    confidence: float  # mean confidence in the bin
    accuracy: float
    count: int


def confusion_matrix(actual: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(classes, classes) int64 counts; row = actual class, column = predicted class."""
    flat = actual.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


def per_class_scores(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision, recall and F1 per class (float64); 0 where a denominator is 0, as scikit-learn does."""
    confusion = confusion.double()
    true_positives = confusion.diag()
    predicted = confusion.sum(0)
    actual = confusion.sum(1)
    precision = torch.where(predicted > 0, true_positives / predicted.clamp(min=1), 0.0)
    recall = torch.where(actual > 0, true_positives / actual.clamp(min=1), 0.0)
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp(min=1e-300), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": actual.long()}


def calibration(probabilities: torch.Tensor, actual: torch.Tensor, bins: int) -> tuple[list[CalibrationRow], float]:
    """Reliability diagram data over `bins` equal-width confidence bins, and the expected calibration error.

    Confidence is the top-class probability; ECE = sum over bins of (bin size / N) * |accuracy - confidence|.
    """
    confidence, predicted = probabilities.double().max(1)
    correct = (predicted == actual).double()
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 cannot occur for a max.
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    count = torch.bincount(index, minlength=bins)
    confidence_sum = torch.bincount(index, weights=confidence, minlength=bins)
    correct_sum = torch.bincount(index, weights=correct, minlength=bins)
    rows: list[CalibrationRow] = []
    error = 0.0
    for b in range(bins):
        n = int(count[b])
        if n == 0:
            continue
        mean_confidence, accuracy = confidence_sum[b].item() / n, correct_sum[b].item() / n
        error += n / len(actual) * abs(accuracy - mean_confidence)
        rows.append(
            CalibrationRow(
                bin_upper=round((b + 1) / bins, 6),
                confidence=round(mean_confidence, 6),
                accuracy=round(accuracy, 6),
                count=n,
            )
        )
    return rows, error
