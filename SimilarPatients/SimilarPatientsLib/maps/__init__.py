"""Maps of embeddings: 2-D projections, the map's data (positions, nearest lesions and patients by the
real distance), the interactive HTML page and the static figure.

scikit-learn, umap-learn, plotly and matplotlib come with the ``analysis`` extra.
"""

from .embedding_map import EmbeddingMap, ModelMap, build

__all__ = ["EmbeddingMap", "ModelMap", "build"]
