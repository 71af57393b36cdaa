"""Configuration: one `@dataclass` per stage, YAML files, `key=value` overrides.

OmegaConf structured configs give us type checks and, above all, an error for a key
that does not exist (a typo in a YAML file must never be silently ignored on a
cluster job). `load_config` turns OmegaConf's errors into one-line `LdmError`s that
list the keys that do exist.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ldm.errors import LdmError

# ---------------------------------------------------------------- shared parts


@dataclass
class ShapesConfig:
    """The embedded synthetic data set (see `ldm.data.shapes`)."""

    num_images: int = 4096
    seed: int = 0
    # (colour, kind) pairs never drawn, written "green triangle".
    exclude: List[str] = field(default_factory=list)


@dataclass
class BucketConfig:
    """Aspect-ratio bucketing (ldm.data.buckets): train on whole images of many shapes, not square crops.

    Buckets are (width, height) pairs of about resolution**2 pixels, both multiples of `step`,
    no longer than `max_aspect` times their other side; each image goes to the bucket of the
    nearest aspect ratio, and every batch holds one bucket. Off: square crops, as always.
    """

    enabled: bool = False
    max_aspect: float = 2.0  # the longest bucket is at most this many times as long as it is wide (or tall)
    # Sides are multiples of this; None: the model's factor (stage 1: the VAE's; stage 2 and
    # control: the VAE's times the U-Net's), so latents of every bucket fit the U-Net.
    step: Optional[int] = None


@dataclass
class DataConfig:
    source: str = "shapes"  # "shapes" | "folder" | "webdataset"
    # "folder": the image folder; "webdataset": tar shards, brace patterns allowed
    # ("data/shard-{000000..000999}.tar"), several patterns joined with "::".
    path: Optional[str] = None
    # webdataset: the number of samples in the shards (their length is not stored in them).
    num_samples: Optional[int] = None
    # Stage 2: a folder written by `ldm-cache` (VAE latent distributions and, for a frozen
    # text encoder, its hidden states). Training then reads it instead of running the
    # VAE encoder and the text encoder on every step.
    cache: Optional[str] = None
    resolution: int = 32
    center_crop: bool = True  # False: random crop
    random_flip: bool = False
    num_workers: int = 0
    num_validation: int = 64  # images held out of training for validation
    # Control images (ControlNet / T2I-Adapter training): items also carry
    # "conditioning_pixel_values", float (3, res, res) in [0, 1], cropped and flipped with
    # their image. shapes: the shape's outline; folder: the metadata line's
    # "conditioning_image"; webdataset: the sample's "cond.png".
    conditioning: bool = False
    # folder: an image whose caption is not UTF-8 or empty is skipped and reported in the run's
    # skipped.jsonl ("skip"), or stops the run before it starts ("error").
    bad_captions: str = "skip"
    # Aspect-ratio bucketing of the train split (folder, webdataset and ldm-cache data); the
    # validation split keeps square center crops, so its metrics compare like with like.
    buckets: BucketConfig = field(default_factory=BucketConfig)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)


@dataclass
class SpeedConfig:
    """Speed levers of a training step (ldm.train.speed); the defaults change nothing.

    Each one is measured on and off by bench/train_speed.py (docs/benchmarks.md).
    """

    channels_last: bool = False  # NHWC weights and activations: faster convolutions with oneDNN / cuDNN
    # torch.compile of the trained U-Net (Module.compile: its state dict keeps its names).
    compile: bool = False
    compile_mode: Optional[str] = None  # None | "default" | "reduce-overhead" | "max-autotune"
    # AdamW kernel: "default" (torch's choice: for-loop on CPU, foreach on CUDA), "foreach"
    # (one kernel per op over all parameters) or "fused" (one kernel for the whole update).
    adamw: str = "default"


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    batch_size: int = 32  # per process
    max_steps: int = 1000  # optimizer steps
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant"  # any name `diffusers.optimization.get_scheduler` knows
    lr_warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    checkpoint_every: int = 500
    checkpoints_total_limit: Optional[int] = 3
    log_every: int = 25
    # Stop after this many minutes even if max_steps is not reached (None: no limit).
    # The run still saves its final model, so a time budget never loses work.
    max_minutes: Optional[float] = None
    # Recompute activations in the backward pass: less memory, ~30% more compute.
    gradient_checkpointing: bool = False
    # How long processes wait for each other (validation on the main process, checkpoint
    # writes) before the collective times out.
    process_group_timeout_minutes: float = 60.0
    # With several processes, one phase of a training step (loading the batch, forward/backward,
    # the stop-request all-reduce) lasting longer than this ends the job with a line naming the
    # rank and the phase (ldm/train/watchdog.py), long before the process-group timeout.
    collective_timeout_minutes: float = 10.0
    # Steps with a non-finite (NaN/inf) loss or gradient norm are skipped; this many in a row stop the run.
    max_nonfinite_steps: int = 5
    # Settings changed on purpose when resuming (--allow-changed KEY), e.g. [train.learning_rate]:
    # applied for real and recorded in the run's changes.jsonl (see ldm/train/changes.py).
    allow_changed: List[str] = field(default_factory=list)
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def __post_init__(self):
        # YAML 1.1 reads a bare `no` as false, so `train.mixed_precision=no` (accelerate's
        # own spelling) would arrive as the string "False".
        if self.mixed_precision in ("False", "false"):
            self.mixed_precision = "no"


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.999
    # Warm-up (decay grows as 1 - (1 + step / inv_gamma) ** -power), as diffusers' EMAModel.
    use_warmup: bool = True
    inv_gamma: float = 1.0
    power: float = 0.75
    # Update the average with torch._foreach ops (diffusers' EMAModel(foreach=True)): same
    # numbers, one kernel per op instead of one per parameter.
    foreach: bool = False


# ---------------------------------------------------------------- stage 1


@dataclass
class VAEModelConfig:
    """`diffusers.AutoencoderKL` arguments; the factor is 2 ** (len(block_out_channels) - 1)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: List[int] = field(default_factory=lambda: [64, 128, 128])
    layers_per_block: int = 1
    norm_num_groups: int = 32


