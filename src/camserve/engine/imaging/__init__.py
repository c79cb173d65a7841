"""Pixels on the device: preprocessing (resize, crop, normalise) and rendering (normalise, upsample, colour, overlay, PNG)."""
