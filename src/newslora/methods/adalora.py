"""AdaLoRA: SVD-shaped LoRA whose rank allocator prunes from ``init_r`` towards ``target_r`` during training.

The budget counts AdaLoRA at init_r (1,537 * init_r per 768x768 module: A, B and the singular values E). The rank
allocation runs in a Trainer callback (below), once per optimizer step, and the final allocation is saved with
the adapter. This module is longer than the others because the allocator's state must survive ``--resume``.
"""
from __future__ import annotations

import functools
import math
import re

from pydantic import Field, model_validator

from ..errors import NewsloraError
from ..sections import Float, Int, Section
from .base import Method, MethodPlot, register, register_section

# its files in the run folder: the rank log (step, module, rank) and the final allocation; its plot in plots/
RANKS, RANK_PATTERN, RANKS_PLOT = "adalora_ranks.csv", "adalora_rank_pattern.json", "adalora_ranks.png"
RANK_COLUMNS = ["step", "module", "rank"]


@register_section("adalora", order=1)
class AdaLoraSection(Section):
    """AdaLoRA's own options (method=adalora): the rank allocator prunes from init_r to an average of target_r per
    module over the run; targets, layers, dropout and bias are the ``lora`` section's."""

    init_r: Int = Field(12, gt=0)
    """starting rank of every module (the budget counts this rank)"""
    target_r: Int = Field(8, gt=0)
    """average rank per module after pruning; below init_r"""
    alpha: Float = Field(16.0, gt=0)
    """scale numerator of the update (AdaLoRA's lora_alpha)"""
    tinit: Int = Field(0, ge=0)
    """optimizer steps of warm-up before pruning (0: 10% of the run's optimizer steps)"""
    tfinal: Int = Field(0, ge=0)
    """final optimizer steps with the allocation frozen (0: 20% of the run's steps, at least 1)"""
    deltaT: Int = Field(10, gt=0)
    """optimizer steps between two re-allocations"""
    beta1: Float = Field(0.85, gt=0, lt=1)
    """EMA factor of the importance scores' sensitivity"""
    beta2: Float = Field(0.85, gt=0, lt=1)
    """EMA factor of the importance scores' uncertainty"""
    orth_reg_weight: Float = Field(0.5, ge=0)
    """weight of the orthogonality penalty on P and Q"""

    @model_validator(mode="after")
    def _prunes(self):
        if self.target_r >= self.init_r:
            raise ValueError(f"adalora.target_r={self.target_r} must be below adalora.init_r={self.init_r}: AdaLoRA "
                             "prunes from init_r down to target_r (use method=lora for a fixed rank)")
        return self


def adalora_schedule(recipe, total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) for a run of ``total_steps`` optimizer steps, checked against PEFT's phases.

    The callback passes 0-based step indices 0..total_steps-1, so the final allocation (at index
    ``total_steps - tfinal``) needs ``tfinal >= 1``; pruning happens at indices in ``(tinit, total_steps - tfinal)``.
    """
    a = recipe.adalora
    tinit = a.tinit or int(0.1 * total_steps)
    tfinal = a.tfinal or max(1, int(0.2 * total_steps))
    if tinit + tfinal >= total_steps:
        raise NewsloraError(
            f"adalora: tinit={tinit} + tfinal={tfinal} leave no pruning phase in a run of {total_steps} optimizer "
            f"steps (train.optimizer steps = ceil(epochs * batches / grad_accum) or train.max_steps); lower "
            f"adalora.tinit/adalora.tfinal or train longer")
    return tinit, tfinal


class AdaLora(Method):
    name, display, order = "adalora", "AdaLoRA", 1
    section, rank_attr = "adalora", "init_r"
    constant_params = ("ranknum",)  # PEFT re-creates it with requires_grad on the meta device
    # the model is the one at the end of the rank schedule: an earlier "best" checkpoint holds another allocation
    # (and more than target_r ranks)
    keeps_best_checkpoint = False
    head_rank_pattern = False
    artifacts = (RANKS, RANK_PATTERN)
    plots = (MethodPlot(RANKS_PLOT, RANKS, lambda *args: plot_ranks(*args)),)  # plot_ranks: defined below

    def min_rank(self, recipe):
        return recipe.adalora.target_r + 1, f"adalora.init_r must exceed adalora.target_r={recipe.adalora.target_r}"

    def check_recipe(self, recipe):
        if recipe.train.early_stopping_patience:
            raise NewsloraError("train.early_stopping_patience does not combine with method=adalora: the rank "
                                "schedule runs to the last optimizer step (set train.early_stopping_patience=null)")

    def check_schedule(self, recipe, total_steps):
        adalora_schedule(recipe, total_steps)

    def peft_config(self, recipe, common, total_steps, for_count):
        from peft import AdaLoraConfig

        a, lo = recipe.adalora, recipe.lora
        if total_steps is None and not for_count:
            raise NewsloraError("method=adalora needs the run's optimizer-step count (total_steps) to build")
        steps = total_steps or 1000  # counting only: the schedule does not change the parameter count
        tinit, tfinal = adalora_schedule(recipe, steps) if total_steps else (0, 1)
        return AdaLoraConfig(init_r=a.init_r, target_r=a.target_r, tinit=tinit, tfinal=tfinal, deltaT=a.deltaT,
                             beta1=a.beta1, beta2=a.beta2, orth_reg_weight=a.orth_reg_weight, total_step=steps,
                             lora_alpha=a.alpha, lora_dropout=lo.dropout, bias=lo.bias, **common)

    def callbacks(self, run, total_steps):
        return [allocator_callback_class()(run, total_steps)]

    def after_train(self, model, run, global_step, callbacks):
        cls = allocator_callback_class()
        ada = next(c for c in callbacks if isinstance(c, cls))
        return ada.finish(model, global_step)


register(AdaLora())


# ----------------------------------------------------------------------------- the rank log and its plot


def rank_rows(run, until: int | None = None) -> list[dict]:
    """The rank log's rows (step <= ``until``), as a resumed run reads them back."""
    return [r for r in run.read_csv_rows(RANKS) if until is None or int(r["step"]) <= until]


