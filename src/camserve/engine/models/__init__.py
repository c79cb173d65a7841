"""Models: where they come from (sources, checkpoints), what serving knows of them (profiles,
labels) and how a spec becomes a served model (loader).

* :mod:`.spec` — :class:`ModelSpec`, the ``handler.model`` section of ``model-config.yaml``;
* :mod:`.sources` — torchvision, timm, eager (``--model-file``), transformers, the bundled
  EfficientNet-Lite0; :mod:`.checkpoints` — state dicts only (``weights_only`` / safetensors);
* :mod:`.profile` — :class:`ModelProfile` (preprocessing, default layer, stages);
* :mod:`.labels` — ``index_to_name.json``, ImageNet names, indices;
* :mod:`.loader` — :func:`load_spec`, :func:`profile_with_layers`, :func:`embedding_model_for`;
* :mod:`.bundled` — the pretrained EfficientNet-Lite0/1/2 (registry weight packages) and
  torchvision-by-name helpers used by tests and CLIs.
"""

from camserve.engine.models.bundled import (EFFNET_LITE0, EFFNET_LITE1, EFFNET_LITE2, EFFNET_LITES, TORCHVISION_PROFILES,
                                            effnet_lite0_weights_path, effnet_lite_name, effnet_lite_weights_path,
                                            load_effnet_lite, load_effnet_lite0, load_model, load_torchvision,
                                            profile_for)
from camserve.engine.models.checkpoints import WeightsError, load_weights, read_state_dict
from camserve.engine.models.labels import class_names, imagenet_class_names
from camserve.engine.models.loader import LoadedModel, embedding_model_for, labels_for, load_spec, profile_with_layers
from camserve.engine.models.profile import IMAGENET_MEAN, IMAGENET_STD, ModelProfile, default_profile
from camserve.engine.models.sources import ModelSourceError, build_model
from camserve.engine.models.spec import ModelSpec

__all__ = ["EFFNET_LITE0", "EFFNET_LITE1", "EFFNET_LITE2", "EFFNET_LITES", "effnet_lite_name",
           "effnet_lite_weights_path", "load_effnet_lite", "TORCHVISION_PROFILES", "IMAGENET_MEAN", "IMAGENET_STD", "LoadedModel", "ModelProfile",
           "ModelSourceError", "ModelSpec", "WeightsError", "build_model", "class_names", "default_profile",
           "effnet_lite0_weights_path", "embedding_model_for", "imagenet_class_names", "labels_for",
           "load_effnet_lite0", "load_model", "load_spec", "load_torchvision", "load_weights", "profile_for",
           "profile_with_layers", "read_state_dict"]