@dataclass
class VAELossConfig:
    """Rombach et al. 2022 / taming-transformers' LPIPSWithDiscriminator."""

    reconstruction: str = "l1"  # "l1" | "l2"
    kl_weight: float = 1e-6
    # LPIPS (Zhang et al. 2018) on VGG16 features. Its weights cannot be downloaded here:
    # vgg_weights is torchvision's VGG16 ImageNet state dict (vgg16-397923af.pth),
    # linear_weights the LPIPS v0.1 linear layers (lpips/weights/v0.1/vgg.pth).
    perceptual_weight: float = 0.0
    lpips_vgg_weights: Optional[str] = None
    lpips_linear_weights: Optional[str] = None
    # PatchGAN discriminator (Isola et al. 2017), switched on at discriminator_start
    # (None: never) and weighted adaptively by the gradient norms at the decoder's last layer.
    discriminator_start: Optional[int] = None
    discriminator_weight: float = 0.5
    discriminator_loss: str = "hinge"  # "hinge" | "vanilla"
    discriminator_layers: int = 3
    discriminator_channels: int = 64
    # None: train.learning_rate
    discriminator_learning_rate: Optional[float] = None


@dataclass
class VAEValidationConfig:
    every: int = 500  # steps between validations (PSNR, SSIM, MAE and a reconstruction grid)
    grid_images: int = 8


@dataclass
class VAEStageConfig:
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/vae", learning_rate=1e-3))
    validation: VAEValidationConfig = field(default_factory=VAEValidationConfig)
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(enabled=False))
    # Images over which the latent scaling factor (1 / std of latents) is measured.
    scale_samples: int = 1024
    # Also store a per-channel latents_mean / latents_std (SDXL-style shift) in the VAE config.
    per_channel_stats: bool = False


# ---------------------------------------------------------------- stage 2


@dataclass
class TextEncoderConfig:
    kind: str = "open_clip"  # "open_clip" | "hf_clip"
    # open_clip: a named model config ("ViT-H-14", ...) or None for the small custom tower below.
    model_name: Optional[str] = None
    width: int = 64
    heads: int = 4
    layers: int = 2
    context_length: int = 77
    quick_gelu: bool = False
    # A local open_clip checkpoint (.safetensors, or a weights-only torch file); None: random init.
    weights: Optional[str] = None
    # hf_clip: a local folder with text_encoder/ + tokenizer/ (or config.json + vocab files).
    path: Optional[str] = None
    layer: str = "last"  # hidden states fed to cross-attention: "last" | "penultimate"
    trainable: bool = False
    seed: int = 0  # initialisation seed of a randomly initialised tower


