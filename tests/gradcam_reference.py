"""pytorch-grad-cam as the reference for the engine's CAM family (tests/test_engine_parity.py on
EfficientNet-Lite0, tests/test_vit.py on a ViT and Swin): its classes by our method names, its
per-layer map, and the check that nothing left a hook behind.

Importing this module imports ``pytorch_grad_cam``: a test file that skips without it calls
``pytest.importorskip("pytorch_grad_cam")`` first.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from engine_checks import no_hooks

#: our method name → pytorch-grad-cam's class
REFERENCES = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus, "layercam": LayerCAM}


def grad_cam_per_layer(reference, model: torch.nn.Module, module: torch.nn.Module, images: torch.Tensor,
                       targets: Sequence[int], reshape_transform: Optional[Callable] = None
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """pytorch-grad-cam's map after its ReLU, min-max at layer resolution and cv2 resize (its
    ``compute_cam_per_layer``, i.e. before the multi-layer aggregation re-normalises), and its
    public output; asserts that it left no hook on ``model``."""
    with reference(model=model, target_layers=[module], reshape_transform=reshape_transform) as cam:
        per_layer = None
        original = cam.compute_cam_per_layer

        def keep(*args, **kwargs):
            nonlocal per_layer
            per_layer = original(*args, **kwargs)
            return per_layer

        cam.compute_cam_per_layer = keep
        final = cam(input_tensor=images, targets=[ClassifierOutputTarget(t) for t in targets])
    assert no_hooks(model)
    return per_layer[0][:, 0], final