def _module_label(module: str) -> str:
    """'roberta.encoder.layer.3.attention.self.query' -> 'L3 query'."""
    m = re.search(r"layers?\.(\d+)\.(.+)$", module)
    if not m:
        return ".".join(module.split(".")[-2:])
    rest = m.group(2)
    for old, new in (("attention.self.", ""), ("attention.output.dense", "attn.output"),
                     ("intermediate.dense", "ffn.in"), ("output.dense", "ffn.out")):
        rest = rest.replace(old, new)
    return f"L{m.group(1)} {rest}"


def _layer(module: str) -> int:
    m = re.search(r"layers?\.(\d+)\.", module)
    return int(m.group(1)) if m else -1


def plot_ranks(run, path, title: str, figure):
    """Rank per module over the optimizer steps: step lines for a few modules, a heat map (one row per module,
    transformer layers separated) for more. None when the log holds no rows."""
    df = run.read_table(RANKS, ["step", "rank"])
    if df is None or not set(RANK_COLUMNS) <= set(df.columns):
        return None
    df = df.dropna(subset=RANK_COLUMNS)
    if df.empty:
        return None
    table = df.pivot_table(index="module", columns="step", values="rank", aggfunc="last")
    first_seen = {m: i for i, m in reversed(list(enumerate(df["module"])))}
    table = table.loc[sorted(table.index, key=lambda m: (_layer(m), first_seen[m]))]
    labels = [_module_label(m) for m in table.index]
    title = f"AdaLoRA rank per module — {title}"
    if len(table) <= 8:  # few modules: lines are clearer
        fig, ax = figure()
        for label, (_, row) in zip(labels, table.iterrows()):
            pts = row.dropna()
            ax.step(pts.index, pts.values, where="post", marker="o", markersize=3, label=label)
        ax.set(title=title, xlabel="step", ylabel="rank")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.savefig(path, bbox_inches="tight")
        return path
    steps = list(table.columns)
    fig, ax = figure(max(7.5, 0.25 * len(steps) + 4), 0.16 * len(table) + 1.8)
    im = ax.imshow(table.to_numpy(dtype=float), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    layers = [_layer(m) for m in table.index]
    for i in range(1, len(layers)):
        if layers[i] != layers[i - 1]:  # separate transformer layers
            ax.axhline(i - 0.5, color="white", linewidth=1.2)
    every = max(1, math.ceil(len(steps) / 12))
    ax.set_xticks(range(0, len(steps), every), [f"{s:,.0f}" for s in steps[::every]])
    ax.set(title=title, xlabel="step", ylabel="module")
    fig.colorbar(im, ax=ax, label="rank", shrink=0.6)
    fig.savefig(path, bbox_inches="tight")
    return path


@functools.cache
def allocator_callback_class():
    """The callback class, built on first use so that reading a recipe does not import transformers."""
    import torch
    from transformers import TrainerCallback

    class AdaLoraCallback(TrainerCallback):
        """AdaLoRA's rank allocation: ``update_and_allocate`` exactly once per optimizer step (``on_optimizer_step``:
        after ``optimizer.step()``, before ``zero_grad``, so gradient accumulation is respected), with the 0-based
        index of that step -- the Trainer increments ``global_step`` after this event -- as in PEFT's reference loop.

        The allocation (PEFT's ``rank_pattern``) lives here and is put on the adapter config only around the call
        and at the end (:meth:`finish`): with a pattern on its config PEFT saves *shrunk* tensors, which the
        Trainer's checkpoints could not load back into the full-size model on ``--resume``. Checkpoints hold
        full-size tensors (pruned singular values are zeros) plus ``adalora_state.pt`` (allocation, importance
        scores, call count). Rank over time goes to the run's rank log (step, module, rank; step = optimizer steps
        done): at the start, after every re-allocation that changes a rank, and at the end.
        """

        STATE = "adalora_state.pt"

        def __init__(self, run, total_steps: int):
            self.run = run
            self.total_steps = total_steps
            self.calls = 0  # update_and_allocate calls
            self.steps: list[int] = []  # the step index given to each call
            self.pattern: dict | None = None  # {"<module>.lora_E.default": [kept?] * init_r}; None: nothing pruned
            self.last: dict[str, int] = {}

        @staticmethod
        def _config(model):
            return model.peft_config[model.active_adapter]

        def ranks(self, model) -> dict[str, int]:
            """Current rank of every AdaLoRA module under the current allocation (init_r before the first one)."""
            out = {}
            for name, p in model.get_base_model().named_parameters():
                if ".lora_E." in name:
                    kept = self.pattern.get(name) if self.pattern else None
                    out[name.split(".lora_E.")[0]] = int(sum(kept)) if kept is not None else int(p.shape[0])
            return out

        def _truncate(self, keep_until: int) -> dict[str, int]:
            """Resumed: drop the rows the interrupted part logged after the checkpoint; return the last ranks."""
            rows = rank_rows(self.run, until=keep_until)
            self.run.write_csv(RANKS, RANK_COLUMNS, rows)
            return {r["module"]: int(r["rank"]) for r in rows}

        def _write(self, step: int, ranks: dict[str, int]) -> None:
            self.run.write_csv(RANKS, RANK_COLUMNS, [(step, m, n) for m, n in ranks.items()], append=True)
            self.last = dict(ranks)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.max_steps != self.total_steps:
                raise NewsloraError(f"AdaLoRA was built for total_step={self.total_steps} optimizer steps but the "
                                    f"Trainer will take {state.max_steps}; please report this")
            if state.global_step > 0:  # --resume: restore the allocation and the importance scores
                ckpt = self.run.checkpoint(state.global_step) / self.STATE
                if ckpt.is_file():
                    st = torch.load(ckpt, weights_only=True)  # tensors and plain data only: never code
                    self.pattern, self.calls, self.steps = st["pattern"], st["calls"], st["steps"]
                    alloc = model.base_model.rankallocator
                    alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = st["ipt"], st["exp_avg_ipt"], st["exp_avg_unc"]
                self.last = self._truncate(state.global_step)
                if self.ranks(model) != self.last:
                    self._write(state.global_step, self.ranks(model))
            else:
                self.run.remove(RANKS)
                self._write(0, self.ranks(model))

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            cfg = self._config(model)
            cfg.rank_pattern = self.pattern
            model.base_model.update_and_allocate(state.global_step)
            pattern, cfg.rank_pattern = cfg.rank_pattern, None
            self.calls += 1
            self.steps.append(state.global_step)
            if pattern is not None and pattern is not self.pattern:
                self.pattern = pattern
                ranks = self.ranks(model)
                if ranks != self.last:
                    self._write(state.global_step + 1, ranks)

        def on_save(self, args, state, control, model=None, **kwargs):
            ckpt = self.run.checkpoint(state.global_step)
            if ckpt.is_dir() and self.run.writes:
                alloc = model.base_model.rankallocator
                torch.save({"pattern": self.pattern, "calls": self.calls, "steps": self.steps, "ipt": alloc.ipt,
                            "exp_avg_ipt": alloc.exp_avg_ipt, "exp_avg_unc": alloc.exp_avg_unc}, ckpt / self.STATE)

        def finish(self, model, step: int) -> dict:
            """Put the final allocation on the adapter config (the saved adapter is then shrunk to it), log the
            final ranks and write the rank-pattern file; returns a summary for run.json."""
            cfg = self._config(model)
            cfg.rank_pattern = self.pattern
            ranks = self.ranks(model)
            self._write(step, ranks)
            a = {"init_r": cfg.init_r, "target_r": cfg.target_r, "total_step": cfg.total_step, "tinit": cfg.tinit,
                 "tfinal": cfg.tfinal, "deltaT": cfg.deltaT}
            summary = {**a, "ranks": ranks, "total_rank": sum(ranks.values()),
                       "target_total_rank": cfg.target_r * len(ranks),
                       "rank_pattern": {k: [bool(x) for x in v] for k, v in (self.pattern or {}).items()}}
            self.run.write_record(RANK_PATTERN, summary)
            return {**a, "optimizer_step_calls": self.calls, "total_rank": summary["total_rank"],
                    "ranks_changed": any(n != cfg.init_r for n in ranks.values())}

    return AdaLoraCallback
