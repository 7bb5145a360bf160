"""stellar_hf: STELLAR (sparse semantic tokens x spatial assignment map) as transformers models.

Importing the package registers the STELLAR and MaskGIT VQGAN classes with the transformers Auto classes.
Conversion scripts, data, evaluation and visualisation helpers are separate modules, imported on demand.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForImageToImage,
    AutoModelForPreTraining,
)

from .configuration_maskgit_vqgan import MaskGitVQGANConfig
from .configuration_stellar import StellarConfig
from .image_processing_stellar import StellarImageProcessor, StellarImageProcessorFast
from .modeling_maskgit_vqgan import MaskGitVQGANModel
from .modeling_stellar import (
    StellarClusteringHead,
    StellarForImageClassification,
    StellarForImageReconstruction,
    StellarForPreTraining,
    StellarForPreTrainingOutput,
    StellarModel,
    StellarModelOutput,
    StellarPreTrainedModel,
    StellarReconstructionOutput,
)

__version__ = "0.1.0"

AutoConfig.register(StellarConfig.model_type, StellarConfig, exist_ok=True)
AutoConfig.register(MaskGitVQGANConfig.model_type, MaskGitVQGANConfig, exist_ok=True)
AutoModel.register(StellarConfig, StellarModel, exist_ok=True)
AutoModel.register(MaskGitVQGANConfig, MaskGitVQGANModel, exist_ok=True)
AutoModelForImageClassification.register(StellarConfig, StellarForImageClassification, exist_ok=True)
AutoModelForImageToImage.register(StellarConfig, StellarForImageReconstruction, exist_ok=True)
AutoModelForPreTraining.register(StellarConfig, StellarForPreTraining, exist_ok=True)
AutoImageProcessor.register(
    StellarConfig,
    image_processor_classes={"pil": StellarImageProcessor, "torchvision": StellarImageProcessorFast},
    exist_ok=True,
)

# `save_pretrained` writes these classes' source next to the weights, so a process that never imports stellar_hf
# loads the folder with `trust_remote_code=True`.
StellarConfig.register_for_auto_class()
StellarModel.register_for_auto_class("AutoModel")
StellarForImageClassification.register_for_auto_class("AutoModelForImageClassification")
StellarForImageReconstruction.register_for_auto_class("AutoModelForImageToImage")
StellarForPreTraining.register_for_auto_class("AutoModelForPreTraining")
StellarImageProcessor.register_for_auto_class("AutoImageProcessor")
StellarImageProcessorFast.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "MaskGitVQGANConfig",
    "MaskGitVQGANModel",
    "StellarClusteringHead",
    "StellarConfig",
    "StellarForImageClassification",
    "StellarForImageReconstruction",
    "StellarForPreTraining",
    "StellarForPreTrainingOutput",
    "StellarImageProcessor",
    "StellarImageProcessorFast",
    "StellarModel",
    "StellarModelOutput",
    "StellarPreTrainedModel",
    "StellarReconstructionOutput",
]
