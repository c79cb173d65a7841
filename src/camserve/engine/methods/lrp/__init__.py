"""Methods read from an LRP relevance pass: Relevance-CAM and Shallow-CAM."""
