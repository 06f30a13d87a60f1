"""The small models the recipes need, and nothing more."""

from stepkit.models.autoencoder import MultimodalAutoencoder
from stepkit.models.cnn import SmallCNN
from stepkit.models.dino import DINOHead, cancel_last_layer_gradients, multi_crop_forward
from stepkit.models.jepa import ConvPredictor, JEPAPredictor, MaskedCNN
from stepkit.models.vit import VisionTransformer

__all__ = [
    "ConvPredictor",
    "DINOHead",
    "JEPAPredictor",
    "MaskedCNN",
    "MultimodalAutoencoder",
    "SmallCNN",
    "VisionTransformer",
    "cancel_last_layer_gradients",
    "multi_crop_forward",
]
