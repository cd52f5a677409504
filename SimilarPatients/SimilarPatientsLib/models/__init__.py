"""Embedding models: the registry (encoder, recipe, length, weights, licence), the networks, strict
checkpoint loading, weights found or fetched with consent, the weight-free descriptor, and the
:class:`Embedder` that turns tumors into embeddings.

torch, MONAI and safetensors come with the ``embed`` extra; the registry and ``models list`` need none.
"""

from .embedder import Embedder, Embedding
from .registry import MODELS, ModelSpec, get, summary
from .weights import WeightSource, WeightStatus, status

__all__ = ["MODELS", "Embedder", "Embedding", "ModelSpec", "WeightSource", "WeightStatus", "get", "status", "summary"]
