"""codeq.report: per-layer sparsity / bits / MACs / BOPs (paper Eqs. 20-22),
the text table, the JSON + PNG files and the command line."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import codeq
from codeq.report import compression_report, format_report, main, save_report


def _hand_model():
    """Conv2d(3,4,3,p=1) with a 4-bit dead-zone quantizer, half of its weights
    pruned; Linear(256,10) with an 8-bit uniform quantizer, half its weights 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    conv, lin = model[0], model[3]
    with torch.no_grad():
        w = torch.empty(108).uniform_(0.5, 1.0) * torch.tensor([1.0, -1.0]).repeat(54)
        w[::2] = 1e-6  # far inside the dead zone (d/2 ~ 0.01 * a)
        conv.weight.copy_(w.reshape(4, 3, 3, 3))
        v = torch.empty(2560).uniform_(0.5, 1.0)
        v[1::2] = 0.0
        lin.weight.copy_(v.reshape(10, 256))
    parametrize.register_parametrization(
        conv, "weight", codeq.DeadZoneLDZCompander(fixed_bit_val=4, learnable_bit=False), unsafe=True)
    parametrize.register_parametrization(lin, "weight", codeq.UniformSymmetric(bitwidth=8), unsafe=True)
    return model


def test_hand_computed_bops():
    model = _hand_model()
    rep = compression_report(model, torch.randn(1, 3, 8, 8))
    conv, lin = rep["layers"]
    assert [conv["name"], lin["name"]] == ["0", "3"]
    assert [conv["type"], lin["type"]] == ["Conv2d", "Linear"]
    assert (conv["params"], conv["nonzero"], conv["bits"]) == (108, 54, 4.0)
    assert (lin["params"], lin["nonzero"], lin["bits"]) == (2560, 1280, 8.0)
    assert conv["sparsity"] == 0.5 and lin["sparsity"] == 0.5
    # MACs: conv 4*8*8 outputs x 3 in-channels x 3x3 kernel; linear 256 x 10 x 1 row
    mac_c, mac_l = 256 * 3 * 9, 256 * 10
    assert conv["macs"] == mac_c == 6912 and lin["macs"] == mac_l == 2560
    bops = mac_c * 0.5 * 4 * 32 + mac_l * 0.5 * 8 * 32  # 442368 + 327680
    dense = (mac_c + mac_l) * 32 * 32
    t = rep["totals"]
    assert conv["bops"] == 442368 and lin["bops"] == 327680
    assert t["bops"] == bops == 770048
    assert t["dense_bops"] == dense == 9699328
    assert t["relative_bops"] == pytest.approx(770048 / 9699328, rel=1e-12)
    assert t["params"] == 2668 and t["nonzero"] == 1334 and t["sparsity"] == 0.5
    assert t["storage_bits"] == 108 * 4 * 0.5 + 2560 * 8 * 0.5
    # act_bits scales BOPs linearly, not the dense reference
    rep8 = compression_report(model, torch.randn(1, 3, 8, 8), act_bits=8)
    assert rep8["totals"]["bops"] == bops / 4 and rep8["totals"]["dense_bops"] == dense


def test_per_sample_numbers_do_not_depend_on_batch():
    model = _hand_model()
    r1 = compression_report(model, torch.randn(1, 3, 8, 8))
    r5 = compression_report(model, torch.randn(5, 3, 8, 8))
    assert r5["batch_size"] == 5
    assert r1["totals"] == r5["totals"]


def test_vit_token_linears_count_tokens():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.qkv = nn.Linear(16, 48)
            self.proj = nn.Linear(16, 16)
            self.head = nn.Linear(16, 10)

        def forward(self, x):  # x: [B, T, C]
            q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
            x = x + self.proj(torch.softmax(q @ k.transpose(1, 2), -1) @ v)
            return self.head(x[:, 0])  # the head sees one token

    model = Block()
    codeq.attach_weight_quantizers(model, exclude_layers=["norm"])
    rep = compression_report(model, torch.randn(3, 7, 16))
    by = {r["name"]: r for r in rep["layers"]}
    assert list(by) == ["qkv", "proj", "head"]
    assert by["qkv"]["rows"] == 7 and by["qkv"]["macs"] == 16 * 48 * 7
    assert by["proj"]["macs"] == 16 * 16 * 7
    assert by["head"]["rows"] == 1 and by["head"]["macs"] == 16 * 10


def test_quantized_non_linear_layers_are_rows_without_macs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    codeq.attach_weight_quantizers(model)  # BN weight quantized too
    rep = compression_report(model, torch.randn(2, 3, 6, 6))
    assert [r["type"] for r in rep["layers"]] == ["Conv2d", "BatchNorm2d"]
    assert rep["layers"][1]["macs"] == 0 and rep["layers"][1]["bits"] == 8.0


