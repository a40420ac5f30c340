"""CC-ST-AE model: shapes, gradients, bounds, the K-sparse layer and golden outputs (issue 6).

Golden outputs: ``tests/golden/ccstae_forward.npz`` holds the forward pass of a small seeded
model on a fixed input; regenerate it with ``ACCEPT=1 pytest tests/test_ccstae_model.py`` after a
deliberate change of the model (the file is capped at 200 kB).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from stemlib.ccstae import CCSTAEConfig, build_model
from stemlib.ccstae.loss import cycle_loss, robust_mean
from stemlib.ccstae.model import AffineHead, KSparse, derive_pools
from stemlib.masks import ring_mask

GOLDEN = Path(__file__).parent / "golden" / "ccstae_forward.npz"
GOLDEN_MAX_BYTES = 200_000

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


def _model(config: CCSTAEConfig, shape=(48, 48)):
    torch.manual_seed(0)
    return build_model(config, pattern_shape=shape, center=(shape[0] // 2, shape[1] // 2))


def _input(b=3, shape=(48, 48)) -> torch.Tensor:
    # Drawn on the CPU with a fixed generator, then moved: the same numbers on every device.
    g = torch.Generator().manual_seed(1)
    return torch.rand(b, 1, *shape, generator=g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decoder", ["image", "conv"])
@pytest.mark.parametrize("shape", [(48, 48), (40, 56)])
def test_shapes(device, decoder, shape):
    config = CCSTAEConfig.preset("cpu", num_bases=2, decoder=decoder, channels=8)
    model = _model(config, shape).to(device)
    x = _input(3, shape).to(device)
    out = model(x, torch.zeros(3, device=device))
    assert out.bases.shape == (2, 1, *shape)
    assert out.code.shape == (3, 2) and torch.all(out.code.sum(1) == 1)
    assert (
        out.base.shape
        == out.transformed_input.shape
        == out.transformed_base.shape
        == (3, 1, *shape)
    )
    assert out.affine.matrix().shape == (3, 2, 2) and out.affine.shift.shape == (3, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_reaches_the_input_and_every_part(device):
    config = CCSTAEConfig.preset("cpu", num_bases=2, channels=8)
    model = _model(config).to(device)
    with (
        torch.no_grad()
    ):  # leave the zero initialisation of the head, so that it passes gradients on
        model.head.linear.weight.normal_(0, 0.1)
    x = _input().to(device).requires_grad_(True)
    out = model(x)
    mask = torch.from_numpy(ring_mask((48, 48), inner=4, outer=20)).float().to(device)
    cycle_loss(out, x, mask, config, center=model.center).total.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, part in (
        ("encoder", model.encoder),
        ("sparse", model.sparse),
        ("head", model.head),
        ("decoder", model.decoder),
    ):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name


def test_affine_head_bounds():
    head = AffineHead(
        4,
        1,
        scale_limit=0.05,
        shear_limit=0.1,
        rotation_limit=0.15,  # every limit its own, so that one taken for another fails
        translation=True,
        translation_limit=3.0,
    )
    with torch.no_grad():
        head.linear.weight.normal_(0, 100.0)
        head.linear.bias.normal_(0, 100.0)
    z = torch.randn(256, 4) * 10
    theta0 = torch.linspace(-3, 3, 256)
    with torch.no_grad():
        a = head(z, torch.ones(256, 1), theta0)
    eps = 1e-6  # float32 rounding
    assert (
        float((a.scale_x - 1).abs().max()) <= 0.05 + eps
        and float((a.scale_y - 1).abs().max()) <= 0.05 + eps
    )
    assert float(a.shear.abs().max()) <= 0.1 + eps
    assert float((a.theta - theta0).abs().max()) <= 0.15 + eps
    assert float(a.shift.abs().max()) <= 3.0 + eps
    # the bounds are reached, not just respected: each output has its own limit
    assert float((a.scale_x - 1).abs().max()) > 0.049 and float((a.scale_y - 1).abs().max()) > 0.049
    assert float(a.shear.abs().max()) > 0.099
    assert float((a.theta - theta0).abs().max()) > 0.149
    assert float(a.shift.abs().max()) > 2.99
    assert not torch.equal(a.scale_x, a.scale_y)  # two outputs, not one read twice


def test_affine_head_starts_at_the_identity_around_theta0():
    head = AffineHead(
        4,
        1,
        scale_limit=0.05,
        shear_limit=0.1,
        rotation_limit=0.1,
        translation=False,
        translation_limit=3.0,
    )
    a = head(torch.randn(5, 4), torch.ones(5, 1), torch.full((5,), 0.7))
    np.testing.assert_allclose(
        a.matrix().detach().numpy(),
        np.broadcast_to([[np.cos(0.7), -np.sin(0.7)], [np.sin(0.7), np.cos(0.7)]], (5, 2, 2)),
        atol=1e-6,
    )
    assert float(a.shift.abs().max()) == 0.0


def test_k_sparse_is_one_hot_with_a_straight_through_gradient():
    torch.manual_seed(0)
    layer = KSparse(6, 3)
    z = torch.randn(8, 6)
    code = layer(z)
    assert torch.equal(
        code.detach(), torch.nn.functional.one_hot(code.detach().argmax(1), 3).float()
    )
    (code * torch.arange(3.0)).sum().backward()
    assert layer.logits[0].weight.grad is not None and layer.logits[0].weight.grad.abs().sum() > 0


def test_derive_pools_follows_the_pattern_size():
    assert derive_pools(200) == (5, 5, 2)
    assert derive_pools(128) == (4, 4, 2)
    assert derive_pools(256) == (4, 4, 4)
    assert derive_pools(30) == (5,)


def test_the_loss_of_slices_sums_to_the_batchs_with_an_outlier_among_them():
    """A batch of 8 with two broken patterns (their losses log-compressed by the robust mean),
    passed in slices of 3 with the batch's size and threshold: the slices' losses and
    gradients sum to the whole batch's. The slice that holds both has its median among them:
    with its own threshold it would not compress them."""
    config = CCSTAEConfig.preset("cpu", num_bases=2, channels=8, outlier_factor=3.0)
    model = _model(config)
    with torch.no_grad():
        model.head.linear.weight.normal_(0, 0.1)
    x = _input(8)
    x[3:5] *= 40.0  # their cycle errors are far above the others'
    mask = torch.from_numpy(ring_mask((48, 48), inner=4, outer=20)).float()

    def grads() -> list[torch.Tensor]:
        found = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad()
        return found

    whole = cycle_loss(model(x), x, mask, config, center=model.center)
    whole.total.backward()
    expected = grads()
    tau = config.outlier_factor * whole.per_pattern.median()
    assert (whole.per_pattern > tau).sum() == 2  # the compression is in play
    parts = [slice(0, 3), slice(3, 6), slice(6, 8)]
    total = 0.0
    for part in parts:
        piece = cycle_loss(
            model(x[part]), x[part], mask, config, center=model.center, batch=8, tau=tau
        )
        piece.total.backward()
        total += float(piece.total.detach())
    assert total == pytest.approx(float(whole.total.detach()), rel=1e-5)
    torch.testing.assert_close(grads(), expected, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        own = sum(
            float(cycle_loss(model(x[p]), x[p], mask, config, center=model.center, batch=8).total)
            for p in parts
        )
    assert own != pytest.approx(float(whole.total.detach()), rel=1e-3)  # each slice's own threshold


def test_robust_mean_limits_outliers():
    losses = torch.tensor([1.0] * 7 + [1e6])
    assert float(robust_mean(losses, 5.0)) < 10.0  # the plain mean is 125,000
    assert float(robust_mean(torch.ones(8), 5.0)) == pytest.approx(1.0)


def test_golden_forward_pass():
    config = CCSTAEConfig.preset("cpu", num_bases=2, channels=8, decoder="conv")
    model = _model(config, (32, 32))
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        model.head.linear.weight.copy_(
            torch.randn(model.head.linear.weight.shape, generator=g) * 0.3
        )
        out = model(_input(2, (32, 32)), torch.tensor([0.2, -0.4]))
    got = {
        "transformed_input": out.transformed_input.numpy(),
        "transformed_base": out.transformed_base.numpy(),
        "matrix": out.affine.matrix().numpy(),
        "shift": out.affine.shift.numpy(),
        "code": out.code.numpy(),
    }
    if os.environ.get("ACCEPT"):
        GOLDEN.parent.mkdir(exist_ok=True)
        np.savez_compressed(GOLDEN, **got)
    assert GOLDEN.stat().st_size < GOLDEN_MAX_BYTES, "golden file too large: shrink the input"
    expected = np.load(GOLDEN)
    for key, value in got.items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_warps_stay_float32_under_bf16_autocast():
    # Training on CUDA runs the network under bf16 autocast; the warps must not lose precision.
    model = _model(CCSTAEConfig.preset("cpu", channels=8, decoder="conv"))
    x = _input()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.full((3,), 0.3))
    assert out.transformed_input.dtype == out.transformed_base.dtype == torch.float32
    reference = model(x, torch.full((3,), 0.3))
    # identical warp of the input (the head starts at the identity around theta0)
    torch.testing.assert_close(out.transformed_input, reference.transformed_input)


@pytest.mark.parametrize("decoder", ["image", "conv"])
def test_bases_stay_float32_under_bf16_autocast(decoder):
    # The bases are what every pattern is registered onto: under the training step's bf16
    # autocast they must be the float32 bases, not bf16-rounded copies (up to 0.4 % off).
    model = _model(CCSTAEConfig.preset("cpu", channels=8, num_bases=2, decoder=decoder))
    model.initialise_bases(_input(2))
    x = _input()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.full((3,), 0.3))
    reference = model(x, torch.full((3,), 0.3))
    for name in ("bases", "base", "transformed_base"):
        torch.testing.assert_close(
            getattr(out, name), getattr(reference, name), rtol=0, atol=0, msg=name
        )


def test_the_model_compiles_into_one_graph():
    # The GPU preset sets `compile: true`. Dynamo must trace the forward and the backward pass
    # whole; a graph break would lose the speed-up on the GPU. The aot_eager backend traces as
    # inductor does, without a C++ compiler, so this runs on any CI machine.
    torch._dynamo.reset()
    config = CCSTAEConfig.preset("gpu", channels=8, num_bases=2)
    model = _model(config)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x, theta0, shift0 = _input(), torch.full((3,), 0.3), torch.tensor([[0.5, -0.25]] * 3)
    mask = torch.from_numpy(ring_mask((48, 48), inner=4, outer=20)).float()
    grads = []
    for forward in (compiled, model):
        model.zero_grad()
        out = forward(x, theta0, shift0)
        cycle_loss(out, x, mask, config, center=model.center).total.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_models_of_different_centres_share_one_compiled_graph():
    # A facility reprocess trains scan after scan, each with its own direct-beam centre
    # (origin_px), in one long-lived worker. A centre held as Python floats was a constant of
    # Dynamo's graph: every new centre recompiled, and from the 9th scan on (Dynamo's
    # recompile limit, 8) the GPU training ran eager, silently. The centre is a buffer, an
    # input of the one graph. aot_eager: Dynamo and AOT autograd as on the GPU, no codegen.
    from torch._dynamo.utils import counters

    torch.compiler.reset()
    counters.clear()
    config = CCSTAEConfig.preset("gpu", channels=8, num_bases=2)
    shape = (32, 32)
    x, theta0, shift0 = _input(2, shape), torch.full((2,), 0.3), torch.tensor([[0.5, -0.25]] * 2)
    mask = torch.from_numpy(ring_mask(shape, inner=3, outer=12)).float()
    for center in ((16.0, 16.0), (15.5, 16.25), (17.3, 14.9)):
        torch.manual_seed(0)
        model = build_model(config, pattern_shape=shape, center=center)
        out = torch.compile(model, backend="aot_eager", fullgraph=True)(x, theta0, shift0)
        cycle_loss(out, x, mask, config, center=model.center).total.backward()
        # the one graph warps about each model's own centre, not the first one's
        eager = model(x, theta0, shift0)
        torch.testing.assert_close(out.transformed_input, eager.transformed_input)
        torch.testing.assert_close(out.transformed_base, eager.transformed_base)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_compiled_training_steps_take_batches_of_any_size():
    # Training meets batches of several sizes (each DataLoader worker's last one is short).
    # Dynamo then makes the batch size symbolic, and PyTorch's affine_grid failed in its
    # backward ("SymIntArrayRef expected to contain only concrete integers"): the gpu preset's
    # first epoch would have ended in that error on a scan whose size is not a multiple of
    # the batch. aot_eager: Dynamo and AOT autograd as on the GPU, no codegen.
    torch.compiler.reset()
    config = CCSTAEConfig.preset("gpu", channels=8, num_bases=2)
    shape = (32, 32)
    mask = torch.from_numpy(ring_mask(shape, inner=3, outer=12)).float()
    torch.manual_seed(0)
    model = build_model(config, pattern_shape=shape, center=(16.0, 16.0))
    forward = torch.compile(model, backend="aot_eager")
    for b in (8, 8, 3, 5):
        x = _input(b, shape)
        out = forward(x, torch.zeros(b), torch.zeros(b, 2))
        cycle_loss(out, x, mask, config, center=model.center).total.backward()
        torch.testing.assert_close(out.transformed_input, model(x).transformed_input)