@dataclass
class UNetModelConfig:
    """`diffusers.UNet2DConditionModel` arguments; sample_size follows from the data and VAE."""

    block_out_channels: List[int] = field(default_factory=lambda: [64, 128])
    down_block_types: List[str] = field(default_factory=lambda: ["CrossAttnDownBlock2D", "DownBlock2D"])
    up_block_types: List[str] = field(default_factory=lambda: ["UpBlock2D", "CrossAttnUpBlock2D"])
    layers_per_block: int = 2
    attention_head_dim: int = 8
    norm_num_groups: int = 32
    # None: the text encoder's width.
    cross_attention_dim: Optional[int] = None
    attention_backend: str = "sdpa"  # "sdpa" | "xformers"


@dataclass
class ObjectiveConfig:
    """The stage-2 loss (`ldm.objectives.build_objective`)."""

    # "ddpm" (Ho et al. 2020; the options below up to offset_noise), "edm" (Karras et al.
    # 2022) or "flow" (rectified flow matching, Esser et al. 2024).
    kind: str = "ddpm"
    # How noise levels are drawn; null: the kind's default. ddpm: uniform (default) | cubic
    # (T2I-Adapter); edm: log_normal; flow: logit_normal (default) | uniform.
    timestep_sampling: Optional[str] = None
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"
    # Fraction of captions replaced by "" so the model also learns p(x) for CFG.
    caption_dropout: float = 0.1
    # Min-SNR-gamma loss weighting (Hang et al. 2023); None: plain MSE. 5.0 is the paper's choice.
    min_snr_gamma: Optional[float] = None
    # Rescale the betas so the last step has SNR 0 (Lin et al. 2024, "Common diffusion noise
    # schedules and sample steps are flawed"); pair it with v_prediction.
    rescale_zero_terminal_snr: bool = False
    # Offset noise (Guttenberg 2023): eps + offset_noise * per-channel N(0, 1), so the model
    # can change an image's mean brightness. 0.1 is the usual value; 0: off.
    offset_noise: float = 0.0
    # kind=edm: ln(sigma) ~ N(p_mean, p_std^2) in training; sigma_data is the latents' std
    # (1: they are scaled to unit variance); sampling runs the Karras schedule from sigma_max
    # to sigma_min with exponent rho (Karras et al. 2022, Table 1).
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 1.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    # kind=flow: t = sigmoid(n), n ~ N(logit_mean, logit_std^2) (Esser et al. 2024, eq. 19).
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class ValidationConfig:
    prompts: List[str] = field(default_factory=list)
    every: int = 500
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    seed: int = 0  # also seeds the validation loss's fixed noise
    # Every `every` steps: the loss on the held-out split (data.num_validation images) at
    # `loss_buckets` fixed noise levels with fixed noise, raw and EMA weights
    # (ldm/eval/validation_loss.py; metrics.jsonl keys val_loss, val_loss_t{k}, val_loss_ema, ...).
    loss: bool = True
    loss_buckets: int = 8
    loss_batch_size: int = 32  # held-out images per forward pass, per process
    # Evaluation during training (ldm/eval/during_training.py): every `eval_every` steps (at validation
    # steps; None: off), sample `eval_images_per_prompt` images of each of `eval_prompts` with the EMA
    # weights and log eval_* keys: eval_adherence(_held_out) on shapes data, eval_fid/eval_kid against
    # the held-out images with `eval_inception_weights`, eval_clip_score with a local CLIP.
    eval_every: Optional[int] = None
    eval_prompts: List[str] = field(default_factory=list)  # empty: the 18 shapes prompts (data.source=shapes)
    eval_images_per_prompt: int = 4
    eval_steps: int = 25
    eval_guidance_scale: float = 5.0
    eval_inception_weights: Optional[str] = None
    eval_clip_model: Optional[str] = None  # open_clip architecture name, with eval_clip_weights
    eval_clip_weights: Optional[str] = None
    eval_clip_folder: Optional[str] = None  # or a transformers CLIP folder


