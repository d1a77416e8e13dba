"""The benchmark's diagnostics read a concept file the way users load it."""

from __future__ import annotations

import torch

from yochameleon.concept import ConceptSpec, attach, concept_rows, get_bank, save_concept


def _saved_concept(backend, tmp_path, move: dict[str, float]):
    """A concept file whose ``g`` / ``u`` rows were scaled by ``1 + move[group]`` (a relative move of ``move``)."""
    tokens = attach(backend, ConceptSpec("sks", n_g=3, n_u=2))
    bank = get_bank(backend)
    with torch.no_grad():
        for module in (bank.embedding, bank.head):
            weight = module.rows["sks"]
            for group, ids in (("g", tokens.g_ids), ("u", tokens.u_ids)):
                rows = [tokens.ids.index(i) for i in ids]
                weight[rows] *= 1.0 + move.get(group, 0.0)
    assert concept_rows(backend, "sks")["embed"].shape[0] == 6
    return save_concept(backend, "sks", tmp_path / "sks")[0]


def test_token_drift_is_zero_for_untrained_rows_and_grows_with_the_move(tiny_dir, backend, tmp_path):
    from yochameleon.eval.toyworld.diagnose import token_drift

    concept_file = _saved_concept(backend, tmp_path, {"u": 0.5})
    drift = token_drift(tiny_dir, concept_file)
    assert set(drift) == {"sks", "g", "u"}
    assert drift["sks"] == {"embed": 0.0, "head": 0.0}
    assert drift["g"]["embed"] == 0.0 and drift["g"]["head"] == 0.0
    for part in ("embed", "head"):
        assert abs(drift["u"][part] - 0.5) < 1e-5