def test_unquantized_model_is_relative_one():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    rep = compression_report(model, torch.randn(2, 3, 8, 8))
    assert rep["totals"]["relative_bops"] == 1.0
    assert all(r["bits"] == 32 and r["quantizer"] is None for r in rep["layers"])
    text = format_report(rep)
    assert text.splitlines()[-1] == "relative BOPs: 1 (1/1.0 of a dense 32-bit model)"


def test_modes_restored_and_disabled_flag():
    model = _hand_model()
    model.train()
    model[3].eval()  # mixed modes must come back as they were
    codeq.toggle_quantization(model, False)
    rep = compression_report(model, torch.randn(1, 3, 8, 8))
    assert model.training and model[0].training and not model[3].training
    assert [r["enabled"] for r in rep["layers"]] == [False, False]
    assert [r["bits"] for r in rep["layers"]] == [4.0, 8.0]  # the quantizers' bits, flagged disabled
    assert rep["layers"][0]["nonzero"] == 108  # the float weight is used: 1e-6 is not 0
    assert "*" in format_report(rep)


def test_format_report_table():
    rep = compression_report(_hand_model(), torch.randn(1, 3, 8, 8))
    lines = format_report(rep).splitlines()
    assert lines[0].split()[:3] == ["#", "layer", "type"]
    assert any(line.split()[:2] == ["total", "2.67K"] for line in lines)
    rel = 770048 / 9699328
    assert lines[-1] == f"relative BOPs: {rel:.4g} (1/{1 / rel:.1f} of a dense 32-bit model)"
    # columns aligned: every table row as wide as the header row or narrower, same column starts
    assert len({len(line) for line in lines[:2]}) == 1


def test_save_report_json_and_png(tmp_path):
    from PIL import Image

    rep = compression_report(_hand_model(), torch.randn(1, 3, 8, 8))
    paths = save_report(rep, str(tmp_path / "out"), stem="r")
    assert paths == {"json": str(tmp_path / "out" / "r.json"), "png": str(tmp_path / "out" / "r.png")}
    with open(paths["json"]) as f:
        back = json.load(f)
    assert back == json.loads(json.dumps(rep))
    assert back["totals"]["bops"] == 770048
    with Image.open(paths["png"]) as im:
        im.verify()
    with Image.open(paths["png"]) as im:
        assert im.format == "PNG" and im.size[0] >= 800 and 300 <= im.size[1] <= 1200
        assert len(im.convert("RGB").getcolors(1 << 16)) > 3  # not a blank image
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".tmp")]


def test_main_errors_one_line(tmp_path, capsys):
    rc = main([str(tmp_path / "missing.th")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    bad = tmp_path / "bad.th"
    bad.write_bytes(b"not a checkpoint at all" * 10)
    rc = main([str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1


def _tiny_checkpoint(tmp_path, model_name="mlp", model_kwargs=None, quantizer="deadzone", img_size=8):
    from codeq.checkpoint import save_checkpoint
    from codeq.models import build_model

    d = {
        "model": model_name,
        "epochs": 1,
        "img_size": img_size,
        "model_kwargs": model_kwargs or {},
        "optimizer": {"type": "adamw", "param_groups": {"base": {"lr": 1e-3}}},
    }
    if quantizer:
        d["quantizer"] = {"name": quantizer, "kwargs": {"init_deadzone_logit": 0.4, "init_bit_logit": 0.5}
                          if quantizer == "deadzone" else {"bitwidth": 4}, "exclude_layers": ["bn", "norm"]}
    torch.manual_seed(1)
    model = build_model(model_name, img_size=img_size, model_kwargs=d["model_kwargs"], quantizer=d.get("quantizer"))
    path = str(tmp_path / "ckpt.th")
    save_checkpoint({"model": model.state_dict(), "config": d, "epoch": 1}, path)
    return path, model


def test_main_on_a_checkpoint(tmp_path, capsys):
    path, model = _tiny_checkpoint(tmp_path, model_kwargs={"hidden": [32]})
    rc = main([path, "--out", str(tmp_path / "rep"), "--act-bits", "8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "relative BOPs:" in out
    with open(tmp_path / "rep" / "compression_report.json") as f:
        rep = json.load(f)
    assert rep["act_bits"] == 8 and [r["name"] for r in rep["layers"]] == ["net.fc1", "net.fc2"]
    assert rep["layers"][0]["macs"] == 3 * 8 * 8 * 32
    assert rep["totals"]["sparsity"] > 0.1  # init_deadzone_logit 0.4 prunes a lot
