"""Writes colab.ipynb (outputs empty), the notebook for a GPU host (Colab, Kaggle). Edit the cells here, then:
python notebooks/make_colab.py"""
from pathlib import Path

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md("# newslora on a GPU host (Colab, Kaggle)\n\nA seed recipe the way its author ran it: `roberta-base` and "
       "`ag_news` from the Hugging Face hub, trained on a GPU in the precision the seed asks for, then a "
       "submission for the competition's pickled test set. Every step calls newslora's Python API or CLI.\n\n"
       "**Settings** are in the next cell: `RECIPE` (any `configs/seed-*.yaml`), `REPO_URL` (where to clone "
       "newslora from when this notebook is opened on its own), `TEST_PKL` (the competition's pickled `Dataset`; "
       "without it the hub's AG News test texts stand in). `NEWSLORA_NB_TINY=1` (used by CI) shrinks the run to a "
       "few steps."),
    code('import importlib.util\nimport os\nimport subprocess\nimport sys\nfrom pathlib import Path\n\n'
         'RECIPE = "seed-002-lora-r10.yaml"   # seed 002: LoRA r=10, alpha 64, fp16\n'
         'REPO_URL = os.environ.get("NEWSLORA_REPO_URL", "https://github.com/<owner>/newslora.git")  # your clone\n'
         'TEST_PKL = os.environ.get("NEWSLORA_TEST_PKL")  # e.g. /kaggle/input/<competition>/test_unlabelled.pkl\n'
         'TINY = os.environ.get("NEWSLORA_NB_TINY") == "1"\n'
         'RUNS = Path(os.environ.get("NEWSLORA_NB_RUNS", "runs/colab")).resolve()\n'
         'ROOT = next((p for p in (Path.cwd(), Path.cwd().parent) if (p / "configs" / RECIPE).is_file()), None)\n'
         'print("tiny" if TINY else "full", RECIPE, RUNS)'),
    md("## 1. Install\n\nInside a clone of the repository, or where newslora already imports, nothing is "
       "installed. Opened on its own (Colab, Kaggle), the repository is cloned and `pip install`ed (a minute)."),
    code('if ROOT is None:  # the notebook alone: fetch the repository (its configs/ hold the seed recipes)\n'
         '    subprocess.run(["git", "clone", "-q", "--depth", "1", REPO_URL, "newslora"], check=True)\n'
         '    ROOT = Path("newslora").resolve()\n'
         'if importlib.util.find_spec("newslora") is None:\n'
         '    subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(ROOT)], check=True)\n'
         'import newslora\nfrom newslora.config import load_recipe\n\n'
         'CONFIG = ROOT / "configs" / RECIPE\nprint("newslora from", Path(newslora.__file__).parent)'),
    md("## 2. The GPU, and the precision the seed asks for\n\nSeeds 000 and 002 train in fp16, which needs a "
       "CUDA GPU (Colab: Runtime → Change runtime type → GPU; Kaggle: Settings → Accelerator). Without one the "
       "same recipe runs in fp32 through the override `train.precision=fp32`."),
    code('import torch\n\nOVERRIDES = []\nasked = load_recipe(CONFIG).train.precision\n'
         'if torch.cuda.is_available():\n'
         '    print(f"GPU: {torch.cuda.get_device_name(0)}; the seed asks for {asked}")\n'
         'else:\n'
         '    print(f"no GPU: the seed asks for {asked}; running in fp32 instead (train.precision=fp32)")\n'
         '    OVERRIDES.append("train.precision=fp32")\n'
         'if TINY:  # CI: a few steps on short texts\n'
         '    OVERRIDES += ["model.max_length=48", "data.validation_size=40", "train.max_steps=4", "train.epochs=1",\n'
         '                  "train.batch_size=16", "train.eval_batch_size=64", "train.eval_steps=2",\n'
         '                  "train.logging_steps=1", "train.grad_accum=1", "train.lr=3e-3"]\n'
         'OVERRIDES'),
    md("## 3. The budget table\n\nEvery seed recipe counted exactly on the meta device (no weights read): "
       "trainable parameters, head and adapter, and whether it fits the 1,000,000 budget. On roberta-base the "
       "seeds' printed counts come out: 888,580 for seed 003's student, 925,444 for seed 004."),
    code('import pandas as pd\nfrom newslora.budget import budget_report\n\nrows = []\n'
         'for cfg in sorted((ROOT / "configs").glob("seed-*.yaml")):\n'
         '    if "space" in cfg.name:\n        continue\n'
         '    try:\n        r = budget_report(cfg).to_json()\n'
         '    except newslora.NewsloraError as e:  # a recipe this backbone cannot take (CI: 2 layers, lora.layers)\n'
         '        rows.append({"recipe": cfg.name, "note": str(e)})\n        continue\n'
         '    row = {"recipe": cfg.name, "method": r["method"], "trainable": r["trainable"], "head": r["head"],\n'
         '           "adapter": r["adapter"], "fits 1M": r["fits"]}\n'
         '    if r.get("trainable_share") is not None:  # the share of all parameters, where the count gives it\n'
         '        row["share"] = f"{r[\'trainable_share\']:.2%}"\n'
         '    rows.append(row)\npd.DataFrame(rows)'),
    md("## 4. Train the seed recipe\n\n`roberta-base` (the hub's `FacebookAI/roberta-base`) and `ag_news` "
       "(`fancyzhx/ag_news`) come from the hub, or from its cache when offline."),
    code('from newslora.train import train\n\n'
         'result = train(load_recipe(CONFIG, OVERRIDES), run_dir=RUNS / CONFIG.stem)\nRUN = result.run_dir\n'
         'print("validation", round(result.eval["validation"]["accuracy"], 4), "test",\n'
         '      round(result.eval["test"]["accuracy"], 4), "trainable", f"{result.trainable.total:,}")'),
    md("## 5. Plots\n\nLoss against epochs (training and validation), loss and accuracy per step, and the test "
       "confusion matrix, as written into the run's `plots/`."),
    code('from IPython.display import Image, display\n\n'
         'for name in ["loss_epochs.png", "loss.png", "accuracy.png", "confusion_test.png"]:\n'
         '    if (RUN / "plots" / name).is_file():\n'
         '        display(Image(filename=str(RUN / "plots" / name), width=560))'),
    md("## 6. A submission for the competition's pickled test set\n\nThe competition ships its test texts as a "
       "pickled `datasets.Dataset`. Unpickling runs code from the file, so `newslora predict` reads it only with "
       "`--trust-pickle`. Without `TEST_PKL`, the hub's AG News test texts are pickled the same way."),
    code('import pickle\n\nimport datasets\n\nif TEST_PKL is None:\n'
         '    texts = datasets.load_dataset("fancyzhx/ag_news", split="test").remove_columns("label")\n'
         '    TEST_PKL = RUNS / "test_unlabelled.pkl"\n'
         '    TEST_PKL.write_bytes(pickle.dumps(texts))\n'
         'cmd = [sys.executable, "-m", "newslora", "predict", str(RUN), "--input", str(TEST_PKL),\n'
         '       "--output", str(RUNS / "submission.csv"), "--trust-pickle", "--overwrite"]\n'
         'print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)\n'
         'pd.read_csv(RUNS / "submission.csv").head()'),
    md("## 7. Classify your own headlines\n\n`newslora export RUN` merges the adapter into a standalone model "
       "(seed 000's last step); `load_classifier` reads a run folder or that merged model."),
    code('from newslora import load_classifier\n\nclf = load_classifier(RUN)\n'
         'headlines = ["Shares slide as the central bank raises rates", "Striker scores twice in the cup final",\n'
         '             "New smartphone chip promises longer battery life"]\n'
         'for text, r in zip(headlines, clf.classify(headlines)):\n'
         '    print(f"{r[\'label\']:<9} {r[\'score\']:.2f}  {text}")'),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                               "language": "python"},
                                                "accelerator": "GPU", "colab": {"provenance": []}})
nbf.write(nb, Path(__file__).with_name("colab.ipynb"))
