"""camserve's explanation engine: pure PyTorch, no serving import. Its public API:

- classifiers: :class:`Explainer` (one forward, every method family), :class:`ExplainSpec`,
  :class:`ExplainResult`, :class:`Explanation`; :func:`compare` for several methods side by side;
- embedding models: :class:`FamExplainer`, :class:`FamSpec`, :class:`FamResult`, :class:`Gallery`;
- the methods: :data:`REGISTRY` (every family: ``cam``, ``lrp``, ``captum``, ``similarity``),
  :class:`CaptumLimits`, :data:`SIMILARITIES`; the LRP knobs :data:`COMPOSITES` / :func:`get_composite`
  and :data:`CANONIZERS`;
- the error types (each a 4xx: :class:`ExplanationInputError` and its subclasses);
- the model loaders in :mod:`camserve.engine.models`.
"""

from camserve.engine.comparison import Comparison, compare, comparison_json
from camserve.engine.errors import (ExplanationInputError, InvalidInputError, InvalidOptionError, InvalidReferenceError,
                                    InvalidTargetError, NotAFeatureMapError, UnknownLayerError, UnknownMethodError,
                                    UnsupportedModelError)
from camserve.engine.lrp.canonizers import CANONIZERS
from camserve.engine.lrp.composites import COMPOSITES, get_composite
from camserve.engine.methods import REGISTRY
from camserve.engine.methods.captum.catalog import CaptumLimits
from camserve.engine.methods.similarity.channel_weights import WEIGHTINGS as FAM_WEIGHTINGS
from camserve.engine.methods.similarity.fam import SIMILARITIES, FamExplainer, FamResult, FamSpec
from camserve.engine.methods.similarity.gallery import Gallery
from camserve.engine.methods.similarity.prototypes import (FewShotEpisode, episode_from_gallery, explain_queries,
                                                         prototype_spec)
from camserve.engine.pipeline import ExplainResult, ExplainSpec, Explainer, Explanation

__all__ = ["CANONIZERS", "COMPOSITES", "FAM_WEIGHTINGS", "CaptumLimits", "Comparison", "ExplainResult", "ExplainSpec", "Explainer",
           "Explanation", "ExplanationInputError", "FamExplainer", "FamResult", "FamSpec", "FewShotEpisode", "Gallery",
           "InvalidInputError", "InvalidOptionError", "InvalidReferenceError", "InvalidTargetError",
           "NotAFeatureMapError", "REGISTRY", "SIMILARITIES", "UnknownLayerError", "UnknownMethodError",
           "UnsupportedModelError", "compare", "comparison_json", "episode_from_gallery", "explain_queries",
           "prototype_spec",
           "get_composite"]
