"""camserve: explanations (Shallow-CAM, FAM, the CAM family, Captum) served by TorchServe."""

__version__ = "0.1.0"
