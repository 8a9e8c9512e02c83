"""codeq.onnx_export: ONNX files with INT4/INT8 weights whose in-graph ŵ is the
quantizer's bit for bit, run by ONNX Runtime like PyTorch, checked by
onnx.checker; refusals of what cannot be stored as integers; the CLI
(``python -m codeq.export ... --format onnx``) and its one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

import codeq
from codeq import onnx_export
from codeq.errors import ExportError
from codeq.export import main as export_main
from codeq.models import build_model, example_input
from test_train_cli import run_dirs, tiny, write

pytestmark = pytest.mark.skipif(
    bool(onnx_export.missing_packages()),
    reason=f"the ONNX export's optional packages are not installed ({', '.join(onnx_export.missing_packages())}): "
           "pip install 'codeq[onnx]' (make install does)")

if not onnx_export.missing_packages():
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper


def _with_mixed_bits(model, seed: int):
    """Random dead zones, and bit-widths from 2 to 8 so that a model has INT4 and INT8 layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (_, _, q) in enumerate(codeq.iter_quantizers(model)):
            q.logit_dz.fill_(float(torch.empty(()).uniform_(0.3, 1.5, generator=g)))
            if q.learnable_bit:
                q.logit_bit.fill_([0.1, 0.4, 0.8, 3.0][i % 4])  # B = 2 + 6|tanh|: 2.6->3, 4.3->4, 6.0->6, 8
    return model.eval()


def _resnet20(seed):
    torch.manual_seed(seed)
    return _with_mixed_bits(build_model("resnet20", quantizer={"name": "deadzone", "kwargs": {"learnable_bit": True},
                                                               "exclude_layers": ["bn"]}), seed)


def _vit_tiny(seed):
    """timm's ViT-Tiny (vit_tiny_patch16_224: 12 blocks, width 192), at 32x32 with 8x8 patches."""
    torch.manual_seed(seed)
    return _with_mixed_bits(build_model("vit", img_size=32, model_kwargs={"patch_size": 8},
                                        quantizer={"name": "deadzone", "kwargs": {"learnable_bit": True},
                                                   "exclude_layers": ["norm"]}), seed)


def _graph_weights(path: str, keys) -> dict:
    """The ŵ the file's graph computes, by ONNX Runtime running the graph as written."""
    proto = onnx.load(path)
    for k in keys:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(k, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = onnx_export.probe_input(json.loads({p.key: p.value for p in proto.metadata_props}["codeq.input_shape"]))
    outs = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    return dict(zip([o.name for o in sess.get_outputs()], outs))


@pytest.mark.parametrize("form", onnx_export.FORMS)
@pytest.mark.parametrize("make, img", [(_resnet20, 32), (_vit_tiny, 32)], ids=["resnet20", "vit_tiny"])
def test_integer_weights_bit_for_bit_and_outputs(tmp_path, seed, make, img, form):
    model = make(seed)
    path = str(tmp_path / "m.onnx")
    x = torch.randn(3, 3, img, img, generator=torch.Generator().manual_seed(seed))
    info = onnx_export.export_onnx(model, x, path, form=form)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    inits = {i.name: i for i in proto.graph.initializer}
    with torch.no_grad(), parametrize.cached():
        w_hat = {f"{n}.weight": m.weight.detach().clone() for n, m, _ in codeq.iter_quantizers(model)}
        bits = {f"{n}.weight": int(q.get_bitwidth()) for n, _, q in codeq.iter_quantizers(model)}
        ref = model(x).numpy()
    assert set(info["layers"]) == set(w_hat)
    assert {b <= 4 for b in bits.values()} == {True, False}  # both integer types are exercised
    for key, b in bits.items():
        # stored as integers of the right width, the float weight gone
        assert key not in inits
        want = onnx.TensorProto.INT4 if b <= 4 else onnx.TensorProto.INT8
        assert inits[f"{key}.q"].data_type == want, key
        q = numpy_helper.to_array(inits[f"{key}.q"]).astype(np.int64)
        assert np.abs(q).max() <= 2 ** (b - 1) - 1
    # the graph's ŵ equals PyTorch's bit for bit (zeros without their sign: an integer 0 has none)
    got = _graph_weights(path, list(w_hat))
    for key, w in w_hat.items():
        a = got[key] + np.float32(0)
        b = w.numpy() + np.float32(0)
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), key
    # ONNX Runtime (default optimizations) runs it like PyTorch, any batch size
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    one = sess.run(None, {sess.get_inputs()[0].name: x[:1].numpy()})[0]
    assert np.abs(one - ref[:1]).max() <= 1e-4 * np.abs(ref).max()


