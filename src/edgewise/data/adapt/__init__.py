"""Label-free adaptation of an ONNX model to the data a device actually sees (numpy + onnx + ONNX Runtime only).

Two methods, one result type:

- :func:`adabn` (``adabn.py``): re-estimate every BatchNormalization node's mean and
  variance from a window of recent unlabeled inputs (Li et al., *Revisiting Batch
  Normalization for Practical Domain Adaptation*, 2016).
- :func:`coral` (``coral.py``): for models without BatchNorm, whiten-and-recolor the
  input of one linear layer (the first or the last) so its covariance matches the
  source domain's (Sun et al., *Return of Frustratingly Easy Domain Adaptation*, 2016),
  folded into that layer's weights.

Both return an :class:`Adaptation`: a set of *initializer replacements* (same names,
shapes and dtypes as in the base model). An adaptation never changes the graph, so the
adapted model is the signed base model plus a few new numbers, and
:func:`apply_adaptation` can check it against the base before anything runs.
"""

from ._graph import Adaptation, AdaptationError, apply_adaptation
from .adabn import adabn, batchnorm_nodes
from .coral import SourceStatistics, coral, source_statistics

__all__ = [
    "Adaptation", "AdaptationError", "SourceStatistics", "adabn", "apply_adaptation", "batchnorm_nodes", "coral",
    "source_statistics",
]
