"""Serve stage: a small FastAPI app over a loaded classifier (``newslora serve MODEL``)."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

MAX_TEXTS = 1024


class ClassifyRequest(BaseModel):
    texts: list[str] = Field(..., min_length=1, max_length=MAX_TEXTS, description="texts to classify")


def create_app(model_path: str | Path, classifier=None) -> FastAPI:
    """The app: ``GET /health``, ``GET /labels``, ``POST /classify {"texts": [...]}``."""
    from .predict import load_classifier

    clf = classifier or load_classifier(model_path)
    app = FastAPI(title="newslora", description=f"news topic classifier from {model_path}")

    @app.get("/health")
    def health():
        return {"status": "ok", "model": str(model_path)}

    @app.get("/labels")
    def labels():
        return {"labels": clf.label_names}

    @app.post("/classify")
    def classify(req: ClassifyRequest):
        empty = [i for i, t in enumerate(req.texts) if not t.strip()]
        if empty:
            raise HTTPException(422, f"texts[{empty[0]}] is empty")
        return {"results": clf.classify(req.texts)}

    return app
