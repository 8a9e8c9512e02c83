"""A trained codeq model as ONNX with integer weights, run by ONNX Runtime.

Every quantized weight is stored as integer levels -- INT4 when its bit-width
B <= 4, INT8 when B <= 8 (ONNX opset 21) -- with its scale s and dead-zone
offset delta as float32 scalars, and turned back into ŵ inside the graph with
the quantizer's own float32 ops, so that ŵ is bit for bit the quantizer's::

    form "cast" (default)   ŵ = Add(Mul(Cast(q), s), Mul(Sign(Cast(q)), delta))
    form "qdq"              ŵ = Add(DequantizeLinear(q, s), Mul(Sign(DequantizeLinear(q, s)), delta))

(``uniform`` quantizers: no delta, ŵ = s·q.)  The qdq form is the plain
DequantizeLinear that TensorRT-style consumers look for, with the dead zone's
offset added after it.  Everything else (biases, norms) is float32, as in an
fp32 export.  The graph comes from ``torch.onnx.export(dynamo=True,
optimize=False)`` of a quantizer-free copy of the model: no batch norm is
folded into the weights, so the integers stay integers; the export then checks
that every quantized weight is an initializer equal to ŵ, replaces it, and
refuses (one-line :class:`~codeq.errors.ExportError`) a model where it is not.

Before the file is written (atomically): ``onnx.checker`` with ``full_check``,
every quantized weight present as INT4/INT8, ONNX Runtime (CPU provider)
rebuilding each ŵ bit for bit and matching PyTorch's outputs on the example
input within ``1e-4`` of the largest logit.  :func:`check_onnx` re-runs the
checks on a file (``python -m codeq.export --check OUT.onnx``), against the
PyTorch output the file records.

Needs the optional packages onnx, onnxscript and onnxruntime
(``pip install 'codeq[onnx]'``); without them the functions raise an
ExportError naming the missing ones.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import os
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from codeq._io import atomic_write_bytes, json_safe
from codeq.checkpoint import load_model
from codeq.errors import ConfigError, ExportError
from codeq.levels import dequantize, integer_levels, plain_state_dict, quantized_weights
from codeq.models import example_input
from codeq.parametrize import strip_quantizers

__all__ = ["export_onnx", "export_checkpoint_onnx", "check_onnx", "format_summary", "missing_packages",
           "probe_input", "FORMS", "OPSET", "ONNX_FORMAT", "RTOL"]

PACKAGES = ("onnx", "onnxscript", "onnxruntime")
FORMS = ("cast", "qdq")
OPSET = 21  # the first opset with INT4 (and Cast / DequantizeLinear of it)
ONNX_FORMAT = "codeq-onnx"
RTOL = 1e-4  # ONNX Runtime's outputs within RTOL x the largest |output| of PyTorch's


def missing_packages() -> list[str]:
    """The packages of the ONNX export that are not installed."""
    return [p for p in PACKAGES if importlib.util.find_spec(p) is None]


def _require() -> None:
    missing = missing_packages()
    if missing:
        raise ExportError(f"the ONNX export needs the packages {', '.join(PACKAGES)} (missing: {', '.join(missing)}); "
                          "install them with: pip install 'codeq[onnx]'")


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


# ------------------------------------------------------------- the graph --
def _torch_export(plain: nn.Module, x: torch.Tensor, w_hats: dict):
    """The fp32 ONNX model proto of ``plain`` (batch dimension dynamic) with
    the quantized weights ``w_hats`` ({state-dict key: ŵ}) left out: each is a
    free name its consumers read, for the caller to define.

    Each must be an initializer of torch's graph equal to ŵ (ExportError
    naming the first that is not).  They are made graph inputs while onnxscript
    optimizes the rest (constant folding, the simplifications of torch's own
    ``optimize``): an input is not a constant, so nothing folds into it (no
    batch norm into a weight, no transposed copy in its place).  The
    exporter's per-node metadata (stack traces: a sixth of a small model's
    file) is dropped."""
    from onnxscript import ir, optimizer

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(plain, (x,), dynamo=True, optimize=False, opset_version=OPSET,
                                     dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), verbose=False)
    except Exception as e:  # noqa: BLE001 -- whatever torch.export / the exporter raise, as one line
        raise ExportError(f"torch.onnx.export failed: {_one_line(e)}") from None
    graph = prog.model.graph
    weights = []
    for key, w in w_hats.items():
        v = graph.initializers.get(key)
        if v is None or v.const_value is None:
            raise ExportError(f"{key} is not a weight of the exported graph (the exporter rewrote or folded it); "
                              "its integers could not be stored")
        stored = v.const_value.numpy()
        if stored.dtype != np.float32 or not _same_bits(stored, w.cpu().numpy()):
            raise ExportError(f"{key} in the exported graph is not the quantizer's ŵ (the exporter changed it)")
        graph.initializers.pop(key)
        v.const_value = None
        graph.inputs.append(v)
        weights.append(v)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            optimizer.optimize(prog.model)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"optimizing the exported graph failed: {_one_line(e)}") from None
    for v in weights:
        graph.inputs.remove(v)
    proto = ir.serde.serialize_model(prog.model)
    for node in proto.graph.node:  # names are optional; the values' names say what the graph does
        del node.metadata_props[:]
        node.doc_string = node.name = ""
    del proto.graph.value_info[:]  # shape annotations, optional (ONNX Runtime infers them)
    for v in list(proto.graph.input) + list(proto.graph.output):
        del v.metadata_props[:]
    for init in proto.graph.initializer:
        del init.metadata_props[:]
    del proto.metadata_props[:]
    proto.doc_string = proto.graph.doc_string = ""
    _compact(proto)
    return proto


def _compact(proto) -> None:
    """Fewer bytes around the weights, the same computation: a Conv's all-zero
    bias (the exporter spells out the missing one) dropped, and the graph's
    intermediate values renamed t0, t1, ... (each name is stored in every node
    that reads it)."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Conv" and len(node.input) == 3 and node.input[2] in inits \
                and not np.any(numpy_helper.to_array(inits[node.input[2]])):
            del node.input[2]
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for name, init in inits.items():
        if name not in used:
            graph.initializer.remove(init)
    keep = {i.name for i in graph.input} | {o.name for o in graph.output} | {i.name for i in graph.initializer}
    names = {}
    for node in graph.node:
        for j, out in enumerate(node.output):
            if out and out not in keep:
                names[out] = node.output[j] = f"t{len(names)}"
        for j, inp in enumerate(node.input):
            if inp in names:
                node.input[j] = names[inp]


