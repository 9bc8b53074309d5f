"""The ONNX runtime side: an exported folder (``model.onnx`` + config + tokenizer + ``newslora.json``) run with
onnxruntime on the CPU. :mod:`newslora.export_onnx` writes such folders; :mod:`newslora.predict` loads them here."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import NewsloraError

ONNX_FILE = "model.onnx"


def is_onnx_folder(path: str | Path) -> bool:
    return (Path(path) / ONNX_FILE).is_file()


class OnnxModel:
    """An onnxruntime session over ``model.onnx``: ``logits({"input_ids": ..., "attention_mask": ...})``."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.inter_op_num_threads = 1
        # no busy-waiting between ops: on a few shared cores the spin steals CPU from tokenization and the server
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.num_labels = int(self.session.get_outputs()[0].shape[-1])

    def logits(self, batch: dict) -> np.ndarray:
        feed = {k: np.asarray(batch[k], dtype=np.int64) for k in self.input_names}
        return self.session.run(None, feed)[0].astype(np.float32, copy=False)


def load_onnx(path: str | Path, threads: int | None = None):
    """(OnnxModel, tokenizer, label_names, max_length) from an ONNX folder."""
    from transformers import AutoConfig, AutoTokenizer

    from .run import model_max_length, read_model_meta

    path = Path(path)
    if not is_onnx_folder(path):
        raise NewsloraError(f"{path} has no {ONNX_FILE}: export one with newslora export RUN --onnx")
    try:
        config = AutoConfig.from_pretrained(path)
        model = OnnxModel(path / ONNX_FILE, threads)
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # onnxruntime and transformers raise many kinds for a damaged or partial folder
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise NewsloraError(f"cannot load the ONNX model in {path}: {first}; the folder is damaged or incomplete: "
                            "export it again with newslora export RUN --onnx") from None
    meta = read_model_meta(path)
    names = [config.id2label[i] for i in range(config.num_labels)]
    if model.num_labels != len(names):
        raise NewsloraError(f"{path}: {ONNX_FILE} has {model.num_labels} outputs but config.json has {len(names)} "
                            "labels; export the folder again")
    return model, tok, names, model_max_length(path)
