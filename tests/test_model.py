"""CenterNet model: output shapes at stride 4, head initialisation, gradient checkpointing
(outputs, gradients and BatchNorm statistics identical, on every backbone; which pieces are
recomputed), input dtype, build_model errors."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from omegaconf import DictConfig
from torch import nn

from centerx.errors import ConfigError
from centerx.model import centernet
from centerx.model.centernet import CenterNet, build_model

pytestmark = pytest.mark.usefixtures("single_thread")


def _images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=gen, dtype=torch.uint8)


def _build(cfg: DictConfig, backbone: str, skip: bool, num_classes: int = 3, **extra) -> CenterNet:
    cfg.backbone = backbone
    cfg.skip_connections = skip
    cfg.pretrained = None
    for key, value in extra.items():
        cfg[key] = value
    torch.manual_seed(0)
    return build_model(cfg, num_classes, pretrained=False)


@pytest.mark.parametrize("skip", [True, False], ids=["skips", "noskips"])
@pytest.mark.parametrize(
    "backbone,hw", [("tiny", (64, 64)), ("tiny", (96, 128)), ("resnet18", (64, 64))]
)
def test_output_shapes_at_stride_4(tiny_model_cfg, backbone: str, hw, skip: bool) -> None:
    model = _build(tiny_model_cfg, backbone, skip, num_classes=5).eval()
    assert model.stride == 4 and model.num_classes == 5
    assert model.neck.uses_skips is skip
    laterals = [stage.lateral for stage in model.neck]
    assert all((lateral is not None) is skip for lateral in laterals)
    with torch.no_grad():
        out = model(_images(2, *hw))
    h, w = hw[0] // 4, hw[1] // 4
    assert set(out) == {"heatmap", "wh", "offset"}
    assert out["heatmap"].shape == (2, 5, h, w)
    assert out["wh"].shape == (2, 2, h, w)
    assert out["offset"].shape == (2, 2, h, w)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_skip_connections_feed_the_neck(tiny_model_cfg) -> None:
    """With skips, the stride-4 backbone features reach the output (and change it)."""
    model = _build(tiny_model_cfg, "tiny", True).eval()
    seen = {}
    hooks = [
        stage.lateral.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, i[0].shape))
        for k, stage in enumerate(model.neck)
    ]
    with torch.no_grad():
        model(_images(1, 64, 64))
    for hook in hooks:
        hook.remove()
    # Laterals receive the backbone's stride-16, 8, 4 maps.
    assert [shape[-1] for _, shape in sorted(seen.items())] == [4, 8, 16]


def test_heatmap_bias_gives_prior_0_1(tiny_model_cfg) -> None:
    model = _build(tiny_model_cfg, "tiny", True)
    bias = model.heads.heatmap[-1].bias
    torch.testing.assert_close(torch.sigmoid(bias), torch.full_like(bias, 0.1), atol=1e-6, rtol=0)
    assert float(bias[0].detach()) == pytest.approx(-math.log(9), abs=1e-6)
    for head in (model.heads.wh, model.heads.offset):
        assert torch.equal(head[-1].bias, torch.zeros_like(head[-1].bias))
    # With small random head weights the average initial probability is near the prior.
    model.eval()
    with torch.no_grad():
        probs = torch.sigmoid(model(_images(1, 64, 64))["heatmap"])
    assert 0.02 < float(probs.mean()) < 0.3


def test_uint8_and_float_inputs_give_the_same_output(tiny_model_cfg) -> None:
    model = _build(tiny_model_cfg, "tiny", True).eval()
    images = _images(2, 64, 96)
    with torch.no_grad():
        from_uint8 = model(images)
        from_float = model(images.float())
    for key in from_uint8:
        assert torch.equal(from_uint8[key], from_float[key]), key


def test_unknown_backbone_lists_the_available_ones(tiny_model_cfg) -> None:
    tiny_model_cfg.backbone = "nope"
    with pytest.raises(ValueError) as info:
        build_model(tiny_model_cfg, 3)
    message = str(info.value)
    assert "nope" in message
    for name in tiny_model_cfg.backbones:
        assert name in message


# ------------------------------------------------------------------------ gradient checkpointing


def _batchnorm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: buffer.clone()
        for name, buffer in model.named_buffers()
        if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
    }


def _train_step(model: CenterNet, images: torch.Tensor, seed: int = 1) -> dict[str, torch.Tensor]:
    """One forward/backward/SGD step with a fixed random objective; returns the outputs."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs = model(images)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((v * torch.randn(v.shape, generator=gen)).sum() for v in outputs.values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {k: v.detach() for k, v in outputs.items()}


def _first_module(piece: nn.Module) -> nn.Module:
    """The first leaf module of a piece: persistent even where stages() builds transient
    nn.Sequential views (ResNet's and EfficientNet's stems), and the first to run."""
    while list(piece.children()):
        piece = next(piece.children())
    return piece


def _count_forwards(module: nn.Module) -> list[int]:
    # A pre-hook: non-reentrant checkpointing stops a recompute early once it has every
    # tensor backward needs, so a post-forward hook may not fire.
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _count_stem_forwards(model: CenterNet) -> list[int]:
    return _count_forwards(_first_module(model.backbone.stages()[0]))