def _dequant_nodes(onnx, key: str, i: int, encoding: str, form: str) -> list:
    """The nodes that turn the initializers ``key.q``, ``key.scale`` (and ``key.delta``) into ``key``;
    ``i`` numbers their intermediate values (short names: a name is stored in every node that uses it)."""
    h, T = onnx.helper, onnx.TensorProto
    sq = f"dq{i}s" if encoding == "deadzone" else key
    if form == "qdq":
        nodes = [h.make_node("DequantizeLinear", [f"{key}.q", f"{key}.scale"], [sq])]
        sign_of = sq  # sign(s·q) = sign(q): s > 0
    else:
        nodes = [h.make_node("Cast", [f"{key}.q"], [f"dq{i}f"], to=T.FLOAT),
                 h.make_node("Mul", [f"dq{i}f", f"{key}.scale"], [sq])]
        sign_of = f"dq{i}f"
    if encoding == "deadzone":  # the quantizer's order: s·q + δ·sign(q), float32
        nodes += [h.make_node("Sign", [sign_of], [f"dq{i}g"]),
                  h.make_node("Mul", [f"dq{i}g", f"{key}.delta"], [f"dq{i}d"]),
                  h.make_node("Add", [sq, f"dq{i}d"], [key])]
    return nodes


def _levels_of_model(model: nn.Module) -> dict:
    """{state-dict key: (Levels, ŵ)} of every quantized weight; ExportError naming the first that cannot
    be stored as integers (INT4/INT8, float32)."""
    plain = plain_state_dict(model)
    out = {}
    for mname, (module, q) in quantized_weights(model).items():
        key = f"{mname}.weight" if mname else "weight"
        w_hat = plain[key]
        found = "not a single quantizer parametrization" if q is None else \
            integer_levels(q, module.parametrizations["weight"].original, w_hat)
        if isinstance(found, str):
            raise ExportError(f"{key} cannot be stored as integers: {found}")
        if w_hat.dtype != torch.float32:
            raise ExportError(f"{key} is {str(w_hat.dtype).replace('torch.', '')}; the ONNX export stores float32 "
                              "models (convert the model with .float() first)")
        if found.bits > 8:
            raise ExportError(f"{key} has {found.bits} bits; ONNX integers hold at most 8 (INT8)")
        out[key] = (found, w_hat)
    if not out:
        raise ExportError("the model has no quantized weights, so there is nothing to store as integers; "
                          "export an fp32 model with torch.onnx.export")
    return out


