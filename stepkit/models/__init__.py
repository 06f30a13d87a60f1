"""The small models the recipes need, and nothing more."""

from stepkit.models.arguments import ARCHITECTURES, arch_record, build_arch, records_arguments
from stepkit.models.autoencoder import MultimodalAutoencoder
from stepkit.models.cnn import SmallCNN
from stepkit.models.dino import DINOHead, DINOModel, cancel_last_layer_gradients, multi_crop_forward
from stepkit.models.jepa import (
    JEPA,
    ConvPredictor,
    JEPAPredictor,
    MaskedBatchNorm2d,
    MaskedCNN,
    gather_tokens,
    jepa_targets,
    patch_tokens,
    pooled_patches,
)
from stepkit.models.pretrained import PretrainedImageEncoder, lock, pretrained_image_stats
from stepkit.models.sequence import (
    MaskedTemporalCNN,
    SequenceJEPA,
    SequencePredictor,
    TokenTransformer,
    sequence_tokens,
)
from stepkit.models.text import (
    PretrainedTextEncoder,
    TinyTextEncoder,
    WordTokenizer,
    add_lora,
    merge_lora,
    pretrained_tokenizer,
    pretrained_vocab,
)
from stepkit.models.tower import ProjectedTower
from stepkit.models.vit import LayerScale, SwiGLU, VisionTransformer, sincos_pos_embed_2d, swiglu_hidden

# The classes exported weights may rebuild (stepkit.weights.load_exported): these and no others.
ARCHITECTURES.update({cls.__name__: cls for cls in (VisionTransformer, SmallCNN, MaskedCNN, MaskedTemporalCNN,
                                                    TokenTransformer, TinyTextEncoder, PretrainedTextEncoder,
                                                    PretrainedImageEncoder, MultimodalAutoencoder,
                                                    ProjectedTower)})

__all__ = [
    "ARCHITECTURES",
    "PretrainedImageEncoder",
    "ProjectedTower",
    "lock",
    "pretrained_image_stats",
    "arch_record",
    "build_arch",
    "records_arguments",
    "JEPA",
    "SequenceJEPA",
    "ConvPredictor",
    "DINOHead",
    "DINOModel",
    "JEPAPredictor",
    "MaskedBatchNorm2d",
    "MaskedCNN",
    "MaskedTemporalCNN",
    "MultimodalAutoencoder",
    "PretrainedTextEncoder",
    "SequencePredictor",
    "SmallCNN",
    "TinyTextEncoder",
    "TokenTransformer",
    "VisionTransformer",
    "LayerScale",
    "SwiGLU",
    "WordTokenizer",
    "add_lora",
    "cancel_last_layer_gradients",
    "gather_tokens",
    "jepa_targets",
    "merge_lora",
    "multi_crop_forward",
    "patch_tokens",
    "pooled_patches",
    "pretrained_tokenizer",
    "pretrained_vocab",
    "sequence_tokens",
    "sincos_pos_embed_2d",
    "swiglu_hidden",
]
