"""PiSSA: LoRA initialised from the principal singular vectors of each targeted weight. The adapter is saved
converted to a plain LoRA on the original weights (PEFT's conversion from the saved starting adapter), so loading
and merging it needs nothing PiSSA-specific."""
from __future__ import annotations

from .base import register
from .lora import Lora


INIT = "pissa_init"  # in the run folder: the starting adapter, the reference of the conversion when saving


class Pissa(Lora):
    name, display, order = "pissa", "PiSSA", 4
    artifacts = (INIT,)

    def init_weights(self, for_count: bool):
        return True if for_count else "pissa"  # no SVD of meta tensors when only counting

    def before_train(self, model, run, resuming):
        if resuming or not run.writes:  # rank 0 alone writes the run folder (several processes)
            return
        model.peft_config["default"].init_lora_weights = True  # saved as a plain LoRA start for conversion
        model.save_pretrained(run.file(INIT))
        model.peft_config["default"].init_lora_weights = "pissa"

    def save_adapter(self, model, run):
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import load_file, save_file

        model.save_pretrained(run.adapter_dir, path_initial_model_for_weight_conversion=str(run.file(INIT)))
        # the conversion writes only lora_A/lora_B: put the fully trained modules (the head) back
        path = run.adapter_dir / "adapter_model.safetensors"
        saved = load_file(str(path))
        full = get_peft_model_state_dict(model)
        extra = {k: v.detach().cpu().contiguous() for k, v in full.items() if k not in saved and ".lora_" not in k}
        if extra:
            saved.update(extra)
            save_file(saved, str(path), metadata={"format": "pt"})


register(Pissa())
