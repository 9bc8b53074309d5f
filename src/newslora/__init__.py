"""newslora: fine-tune encoders into news-topic classifiers with LoRA & friends under a parameter budget.

Pipeline, one module per stage: config -> data -> model (backbone + adapter + budget) -> train -> evaluate
-> export -> predict / serve; report draws the pictures. The CLI (newslora.cli) is a thin layer over these:
``newslora.train.train``, ``newslora.evaluate.evaluate``, ``newslora.export.export``, ``newslora.predict.predict``.
"""
__version__ = "0.1.0"

from .errors import NewsloraError  # noqa: E402


def __getattr__(name):  # lazy: `import newslora` stays fast, torch loads on first use
    if name in ("load_classifier", "Classifier"):
        from . import predict

        return getattr(predict, name)
    if name == "load_recipe":
        from .config import load_recipe

        return load_recipe
    raise AttributeError(name)


__all__ = ["NewsloraError", "load_classifier", "Classifier", "load_recipe"]
