"""Trained-token methods: Yo'Chameleon, its ablations, and the Yo'LLaVA-style baseline.

Each is the same trainer with different switches, so differences between rows of a results table
come from the method, not from the code path. A fitted method is scored as a user would use it: the
concept file that training wrote is loaded onto the model and every question goes through
:class:`~yochameleon.infer.PersonalizedModel`, so the harness's numbers are the numbers of
``yochameleon ask`` and ``yochameleon generate``.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from yochameleon.baselines.base import ConceptData, Method, Prompted
from yochameleon.concept import detach, get_bank, load_concept, normalize_name
from yochameleon.config import from_dict, to_dict
from yochameleon.infer import PersonalizedModel
from yochameleon.train.config import TASKS, TrainConfig

ALL = list(TASKS)
UNDERSTANDING = ["recognition", "text_qa", "relation"]
GENERATION = ["generation_real", "generation_soft"]

# name -> (concept overrides, data.tasks, self_prompting)
VARIANTS = {
    "yochameleon": ({}, ALL, True),
    "yochameleon_no_soft": ({}, ["recognition", "text_qa", "relation", "generation_real"], True),
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
        self.variant = variant
        self.train = train or {}
        self.tokens = None
        self.model = None
        self.self_prompting = VARIANTS[variant][2]
        self.steps = 0  # optimizer steps the fit took
        self.concept_file: Path | None = None

    def config(self, concept: ConceptData, workdir: Path) -> TrainConfig:
        over, tasks, self_prompting = VARIANTS[self.variant]
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
        self._plan(trainer)
        result = trainer.train(resume=(Path(self.cfg.output_dir) / "checkpoints" / "latest").exists())
        name = normalize_name(concept.name)
        # No in-memory shortcut: what is scored is the file a user would load.
        detach(self.backend, name)
        self.concept_file = result.concept_files[name]
        self.steps = result.steps
        self.tokens = load_concept(self.backend, self.concept_file)
        self.self_prompting = self.cfg.method.self_prompting
        self.model = PersonalizedModel(self.backend, self_prompting=self.self_prompting)

    def _plan(self, trainer) -> None:
        """Adjust the set-up trainer before it trains (nothing here; the warm start shortens the run)."""

    def _for_model(self, text: str) -> str:
        """``text`` naming the concept as :class:`PersonalizedModel` prompts do (``<NAME>``)."""
        return text.replace("<sks>", f"<{self.tokens.spec.name}>")

    def prompt(self, text: str, image: Image.Image | None = None, task: str = "understanding") -> Prompted:
        t = self.tokens
        prefix: list[int] = []
        if self.self_prompting:
            prefix = t.g_ids if task == "generation" else t.u_ids
        text = text.replace("<sks>", t.sks)
        return Prompted(self._ids(text, image, concepts=[t], preamble=t.personalized_prompt()), prefix)

    # ----- scoring, through the inference path ------------------------------------------------
    def yes_no(self, question: str, image: Image.Image) -> tuple[float, float]:
        """:meth:`PersonalizedModel.yes_no_logprobs` of the loaded concept file."""
        return self.model.yes_no_logprobs(self._for_model(question), image)

    def answer(self, question: str, image: Image.Image | None = None, max_new_tokens: int = 16) -> str:
        """:meth:`PersonalizedModel.ask` with the self-prompt forced (when the variant has one)."""
        return self.model.ask(
            self._for_model(question), image, force_tokens=True, max_new_tokens=max_new_tokens
        )

    def generate_images(
        self, request: str, n: int = 1, seed: int = 0, temperature: float = 1.0
    ) -> list[Image.Image]:
        """:meth:`PersonalizedModel.generate_image` with the g-tokens forced (when the variant has them)."""
        return self.model.generate_image(
            self._for_model(request), n=n, seed=seed, force_tokens=True, temperature=temperature
        )

    def prompt_tokens(self) -> int:
        return self.tokens.spec.n_tokens if self.tokens else 0

    def close(self) -> None:
        bank = get_bank(self.backend)
        if self.tokens is not None and bank is not None and self.tokens.spec.name in bank.concepts:
            detach(self.backend, self.tokens.spec.name)
