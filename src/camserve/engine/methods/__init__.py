"""Explanation methods, one registry for all of them: :data:`REGISTRY` (request name → method).

Families: the CAM family (:mod:`.cam`), methods read from an LRP relevance pass (:mod:`.lrp`),
Captum's attributions (:mod:`.captum`, names ``captum.<name>``) and the similarity explanations of
embedding models (:mod:`.similarity`). Names are lower-case; common aliases (``grad-cam``,
``gradcam++``, ``layer_cam``, ``captum.ig`` …) resolve to the same method. The registry is filled
here, at import, and never written afterwards (:meth:`Registry.extended` makes a new one).
"""

from camserve.engine.methods.cam.base import CamMethod, Captured
from camserve.engine.methods.cam.cam import CAM
from camserve.engine.methods.cam.gradcam import GradCAM
from camserve.engine.methods.cam.gradcampp import GradCAMPlusPlus
from camserve.engine.methods.cam.layercam import LayerCAM
from camserve.engine.methods.captum.attribute import CaptumAttribution
from camserve.engine.methods.captum.catalog import ALIASES as CAPTUM_ALIASES, METHODS as CAPTUM_METHODS, PREFIX
from camserve.engine.methods.lrp.fgcam import FGCAM
from camserve.engine.methods.lrp.relevancecam import RelevanceCAM
from camserve.engine.methods.lrp.shallowcam import ShallowCAM
from camserve.engine.methods.registry import CLASSIC, Method, Registry
from camserve.engine.methods.similarity.fam import FAM, GRADCAM_SIMILARITY

_CLASSIC = (CAM(), GradCAM(), GradCAMPlusPlus(), LayerCAM(), RelevanceCAM(), ShallowCAM(), FGCAM())
_CLASSIC_ALIASES = {
    "gradcam": ("grad-cam", "grad_cam"),
    "gradcampp": ("gradcam++", "grad-cam++", "gradcamplusplus", "gradcam_pp"),
    "layercam": ("layer-cam", "layer_cam"),
    "relevancecam": ("relevance-cam", "relevance_cam"),
    "shallowcam": ("shallow-cam", "shallow_cam"),
    "fgcam": ("fg-cam", "fg_cam"),
}
_CAPTUM_NAMES = list(CAPTUM_METHODS) + ["noise_tunnel"]

REGISTRY = Registry(
    [(method, _CLASSIC_ALIASES.get(method.name, ())) for method in _CLASSIC]
    + [(CaptumAttribution(PREFIX + name), tuple(PREFIX + alias for alias, target in CAPTUM_ALIASES.items()
                                                if target == name)) for name in _CAPTUM_NAMES]
    + [(FAM, ()), (GRADCAM_SIMILARITY, ())])


def get_method(name: str) -> Method:
    """The registered classifier method for ``name`` (case-insensitive, aliases allowed)."""
    return REGISTRY.lookup(name)


__all__ = ["CLASSIC", "CamMethod", "Captured", "Method", "REGISTRY", "Registry", "get_method"]
