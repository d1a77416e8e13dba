"""The toy world: a procedural CPU benchmark world (DESIGN §6) and its independent attribute/mark scorer.

``world`` draws seeded 32x32 scenes of marked objects, identity splits, benchmark items and concept folders;
``scorer`` judges photos (and generated images) attribute by attribute and mark by mark.
"""

from .scorer import Scorer, ScorerConfig, ScorerError, evaluate_scorer, train_scorer
from .world import (
    ConceptTestSet,
    Identity,
    Mark,
    PoolItem,
    QAPair,
    SamePair,
    TextQAItem,
    ToyWorld,
    ToyWorldError,
    VQAItem,
    WorldConfig,
    attribute_qa,
    caption,
    concept_photos,
    pool_images,
    render,
    split_identities,
    test_set,
    text_qa,
    twin,
    write_concept_folder,
)

__all__ = [
    "ConceptTestSet",
    "Identity",
    "Mark",
    "PoolItem",
    "QAPair",
    "SamePair",
    "Scorer",
    "ScorerConfig",
    "ScorerError",
    "TextQAItem",
    "ToyWorld",
    "ToyWorldError",
    "VQAItem",
    "WorldConfig",
    "attribute_qa",
    "caption",
    "concept_photos",
    "evaluate_scorer",
    "pool_images",
    "render",
    "split_identities",
    "test_set",
    "text_qa",
    "train_scorer",
    "twin",
    "write_concept_folder",
]
