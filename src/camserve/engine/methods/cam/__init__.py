"""The CAM family: one base (CamMethod), one override point (weights), CAM, Grad-CAM, Grad-CAM++ and LayerCAM."""
