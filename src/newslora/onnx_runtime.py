"""The ONNX runtime side: an exported folder (``model.onnx`` + config + tokenizer + ``newslora.json``) run with
onnxruntime on the CPU. :mod:`newslora.export_onnx` writes such folders; :mod:`newslora.predict` loads them here."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import NewsloraError, first_line
from .modelfolder import ONNX_FILE, ModelFolder


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


def load_onnx(folder: ModelFolder, threads: int | None = None):
    """(OnnxModel, tokenizer) of an ONNX folder described by :func:`newslora.modelfolder.describe`."""
    from transformers import AutoTokenizer

    path = folder.path
    try:
        model = OnnxModel(path / ONNX_FILE, threads)
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # onnxruntime and transformers raise many kinds for a damaged or partial folder
        raise NewsloraError(f"cannot load the ONNX model in {path}: {first_line(e)}; the folder is damaged or "
                            "incomplete: export it again with newslora export RUN --onnx") from None
    if model.num_labels != len(folder.label_names):
        raise NewsloraError(f"{path}: {ONNX_FILE} has {model.num_labels} outputs but config.json has "
                            f"{len(folder.label_names)} labels; export the folder again")
    return model, tok