def _integer_type(onnx, bits: int) -> int:
    return onnx.TensorProto.INT4 if bits <= 4 else onnx.TensorProto.INT8


@torch.no_grad()
def _build(model: nn.Module, x: torch.Tensor, form: str, config: dict | None):
    """(ONNX model proto with integer weights, {key: ŵ}, {key: layer info})."""
    import onnx
    from onnx import numpy_helper

    levels = _levels_of_model(model)
    proto = _torch_export(strip_quantizers(model).eval(), x, {k: w for k, (_, w) in levels.items()})
    graph = proto.graph
    nodes, layers = [], {}
    for i, (key, (lv, _)) in enumerate(levels.items()):
        q = lv.levels.cpu().numpy().astype(np.int8)
        itype = _integer_type(onnx, lv.bits)
        if itype == onnx.TensorProto.INT4:
            import ml_dtypes  # onnx's own dependency, for its 4-bit types

            q = q.astype(ml_dtypes.int4)
        graph.initializer.append(numpy_helper.from_array(q, f"{key}.q"))
        graph.initializer.append(numpy_helper.from_array(np.array(lv.s.item(), dtype=np.float32), f"{key}.scale"))
        if lv.encoding == "deadzone":
            graph.initializer.append(numpy_helper.from_array(np.array(lv.delta.item(), dtype=np.float32),
                                                             f"{key}.delta"))
        nodes += _dequant_nodes(onnx, key, i, lv.encoding, form)
        layers[key] = {"bits": lv.bits, "type": "INT4" if itype == onnx.TensorProto.INT4 else "INT8",
                       "encoding": lv.encoding}
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    with parametrize.cached():
        probe_out = model(probe_input(x.shape)).detach().float().cpu().numpy()
    meta = {"codeq.format": ONNX_FORMAT, "codeq.form": form, "codeq.layers": json.dumps(layers, separators=(",", ":")),
            "codeq.input_shape": json.dumps(list(x.shape)),
            "codeq.probe_output": base64.b64encode(probe_out.tobytes()).decode(),
            "codeq.probe_output_shape": json.dumps(list(probe_out.shape))}
    if config is not None:
        meta["codeq.config"] = json.dumps(json_safe(config))
    onnx.helper.set_model_props(proto, meta)
    proto.producer_name = "codeq"
    return proto, {k: w for k, (_, w) in levels.items()}, layers


# ------------------------------------------------------------- the checks --
def _integers_present(proto, layers: dict) -> None:
    """Every quantized weight of ``layers`` as INT4/INT8 levels, none as a float initializer."""
    import onnx

    types = {i.name: i.data_type for i in proto.graph.initializer}
    for key, info in layers.items():
        if key in types:
            raise ExportError(f"{key} is stored as a float tensor, not as integers")
        want = onnx.TensorProto.INT4 if info["type"] == "INT4" else onnx.TensorProto.INT8
        if types.get(f"{key}.q") != want:
            raise ExportError(f"{key} is not stored as {info['type']} integers")


