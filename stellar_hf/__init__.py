"""stellar_hf: STELLAR (sparse semantic tokens x spatial assignment map) as transformers models.

Importing the package registers the STELLAR and MaskGIT VQGAN classes with the transformers Auto classes.
Conversion scripts, data, evaluation and visualisation helpers are separate modules, imported on demand.
`list_released_models` and `load_released_model` (the released checkpoints, downloaded and converted in one call) are
imported from `stellar_hf.released` the first time they are used, and that module imports the converter only when a
file has to be converted.

Image processors follow transformers 5.24's naming: `StellarImageProcessor` (torchvision) and
`StellarImageProcessorPil` (PIL). `StellarImageProcessorFast`, the torchvision class's name before, still imports,
with a `FutureWarning`.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForImageToImage,
    AutoModelForPreTraining,
)
from transformers.utils import is_torchvision_available

from .configuration_maskgit_vqgan import MaskGitVQGANConfig
from .configuration_stellar import StellarConfig
from .image_processing_stellar import IMAGE_PROCESSOR_CLASSES, StellarImageProcessorPil, compatible_class
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

if is_torchvision_available():
    from .image_processing_stellar import StellarImageProcessor
# else: `StellarImageProcessor` is `StellarImageProcessorPil`, with a logged warning when asked for (`__getattr__`).

__version__ = "0.1.0"

AutoConfig.register(StellarConfig.model_type, StellarConfig, exist_ok=True)
AutoConfig.register(MaskGitVQGANConfig.model_type, MaskGitVQGANConfig, exist_ok=True)
AutoModel.register(StellarConfig, StellarModel, exist_ok=True)
AutoModel.register(MaskGitVQGANConfig, MaskGitVQGANModel, exist_ok=True)
AutoModelForImageClassification.register(StellarConfig, StellarForImageClassification, exist_ok=True)
AutoModelForImageToImage.register(StellarConfig, StellarForImageReconstruction, exist_ok=True)
AutoModelForPreTraining.register(StellarConfig, StellarForPreTraining, exist_ok=True)
# Both backends, by transformers' backend names: `backend="pil" | "torchvision"` (or the deprecated `use_fast`) picks
# one whichever class saved the folder; the default is torchvision when it is installed.
AutoImageProcessor.register(StellarConfig, image_processor_classes=dict(IMAGE_PROCESSOR_CLASSES), exist_ok=True)

# `save_pretrained` writes these classes' source next to the weights, so a process that never imports stellar_hf
# loads the folder with `trust_remote_code=True`.
StellarConfig.register_for_auto_class()
StellarModel.register_for_auto_class("AutoModel")
StellarForImageClassification.register_for_auto_class("AutoModelForImageClassification")
StellarForImageReconstruction.register_for_auto_class("AutoModelForImageToImage")
StellarForPreTraining.register_for_auto_class("AutoModelForPreTraining")
for _image_processor_class in IMAGE_PROCESSOR_CLASSES.values():
    _image_processor_class.register_for_auto_class("AutoImageProcessor")
del _image_processor_class

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
    "StellarImageProcessorPil",
    "StellarModel",
    "StellarModelOutput",
    "StellarPreTrainedModel",
    "StellarReconstructionOutput",
    "list_released_models",
    "load_released_model",
]

# Names served by a module imported on first use (`__getattr__`).
_LAZY_NAMES = {"list_released_models": "released", "load_released_model": "released"}


def __getattr__(name: str):
    """`list_released_models` and `load_released_model` (from `stellar_hf.released`, imported on first use), and the
    names kept for compatibility: `StellarImageProcessorFast` (deprecated), `StellarImageProcessor` without
    torchvision. See `image_processing_stellar.compatible_class`."""
    if name in _LAZY_NAMES:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    compatible = compatible_class(name, stacklevel=2)
    if compatible is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return compatible