@dataclass
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2022) through peft, as diffusers' train_text_to_image_lora.py adds them.

    Only the adapters train; the base stays frozen. Saved in diffusers' LoRA format
    (final/lora/pytorch_lora_weights.safetensors), which `pipe.load_lora_weights(DIR)` reads.
    """

    enabled: bool = False
    rank: int = 4
    alpha: Optional[float] = None  # None: alpha = rank (the update is scaled by alpha / rank)
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    # Also adapt the text encoder (a transformers CLIPTextModel, as in Stable Diffusion folders).
    text_encoder: bool = False
    text_encoder_target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])


@dataclass
class UNetStageConfig:
    vae_path: str = "runs/vae/final"
    # Fine-tuning: start from this model folder (ours, or a diffusers Stable Diffusion folder)
    # instead of a fresh U-Net; `model.*` is then read from the folder, and the objective's
    # model-defining settings (kind, prediction_type, noise schedule) follow the folder's.
    init_from: Optional[str] = None
    init_vae: bool = True  # take the folder's VAE (and its latent scale); false: vae_path
    init_text_encoder: bool = True  # take the folder's text encoder and tokenizer; false: text_encoder.*
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    model: UNetModelConfig = field(default_factory=UNetModelConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/unet", learning_rate=2e-4))
    validation: ValidationConfig = field(default_factory=ValidationConfig)


# ---------------------------------------------------------------- control stage


@dataclass
class ControlModelConfig:
    """What the control stage trains on top of the frozen base model (see ldm.control.models)."""

    kind: str = "controlnet"  # "controlnet" | "t2i_adapter"
    # An existing ControlNet / T2I-Adapter folder to continue from; None: a ControlNet copied from
    # the base U-Net (zero convolutions fresh), or a freshly initialised adapter.
    init_from: Optional[str] = None
    adapter_type: str = "full_adapter"  # T2I-Adapter: "full_adapter" | "light_adapter"
    num_res_blocks: int = 2  # T2I-Adapter residual blocks per level
    # Probability of a blank (all-black) control image for a training example.
    conditioning_dropout: float = 0.05
    # Timestep sampling: None follows the method's paper: "uniform" for ControlNet, "cubic"
    # (more noisy steps, where layout is decided) for T2I-Adapter (Mou et al. 2023, sec. 3.4).
    timestep_sampling: Optional[str] = None
    caption_dropout: float = 0.1  # as in stage 2: the unconditional branch for CFG stays trained
    conditioning_scale: float = 1.0  # for the validation grids


@dataclass
class ControlValidationConfig(ValidationConfig):
    num_controls: int = 6  # control | sample pairs in each validation grid, from the held-out split


@dataclass
class ControlStageConfig:
    # The frozen base: a model folder from train_unet.py / ldm-demo, or a diffusers Stable Diffusion folder.
    base_model: str = "runs/demo/pipeline"
    control: ControlModelConfig = field(default_factory=ControlModelConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(conditioning=True))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/control", learning_rate=1e-4))
    validation: ControlValidationConfig = field(default_factory=ControlValidationConfig)


# ---------------------------------------------------------------- loading


def _keys_at(schema, dotted: str) -> List[str]:
    """The keys that exist under `dotted` (the parent of an unknown key) in `schema`."""
    node = OmegaConf.structured(schema)
    for part in [p for p in dotted.split(".") if p]:
        if not OmegaConf.is_config(node) or part not in node:
            break
        node = node[part]
    return sorted(node.keys()) if OmegaConf.is_dict(node) else []


def _parent(full_key: str) -> str:
    return full_key.rsplit(".", 1)[0] if "." in full_key else ""


def _merge(schema, parts):
    merged = OmegaConf.structured(schema)
    for origin, part in parts:
        try:
            merged = OmegaConf.merge(merged, part)
        except ConfigKeyError as e:
            key = e.full_key or e.key or "?"
            keys = ", ".join(_keys_at(schema, _parent(str(key))))
            where = f" under '{_parent(str(key))}'" if _parent(str(key)) else ""
            raise LdmError(f"unknown config key '{key}' in {origin}; keys{where} are: {keys}") from None
        except OmegaConfBaseException as e:
            msg = str(e).splitlines()[0]
            raise LdmError(f"bad config value in {origin}: {msg} (key '{e.full_key}')") from None
    return merged


def load_config(schema, path: Optional[str] = None, overrides: Optional[List[str]] = None):
    """Build a `schema` dataclass from defaults, a YAML file and `key=value` overrides."""
    parts = []
    if path is not None:
        if not Path(path).is_file():
            raise LdmError(f"config file not found: {path} (pass an existing YAML file to --config)")
        parts.append((path, OmegaConf.load(path)))
    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise LdmError(f"override '{bad[0]}' is not of the form key=value (example: train.max_steps=100)")
    if overrides:
        parts.append(("the command line", OmegaConf.from_dotlist(list(overrides))))
    return OmegaConf.to_object(_merge(schema, parts))


def save_config(config, path) -> None:
    """Write the resolved config, so a run folder says exactly what produced it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(config), path)
