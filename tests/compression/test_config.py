"""CompressConfig: the knobs of ``ecospa.compress`` as one checked object; keyword knobs are the
same call."""
from __future__ import annotations

import copy

import pytest
import torch

import ecospa
from ecospa import CompressConfig
from ecospa.compression.config import CompressError
from tests.compression.test_compress import MLP, _mlp_data, _mlp_loss


def test_a_config_and_keyword_knobs_are_the_same_call():
    dense, data = MLP(), _mlp_data()
    x = (data[0][0],)
    a, rep_a = ecospa.compress(copy.deepcopy(dense), 0.6, data, loss_fn=_mlp_loss, example_inputs=x,
                               config=CompressConfig(rounds=2, allocation="uniform"))
    b, rep_b = ecospa.compress(copy.deepcopy(dense), 0.6, data, loss_fn=_mlp_loss, example_inputs=x,
                               rounds=2, allocation="uniform")
    c, rep_c = ecospa.compress(copy.deepcopy(dense), 0.6, data, loss_fn=_mlp_loss, example_inputs=x,
                               config=CompressConfig(rounds=3, allocation="uniform"), rounds=2)  # keyword wins
    assert rep_a.removed == rep_b.removed == rep_c.removed and len(rep_a.rounds) == 2
    for m in (b, c):
        for (n, p), q in zip(a.named_parameters(), m.parameters()):
            assert torch.equal(p, q), n


@pytest.mark.parametrize("knobs, match", [
    ({"rounds": 0}, "rounds should be an int >= 1"),
    ({"rounds": 2.0}, "rounds should be an int"),
    ({"allocation": "best"}, "allocation should be one of"),
    ({"score": "vibes"}, "score should be 'fisher' or one of"),
    ({"head_widths": "wide"}, "head_widths should be one of"),
    ({"recovery": "magic"}, "recovery should be one of"),
    ({"damp": 0}, "damp should be a positive number"),
    ({"recover_lr": float("nan")}, "recover_lr should be a positive number"),
    ({"reconstruct": "yes"}, "reconstruct should be True or False"),
    ({"calibration_batches": 0}, "calibration_batches should be an int >= 1"),
    ({"allocation": "planner", "coupling_score": "vibes"}, "coupling_score should be one of"),
])
def test_bad_knobs_are_refused_with_their_name(knobs, match):
    with pytest.raises(CompressError, match=match):
        CompressConfig(**knobs)


def test_an_unknown_option_suggests_the_closest_knob():
    with pytest.raises(CompressError, match="unknown option 'roundz'; did you mean 'rounds'"):
        ecospa.compress(MLP(), 0.5, _mlp_data(), loss_fn=_mlp_loss, roundz=2)
    with pytest.raises(CompressError, match="config should be an ecospa.CompressConfig"):
        ecospa.compress(MLP(), 0.5, _mlp_data(), loss_fn=_mlp_loss, config={"rounds": 2})


def test_help_lists_every_knob(capsys):
    out = CompressConfig.help(show=False)
    assert "rounds" in out and all(out.values()) and capsys.readouterr().out == ""