def _session(data: bytes, optimize: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 -- ONNX Runtime's own errors, as one line
        raise ExportError(f"ONNX Runtime cannot load the model: {_one_line(e)}") from None


def _run(sess, x: torch.Tensor) -> list:
    try:
        return sess.run(None, {sess.get_inputs()[0].name: x.cpu().numpy()})
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"ONNX Runtime failed to run the model: {_one_line(e)}") from None


def _check_weights_bitwise(proto, w_hats: dict, x: torch.Tensor) -> None:
    """ONNX Runtime, running the graph as written, rebuilds every ŵ bit for bit."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    for key, w in w_hats.items():
        probe.graph.output.append(onnx.helper.make_tensor_value_info(key, onnx.TensorProto.FLOAT, list(w.shape)))
    sess = _session(probe.SerializeToString(), optimize=False)
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, _run(sess, x)))
    for key, w in w_hats.items():
        if not _same_bits(outs[key], w.cpu().numpy()):
            raise ExportError(f"{key}: the graph's ŵ differs from the quantizer's")


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """The same float32 bits, zeros compared without their sign: an integer level 0 has none (ŵ may hold
    -0.0 where the quantizer rounded a negative weight to 0; it changes no product or sum but the sign of
    an all-zero result)."""
    a, b = a.astype(np.float32) + np.float32(0), b.astype(np.float32) + np.float32(0)  # -0.0 + 0.0 = +0.0
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def probe_input(shape) -> torch.Tensor:
    """The input a file records PyTorch's output on: one sample of ``shape``
    (its batch dimension aside), codeq's fixed-seed values (for an image model,
    ``codeq.models.example_input``)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, *[int(d) for d in shape[1:]], generator=g)


def _recorded(proto):
    """(probe input, PyTorch's output on it) as the file records them."""
    meta = {p.key: p.value for p in proto.metadata_props}
    try:
        shape = json.loads(meta["codeq.input_shape"])
        out = np.frombuffer(base64.b64decode(meta["codeq.probe_output"]), dtype=np.float32)
        out = out.reshape(json.loads(meta["codeq.probe_output_shape"]))
    except (KeyError, ValueError, TypeError) as e:
        raise ExportError(f"the file's codeq metadata is incomplete ({_one_line(e)})") from None
    return probe_input(shape), torch.from_numpy(out.copy())


def _compare(ours: list, ref: torch.Tensor, what: str) -> float:
    """max |ORT - PyTorch| / max |PyTorch|; ExportError above RTOL."""
    ref = ref.detach().float().cpu().numpy()
    got = ours[0]
    if got.shape != ref.shape:
        raise ExportError(f"{what}: ONNX Runtime's output has shape {list(got.shape)}, PyTorch's {list(ref.shape)}")
    scale = float(np.abs(ref).max()) or 1.0
    err = float(np.abs(got - ref).max()) / scale
    if not err <= RTOL:
        raise ExportError(f"{what}: ONNX Runtime's outputs differ from PyTorch's by {err:.2e} of the largest "
                          f"(allowed {RTOL:g})")
    return err


