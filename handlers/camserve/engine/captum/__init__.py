"""Captum attributions as baselines answering the same specs as the CAM methods."""
