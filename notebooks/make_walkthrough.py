"""Writes walkthrough.ipynb (outputs empty). Edit the cells here, then: python notebooks/make_walkthrough.py"""
from pathlib import Path

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md("# newslora walkthrough\n\nFrom labelled news texts to a budgeted LoRA classifier, a merged model and a "
       "Kaggle submission — with the same library the `newslora` CLI uses. Every step calls `newslora`'s Python "
       "API; nothing here re-implements it.\n\n**Settings.** Paths are in the next cell. Offline (the default) "
       "uses the AG News files in `../shared` and the MiniLM packaged on PyPI. Online, set `DATA = \"ag_news\"`, "
       "`TEST = None` and `BACKBONE = \"roberta-base\"` to use the hub. `NEWSLORA_NB_TINY=1` (used by CI) shrinks "
       "every run to a few steps."),
    code('import os\nimport shutil\nfrom pathlib import Path\n\n'
         'ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()\n'
         'DATA = str(ROOT.parent / "shared/data/ag_news/train_sample.csv")   # or "ag_news" (hub)\n'
         'TEST = str(ROOT.parent / "shared/data/ag_news/test.csv")           # or None with the hub\n'
         'BACKBONE = "minilm"                                                  # or "roberta-base" (hub)\n'
         'RUNS = Path(os.environ.get("NEWSLORA_NB_RUNS", ROOT / "runs" / "walkthrough"))\n'
         'shutil.rmtree(RUNS, ignore_errors=True)  # this notebook\'s runs start fresh each time\n'
         'TINY = os.environ.get("NEWSLORA_NB_TINY") == "1"\n'
         'STEPS, ROWS = (8, 400) if TINY else (150, 4000)\n'
         'if TINY and TEST:  # CI: a 300-row slice of the test file keeps the whole notebook to a minute or two\n'
         '    import pandas as pd\n'
         '    RUNS.mkdir(parents=True)\n'
         '    pd.read_csv(TEST, header=None).sample(300, random_state=0).to_csv(RUNS / "test300.csv", header=False, index=False)\n'
         '    TEST = str(RUNS / "test300.csv")\n'
         'os.environ.setdefault("HF_HUB_OFFLINE", "1")\nprint(ROOT, "tiny" if TINY else "full")'),
    md("## 1. The data\n\n`load_splits` reads the file (CSV/TSV/JSONL/parquet, or the classic AG News CSV), "
       "maps labels to ids, and carves a **stratified validation split** from train. The test split is kept aside: "
       "it never takes part in training or model selection."),
    code('import matplotlib.pyplot as plt\nfrom newslora.config import load_recipe\nfrom newslora.data import load_splits\n\n'
         'base = [f"model.backbone={BACKBONE}", f"data.source={DATA}", f"data.test={TEST or \'null\'}", "model.max_length=64",\n'
         '        f"data.max_train_samples={ROWS}", "data.validation_size=300",\n'
         '        "train.eval_batch_size=256"]\n'
         'splits = load_splits(load_recipe(None, base).data)\n'
         'print({k: len(v) for k, v in [("train", splits.train), ("validation", splits.validation), ("test", splits.test)]})\n'
         'fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))\n'
         'splits.train["label"].map(dict(enumerate(splits.label_names))).value_counts().sort_index().plot.bar(ax=ax[0], title="class balance (train)")\n'
         'splits.train["text"].str.split().str.len().plot.hist(bins=40, ax=ax[1], title="words per text (train)")\n'
         'ax[1].set_xlabel("words"); plt.tight_layout(); plt.show()'),
    md("## 2. The budget, before anything trains\n\nThe hard limit is 1,000,000 trainable parameters, "
       "classification head included. `budget_report` counts a recipe exactly on PyTorch's meta device — no "
       "weights are read. Here: three roberta-base recipes from `configs/` (the architecture config ships in "
       "`../shared`, so this works offline)."),
    code('import pandas as pd\nfrom newslora.budget import budget_report\n\n'
         'roberta = str(ROOT.parent / "shared/models/roberta-base")\n'
         'rows = []\nfor cfg in ["seed-001-lora-r4.yaml", "seed-004-lora-r6-qkv.yaml", "seed-000-adalora.yaml"]:\n'
         '    r = budget_report(ROOT / "configs" / cfg, [f"model.backbone={roberta}"]).to_json()\n'
         '    rows.append({"recipe": cfg, "method": r["method"], "trainable": r["trainable"], "head": r["head"],\n'
         '                 "adapter": r["adapter"], "fits 1M": r["fits"]})\npd.DataFrame(rows)'),
    md("## 3. Train a LoRA run and an AdaLoRA run\n\nSame data, same steps, same seed. Each run is one folder: "
       "recipe, metrics, plots, adapter, evaluation. AdaLoRA re-allocates rank during training (its callback is "
       "wired in for you)."),
    code('from newslora.train import train\n\ncommon = base + [f"train.max_steps={STEPS}", "train.batch_size=32", '
         '"train.lr=1e-3", f"train.eval_steps={max(STEPS // 3, 2)}", "train.logging_steps=5"]\n'
         'lora = train(load_recipe(None, common + ["name=lora", "lora.r=8"]), run_dir=RUNS / "lora")\n'
         'ada = train(load_recipe(None, common + ["name=adalora", "method=adalora", "adalora.init_r=8", '
         '"adalora.target_r=4", "adalora.deltaT=2"]), run_dir=RUNS / "adalora")\n'
         'for r in (lora, ada):\n    print(r.run_dir.name, "validation", round(r.eval["validation"]["accuracy"], 4), '
         '"test", round(r.eval["test"]["accuracy"], 4), "trainable", f"{r.trainable.total:,}")'),
    md("## 4. Look at the runs\n\nThe plots are written into each run folder (`plots/`) at the end of training."),
    code('from IPython.display import Image, display\n\nfor name in ["loss.png", "accuracy.png", "confusion_test.png"]:\n'
         '    display(Image(filename=str(lora.run_dir / "plots" / name), width=560))\n'
         'if (ada.run_dir / "plots" / "adalora_ranks.png").exists():\n'
         '    display(Image(filename=str(ada.run_dir / "plots" / "adalora_ranks.png"), width=560))'),
    md("## 5. Evaluate on the test set\n\n`evaluate` works on any saved run or merged model and any labelled file."),
    code('from newslora.evaluate import evaluate\n\nm = evaluate(lora.run_dir, TEST) if TEST else lora.eval["test"]\n'
         'print(f"accuracy {m[\'accuracy\']:.4f}  macro-F1 {m[\'macro_f1\']:.4f}  (n={m[\'n\']})")\n'
         'pd.DataFrame(m["per_class"]).T'),
    md("## 6. Export: merge the adapter into the backbone\n\n`export` runs `merge_and_unload`, checks the merged "
       "model predicts like the adapter model, and saves a standalone model (safetensors), tokenizer and model card."),
    code('from newslora.export import export\n\nmerged = export(lora.run_dir)\nsorted(p.name for p in merged.iterdir())'),
    md("## 7. Predict a file in the Kaggle format, and classify your own headlines"),
    code('from newslora.predict import load_classifier, predict\n\n'
         'sub = predict(merged, TEST or DATA, RUNS / "submission.csv")\npd.read_csv(sub).head()'),
    code('clf = load_classifier(merged)\nheadlines = ["Shares slide as the central bank raises rates",\n'
         '             "Striker scores twice in the cup final",\n'
         '             "New smartphone chip promises longer battery life"]\n'
         'for text, r in zip(headlines, clf.classify(headlines)):\n'
         '    print(f"{r[\'label\']:<9} {r[\'score\']:.2f}  {text}")'),
    md("## 8. Compare the runs\n\n`compare_runs` writes one table (Markdown, HTML with plots, xlsx) sorted by "
       "validation accuracy — the same as `newslora report`."),
    code('from IPython.display import Markdown\nfrom newslora.report import compare_runs\n\n'
         'files = compare_runs([lora.run_dir, ada.run_dir], RUNS / "report")\nMarkdown(files["md"].read_text())'),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                               "language": "python"}})
nbf.write(nb, Path(__file__).with_name("walkthrough.ipynb"))
