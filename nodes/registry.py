"""The list of node classes the pack registers. Node ids are API: workflows store them."""

from __future__ import annotations


def node_classes() -> list[type]:
    from .embeddings import DCOLoadTokenEmbeddings, DCOPromptPair
    from .guider import DCORewardGuidanceGuider, DCORewardGuidanceSampler
    from .subject import DCOLoadSubject
    from .trainer import DCOTrainer

    classes: list[type] = []
    # Each node family lives in its own module; they are appended here as they land.
    classes += [DCOLoadTokenEmbeddings, DCOPromptPair]
    classes += [DCOLoadSubject]
    classes += [DCORewardGuidanceGuider, DCORewardGuidanceSampler]
    classes += [DCOTrainer]
    return classes
