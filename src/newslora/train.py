"""Training stage: one recipe -> one run folder, with the HF Trainer doing the loop.

``setup(recipe, run)`` validates everything that can fail cheaply (recipe, data, budget on the meta device)
before the run folder is created, so a bad input leaves nothing behind; it then builds what trains -- datasets,
model, callbacks, Trainer -- and returns it as a :class:`Setup`. ``fit(setup)`` trains, evaluates and writes the
run folder. ``train(recipe)`` is both. Distillation, search trials, benches and tests plug into ``setup``
(``callbacks``, ``hooks``, ``trainer_cls``) or use the returned :class:`Setup` (its Trainer) directly.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from transformers import EarlyStoppingCallback, ProgressCallback, TrainingArguments, set_seed

from . import distributed, methods, tracking
from .config import Recipe
from .class_weights import class_weights, weighted_loss
from .data import Splits, check_overlap, load_splits, tokenize
from .distill import Distiller
from .errors import NewsloraError, Terminated, first_line, sigterm_raises
from .evaluate import classification_metrics, summary
from .lock import lock_run_folder, unlock_run_folder
from .model import (Breakdown, apply_auto_fit, build_model, check_budget, check_max_length, check_quantization,
                    count_trainable, load_tokenizer)
from .run import Run
from .texts import text_record
# the training loop's parts, also importable from here: one module for a run's setup and its parts
from .trainer import (Collator, Heartbeat, MetricsFileCallback, NewsloraTrainer, ReadableProgress, TrainHook,  # noqa: F401
                      StopOnNonFinite, TrainTally, compile_settings, cpu_bf16_speedup, cpu_has_bf16,
                      cpu_precision_probe, device_name, optimizer_steps, planned_steps, precision_flags,
                      resolve_precision, tf32_matmuls, versions)

console = Console(stderr=True)


@dataclass
class RunResult:
    run_dir: Path
    eval: dict  # {"validation": {...}, "test": {...}}
    trainable: Breakdown | None  # None: a resume that found the run already completed


@dataclass
class Setup:
    """Everything ``fit`` trains, built by :func:`setup`; the run folder exists and holds recipe.yaml and run.json."""

    recipe: Recipe
    run: Run
    splits: Splits
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    test_dataset: Any  # None: the test split is not evaluated (search trials)
    model: Any
    breakdown: Breakdown
    trainer: Any
    callbacks: list
    total_steps: int
    precision: str
    resuming: bool
    info: dict  # run.json as written so far
    hooks: list = field(default_factory=list)


def print_breakdown(b: Breakdown, recipe: Recipe) -> None:
    t = Table(title=f"trainable parameters ({recipe.method})", show_header=True)
    t.add_column("group")
    t.add_column("params", justify="right")
    for mod, n in b.by_module.items():
        t.add_row(f"adapter: {mod}", f"{n:,}")
    t.add_row("classification head", f"{b.head:,}")
    t.add_row("[bold]total[/bold]", f"[bold]{b.total:,}[/bold]")
    if b.params:
        t.add_row("share of all parameters", f"{100 * b.total / b.params:.3f}% of {b.params:,}")
    t.add_row("budget", f"{b.budget:,} ({100 * b.total / b.budget:.1f}% used)")
    console.print(t)


def prepare(recipe: Recipe):
    """Cheap, complete validation before anything is written: quantization and precision support, data, tokenizer,
    the method's schedule, ``budget.auto_fit`` (sets the recipe's rank in place) and the budget (meta device).
    Returns (tokenizer, splits, breakdown)."""
    check_quantization(recipe.model.quantization)
    tracking.check(recipe.train)
    if recipe.train.precision != "auto":  # e.g. fp16 or tf32 asked for on a machine without the GPU for it
        resolve_precision(recipe.train.precision)
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.backbone)
    check_max_length(recipe)
    splits = load_splits(recipe.data)
    overlap = check_overlap(splits, recipe.data.drop_overlap)
    if overlap and distributed.is_main():
        said = ", ".join(f"{n:,} in {k}" for k, n in overlap.items() if k != "dropped" and n)
        console.print(Text(f"{overlap['dropped']:,} training rows also in a held-out split dropped ({said})"
                           if overlap["dropped"] else
                           f"warning: training rows also in a held-out split: {said}; held-out scores may be too "
                           "high (data.drop_overlap=true drops them)", style="yellow"), soft_wrap=True)
    methods.get(recipe.method).check_schedule(recipe, planned_steps(len(splits.train), recipe.train))
    fit = apply_auto_fit(recipe, splits.label_names)
    b = count_trainable(recipe, splits.label_names, fit=False)
    if fit is not None:
        b.fit = fit.to_dict()
        if distributed.is_main():
            console.print(fit.describe())
    check_budget(b, recipe)
    return tokenizer, splits, b


def open_resumable(resume: str | Path) -> Run:
    """An interrupted run folder that ``--resume`` can continue (its checkpoints pointed at where it is now)."""
    if not Run.is_run(resume):
        raise NewsloraError(f"--resume {resume}: not a run folder (no {Run.RECIPE})")
    lock_run_folder(resume, f"--resume {resume}")  # held until train() returns or the process ends
    run = Run.open(resume)
    if completed(run):
        raise NewsloraError(f"--resume {resume}: the run already completed; nothing to resume")
    if run.status() == "running":
        a = run.running_attempt()
        raise NewsloraError(f"--resume {resume}: the run is still training (pid {a.get('pid')} on {a.get('host')}); "
                            "wait for it, or stop it first (Ctrl-C or kill)")
    if not run.checkpoints():
        raise NewsloraError(f"--resume {resume}: no checkpoint saved yet; start the run again instead")
    procs, here = run.read_info().get("processes") or 1, distributed.world_size()
    if procs != here:  # the global batch, and so the data order and the step count, depend on it
        launch = f"torchrun --nproc_per_node {procs} -m newslora train" if procs > 1 else "newslora train"
        n = lambda k: f"{k} process{'es' if k != 1 else ''}"  # noqa: E731
        raise NewsloraError(f"--resume {resume}: the run trained on {n(procs)}, this launch has {n(here)}; "
                            f"resume it as it started: {launch} --resume {resume}")
    drop_unfinished_checkpoint(run)
    check_checkpoint(run.checkpoints()[-1], run.path)  # the one the Trainer resumes from
    run.rebase_checkpoints()  # the folder may have been moved or copied since it was interrupted
    return run


def drop_unfinished_checkpoint(run: Run) -> None:
    """A process killed while saving a checkpoint (kill -9, power loss) leaves its folder without
    ``trainer_state.json``, which the Trainer writes last; resume from the checkpoint before it instead. Only for a
    dead run with such an earlier checkpoint: anything else is left for :func:`check_checkpoint` to refuse."""
    ckpts = run.checkpoints()
    last = ckpts[-1]
    if (run.status() == "dead" and len(ckpts) > 1 and not (last / "trainer_state.json").exists()
            and (ckpts[-2] / "trainer_state.json").is_file()):
        console.print(f"{last.name} was being saved when the run died; resuming from {ckpts[-2].name}",
                      highlight=False)
        shutil.rmtree(last)


def completed(run: Run) -> bool:
    return run.status() == "completed" and run.is_finished()


def check_checkpoint(ckpt: Path, run_dir: Path) -> None:
    """Refuse to resume from a checkpoint whose files hold anything but tensors and plain data (a pickle that runs
    code), or are damaged, before anything in the run folder changes. Every ``.pt``/``.pth``/``.bin`` file is read
    as the Trainer and the AdaLoRA callback read it, ``torch.load(weights_only=True)``; ``training_args.bin``
    (pickled TrainingArguments) is skipped: resuming never loads it."""
    import json
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers.trainer_pt_utils import safe_globals

    fix = (f"delete {ckpt} to resume from the checkpoint before it, or start the run again")
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise NewsloraError(f"--resume {run_dir}: {ckpt / 'trainer_state.json'} is missing or damaged "
                            f"({type(e).__name__}); {fix}") from None
    for f in sorted(ckpt.iterdir()):
        try:
            if f.suffix in (".pt", ".pth", ".bin") and f.name != "training_args.bin":
                with safe_globals():
                    torch.load(f, map_location="cpu", weights_only=True)
            elif f.suffix == ".safetensors":
                load_file(str(f))
        except pickle.UnpicklingError:
            raise NewsloraError(f"--resume {run_dir}: {f} holds pickled objects beyond tensors (code could run when "
                                f"they load); refusing to load it: {fix}") from None
        except (RuntimeError, EOFError, OSError, ValueError, SafetensorError) as e:
            raise NewsloraError(f"--resume {run_dir}: {f} is damaged ({type(e).__name__}); {fix}") from None


def setup(recipe: Recipe | None = None, run: Run | str | Path | None = None, *, resume: str | Path | None = None,
          callbacks=(), hooks=(), trainer_cls: type | None = None, evaluate_test: bool = True) -> Setup:
    """Validate ``recipe``, create its run folder (``run``: a folder path or :class:`Run`; default
    ``runs/<name>``) and build what trains. ``resume``: continue an interrupted run folder with its own recipe.

    Launched on several processes (``torchrun``, ``accelerate launch``), every rank validates and builds the same
    things; rank 0 alone chooses (or, with ``resume``, checks) the run folder and writes it, the others get its path
    and a :class:`Run` that only reads.

    ``callbacks``: extra TrainerCallbacks. ``hooks``: :class:`~newslora.trainer.TrainHook` objects that may change
    the Trainer's class and arguments and the final result. ``trainer_cls``: the Trainer class (default
    :class:`NewsloraTrainer`). ``evaluate_test=False``: validation only (search trials never see the test split).
    """
    distributed.init()
    main = distributed.is_main()
    if resume is not None:  # rank 0 checks the folder (and may drop an unfinished checkpoint) before anyone reads it
        run = Run(distributed.share(lambda: open_resumable(resume).path), writes=main)
        recipe = run.read_recipe()
    recipe = recipe or Recipe()
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    set_seed(recipe.train.seed)
    tokenizer, splits, b = prepare(recipe)
    if not evaluate_test:
        splits.test = None
    if main:
        print_breakdown(b, recipe)
    if resume is None and isinstance(run, Run):
        run.writes = run.writes and main
    elif resume is None:  # rank 0 chooses the folder (runs/<name>-2 when taken) and tells the others
        where = run
        run = Run(distributed.share(lambda: Run.create(where, recipe.name).path), writes=main)
    hooks = list(hooks)
    if recipe.distill.teachers:  # teachers checked, their train outputs cached, before the run folder exists
        with distributed.local_main_first():
            hooks.append(Distiller(recipe, splits))
    run.mkdir()
    if main:  # a --resume of this folder from another process is refused while it trains
        lock_run_folder(run.path, str(run.path))
    try:
        if recipe.train.report_to:  # rank 0 starts the MLflow run (and opens its store) once the run folder exists
            distributed.on_main(lambda: hooks.append(tracking.Tracker(recipe, run, b, resuming=resume is not None)))
        distributed.barrier()  # the folder exists before any rank goes on
        return _build(recipe, run, tokenizer, splits, resume is not None, list(callbacks), hooks,
                      trainer_cls or NewsloraTrainer, b.fit)
    except BaseException:  # fit() never runs: end what setup started (the MLflow run, the folder's lock)
        for hook in hooks:
            hook.abort("failed")
        unlock_run_folder(run.path)
        raise


def choose_precision(choice: str, run: Run, resuming: bool) -> tuple[str, dict]:
    """The precision a run trains in, and what ``auto`` measured to choose it (for run.json). Decided once per run
    folder: a resumed ``auto`` run keeps the precision its first attempt recorded, where this machine can run it, so
    one run never trains partly in one precision and partly in another. Called on rank 0 only (shared)."""
    info = run.read_info() if resuming else {}
    if choice == "auto" and info.get("precision") in ("fp32", "tf32", "bf16", "fp16"):
        try:
            return resolve_precision(info["precision"]), {k: info[k] for k in ("cpu_bf16_speedup",) if k in info}
        except NewsloraError:  # e.g. a GPU run resumed on a CPU: decide again for this machine
            pass
    return resolve_precision(choice), cpu_precision_probe(choice)


def _build(recipe: Recipe, run: Run, tokenizer, splits: Splits, resuming: bool, callbacks: list, hooks: list,
           trainer_cls: type, fit: dict | None) -> Setup:
    t, method = recipe.train, methods.get(recipe.method)
    run.write_recipe(recipe)
    ml = recipe.model.max_length
    with distributed.local_main_first():  # one process per machine fills the tokenization cache, the others read it
        cut = recipe.model.truncation
        train_ds = tokenize(splits.train, tokenizer, ml, truncation=cut)
        val_ds = tokenize(splits.validation, tokenizer, ml, truncation=cut)
        test_ds = tokenize(splits.test, tokenizer, ml, truncation=cut) if splits.test is not None else None
    added = sum(h.added_train_rows for h in hooks)  # e.g. distillation's unlabelled texts
    total_steps = optimizer_steps(len(train_ds) + added, t)

    set_seed(t.seed)
    # budget.auto_fit was applied and the budget checked on the meta device (prepare): neither is repeated here
    model, b = build_model(recipe, splits.label_names, total_steps, run=run, resuming=resuming, fit=False,
                           check=False)
    b.fit = fit
    method.before_train(model, run, resuming)

    precision, probe = distributed.share(lambda: choose_precision(t.precision, run, resuming))
    info = {"name": recipe.name, "method": recipe.method, "backbone": recipe.model.backbone,
            "label_names": splits.label_names, "trainable": {"total": b.total, "head": b.head, "adapter": b.adapter,
                                                             "budget": b.budget},
            "target_modules": recipe.lora.target_modules, "rank": method.get_rank(recipe),
            "rows": {"train": len(train_ds), "validation": len(val_ds), "test": len(test_ds) if test_ds else 0,
                     **({"unlabelled": added} if added else {})},
            "overlap": splits.overlap, "optimizer_steps": total_steps, "auto_fit": b.fit, "device": device_name(),
            "versions": versions(),
            "precision": precision, **probe,
            "processes": distributed.world_size(), "train_runtime_s": None,
            "train_samples_per_second": None, "text": text_record(recipe),
            "class_weights": class_weights(splits.train["label"], len(splits.label_names), t.class_weights)}
    # the attempt (pid, host, heartbeat) is recorded before training starts; on resume the earlier attempts and the
    # training seconds they recorded are kept
    run.start_attempt(info, int(run.checkpoints()[-1].name.split("-")[1]) if resuming else 0)

    eval_strategy = "steps" if t.eval_steps else "epoch"
    args = TrainingArguments(
        output_dir=str(run.checkpoints_dir), learning_rate=t.lr, num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum, weight_decay=t.weight_decay,
        label_smoothing_factor=t.label_smoothing,
        warmup_steps=t.warmup if t.warmup < 1 else int(t.warmup), lr_scheduler_type=t.scheduler,
        # fused AdamW on CPU too: one kernel per step instead of ~8 per tensor (1.1 vs 5.7 ms per step for
        # roberta-base LoRA's trainable tensors on this project's CPU)
        optim="sgd" if t.optimizer == "sgd" else "adamw_torch_fused",
        eval_strategy=eval_strategy, eval_steps=t.eval_steps, save_strategy=eval_strategy, save_steps=t.eval_steps,
        # a method may train to the end of a schedule (AdaLoRA) instead of keeping the best validation checkpoint
        save_total_limit=t.save_total_limit, load_best_model_at_end=method.keeps_best_checkpoint,
        metric_for_best_model=f"eval_{t.metric}", greater_is_better=t.metric != "loss",
        logging_steps=t.logging_steps, logging_first_step=True, seed=t.seed, data_seed=t.seed,
        report_to=tracking.trainer_report_to(t.report_to),  # the Trainer's TensorBoard / MLflow callbacks
        train_sampling_strategy="group_by_length" if t.group_by_length else "random", length_column_name="length",
        remove_unused_columns=False, torch_compile=t.torch_compile,
        torch_compile_mode=t.compile_mode if t.torch_compile else None, dataloader_pin_memory=torch.cuda.is_available(),
        dataloader_num_workers=t.dataloader_workers, dataloader_persistent_workers=t.dataloader_workers > 0,
        # The NaN/inf filter reads the loss as a Python bool every step: a device sync that stops the CPU from
        # queueing the next step while the GPU works. A diverged run logs nan instead of a smoothed-over value.
        logging_nan_inf_filter=False,
        disable_tqdm=False, **launch_flags(precision_flags(precision)))

    def compute_metrics(p):
        logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        return summary(classification_metrics(p.label_ids, logits.argmax(-1), splits.label_names))

    callbacks = [StopOnNonFinite(), TrainTally(), MetricsFileCallback(run), Heartbeat(run, info), *callbacks,
                 *method.callbacks(run, total_steps)]
    if t.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    kwargs = dict(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                  data_collator=Collator(tokenizer, pad_to_multiple_of=8 if torch.cuda.is_available() else None),
                  processing_class=tokenizer, compute_metrics=compute_metrics, callbacks=callbacks,
                  optimizers=(method.optimizer(model, recipe), None),
                  compute_loss_func=weighted_loss(info["class_weights"], t.label_smoothing))
    for hook in hooks:
        trainer_cls = hook.configure(trainer_cls, kwargs)
    with (compile_settings(t.torch_compile, regions=t.compile_regions),
          tracking.tensorboard_dir(run.path, t.report_to)):  # both read the environment when the Trainer is built
        trainer = trainer_cls(**kwargs)  # the Trainer's Accelerator reads its compile settings when it is built
    # Sequence classifiers accept **kwargs but ignore num_items_in_batch; without this the Trainer would skip
    # averaging over gradient-accumulation steps and the loss (and gradients) would be grad_accum times too large.
    trainer.model_accepts_loss_kwargs = False
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ReadableProgress())
    return Setup(recipe, run, splits, tokenizer, train_ds, val_ds, test_ds, model, b, trainer, callbacks,
                 total_steps, precision, resuming, info, hooks)


def fit(s: Setup) -> RunResult:
    """Train what :func:`setup` built, evaluate it, save the adapter and complete the run folder.

    The attempt ends in run.json as ``completed``, ``interrupted`` (Ctrl-C), ``terminated`` (SIGTERM, raised as
    :class:`Terminated`) or ``failed`` (any other exception, recorded as one line and raised again)."""
    run, trainer, info = s.run, s.trainer, s.info
    hint = f"continue with: newslora train --resume {run.path}"
    try:
        with sigterm_raises(f"training terminated (SIGTERM); {hint}"):
            results = _fit(s)
    except BaseException as e:
        outcome = ("terminated" if isinstance(e, Terminated) else "interrupted" if isinstance(e, KeyboardInterrupt)
                   else "failed")
        error = None if outcome == "interrupted" else first_line(e, None, with_type=True)
        run.end_attempt(info, outcome, trainer.state.global_step, error)
        run.relativize_checkpoints()
        for hook in s.hooks:
            hook.abort(outcome)
        for cb in trainer.callback_handler.callbacks:
            if isinstance(cb, ReadableProgress):
                cb.close()
        if outcome == "interrupted" and run.writes:
            console.print(Text(f"interrupted; {hint}", style="yellow"))
        raise
    finally:
        unlock_run_folder(run.path)
    result = RunResult(run.path, results, s.breakdown)
    if run.writes:  # hooks write into the run folder (distill.json, run.json): rank 0 only under torchrun
        for hook in s.hooks:
            result = hook.finish(result)
    return result


def _fit(s: Setup) -> dict:
    run, trainer, info, label_names = s.run, s.trainer, s.info, s.splits.label_names
    method = methods.get(s.recipe.method)
    t0 = time.time()
    with tf32_matmuls(s.precision == "tf32"):
        out = trainer.train(resume_from_checkpoint=True if s.resuming else None)
    info["train_runtime_s"] = round((info.get("train_runtime_s") or 0) + time.time() - t0, 2)
    if not s.resuming:  # the Trainer's figure for a resumed call counts only the steps after the checkpoint
        info["train_samples_per_second"] = out.metrics.get("train_samples_per_second")
    run.write_metric_csvs(trainer.state.log_history)
    info["trainer_max_steps"] = trainer.state.max_steps
    extra = method.after_train(s.model, run, trainer.state.global_step, s.callbacks)
    if extra is not None:
        info[method.name] = extra

    if run.writes:
        save_adapter(s.model, s.recipe, run)
        s.tokenizer.save_pretrained(run.adapter_dir)
    # every rank takes part: the Trainer splits the rows between the processes and gathers the predictions
    with tf32_matmuls(s.precision == "tf32"):  # evaluated as validated during training
        results = {"validation": split_metrics(trainer, s.eval_dataset, label_names)}
        if s.test_dataset is not None:
            results["test"] = split_metrics(trainer, s.test_dataset, label_names)
    run.write_eval(results)
    info["best_checkpoint"] = run.relative(trainer.state.best_model_checkpoint)
    run.end_attempt(info, "completed", trainer.state.global_step)
    run.relativize_checkpoints()
    if run.writes:
        finalize(run.path)
    distributed.barrier()  # the run folder is complete before any process returns
    return results


def train(recipe: Recipe | None = None, run_dir: str | Path | None = None, resume: str | Path | None = None,
          extra_callbacks=(), evaluate_test: bool = True, hooks=(), trainer_cls: type | None = None) -> RunResult:
    """Train one recipe into one run folder (or continue ``resume``, an interrupted run folder): ``fit(setup(...))``.
    A ``resume`` of a completed run changes nothing and returns its results."""
    distributed.init()
    if resume is not None and Run.is_run(resume) and completed(Run(resume)):
        if distributed.is_main():
                console.print(f"{resume}: the run already completed; nothing to resume, nothing changed",
                          highlight=False, soft_wrap=True)
        return RunResult(Run(resume).path, Run(resume).read_eval(), None)
    try:
        return fit(setup(recipe, run_dir, resume=resume, callbacks=extra_callbacks, hooks=hooks,
                         trainer_cls=trainer_cls, evaluate_test=evaluate_test))
    finally:
        if resume is not None:
            unlock_run_folder(resume)


def launch_flags(flags: dict) -> dict:
    """TrainingArguments flags with, on several CPU processes, ``use_cpu``: without it accelerate sets up no process
    group on a machine without a GPU, and each process would train alone."""
    if distributed.launched() and not torch.cuda.is_available():
        return {**flags, "use_cpu": True}
    return flags


def split_metrics(trainer, ds, label_names) -> dict:
    out = trainer.predict(ds)
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    return classification_metrics(out.label_ids, logits.argmax(-1), label_names)


def save_adapter(model, recipe: Recipe, run: Run) -> None:
    """The method's ``save_adapter`` into the run's adapter folder, made portable by :meth:`Run.finish_adapter`."""
    import shutil

    from .report import adapter_card

    if run.adapter_dir.exists():
        shutil.rmtree(run.adapter_dir)
    methods.get(recipe.method).save_adapter(model, run)
    run.finish_adapter(adapter_card(run.path))


def finalize(run_dir: Path) -> None:
    """Plots and the metrics workbook (reporting stage); never fails a finished run. What could not be written is
    said on the console and recorded in run.json (``report_errors``), so a completed run never hides missing files."""
    from .report import finalize_run

    try:
        failures = finalize_run(run_dir)
    except Exception as e:  # a plot must not cost the user a trained model
        failures = [first_line(e, with_type=True)]
    if failures:
        Run(run_dir).update_info(report_errors=failures)
        console.print(Text(f"warning: the model trained, but its report is incomplete ({'; '.join(failures)}); "
                           f"write it again with: newslora plot {run_dir}", style="yellow"), soft_wrap=True)
