"""One path from prompt to score: training, inference and the harness build the same ids and numbers."""

from __future__ import annotations

import pytest
import torch

from yochameleon import conversation
from yochameleon.baselines import ConceptData, build_method
from yochameleon.concept import ConceptSpec, attach, get_bank
from yochameleon.conversation import image_ids, image_span_length, turn_ids
from yochameleon.eval.harness import TestSet, evaluate
from yochameleon.infer import PersonalizedModel
from yochameleon.prompts import recognition_question
from yochameleon.train.sequences import IGNORE, build_sequence

TRAIN = {
    "optim": {"epochs": 1, "lr": 3e-2, "batch_size": 4},
    "concept": {"n_g": 4, "n_u": 4},
    "data": {"n_recognition": 8, "n_hard_negatives": 4, "n_easy_negatives": 4, "n_soft_positives": 6},
    "logging": {"loggers": []},
    "model": {"device": "cpu"},
}


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    """The demo cat (training prepares its data from the index) and a test directory: two of its
    photos and two strangers."""
    from yochameleon.demo import make_concept_folder, make_pool
    from yochameleon.retrieval import TestEmbedder, build_index

    root = tmp_path_factory.mktemp("one_path")
    folder = make_concept_folder(root)
    pool = make_pool(root, per_photo=1)
    build_index(pool, root / "index", TestEmbedder(), progress=False)
    photos = sorted((folder / "photos").glob("*.png"))
    for sub, files in (("positives", photos[:2]), ("negatives_easy", sorted(pool.glob("*.png"))[:2])):
        (root / "test" / sub).mkdir(parents=True)
        for f in files:
            (root / "test" / sub / f.name).write_bytes(f.read_bytes())
    data = ConceptData("sks", folder, photos, "<sks> is a tabby cat.", index_dir=root / "index")
    return data, TestSet.load(root / "test")


def test_training_inference_and_methods_build_the_same_turn(backend, photos):
    tokens = attach(backend, ConceptSpec("bo", n_g=2, n_u=2))
    question = recognition_question(0)
    record = {"task": "understanding", "kind": "recognition", "question": question, "answer": "Yes."}
    seq = build_sequence(backend, record, tokens, image_ids(backend, photos[1]))
    answer_starts = next(i for i, label in enumerate(seq.labels) if label != IGNORE)
    trained_turn = seq.input_ids[:answer_starts]

    pm_turn, used = PersonalizedModel(backend)._prompt_ids(question.replace("<sks>", "<bo>"), photos[1])
    assert used == [tokens] and pm_turn == trained_turn

    # The image goes after the personalized prompt, before the question, wherever the turn is built.
    at = trained_turn.index(backend.special.boi)
    preamble = conversation.encode_text(backend, tokens.personalized_prompt() + " ", [tokens])
    assert trained_turn[:at] == [backend.special.bos] + preamble
    assert (
        turn_ids(
            backend,
            question.replace("<sks>", tokens.sks),
            [tokens],
            [seq.input_ids[at + 1 : at + 1 + backend.image_seq_len]],
            tokens.personalized_prompt(),
        )
        == trained_turn
    )


def test_yes_no_follows_the_concept_s_self_prompt_or_its_absence(backend, photos):
    tokens = attach(backend, ConceptSpec("bo", n_g=2, n_u=2))
    question = "<image>Is <bo> in this photo?"
    turn, _ = PersonalizedModel(backend)._prompt_ids(question, photos[0])
    self_prompted = PersonalizedModel(backend).yes_no_logprobs(question, photos[0])
    plain = PersonalizedModel(backend, self_prompting=False).yes_no_logprobs(question, photos[0])
    assert self_prompted == conversation.yes_no_logprobs(backend, turn + tokens.u_ids)
    assert plain == conversation.yes_no_logprobs(backend, turn) != self_prompted


def test_harness_yes_no_of_a_trained_concept_equals_personalized_model(backend, concept, tiny_dir, tmp_path):
    data, test = concept
    method = build_method("yochameleon", backend, train=TRAIN)
    method.fit(data, tmp_path)
    # The method scores the concept file training wrote, loaded back (not the trainer's rows).
    file_rows = get_bank(backend).embedding.rows["sks"].detach().clone()
    assert method.concept_file is not None and method.concept_file.is_file()

    seen = []
    scored = method.yes_no

    def recording(question, image):
        seen.append((question, image, scored(question, image)))
        return seen[-1][2]

    method.yes_no = recording
    result = evaluate(method, test, "sks", seed=0)
    method.close()
    assert len(seen) == len(test.recognition) and result.recognition_weighted is not None

    # A user's model: a fresh load of the base and the concept file, as `yochameleon ask` loads them.
    user = PersonalizedModel.load(tiny_dir, [method.concept_file], device="cpu")
    assert torch.equal(get_bank(user.backend).embedding.rows["sks"], file_rows)
    for question, image, (yes, no) in seen:
        assert user.yes_no_logprobs(question, image) == (yes, no)


def test_image_generation_length_comes_from_the_backend_layout(tmp_path_factory, monkeypatch):
    from yochameleon.backends import load_backend
    from yochameleon.backends.tiny_emu3 import make_tiny_emu3

    # Emu3 spans carry a header, end-of-line and end-of-frame ids besides the visual tokens.
    emu3 = load_backend(make_tiny_emu3(tmp_path_factory.mktemp("emu3") / "model", seed=0))
    span = len(emu3.image_span([emu3.special.image_token_ids[0]] * emu3.image_seq_len))
    assert image_span_length(emu3) == span > emu3.image_seq_len + 2

    budgets = []
    real_generate = conversation.generate

    def recording(backend, input_ids, constraint, max_new_tokens, *args, **kwargs):
        budgets.append(max_new_tokens)
        return real_generate(backend, input_ids, constraint, max_new_tokens, *args, **kwargs)

    monkeypatch.setattr(conversation, "generate", recording)
    images = PersonalizedModel(emu3).generate_image("A photo of a cat.", n=1, temperature=0)
    assert budgets == [span] and len(images) == 1 and images[0].size[0] > 0
