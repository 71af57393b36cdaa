"""Which distributed set-ups a stage trains under, decided at start-up in one line.

- DDP (multi_gpu.yaml, multi_node.yaml, MULTI_CPU): every stage.
- FSDP2 (fsdp.yaml): stage 2 and the control stage, which train one model (see fsdp.py).
  Refused: stage 1 (it trains the autoencoder and the PatchGAN discriminator: two
  models, and the autoencoder fits every GPU whole: DDP), stage 2 with a trainable text
  encoder (a second trained model) or with LoRA (adapters are small: DDP), FSDP1, and
  a full-state-dict checkpoint type.
- DeepSpeed ZeRO-2 (deepspeed_zero2.yaml): stage 2 and the control stage. Refused where
  Accelerate's DeepSpeed path cannot go: a stage that trains two models (stage 1 with its
  discriminator, stage 2 with a trainable text encoder: Accelerate builds one DeepSpeed
  engine per Accelerator and refuses a second model), and ZeRO-3 (it shards the
  parameters, which the EMA, the validation grids and the final save need whole).
  The shipped config's `auto` micro-batch is filled with train.batch_size here
  (Accelerate reads it from a torch DataLoader, which a webdataset stream is not).

The decision is a pure function of the distributed type and its plugin, so it is tested
without launching DeepSpeed or FSDP (tests/test_distributed_type.py).
"""

from typing import Optional, Sequence

import torch
from accelerate.utils import DistributedType

from ldm.errors import LdmError
from ldm.train.fsdp import fsdp_refusal

DDP = "configs/accelerate/multi_gpu.yaml (DDP)"
FSDP = "configs/accelerate/fsdp.yaml (FSDP2)"


def distributed_refusal(kind, stage: str, trained: Sequence[str], *, fsdp_plugin=None, deepspeed_plugin=None,
                        lora: bool = False) -> Optional[str]:
    """Why `stage` (training the models named in `trained`) cannot run under distributed type `kind`, or None."""
    models = " + ".join(trained)
    if kind == DistributedType.FSDP:
        if stage == "stage 1":
            return (f"stage 1 does not run under FSDP: it trains two models ({models}) and the autoencoder fits every "
                    f"GPU whole; launch with {DDP}")
        if len(trained) > 1:
            return (f"{stage} trains {len(trained)} models ({models}) but FSDP here shards one: set "
                    f"text_encoder.trainable=false, or launch with {DDP}")
        if lora:
            return f"LoRA does not run under FSDP (the adapters are small, the frozen base need not be sharded): launch with {DDP}"
        return fsdp_refusal(fsdp_plugin) if fsdp_plugin is not None else None
    if kind == DistributedType.DEEPSPEED:
        if len(trained) > 1:
            alternative = DDP if stage == "stage 1" else f"{DDP}, or {FSDP} with text_encoder.trainable=false"
            return (f"{stage} trains {len(trained)} models ({models}) and Accelerate's DeepSpeed path prepares one: "
                    f"launch with {alternative}")
        zero = (getattr(deepspeed_plugin, "deepspeed_config", None) or {}).get("zero_optimization", {}).get("stage")
        if zero == 3:
            return (f"DeepSpeed ZeRO-3 shards the parameters, which the EMA, the validation grids and the final save need "
                    f"whole: use configs/accelerate/deepspeed_zero2.yaml, or {FSDP}")
    return None


def check_distributed_type(accelerator, stage: str = "stage 2", trained: Sequence[str] = ("U-Net",),
                           lora: bool = False) -> None:
    """Refuse, in one line naming the alternative, a distributed set-up the stage cannot train under."""
    state = getattr(accelerator, "state", None)
    problem = distributed_refusal(
        accelerator.distributed_type, stage, trained, lora=lora,
        fsdp_plugin=getattr(state, "fsdp_plugin", None), deepspeed_plugin=getattr(state, "deepspeed_plugin", None),
    )
    if problem:
        raise LdmError(problem)


def fill_micro_batch(deepspeed_plugin, batch_size: int) -> None:
    """DeepSpeed's `auto` train_micro_batch_size_per_gpu is train.batch_size (per process), as Accelerate would
    read it from a DataLoader: a webdataset `StreamLoader` is not one, so Accelerate could not."""
    config = deepspeed_plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = batch_size


def deepspeed_nonfinite_loss(accelerator, loss) -> bool:
    """Under DeepSpeed: is `loss` NaN/inf on any process? (False elsewhere.)

    Accelerate's DeepSpeed backward runs the engine's optimizer step itself, before the
    loop's non-finite check on the loss and gradient norm (loop.apply_update) could skip
    it; so under DeepSpeed the loss is judged before backward, and every process skips the
    backward (and so the step) together. Exact with train.gradient_accumulation_steps=1
    (the shipped config); a non-finite gradient with a finite loss still reaches the
    engine (DeepSpeed's fp16 loss scaler skips those steps itself; bf16 has no such check).
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    bad = (~torch.isfinite(loss.detach().float()).all()).float().reshape(1)
    return bool(accelerator.reduce(bad, "sum").item() > 0)
