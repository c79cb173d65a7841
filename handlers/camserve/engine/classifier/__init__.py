"""Classifier explanation: the explainer (one forward, per-round backward passes), scoped capture
and switches, lean gradients, targets, the CAM-family methods and LRP relevance rules."""