# ------------------------------------------------------------------ API --
@torch.no_grad()
def export_onnx(model: nn.Module, example: torch.Tensor, path: str, form: str = "cast",
                config: dict | None = None) -> dict:
    """Export ``model`` (quantizers attached) to the ONNX file ``path`` with
    integer weights, after checking it (module docstring); nothing is written
    when a check fails.  ``example``: an input batch (its batch dimension is
    dynamic in the file).  ``config``: the trainer's config, kept in the file
    (what the model is).  The file also records PyTorch's output on a probe
    input of the example's shape, for :func:`check_onnx`.  Returns a
    summary: path, bytes, per-layer bits and types, the output error."""
    _require()
    if form not in FORMS:
        raise ExportError(f"unknown ONNX form {form!r} (choose one of: {', '.join(FORMS)})")
    if os.path.isdir(path):
        raise ExportError(f"{path} is a directory; give the .onnx file to write")
    import onnx

    was_training = model.training
    model.eval()
    try:
        x = example.detach().cpu()
        proto, w_hats, layers = _build(model, x, form, config)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"onnx.checker: {_one_line(e)}") from None
        _integers_present(proto, layers)
        data = proto.SerializeToString()
        _check_weights_bitwise(proto, w_hats, x)
        with parametrize.cached():
            ref = model(x)
        err = _compare(_run(_session(data), x), ref, "the export")
    finally:
        model.train(was_training)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, data)
    return {"path": path, "bytes": len(data), "form": form, "layers": layers, "max_rel_error": err}


def export_checkpoint_onnx(checkpoint: str, path: str, form: str = "cast") -> dict:
    """Export a trainer checkpoint: its model, its config and the models'
    example input (batch 1, dynamic in the file)."""
    _require()
    try:
        model, config, _ = load_model(checkpoint)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    return export_onnx(model, example_input(int(config.get("img_size", 32))), path, form=form, config=config)


@torch.no_grad()
def check_onnx(path: str) -> dict:
    """Check an ONNX file made by :func:`export_onnx`: ``onnx.checker``
    (full_check), every quantized weight stored as INT4/INT8, ONNX Runtime
    rebuilding each ŵ from the file's integers bit for bit as the quantizer's
    formula does, and its outputs on the probe input matching those PyTorch
    gave at export (recorded in the file).  Returns a description; raises
    ExportError."""
    _require()
    import onnx

    if not os.path.isfile(path):
        raise ExportError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(path)
    except Exception as e:  # noqa: BLE001 -- a truncated or foreign file
        raise ExportError(f"cannot read {path} as an ONNX model: {_one_line(e)}") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("codeq.format") != ONNX_FORMAT:
        raise ExportError(f"{path} was not made by codeq's ONNX export (no codeq.format metadata)")
    layers = json.loads(meta["codeq.layers"])
    _integers_present(proto, layers)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"onnx.checker: {_one_line(e)}") from None
    x, ref = _recorded(proto)
    _check_weights_bitwise(proto, _weights_from_file(proto, layers), x)
    err = _compare(_run(_session(proto.SerializeToString()), x), ref, path)
    return {"path": path, "bytes": os.path.getsize(path), "layers": layers, "form": meta.get("codeq.form"),
            "max_rel_error": err}


def _weights_from_file(proto, layers: dict) -> dict:
    """{key: ŵ} from the file's integers and scalars by the quantizer's formula, in PyTorch."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    out = {}
    for key, info in layers.items():
        q = torch.from_numpy(numpy_helper.to_array(inits[f"{key}.q"]).astype(np.int8))
        s = torch.from_numpy(numpy_helper.to_array(inits[f"{key}.scale"]).astype(np.float32))
        d = torch.from_numpy(numpy_helper.to_array(inits[f"{key}.delta"]).astype(np.float32)) \
            if f"{key}.delta" in inits else torch.zeros((), dtype=torch.float32)
        out[key] = dequantize(info["encoding"], q, s, d, torch.float32)
    return out


def format_summary(info: dict) -> str:
    """A few lines on an ONNX export: where, how big, the integer types, the check against PyTorch."""
    types = {}
    for layer in info["layers"].values():
        types[layer["type"]] = types.get(layer["type"], 0) + 1
    kinds = ", ".join(f"{n} as {t}" for t, n in sorted(types.items()))
    return (f"exported {len(info['layers'])} quantized weight(s) ({kinds}) to {info['path']}: {info['bytes']} bytes\n"
            f"  ONNX Runtime (CPU) rebuilds every weight bit for bit; outputs within {info['max_rel_error']:.1e} "
            f"of PyTorch's largest")
