"""Bad input to the Python API as a new user tries it (issue 17): a model already sharded by
FSDP2, the documented errors of ``compress`` importable from ``ecospa``, ``PlanConfig.help()``
printing what the README offers, and wrong types to ``compress``. Each is one clear
``EcospaError`` naming the way out, raised before any work. (The CLI's: tests/cli/test_bad_inputs.py;
``save``/``load``'s: tests/checkpoint/test_bad_arguments.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import ecospa


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), torch.randn(2, 4)


@pytest.fixture
def sharded(tmp_path):
    """A 2-layer MLP after FSDP2 ``fully_shard`` on a one-process gloo group (CPU), its input and
    the couplings found before sharding."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch without distributed")
    from torch.distributed.device_mesh import init_device_mesh

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model, x = _mlp()
        cg = ecospa.auto_couple(model, (x,))
        mesh = init_device_mesh("cpu", (1,))
        try:
            from torch.distributed.fsdp import fully_shard

            fully_shard(model, mesh=mesh)
        except Exception:  # noqa: BLE001 - no FSDP2 on this platform: DTensor parameters by hand
            from torch.distributed.tensor import Replicate, distribute_tensor

            for mod in model.modules():
                for n, p in list(mod.named_parameters(recurse=False)):
                    setattr(mod, n, nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()])))
        from torch.distributed.tensor import DTensor

        assert all(isinstance(p, DTensor) for p in model.parameters())
        yield model, x, cg
    finally:
        if created:
            dist.destroy_process_group()


def _says_fsdp2_is_not_supported(e: pytest.ExceptionInfo, what: str) -> None:
    msg = str(e.value)
    assert msg.startswith(f"{what}: "), msg
    assert "\n" not in msg and "not supported yet" in msg and "before fully_shard" in msg, msg
    assert "docs/distributed.md" in msg and "'0.weight'" in msg


def test_prune_of_an_fsdp2_model_is_refused_in_one_line(sharded):
    model, x, cg = sharded
    shapes = [tuple(p.shape) for p in model.parameters()]
    with pytest.raises(ecospa.ShardedModelError) as e:
        ecospa.prune(model, {cg[0].name: [0, 1]}, couplings=cg)
    _says_fsdp2_is_not_supported(e, "ecospa.prune")
    assert [tuple(p.shape) for p in model.parameters()] == shapes  # nothing changed
    with pytest.raises(ecospa.ShardedModelError):
        ecospa.prune(model, {cg[0]: [0]})  # keyed by Coupling objects too


def test_auto_couple_ecospa_and_compress_of_an_fsdp2_model_are_refused(sharded):
    model, x, _ = sharded
    with pytest.raises(ecospa.ShardedModelError) as e:
        ecospa.auto_couple(model, (x,))
    _says_fsdp2_is_not_supported(e, "ecospa.auto_couple")
    with pytest.raises(ecospa.ShardedModelError) as e:
        ecospa.EcoSpa(model, torch.optim.SGD(model.parameters(), lr=0.1), example_inputs=(x,))
    _says_fsdp2_is_not_supported(e, "ecospa.EcoSpa")
    with pytest.raises(ecospa.ShardedModelError) as e:
        ecospa.compress(model, 0.5, [x], loss_fn=lambda m, b: m(b).pow(2).mean())
    _says_fsdp2_is_not_supported(e, "ecospa.compress")


def test_the_same_model_unsharded_still_prunes():
    model, x = _mlp()
    cg = ecospa.auto_couple(model, (x,))
    ecospa.prune(model, {cg[0].name: [0, 1]}, couplings=cg)
    assert model[0].out_features == 4


def test_compress_errors_are_exported():
    for name in ("CompressError", "CalibrationError", "ShardedModelError"):
        assert name in ecospa.__all__ and issubclass(getattr(ecospa, name), ecospa.EcospaError)
    model, x = _mlp()
    with pytest.raises(ecospa.CalibrationError):
        ecospa.compress(model, 0.5, [])  # no data
    with pytest.raises(ecospa.CompressError, match="rounds"):
        ecospa.compress(model, 0.5, [x], rounds=0)
    with pytest.raises(ecospa.CompressError, match="model should be a torch.nn.Module, got str"):
        ecospa.compress("model.pt", 0.5, [x])


def test_plan_config_help_prints_a_table_and_returns_the_dict(capsys):
    d = ecospa.PlanConfig.help()
    out = capsys.readouterr().out
    assert isinstance(d, dict) and {"target", "top_k", "theta", "every"} <= set(d)
    for name, text in d.items():
        default = getattr(ecospa.PlanConfig, name, None)
        assert f"  {name} = {default!r}" in out
        assert text.split()[0] in out
    assert len(out.splitlines()) > len(d)
    assert ecospa.PlanConfig.help(show=False) == d and capsys.readouterr().out == ""


def test_ecospa_does_not_print_the_knobs(capsys):
    model, x = _mlp()
    ecospa.EcoSpa(model, torch.optim.SGD(model.parameters(), lr=0.1), example_inputs=(x,), target=0.5)
    assert capsys.readouterr().out == ""


def test_prune_with_a_model_or_optimizer_of_the_wrong_type():
    model, x = _mlp()
    cg = ecospa.auto_couple(model, (x,))
    with pytest.raises(ecospa.PlanError, match="model should be a torch.nn.Module, got str"):
        ecospa.prune("model", {cg[0]: [0]})
    with pytest.raises(ecospa.PlanError, match="model should be a torch.nn.Module, got str"):
        ecospa.prune("model", {cg[0].name: [0]})  # keyed by name, no couplings=
    with pytest.raises(ecospa.PruneError, match="optimizer= should be a torch.optim.Optimizer"):
        ecospa.prune(model, {cg[0]: [0]}, optimizer="adam")
    assert model[0].out_features == 6  # nothing changed
