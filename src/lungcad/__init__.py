"""lungcad: lung cancer computer-aided detection with a ResNet-50 and honest evaluation."""

__version__ = "0.1.0"
