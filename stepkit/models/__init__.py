"""The small models the recipes need, and nothing more."""

from stepkit.models.autoencoder import MultimodalAutoencoder

__all__ = ["MultimodalAutoencoder"]
