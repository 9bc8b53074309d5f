"""ONNX export and runtime: a merged model as ``model.onnx`` (fp32, or int8 weights) next to its tokenizer.

BERT-shaped encoders (BERT, MiniLM, RoBERTa) are exported by the TorchScript exporter with eager attention and fused
by onnxruntime's transformer optimizer (one Attention kernel per layer); other models, or a graph that does not fully
fuse, by ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript), the exporter that supports
transformers 5.x (optimum-onnx pins transformers<4.58), and onnxruntime's dynamic quantization for int8. The
exported graph is checked against the PyTorch model on a fixed sample (same argmax, max logit difference within a
tolerance) before the folder is kept; the check is written to ``newslora.json`` and the folder's README card.

An ONNX folder holds ``model.onnx``, ``config.json`` (labels), the tokenizer and ``newslora.json`` (max_length,
precision, check); ``load_classifier`` runs it with onnxruntime when it finds ``model.onnx``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import NewsloraError, first_line
from .modelfolder import MODEL_META, ONNX_FILE, describe, is_adapter_folder, is_onnx_folder, write_meta
from .onnx_runtime import OnnxModel

# int8 weights move logits by a few hundredths on trained models; the argmax must still agree on the sample
ATOL = {"fp32": 1e-3, "int8": 0.5}


def is_onnx_export(path: Path) -> bool:
    """A folder written by :func:`export_onnx` (``model.onnx`` beside its ``newslora.json``)."""
    return is_onnx_folder(path) and (path / MODEL_META).is_file()


# model types whose graph onnxruntime's transformer optimizer fuses (its "bert" pattern set: BERT, MiniLM, RoBERTa):
# each attention block becomes one Attention kernel (QAttention once quantized) instead of ~20 small ops, and the
# residual adds, layer norms and GELUs fuse too (bench/RESULTS.md, ONNX: the int8 samples/s it buys)
FUSABLE = {"bert", "roberta"}


def _logits_module(model):
    """``model`` as a module whose one output is its logits (no ModelOutput dataclass in the graph)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    return Logits(model).eval()


