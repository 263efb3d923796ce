"""Small reference client models (ordinary LightningModules)."""

from pl_federated.models.classifier import CNNClassifier, ImageClassifier, MLPClassifier

__all__ = ["CNNClassifier", "ImageClassifier", "MLPClassifier"]
