"""FAISS retrieval of soft positives and negatives over an image pool (installed as ``yochameleon.retrieval``).

Typical use::

    from yochameleon.retrieval import OpenClipEmbedder, ImageIndex, concept_query, soft_positives

    embedder = OpenClipEmbedder("ViT-H-14", pretrained="laion2b_s32b_b79k")
    index = ImageIndex.build("pool/", "pool-index/", embedder)
    query = concept_query(embedder.embed_images(concept_photo_paths))
    records = soft_positives(index, query, L=1000, n_g=16)
"""

from .embedders import (
    Embedder,
    OpenClipEmbedder,
    TestEmbedder,
    build_embedder,
    describe_embedder,
    embedder_from_identity,
    identities_match,
    load_image_rgb,
    resolve_embedder,
    sha256_file,
)
from .index import (
    IMAGE_EXTENSIONS,
    BuildReport,
    ImageIndex,
    IndexEntry,
    IndexMismatchError,
    IndexParams,
    RetrievalWarning,
    build_index,
    list_pool_images,
    load_index,
)
from .mining import (
    MinedImage,
    SoftPositive,
    concept_query,
    hard_negatives,
    random_negatives,
    real_photo_token_count,
    soft_positive_bins,
    soft_positives,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "BuildReport",
    "Embedder",
    "ImageIndex",
    "IndexEntry",
    "IndexMismatchError",
    "IndexParams",
    "MinedImage",
    "OpenClipEmbedder",
    "RetrievalWarning",
    "SoftPositive",
    "TestEmbedder",
    "build_embedder",
    "build_index",
    "concept_query",
    "describe_embedder",
    "embedder_from_identity",
    "hard_negatives",
    "identities_match",
    "list_pool_images",
    "load_image_rgb",
    "load_index",
    "random_negatives",
    "real_photo_token_count",
    "resolve_embedder",
    "sha256_file",
    "soft_positive_bins",
    "soft_positives",
]