@pytest.mark.parametrize(
    "backbone,skip",
    [("tiny", True), ("tiny", False), ("resnet18", True), ("efficientnet_lite0", True)],
)
def test_grad_checkpoint_same_outputs_gradients_and_batchnorm_stats(
    tiny_model_cfg, backbone: str, skip: bool
) -> None:
    plain = _build(tiny_model_cfg, backbone, skip)
    ckpt = copy.deepcopy(plain)
    ckpt.grad_checkpoint = True
    before = _batchnorm_buffers(plain)
    plain_calls, ckpt_calls = _count_stem_forwards(plain), _count_stem_forwards(ckpt)
    images = _images(2, 64, 64, seed=3)

    out_plain = _train_step(plain, images)
    grads_plain = {n: p.grad.clone() for n, p in plain.named_parameters()}
    out_ckpt = _train_step(ckpt, images)
    grads_ckpt = {n: p.grad.clone() for n, p in ckpt.named_parameters()}

    # Checkpointing really recomputed the forward during backward.
    assert plain_calls[0] == 1 and ckpt_calls[0] == 2
    for key in out_plain:
        torch.testing.assert_close(out_ckpt[key], out_plain[key], atol=1e-5, rtol=1e-5)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5, msg=name)
    # BatchNorm statistics: updated exactly once per step in both (no double update).
    stats_plain, stats_ckpt = _batchnorm_buffers(plain), _batchnorm_buffers(ckpt)
    assert stats_plain.keys() == before.keys() and len(before) > 0
    for name in stats_plain:
        assert torch.equal(stats_ckpt[name], stats_plain[name]), name
        if name.endswith("num_batches_tracked"):
            assert int(stats_plain[name]) == int(before[name]) + 1
    assert any(not torch.equal(stats_plain[n], before[n]) for n in before if "running_mean" in n)


def test_without_restoring_batchnorm_stats_checkpointing_double_updates(
    tiny_model_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pitfall the implementation guards against is real: with the recompute context
    made a no-op, the BatchNorm layers of the recomputed pieces (and only those) update their
    running stats twice and differ from plain training."""
    monkeypatch.setattr(
        centernet, "_batchnorm_stats_restored", lambda module: contextlib.nullcontext()
    )
    plain = _build(tiny_model_cfg, "tiny", True)
    ckpt = copy.deepcopy(plain)
    ckpt.grad_checkpoint = True
    images = _images(2, 64, 64, seed=3)
    _train_step(plain, images)
    _train_step(ckpt, images)
    stats_plain, stats_ckpt = _batchnorm_buffers(plain), _batchnorm_buffers(ckpt)
    recomputed = [
        piece
        for piece, stride in [
            *zip(ckpt.backbone.stages(), ckpt.stage_strides, strict=True),
            *zip(ckpt.neck, centernet.NECK_STRIDES, strict=True),
        ]
        if stride <= ckpt.checkpoint_max_stride
    ]
    in_recomputed = {id(m) for piece in recomputed for m in piece.modules()}
    doubled = {
        f"{name}.num_batches_tracked"
        for name, module in ckpt.named_modules()
        if isinstance(module, nn.BatchNorm2d) and id(module) in in_recomputed
    }
    tracked = [n for n in stats_plain if n.endswith("num_batches_tracked")]
    assert doubled and set(tracked) > doubled
    for name in tracked:
        assert int(stats_ckpt[name]) == int(stats_plain[name]) + (name in doubled), name
    assert any(
        not torch.allclose(stats_ckpt[n], stats_plain[n]) for n in stats_plain if "running" in n
    )


def test_grad_checkpoint_inactive_in_eval_and_no_grad(tiny_model_cfg) -> None:
    model = _build(tiny_model_cfg, "tiny", True, grad_checkpoint=True)
    assert model.grad_checkpoint is True
    calls = _count_stem_forwards(model)
    stats = _batchnorm_buffers(model)
    model.eval()
    out = model(_images(1, 64, 64))
    out["heatmap"].sum().backward()
    assert calls[0] == 1  # no recompute outside training
    assert all(torch.equal(v, _batchnorm_buffers(model)[k]) for k, v in stats.items())


def test_grad_checkpoint_recomputes_the_fine_stride_pieces_only(tiny_model_cfg) -> None:
    """Backbone pieces and neck stages with output stride <= the backbone's checkpoint_max_stride
    (16 for EfficientNet-Lite0) run twice per training step (forward, then recompute in
    backward); the coarse ones and the heads once."""
    model = _build(tiny_model_cfg, "efficientnet_lite0", True, grad_checkpoint=True)
    pieces = [*model.backbone.stages(), *model.neck, model.heads]
    strides = [*model.stage_strides, *centernet.NECK_STRIDES, centernet.OUTPUT_STRIDE]
    assert strides[:9] == [2, 2, 4, 8, 16, 16, 32, 32, 32]  # stem, 7 stages, head conv
    calls = [_count_forwards(_first_module(piece)) for piece in pieces]
    _train_step(model, _images(2, 64, 64, seed=3))
    assert model.checkpoint_max_stride == 16
    expected = [2 if stride <= 16 else 1 for stride in strides]
    expected[-1] = 1  # the heads are never checkpointed
    assert [count for (count,) in calls] == expected


def test_frozen_stages_keep_weights_and_batchnorm_stats(tiny_model_cfg) -> None:
    tiny_model_cfg.freeze_stages = 2
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg, 2).train()
    frozen = model.backbone.stages()[:2]
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    outputs = model(images)
    (outputs["heatmap"].sum() + outputs["wh"].sum()).backward()
    optimizer.step()
    assert all(not m.training for stage in frozen for m in stage.modules())
    assert all(
        not p.requires_grad and p.grad is None for stage in frozen for p in stage.parameters()
    )
    after = model.backbone.state_dict()
    frozen_memory = {t.data_ptr() for stage in frozen for t in stage.state_dict().values()}
    frozen_keys = {k for k, v in after.items() if v.data_ptr() in frozen_memory}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert frozen_keys and changed  # the test looks at something on both sides
    assert not changed & frozen_keys  # later stages train (BN stats too), frozen ones do not
    with pytest.raises(ConfigError, match="freeze_stages=99"):
        tiny_model_cfg.freeze_stages = 99
        build_model(tiny_model_cfg, 2)
