"""Captum attributions as baselines: the catalog of methods and options, and the isolated attribution runs."""