def test_uniform_quantizer_weights_are_integers(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20", quantizer={"name": "uniform", "kwargs": {"bitwidth": 4}, "exclude_layers": ["bn"]})
    path = str(tmp_path / "u.onnx")
    info = onnx_export.export_onnx(model.eval(), example_input(32, 2), path)
    assert {v["type"] for v in info["layers"].values()} == {"INT4"}
    assert {v["encoding"] for v in info["layers"].values()} == {"uniform"}
    inits = {i.name for i in onnx.load(path).graph.initializer}
    assert not any(k.endswith(".delta") for k in inits)  # ŵ = s·q: no dead-zone offset


def test_refusals_are_one_line_and_write_nothing(tmp_path):
    path = tmp_path / "x.onnx"
    plain = build_model("resnet20").eval()
    with pytest.raises(ExportError, match="no quantized weights"):
        onnx_export.export_onnx(plain, example_input(32), str(path))
    model = _resnet20(0)
    q = next(q for n, _, q in codeq.iter_quantizers(model) if n == "layer2.0.conv1")
    q.enabled = False  # this layer would stay float
    with pytest.raises(ExportError, match=r"layer2\.0\.conv1\.weight cannot be stored as integers: quantizer disabled"):
        onnx_export.export_onnx(model, example_input(32), str(path))
    with pytest.raises(ExportError, match="unknown ONNX form"):
        onnx_export.export_onnx(_resnet20(0), example_input(32), str(path), form="int")
    assert not path.exists()


def test_check_refuses_a_float_or_missing_integer_weight(tmp_path):
    good = str(tmp_path / "good.onnx")
    onnx_export.export_onnx(_resnet20(1), example_input(32), good,
                            config={"model": "resnet20", "img_size": 32, "model_kwargs": {}})
    info = onnx_export.check_onnx(good)
    assert info["max_rel_error"] <= onnx_export.RTOL
    # a changed integer: the graph still rebuilds what the file holds, but the outputs differ from PyTorch's
    proto = onnx.load(good)
    qi = next(i for i in proto.graph.initializer if i.name == "layer1.0.conv1.weight.q")
    q = numpy_helper.to_array(qi).copy()
    q.flat[:40] = -q.flat[:40]
    qi.CopyFrom(numpy_helper.from_array(q, qi.name))
    onnx.save(proto, str(tmp_path / "changed.onnx"))
    with pytest.raises(ExportError, match="outputs differ from PyTorch's"):
        onnx_export.check_onnx(str(tmp_path / "changed.onnx"))
    key = "layer3.1.conv2.weight"
    # the integers replaced by the float weight (as an exporter that rewrote it would leave it)
    proto = onnx.load(good)
    qi = next(i for i in proto.graph.initializer if i.name == f"{key}.q")
    floats = numpy_helper.to_array(qi).astype(np.float32)
    proto.graph.initializer.remove(qi)
    proto.graph.initializer.append(numpy_helper.from_array(floats, f"{key}.q"))
    onnx.save(proto, str(tmp_path / "float.onnx"))
    with pytest.raises(ExportError, match=rf"{key} is not stored as INT(4|8) integers"):
        onnx_export.check_onnx(str(tmp_path / "float.onnx"))
    # the float weight itself in the file
    proto = onnx.load(good)
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros((64, 64, 3, 3), np.float32), key))
    onnx.save(proto, str(tmp_path / "both.onnx"))
    with pytest.raises(ExportError, match=rf"{key} is stored as a float tensor"):
        onnx_export.check_onnx(str(tmp_path / "both.onnx"))
    # a file codeq did not make
    proto = onnx.load(good)
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "foreign.onnx"))
    with pytest.raises(ExportError, match="not made by codeq"):
        onnx_export.check_onnx(str(tmp_path / "foreign.onnx"))


