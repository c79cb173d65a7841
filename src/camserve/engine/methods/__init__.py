"""The registry of explanation methods: request name → method instance.

Names are lower-case; common aliases (``grad-cam``, ``gradcam++``, ``layer_cam`` …) resolve to the
same method. Captum attributions and FAM register under their own names in their modules.
"""

from typing import Dict

from camserve.engine.errors import UnknownMethodError
from camserve.engine.methods.cam.base import CamMethod, Captured
from camserve.engine.methods.cam.cam import CAM
from camserve.engine.methods.cam.gradcam import GradCAM
from camserve.engine.methods.cam.gradcampp import GradCAMPlusPlus
from camserve.engine.methods.cam.layercam import LayerCAM
from camserve.engine.methods.lrp.relevancecam import RelevanceCAM
from camserve.engine.methods.lrp.shallowcam import ShallowCAM

METHODS: Dict[str, CamMethod] = {m.name: m for m in (
    CAM(), GradCAM(), GradCAMPlusPlus(), LayerCAM(), RelevanceCAM(), ShallowCAM())}

ALIASES = {
    "grad-cam": "gradcam", "grad_cam": "gradcam",
    "gradcam++": "gradcampp", "grad-cam++": "gradcampp", "gradcamplusplus": "gradcampp", "gradcam_pp": "gradcampp",
    "layer-cam": "layercam", "layer_cam": "layercam",
    "relevance-cam": "relevancecam", "relevance_cam": "relevancecam",
    "shallow-cam": "shallowcam", "shallow_cam": "shallowcam",
}


def get_method(name: str) -> CamMethod:
    """The registered method for ``name`` (case-insensitive, aliases allowed)."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    try:
        return METHODS[key]
    except KeyError:
        raise UnknownMethodError(f"unknown explanation method {name!r}; available: {sorted(METHODS)}") from None


__all__ = ["CamMethod", "Captured", "METHODS", "get_method"]
