"""Trained-token methods: Yo'Chameleon, its ablations, and the Yo'LLaVA-style baseline.

Each is the same trainer with different switches, so differences between rows of a results table
come from the method, not from the code path.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from yochameleon.baselines.base import ConceptData, Method, Prompted
from yochameleon.concept import detach, get_bank
from yochameleon.config import from_dict, to_dict
from yochameleon.train.config import TASKS, TrainConfig

ALL = list(TASKS)
UNDERSTANDING = ["recognition", "text_qa"]
GENERATION = ["generation_real", "generation_soft"]

# name -> (concept overrides, data.tasks, self_prompting)
VARIANTS = {
    "yochameleon": ({}, ALL, True),
    "yochameleon_no_soft": ({}, ["recognition", "text_qa", "generation_real"], True),
    "yochameleon_shared": ({"shared": True, "n_u": 0}, ALL, True),
    "yochameleon_no_selfprompt": ({}, ALL, False),
    "yochameleon_und_only": ({}, UNDERSTANDING, True),
    "yochameleon_gen_only": ({}, GENERATION, True),
    "yollava": ({"shared": True, "n_u": 0}, UNDERSTANDING, False),
}


class TrainedTokens(Method):
    """A method whose concept is learned tokens (see :data:`VARIANTS`).

    Args:
        backend: the frozen base model (shared across methods; each fit attaches, close detaches).
        variant: a key of :data:`VARIANTS`.
        train: a :class:`TrainConfig` mapping (recipe) for everything the variant does not fix,
            e.g. ``{"optim": {"epochs": 4, "lr": 3e-2}, "concept": {"n_g": 16, "n_u": 16}}``.
    """

    def __init__(self, backend, variant: str = "yochameleon", train: dict | None = None) -> None:
        super().__init__(backend)
        self.name = variant
        self.train = train or {}
        self.tokens = None

    def config(self, concept: ConceptData, workdir: Path) -> TrainConfig:
        over, tasks, self_prompting = VARIANTS[self.name]
        cfg = to_dict(from_dict(TrainConfig, self.train))
        cfg["output_dir"] = str(workdir / self.name)
        cfg["concept"].update(
            {
                "name": concept.name,
                "concept_dir": str(concept.concept_dir),
                "data_dir": str(concept.data_dir) if concept.data_dir else None,
                **over,
            }
        )
        cfg["data"]["tasks"] = tasks
        cfg["data"]["index_dir"] = str(concept.index_dir) if concept.index_dir else cfg["data"]["index_dir"]
        cfg["method"]["self_prompting"] = self_prompting
        return from_dict(TrainConfig, cfg)

    def fit(self, concept: ConceptData, workdir: Path) -> None:
        from yochameleon.train.trainer import Trainer

        super().fit(concept, workdir)
        self.cfg = self.config(concept, workdir)
        trainer = Trainer(self.cfg, backend=self.backend)
        trainer.setup()
        trainer.train(resume=(Path(self.cfg.output_dir) / "checkpoints" / "latest").exists())
        self.tokens = trainer.concepts[concept.name]

    def prompt(self, text: str, image: Image.Image | None = None, task: str = "understanding") -> Prompted:
        t = self.tokens
        body = f"{t.personalized_prompt()} {text.replace('<sks>', t.sks)}"
        prefix: list[int] = []
        if self.cfg.method.self_prompting:
            prefix = t.g_ids if task == "generation" else t.u_ids
        return Prompted(self._ids(body, image, concepts=[t]), prefix)

    def prompt_tokens(self) -> int:
        return self.tokens.spec.n_tokens if self.tokens else 0

    def _banned(self) -> list[int]:
        return list(self.tokens.ids) if self.tokens else []

    def close(self) -> None:
        bank = get_bank(self.backend)
        if self.tokens is not None and bank is not None and self.tokens.spec.name in bank.concepts:
            detach(self.backend, self.tokens.spec.name)
