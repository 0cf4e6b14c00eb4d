"""Models: the one factory, pretrained-weight loading, and the model contract."""

from lungcad.models.contract import ModelContract, load_model, save_model
from lungcad.models.factory import create_model, logits_to_probs

__all__ = ["ModelContract", "create_model", "load_model", "logits_to_probs", "save_model"]
