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
    # The loaded model, with the concept still attached, measures from the same frozen rows.
    assert token_drift(backend, concept_file) == drift


def test_loss_by_kind_averages_each_end_and_the_table_shows_every_look(tmp_path):
    import json

    from yochameleon.eval.toyworld.diagnose import format_diagnostics, loss_by_kind

    rows = [{"step": s, "loss": 1.0, "loss_recognition": 4.0 - s, "loss_text_qa": 2.0} for s in range(10)]
    rows.insert(3, {"step": 3, "lr": 0.01})  # a row without losses is skipped
    rows.append({"step": 10, "loss_generation_real": 6.0})  # a kind logged once
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    losses = loss_by_kind(metrics, share=0.2)
    assert losses["recognition"] == {"first": 3.5, "last": -4.5, "steps": 10}
    assert losses["text_qa"]["first"] == losses["text_qa"]["last"] == 2.0
    assert losses["generation_real"] == {"first": 6.0, "last": 6.0, "steps": 1}
    row = {
        "method": "yochameleon",
        "concept": "toy-1",
        "seed": 0,
        "recognition": {"training": 1.0, "new": 0.9, "twins": 0.4, "random": 0.0},
        "token_drift": {"sks": {"embed": 1.0, "head": 0.1}, "g": {"embed": 2.0, "head": 0.2}},
        "loss_by_kind": losses,
    }
    table = format_diagnostics([row]).splitlines()
    assert len(table) == 3 and table[2].startswith(
        "| yochameleon | toy-1 | 0 | 1.00 / 0.90 / 0.40 / 0.00 | 1.50 |"
    )
    assert "recognition 3.50 → -4.50" in table[2]
