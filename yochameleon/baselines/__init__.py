"""Baselines and ablations behind one interface (:class:`~yochameleon.baselines.base.Method`)."""

from __future__ import annotations

from yochameleon.baselines.base import ConceptData, Method, Prompted
from yochameleon.errors import ConfigError

PROMPTING = ("none", "text_prompt", "text_prompt_oracle", "image_prompt")


def method_names() -> list[str]:
    """Every method name the harness accepts (the encoder methods last: they need ``encoder=``)."""
    from yochameleon.baselines.encoded import ENCODER_METHODS
    from yochameleon.baselines.trained import VARIANTS

    return [*PROMPTING, "myvlm", *VARIANTS, *ENCODER_METHODS]


def build_method(name: str, backend, **options) -> Method:
    """Create method ``name`` on ``backend``; ``options`` go to its constructor (e.g. ``train=``, ``k=``).

    ``yochameleon_zeroshot`` and ``yochameleon_warmstart`` need ``encoder=`` (a concept-encoder file).
    """
    from yochameleon.baselines import encoded, myvlm, prompting, trained

    if name == "none":
        return prompting.NoPersonalization(backend)
    if name == "text_prompt":
        return prompting.TextPrompt(backend)
    if name == "text_prompt_oracle":
        return prompting.OracleTextPrompt(backend)
    if name == "image_prompt":
        return prompting.ImagePrompt(backend, **options)
    if name == "myvlm":
        return myvlm.MyVLM(backend, **options)
    if name in trained.VARIANTS:
        return trained.TrainedTokens(backend, name, **options)
    if name == encoded.ZEROSHOT:
        return encoded.ZeroShot(backend, **options)
    if name == encoded.WARMSTART:
        return encoded.WarmStart(backend, **options)
    raise ConfigError(f"unknown method {name!r}; choose from {', '.join(method_names())}")


__all__ = ["ConceptData", "Method", "Prompted", "build_method", "method_names"]
