"""What serving needs to know of a model besides its weights: preprocessing and layers.

A :class:`ModelProfile` is immutable and shared by every request of a worker. The bundled
EfficientNet-Lite0 has a hand-written one (:data:`camserve.engine.models.bundled.EFFNET_LITE0`);
any other model gets one from its spec's preprocessing and the layers discovered by one probe
forward (:func:`camserve.engine.models.loader.load_spec`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional, Tuple
from camserve.engine.imaging.preprocess import to_model_input

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class ModelProfile:
    """``Resize(resize) → CenterCrop(crop) → Normalize(mean, std)`` with ``interpolation``; the default
    CAM layer and the stages (module paths, shallow → deep)."""

    name: str
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    resize: int
    crop: int
    default_layer: Optional[str]
    stages: Tuple[str, ...]
    interpolation: str = "bilinear"

    @property
    def input_size(self) -> Tuple[int, int]:
        return (self.crop, self.crop)

    def model_input(self, images_uint8, device):
        """``uint8 (3, H, W)`` images → the normalised batch on ``device`` and the [0, 1] crops."""

        return to_model_input(images_uint8, self.resize, self.crop, self.mean, self.std, device, self.interpolation)

    def preprocessing(self) -> Dict[str, Any]:
        """The preprocessing as a plain dict (for responses, model-config.yaml and the CLI)."""
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    def with_preprocessing(self, settings: Optional[Mapping[str, Any]]) -> "ModelProfile":
        """A copy with the given preprocessing keys (``resize, crop, mean, std, interpolation``) applied;
        an unknown key or an ill-formed value is a ``ValueError`` (a configuration error)."""
        return replace(self, **preprocessing_values(settings))


def preprocessing_values(settings: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Checked ``resize, crop, mean, std, interpolation`` values from a YAML/CLI mapping."""
    settings = dict(settings or {})
    known = {"resize", "crop", "mean", "std", "interpolation"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"preprocess: unknown key(s) {unknown}; known: {sorted(known)}")
    out: Dict[str, Any] = {}
    for key in ("resize", "crop"):
        if key in settings:
            value = settings[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"preprocess.{key} must be a positive integer, got {value!r}")
            out[key] = value
    for key in ("mean", "std"):
        if key in settings:
            value = settings[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value] * 3
            if (not isinstance(value, (list, tuple)) or len(value) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise ValueError(f"preprocess.{key} must be 3 numbers (or one), got {value!r}")
            if key == "std" and any(v <= 0 for v in value):
                raise ValueError(f"preprocess.std must be positive, got {value!r}")
            out[key] = tuple(float(v) for v in value)
    if "interpolation" in settings:
        value = str(settings["interpolation"]).lower()
        if value not in INTERPOLATIONS:
            raise ValueError(f"preprocess.interpolation must be one of {list(INTERPOLATIONS)}, got {value!r}")
        out["interpolation"] = value
    if "crop" in out and "resize" not in out:
        out["resize"] = out["crop"]
    if out.get("crop", 0) > out.get("resize", 1 << 30):
        raise ValueError(f"preprocess.crop ({out['crop']}) is larger than preprocess.resize ({out['resize']})")
    return out


def default_profile(name: str) -> ModelProfile:
    """ImageNet defaults: Resize 256 → CenterCrop 224, ImageNet mean/std, bilinear; no layers yet."""
    return ModelProfile(name, IMAGENET_MEAN, IMAGENET_STD, 256, 224, None, ())