def _trained(tmp_path, model_name=None, **over):
    d = tiny(tmp_path, epochs=1, **over)
    if model_name is not None:
        d["model"] = model_name
    assert codeq.train.cli.main(["--config", write(tmp_path, d)]) == 0
    (run,) = run_dirs(tmp_path)
    return os.path.join(run, "checkpoint.th")


def test_cli_export_and_check(tmp_path, capsys):
    ckpt = _trained(tmp_path)
    out = tmp_path / "out"
    assert export_main([ckpt, str(out), "--format", "onnx"]) == 0
    assert (out / "model.onnx").is_file()
    assert "bit for bit" in capsys.readouterr().out
    assert export_main(["--check", str(out / "model.onnx")]) == 0  # format from the suffix
    assert "outputs within" in capsys.readouterr().out
    assert export_main(["--check", str(tmp_path / "missing.onnx")]) == 2
    assert export_main([ckpt, str(tmp_path / "qdq.onnx"), "--onnx-form", "qdq"]) == 0
    proto = onnx.load(str(tmp_path / "qdq.onnx"))
    assert "DequantizeLinear" in {n.op_type for n in proto.graph.node}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["codeq.config"])["model"] == "mlp"


def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch):
    ckpt = _trained(tmp_path)
    capsys.readouterr()
    cases = [
        ([ckpt, str(tmp_path / "a.onnx"), "--format", "tflite"], "unknown --format 'tflite'"),
        ([ckpt, str(tmp_path / "b.onnx"), "--onnx-form", "fp8"], "unknown --onnx-form 'fp8'"),
        ([str(tmp_path / "none.th"), str(tmp_path / "c.onnx")], "checkpoint not found"),
    ]
    d = tiny(tmp_path, epochs=1, save_dir=str(tmp_path / "noq"))
    del d["quantizer"], d["loss_terms"]
    assert codeq.train.cli.main(["--config", write(tmp_path, d, "noq.yaml")]) == 0
    (noq,) = run_dirs(tmp_path, "noq")
    cases.append(([os.path.join(noq, "checkpoint.th"), str(tmp_path / "d.onnx")], "no quantized weights"))
    capsys.readouterr()
    for argv, msg in cases:
        assert export_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and msg in err, err
    # onnxruntime missing: said by name
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert export_main([ckpt, str(tmp_path / "e.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing: onnxruntime" in err and "pip install 'codeq[onnx]'" in err
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".onnx")]


def test_timm_model_by_name_trains_and_exports(tmp_path, capsys):
    """A model outside the registry (timm/resnet10t): one synthetic CPU epoch, then ONNX with the same
    guarantees (integers, bit-exact ŵ, ONNX Runtime agrees)."""
    ckpt = _trained(tmp_path, model_name="timm/resnet10t", model_kwargs={},
                    quantizer={"name": "deadzone", "kwargs": {"fixed_bit_val": 4, "learnable_bit": False},
                               "exclude_layers": ["bn"]},
                    loss_terms=[])
    path = str(tmp_path / "r10t.onnx")
    assert export_main([ckpt, path]) == 0
    info = onnx_export.check_onnx(path)
    assert info["max_rel_error"] <= onnx_export.RTOL and {v["type"] for v in info["layers"].values()} == {"INT4"}
    model, _, _ = codeq.checkpoint.load_model(ckpt)
    with torch.no_grad(), parametrize.cached():
        w_hat = {f"{n}.weight": m.weight.detach().clone() for n, m, _ in codeq.iter_quantizers(model)}
    got = _graph_weights(path, list(w_hat))
    assert all(np.array_equal((got[k] + np.float32(0)).view(np.uint32), (w.numpy() + np.float32(0)).view(np.uint32))
               for k, w in w_hat.items())
