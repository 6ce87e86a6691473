"""The name of every file the stages write inside their output folders, written once.

Writers and readers both take the names from here; dvc.yaml declares the same names as outputs, and
tests/test_dvc_yaml.py checks that the two agree.
"""

from __future__ import annotations

# data/raw/: the four IDX files keep their registry names (stages/datasets.yaml); beside them,
MANIFEST = "dataset.json"  # what was downloaded: dataset, classes, the file of each role

# data/processed/
SPLITS = ("train", "val", "test")
SPLIT_SUFFIX = ".safetensors"  # <split>.safetensors: uint8 images (N, H, W), int64 labels (N,)
META = "meta.json"  # dataset, classes, image shape, split sizes, normalisation

# models/
WEIGHTS = "model.safetensors"
CARD = "model.json"
ONNX = "model.onnx"  # the network as ONNX, for ONNX Runtime: what predict runs
TRAINING_LOG = "training"  # DVCLive's folder: curves and summary; evaluate publishes a copy in metrics/

# metrics/ (besides a copy of TRAINING_LOG)
TEST_METRICS = "test.json"
PER_CLASS = "per_class.csv"
PER_CLASS_TABLE = "per_class.md"
CONFUSION = "confusion.csv"
CALIBRATION = "calibration.csv"
MISCLASSIFIED = "misclassified.png"
REPORT = (TEST_METRICS, PER_CLASS, PER_CLASS_TABLE, CONFUSION, CALIBRATION, MISCLASSIFIED, TRAINING_LOG)


def split_file(split: str) -> str:
    return split + SPLIT_SUFFIX