def _example(model):
    import torch

    example = (torch.tensor([[0, 31414, 232, 2], [0, 31414, 2, 1]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    return tuple(x.clamp(max=model.config.vocab_size - 1) for x in example)


def _torch_export(model, path: Path, opset: int) -> None:
    import torch

    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("sequence", min=2, max=4096)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(_logits_module(model), _example(model), dynamo=True, opset_version=opset,
                                    input_names=["input_ids", "attention_mask"], output_names=["logits"],
                                    dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                    "attention_mask": {0: batch, 1: seq}},
                                    optimize=True, verbose=False)
    program.save(str(path), external_data=False)


def _fused_export(model, path: Path, opset: int) -> bool:
    """Export ``model`` (a BERT-shaped encoder) with eager attention through the TorchScript exporter, whose graph
    onnxruntime's transformer optimizer recognises, and fuse it. True if every attention block fused; False (and
    nothing written) otherwise, for the plain export to take over."""
    import warnings

    import torch
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = model.config
    before = cfg._attn_implementation
    raw = path.with_name(path.name + ".unfused")
    try:
        model.set_attn_implementation("eager")  # the attention pattern the optimizer fuses
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(_logits_module(model), _example(model), str(raw), dynamo=False,
                              opset_version=min(opset, 17), input_names=["input_ids", "attention_mask"],
                              output_names=["logits"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                            "attention_mask": {0: "batch", 1: "sequence"}})
        fused = optimize_model(str(raw), model_type="bert", num_heads=cfg.num_attention_heads,
                               hidden_size=cfg.hidden_size, opt_level=0)  # fusions only: the session optimizes the rest
        if fused.get_fused_operator_statistics().get("Attention", 0) != cfg.num_hidden_layers:
            return False
        fused.save_model_to_file(str(path))
        return True
    finally:
        model.set_attn_implementation(before)
        raw.unlink(missing_ok=True)


def _export_graph(model, path: Path, opset: int) -> str:
    """Write the fp32 graph of ``model`` to ``path``; what wrote it, in words (for newslora.json and the card)."""
    import torch

    if model.config.model_type in FUSABLE:
        try:
            if _fused_export(model, path, opset):
                return (f"torch.onnx.export (TorchScript) torch {torch.__version__}, opset {min(opset, 17)}, "
                        "fused by onnxruntime's transformer optimizer (Attention, SkipLayerNormalization, BiasGelu)")
        except Exception:  # a graph the optimizer can't handle: the plain export below still serves
            path.unlink(missing_ok=True)
    _torch_export(model, path, opset)
    return f"torch.onnx.export(dynamo=True) torch {torch.__version__}, opset {opset}"


def _quantize_int8(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # per-channel int8 weights of MatMul/Gemm and of fused Attention (QAttention); activations quantized on the fly;
    # embeddings stay fp32. Shape inference can't type the outputs of fused (com.microsoft) ops: they are float.
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gemm", "Attention"],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def check_against_torch(model, tokenizer, onnx_path: Path, max_length: int, texts: list[str]) -> dict:
    """Logits of the PyTorch model and the ONNX graph on ``texts``: argmax agreement and max abs difference."""
    from .predict import batched_logits

    ref = batched_logits(model, tokenizer, texts, max_length)
    got = batched_logits(OnnxModel(onnx_path), tokenizer, texts, max_length)
    agree = int((ref.argmax(-1) == got.argmax(-1)).sum())
    return {"n": len(texts), "same_argmax": agree, "max_logit_diff": float(np.abs(ref - got).max())}


def export_onnx(source: str | Path, output: str | Path | None = None, int8: bool = False,
                atol: float | None = None, opset: int = 18, check_texts: list[str] | None = None,
                overwrite: bool = False) -> Path:
    """Export ``source`` (a run folder, merged first with :func:`newslora.export.export`, or a merged model folder)
    to ONNX in ``output`` (default ``RUN/onnx`` or ``RUN/onnx-int8``). Kept only if the graph's argmax equals the
    PyTorch model's on the check sample and the logits agree within ``atol`` (fp32 1e-3, int8 0.5)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .export import CHECK_TEXTS, export
    from .outputs import build_folder, check_output_folder
    from .predict import refuse_non_finite
    from .run import Run

    source = Path(source)
    if Run.is_run(source):
        run = Run.open(source, need="adapter")  # an unfinished run: one line saying how to continue it
        merged = run.merged_dir
        if not (merged / "config.json").is_file():
            merged = export(source)
    elif (source / "config.json").is_file() and (source / "model.safetensors").is_file():
        run, merged = None, source
    elif is_adapter_folder(source):  # a plain PEFT adapter: merged first (ADAPTER/merged), then exported
        run, merged = None, source / Run.MERGED
        if not (merged / "config.json").is_file():
            merged = export(source)
    else:
        raise NewsloraError(f"{source} is neither a finished run folder (recipe.yaml + adapter/) nor a merged model "
                            "folder (config.json + model.safetensors)")
    precision = "int8" if int8 else "fp32"
    atol = ATOL[precision] if atol is None else atol
    if output:
        target = Path(output)
    else:
        target = run.onnx_dir(int8) if run else merged.parent / (Run.ONNX_INT8 if int8 else Run.ONNX)
    check_output_folder(target, is_onnx_export, "ONNX model (newslora export --onnx)", overwrite,
                        protect=[p for p in (run.path if run else None, merged) if p is not None])
    described = describe(merged, runtime="torch")
    max_length = described.max_length
    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    refuse_non_finite(model, merged)
    tok = AutoTokenizer.from_pretrained(merged)

    with build_folder(target) as tmp:
        fp32 = tmp / ("model.fp32.onnx" if int8 else ONNX_FILE)
        try:
            exporter = _export_graph(model, fp32, opset)
            if int8:
                _quantize_int8(fp32, tmp / ONNX_FILE)
                fp32.unlink()
        except Exception as e:  # the exporter's errors (an unsupported operator, a model torch.export can't trace)
            raise NewsloraError(f"ONNX export of {merged} failed: {first_line(e)}; the merged folder still works with "
                                "--runtime torch") from None
        texts = list(check_texts or CHECK_TEXTS)
        check = {**check_against_torch(model, tok, tmp / ONNX_FILE, max_length, texts), "atol": atol}
        if check["same_argmax"] != check["n"] or check["max_logit_diff"] > atol:
            raise NewsloraError(f"the {precision} ONNX graph differs from the PyTorch model (same argmax on "
                                f"{check['same_argmax']}/{check['n']} check texts, max logit diff "
                                f"{check['max_logit_diff']:.2e}, tolerance {atol}); not exported")
        model.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        import onnxruntime

        info = {"runtime": "onnx", "precision": precision,
                "source": os.path.relpath(merged.resolve(), target.resolve()),
                "exporter": exporter,
                "onnxruntime": onnxruntime.__version__, "check": check}
        if run is not None:
            info["run"] = os.path.relpath(run.path.resolve(), target.resolve())
        write_meta(tmp, described, **info)
        _write_card(tmp, target.name, merged, info)
    return target


def _write_card(folder: Path, name: str, merged: Path, info: dict) -> None:
    """The merged model's card (or the run's) with a section on the ONNX export and its check."""
    card = ""
    if (merged / "README.md").is_file():
        card = (merged / "README.md").read_text()
    c = info["check"]
    card += (f"\n\n## ONNX export ({info['precision']})\n\n"
             f"`{ONNX_FILE}`: {info['exporter']}"
             + (", weights quantized to int8 by onnxruntime's `quantize_dynamic` (per channel, MatMul/Gemm/Attention)"
                if info["precision"] == "int8" else "") + ". "
             f"Checked against the PyTorch model on {c['n']} texts: same argmax on {c['same_argmax']}/{c['n']}, "
             f"max logit difference {c['max_logit_diff']:.2e} (tolerance {c['atol']}).\n\n"
             f"```bash\nnewslora classify {name} \"Stocks rally as oil prices fall.\"   "
             "# onnxruntime, chosen by model.onnx; --runtime torch needs the merged folder\n```\n")
    (folder / "README.md").write_text(card.lstrip())
