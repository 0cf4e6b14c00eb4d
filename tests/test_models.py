"""Model factory, pretrained-weight loading, fine-tuning strategies and the model contract."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import resnet18, resnet50

from lungcad.data.transforms import Preprocessing
from lungcad.errors import LungcadError
from lungcad.models import ModelContract, create_model, load_model, logits_to_probs, save_model
from lungcad.models.factory import configure_finetuning, set_train_mode


@pytest.fixture(scope="module")
def imagenet_like_state():
    torch.manual_seed(0)
    return resnet50(weights=None).state_dict()  # stands in for the ImageNet weights (1000-way fc)


@pytest.mark.parametrize("task, classes, outputs", [("binary", 2, 1), ("multiclass", 3, 3)])
def test_heads(task, classes, outputs):
    from lungcad.models.factory import num_outputs

    n = num_outputs(task, classes)
    model, init = create_model(outputs=n, pretrained="none")
    assert n == outputs and init == {"pretrained": "none"}
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, outputs)
    probs = logits_to_probs(logits, task)
    assert probs.shape == (2, classes) and torch.allclose(probs.sum(1), torch.ones(2))


def test_weights_file_pth_and_safetensors(tmp_path, imagenet_like_state):
    pth, st = tmp_path / "w.pth", tmp_path / "w.safetensors"
    torch.save({"state_dict": {f"module.{k}": v for k, v in imagenet_like_state.items()}}, pth)
    save_file({k: v.contiguous() for k, v in imagenet_like_state.items()}, str(st))
    for path in (pth, st):
        model, init = create_model(outputs=3, weights_file=path)
        assert init["pretrained"] == "file" and len(init["sha256"]) == 64
        assert torch.equal(model.conv1.weight, imagenet_like_state["conv1.weight"])
        assert torch.equal(model.layer4[2].bn3.running_var, imagenet_like_state["layer4.2.bn3.running_var"])
        assert model.fc.out_features == 3  # the head is new, not ImageNet's


def test_weights_file_for_another_architecture(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(LungcadError, match="do not fit resnet50") as exc:
        create_model(outputs=3, weights_file=path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("content", [b"", b"garbage" * 10])
def test_unreadable_weights_file(tmp_path, content):
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with pytest.raises(LungcadError, match="unreadable weights file"):
        create_model(outputs=3, weights_file=path)
    with pytest.raises(LungcadError, match="not found"):
        create_model(outputs=3, weights_file=tmp_path / "missing.pth")


def test_pickled_code_in_weights_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(LungcadError, match="unreadable weights file"):
        create_model(outputs=3, weights_file=path)


def test_imagenet_unavailable_is_a_clear_error(monkeypatch, tmp_path):
    import urllib.error

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache

    def no_network(*a, **k):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(LungcadError, match=r"ImageNet weights.*--weights FILE.*--pretrained none"):
        create_model(outputs=3, pretrained="imagenet")


def test_imagenet_from_torch_hub_cache(monkeypatch, tmp_path, imagenet_like_state):
    """The normal path: torchvision's weights API reads its cached download."""
    from torchvision.models import ResNet50_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / ResNet50_Weights.IMAGENET1K_V2.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.save(imagenet_like_state, cached)
    model, init = create_model(outputs=1, pretrained="imagenet")
    assert init["pretrained"] == "imagenet"
    assert torch.equal(model.layer1[0].conv1.weight, imagenet_like_state["layer1.0.conv1.weight"])


@pytest.mark.parametrize("strategy, trainable", [("fc", {"fc"}), ("layer4", {"fc", "layer4"}), ("all", None)])
def test_finetune_strategies_freeze_and_keep_frozen_bn_in_eval(strategy, trainable):
    model, _ = create_model(outputs=3)
    params = configure_finetuning(model, strategy)
    tops = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    if trainable is None:
        assert len(params) == len(list(model.parameters()))
    else:
        assert tops == trainable
    set_train_mode(model, True)
    assert model.layer4[0].bn1.training == (strategy != "fc")
    assert model.bn1.training == (strategy == "all")
    with pytest.raises(LungcadError):
        configure_finetuning(model, "layer3")


def test_contract_round_trip_and_sha_check(tmp_path):
    model, init = create_model(outputs=3)
    contract = ModelContract(arch="resnet50", task="multiclass", classes=["normal", "benign", "malignant"],
                             preprocessing=Preprocessing(image_size=64), init=init, temperature=1.5)
    save_model(tmp_path, model, contract)
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporaries
    loaded, c2 = load_model(tmp_path)
    assert c2.preprocessing == contract.preprocessing and c2.temperature == 1.5 and c2.classes == contract.classes
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x))
    # tampered weights are detected
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(LungcadError, match="sha256"):
        load_model(tmp_path)


def test_corrupt_or_missing_contract(tmp_path):
    with pytest.raises(LungcadError, match="run folder not found"):
        load_model(tmp_path / "none")
    with pytest.raises(LungcadError, match="no model.json"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(LungcadError, match="corrupt model contract"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"format_version": 99, "arch": "resnet50", "task": "binary",
                                                    "classes": ["a", "b"], "preprocessing": {}}))
    with pytest.raises(LungcadError, match="newer"):
        load_model(tmp_path)
