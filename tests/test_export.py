"""codeq.export: compact export of packed sparse integer levels, exact
round trip, hand-computed sizes, and clear errors on damaged files."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import codeq
from codeq.export import ExportError, export_model, load_state_dict, main, plain_state_dict

DZ_KW = dict(init_deadzone_logit=0.4, init_bit_logit=0.5)  # ~60% pruned, 4 bits


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))


def _resnet_like():
    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.layer1 = nn.Sequential(Block(8), Block(8))
            self.linear = nn.Linear(8, 10)

        def forward(self, x):
            x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
            return self.linear(x.mean((2, 3)))

    net = Net()
    with torch.no_grad():  # non-trivial BN statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return net


def _vit_like():
    class Block(nn.Module):
        def __init__(self, c=16):
            super().__init__()
            self.patch = nn.Conv2d(3, c, 4, stride=4)
            self.cls = nn.Parameter(torch.randn(1, 1, c))
            self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
            self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
            self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
            self.head = nn.Linear(c, 10)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
            q, k, v = self.qkv(self.norm1(x)).chunk(3, -1)
            x = x + self.proj(torch.softmax(q @ k.transpose(1, 2) / 4, -1) @ v)
            x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))
            return self.head(x[:, 0])

    return Block()


FAMILIES = {
    "mlp": (_mlp, [], (5, 3, 4, 4)),
    "resnet": (_resnet_like, ["bn"], (2, 3, 8, 8)),
    "vit": (_vit_like, ["norm"], (2, 3, 8, 8)),
}


def _quantized(family, quantizer="deadzone", kwargs=None, seed=0):
    make, exclude, shape = FAMILIES[family]
    torch.manual_seed(seed)
    plain = make()
    model = copy.deepcopy(plain)
    codeq.attach_weight_quantizers(model, exclude_layers=exclude, quantizer=quantizer,
                                   quantizer_kwargs=DZ_KW if kwargs is None else kwargs)
    return model.eval(), plain.eval(), torch.randn(*shape)


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_identical_outputs(tmp_path, family):
    model, plain, x = _quantized(family)
    summary = export_model(model, str(tmp_path / "ex"))
    assert summary["quantized_layers"] == len(list(codeq.iter_quantizers(model)))
    assert not summary["raw_layers"]
    sd = load_state_dict(str(tmp_path / "ex"))
    _assert_same_state(sd, plain_state_dict(model))
    plain.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    # the packed weights are far smaller than float32 (the tiny models' files are dominated by headers)
    packed = sum(v["nbytes"] for v in summary["layers"].values())
    numel = sum(v["numel"] for v in summary["layers"].values())
    assert packed < 0.2 * 4 * numel
    assert summary["bytes"] < summary["fp32_bytes"]
    assert not [p for p in os.listdir(tmp_path / "ex") if p.startswith(".tmp")]


@pytest.mark.parametrize("kwargs", [
    dict(learnable_bit=False, fixed_bit_val=2, init_deadzone_logit=1.0),  # B = 2: levels +-1, 1 bit each
    dict(learnable_bit=False, fixed_bit_val=8, init_deadzone_logit=6.0),  # tiny dead zone, delta < 0
    dict(init_deadzone_logit=0.01, init_bit_logit=0.5),  # almost everything pruned: Rice-coded mask
])
def test_round_trip_extreme_settings(tmp_path, kwargs):
    model, plain, x = _quantized("mlp", kwargs=kwargs, seed=3)
    export_model(model, str(tmp_path / "ex"))
    plain.load_state_dict(load_state_dict(str(tmp_path / "ex")))
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))


def test_uniform_and_disabled_and_unknown_quantizers(tmp_path):
    model, plain, x = _quantized("resnet", quantizer="uniform", kwargs={"bitwidth": 3})

    class Halve(nn.Module):  # a parametrization that is not a known quantizer: stored as float
        def forward(self, w):
            return w / 2

    parametrize.register_parametrization(model.linear, "weight", Halve())
    codeq.toggle_quantization(model.layer1[1], False)
    summary = export_model(model, str(tmp_path / "ex"))
    assert set(summary["raw_layers"]) == {"linear.weight", "layer1.1.conv1.weight", "layer1.1.conv2.weight"}
    assert {v["bits"] for v in summary["layers"].values()} == {3}
    sd = load_state_dict(str(tmp_path / "ex"))
    _assert_same_state(sd, plain_state_dict(model))
    plain.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    from codeq.export import load

    with pytest.raises(ExportError, match="no architecture config"):
        load(str(tmp_path / "ex"))


def test_top_level_and_weight_norm_parametrizations(tmp_path):
    lin = nn.Linear(32, 8)  # the quantized module is the model itself: keys "weight", "bias"
    codeq.attach_weight_quantizers(lin, quantizer_kwargs=DZ_KW)
    wn = nn.utils.parametrizations.weight_norm(nn.Linear(8, 4))  # original0/original1: stored as float
    model = nn.Sequential(lin, wn)
    sd = plain_state_dict(model)
    assert set(sd) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    s = export_model(model, str(tmp_path / "ex"))
    assert list(s["layers"]) == ["0.weight"] and "1.weight" in s["raw_layers"]
    _assert_same_state(load_state_dict(str(tmp_path / "ex")), sd)
    top = export_model(lin, str(tmp_path / "top"))
    assert list(top["layers"]) == ["weight"]
    _assert_same_state(load_state_dict(str(tmp_path / "top")), plain_state_dict(lin))


def test_half_precision_weights(tmp_path):
    lin = nn.Linear(64, 16).half()
    codeq.attach_weight_quantizers(lin, quantizer_kwargs=DZ_KW)
    export_model(lin, str(tmp_path / "ex"))
    sd = load_state_dict(str(tmp_path / "ex"))
    assert sd["weight"].dtype == torch.float16
    _assert_same_state(sd, plain_state_dict(lin))


def test_known_layer_sizes(tmp_path):
    """Bitmap case (every other weight pruned) and Rice case (one nonzero), by hand."""
    a = nn.Linear(64, 32, bias=False)  # 2048 weights, dead zone, B = 8 (init_bit_logit 3.0)
    b = nn.Linear(64, 32, bias=False)  # 2048 weights, uniform 8 bits, one nonzero at 1000
    with torch.no_grad():
        w = torch.empty(2048).uniform_(0.5, 1.0)
        w[::2] = 1e-7
        a.weight.copy_(w.reshape(32, 64))
        v = torch.zeros(2048)
        v[1000] = -0.7
        b.weight.copy_(v.reshape(32, 64))
    model = nn.Sequential(a, b)
    parametrize.register_parametrization(a, "weight", codeq.DeadZoneLDZCompander(), unsafe=True)
    parametrize.register_parametrization(b, "weight", codeq.UniformSymmetric(8), unsafe=True)
    assert int(torch.count_nonzero(a.weight)) == 1024
    s = export_model(model, str(tmp_path / "ex"))
    la, lb = s["layers"]["0.weight"], s["layers"]["1.weight"]
    # a: gaps all 1 -> Rice needs 2 bits per nonzero = the 1-bit-per-weight bitmap; the bitmap wins ties.
    # bitmap 2048/8 + signs 1024/8 + magnitudes 1024*7/8 (Q = 127 -> 7 bits) + s, delta (2 x float32)
    assert la["mask"] == "bitmap" and la["bits"] == 8 and la["nonzero"] == 1024
    assert la["nbytes"] == 256 + 128 + 896 + 8 == 1288
    # b: one gap of 1000; Rice k=7: unary 1000>>7 = 7 ones + stop = 1 byte, remainder 7 bits = 1 byte
    # -> mask 2 bytes + sign 1 byte + magnitude (126 in 7 bits) 1 byte + s, delta 8 bytes
    assert lb["mask"] == "rice" and lb["nonzero"] == 1
    assert lb["nbytes"] == 2 + 1 + 1 + 8 == 12
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "ex" / "model.safetensors"))
    assert t["codeq::0.weight::codes"].numel() == 1280 and t["codeq::1.weight::codes"].numel() == 4
    assert t["codeq::0.weight::scalars"].dtype == torch.float32
    layout = json.loads((tmp_path / "ex" / "layout.json").read_text())
    assert layout["layers"]["1.weight"]["streams"]["mask"]["k"] == 7
    # theoretical size: Σ nonzero·bits + numel mask bits
    assert s["theoretical_bytes"] == (1024 * 8 + 2048 + 1 * 8 + 2048) / 8
    assert s["bytes"] == os.path.getsize(tmp_path / "ex" / "model.safetensors") + os.path.getsize(
        tmp_path / "ex" / "layout.json")
    sd = load_state_dict(str(tmp_path / "ex"))
    _assert_same_state(sd, plain_state_dict(model))
    assert sd["1.weight"].reshape(-1)[1000] == b.weight.reshape(-1)[1000] != 0


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_exports_are_clear_errors(tmp_path, capsys):
    model, _, _ = _quantized("mlp")
    ex = tmp_path / "ex"
    export_model(model, str(ex))
    tfile, lfile = ex / "model.safetensors", ex / "layout.json"
    good_t, good_l = tfile.read_bytes(), lfile.read_text()

    _flip(tfile, len(good_t) - 5)  # a byte of the codes
    with pytest.raises(ExportError, match="SHA-256 mismatch"):
        load_state_dict(str(ex))
    assert main(["--check", str(ex)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "SHA-256" in err

    tfile.write_bytes(good_t[: len(good_t) // 2])  # truncated
    with pytest.raises(ExportError, match="corrupt or truncated"):
        load_state_dict(str(ex))

    tfile.write_bytes(good_t)
    lfile.write_text(good_l.replace('"nonzero":', '"nonzero":1', 1))  # edited layout
    with pytest.raises(ExportError, match="layout checksum"):
        load_state_dict(str(ex))
    lfile.write_text(good_l[:100])  # truncated layout
    with pytest.raises(ExportError, match="corrupt layout.json"):
        load_state_dict(str(ex))
    lfile.unlink()
    with pytest.raises(ExportError, match="not a codeq export"):
        load_state_dict(str(ex))
    with pytest.raises(ExportError, match="no export directory"):
        load_state_dict(str(tmp_path / "nowhere"))

    lfile.write_text(good_l)
    load_state_dict(str(ex))  # intact again
    assert main(["--check", str(ex)]) == 0


def test_cli_errors_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.th"
    bad.write_bytes(b"\x00garbage" * 20)
    for argv in ([str(tmp_path / "missing.th"), str(tmp_path / "o")], [str(bad), str(tmp_path / "o")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


# ------------------------------------------------- full checkpoint path --
TRAINER_MODELS = {
    "mlp": ({"hidden": [32]}, 8),
    "resnet20": ({"num_blocks": [1, 1, 1], "width": 4}, 8),
    "vit": ({"patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2}, 8),
}


@pytest.mark.parametrize("name", sorted(TRAINER_MODELS))
def test_checkpoint_export_and_load(tmp_path, name, capsys):
    from codeq.checkpoint import save_checkpoint
    from codeq.export import load
    from codeq.models import build_model, example_input

    kw, img = TRAINER_MODELS[name]
    d = {
        "model": name,
        "epochs": 1,
        "img_size": img,
        "model_kwargs": kw,
        "optimizer": {"type": "adamw", "param_groups": {"base": {"lr": 1e-3}}},
        "quantizer": {"name": "deadzone", "kwargs": DZ_KW, "exclude_layers": ["bn", "norm"]},
    }
    torch.manual_seed(2)
    model = build_model(name, img_size=img, model_kwargs=kw, quantizer=d["quantizer"]).eval()
    ckpt = tmp_path / "ckpt.th"
    save_checkpoint({"model": model.state_dict(), "config": d, "epoch": 1}, str(ckpt))

    assert main([str(ckpt), str(tmp_path / "ex")]) == 0
    out = capsys.readouterr().out
    assert "of fp32" in out and "theoretical" in out
    rebuilt = load(str(tmp_path / "ex"))
    assert not list(codeq.iter_quantizers(rebuilt)) and not rebuilt.training
    x = example_input(img, batch_size=2)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
