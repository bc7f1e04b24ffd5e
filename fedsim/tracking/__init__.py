"""Experiment tracking: per-round and per-adaptation-batch metrics to TensorBoard, MLflow, W&B."""
