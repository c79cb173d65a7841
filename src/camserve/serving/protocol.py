"""The protocol's names in one place: envelopes, request fields, request-level options and the KServe
v2 output tensors. :mod:`.requests` reads them to parse a request and :mod:`.encode` to write an
answer; neither imports the other.
"""

#: the three envelopes a request may come in (recognised by the body's shape, per request)
PLAIN, KSERVE_V1, KSERVE_V2 = "torchserve", "kserve_v1", "kserve_v2"

#: field name → role. ``image`` is the query image; the embedding handler adds reference roles.
IMAGE_FIELDS = {"body": "image", "data": "image", "image": "image", "file": "image", "b64": "image"}
EMBED_FIELDS = {**IMAGE_FIELDS, "reference": "reference", "reference_embedding": "reference_embedding"}

#: KServe v2 datatypes accepted for a ``reference_embedding`` input
FLOAT_DATATYPES = ("FP16", "FP32", "FP64")
#: request-level options that are about the answer's envelope, never passed to a handler
ENVELOPE_OPTIONS = ("json_output",)

#: the parameters of a base64 PNG output tensor
PNG = {"content_type": "image/png", "encoding": "base64"}

#: every KServe v2 output tensor an answer can carry (a request's ``outputs`` may name only these)
V2_OUTPUT_NAMES = {
    # classifier
    "scores", "indices", "labels", "batch_size", "runtime", "method", "layer", "targets", "target_labels", "layer_shape",
    "heatmap", "heatmap_color", "overlay", "heatmap_array", "size", "colormap", "crop_box", "image_size",
    "options", "seconds", "batch_seconds", "passes_forward", "passes_backward", "passes_relevance", "spearman",
    "comparison_target", "comparison_seconds", "calibration",
    # embedding model
    "embedding", "dim", "similarity", "metric", "route", "reference", "query_map", "reference_map",
    "match_index", "match_label", "match_similarity", "match_query_map", "match_reference_map",
    "weights", "neighbours", "query_map_array", "reference_map_array", "match_query_map_array",
    "match_reference_map_array", "prototype",
}
