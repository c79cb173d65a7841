"""The engine's core: the request spec and result types (explanation), scoped forward capture, the layer catalog, target selection, lean gradients and map comparison."""
