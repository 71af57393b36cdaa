"""LoRA: low-rank adapters on a frozen model (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models").

W x becomes W x + (alpha / r) B A x with A (r x in) and B (out x r), the only trained
weights. As diffusers' examples/text_to_image/train_text_to_image_lora.py: peft injects
the adapters (`model.add_adapter(LoraConfig(..., init_lora_weights="gaussian"))`: A
Gaussian, B zero, so training starts from the base model exactly), and the trained
adapters are saved in diffusers' LoRA format (`get_peft_model_state_dict` ->
`convert_state_dict_to_diffusers` -> `save_lora_weights`, with the LoraConfig in the file's
metadata so that alpha survives), which `pipe.load_lora_weights(DIR)` reads in diffusers'
StableDiffusionPipeline and in ours (`LoraLoading`).

transformers' `add_adapter` refuses a peft older than its minimum (transformers 5.24: 0.22);
there a text encoder's adapters are injected with peft itself (`inject_lora`). Loading needs no
such detour: transformers' `load_adapter`, which diffusers' loader calls, does not check the version.
"""

from pathlib import Path

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin

from ldm.errors import LdmError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights(DIR) looks for first


def check_lora_config(cfg, text_encoder=None) -> None:
    """Reject a bad `LoRAConfig` before anything loads (`text_encoder`: the model it would adapt)."""
    if cfg.rank < 1:
        raise LdmError(f"lora.rank must be at least 1, got {cfg.rank}")
    if cfg.alpha is not None and cfg.alpha <= 0:
        raise LdmError(f"lora.alpha must be positive (or null: alpha = rank), got {cfg.alpha}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise LdmError(f"lora.dropout is a probability in [0, 1), got {cfg.dropout}")
    if not cfg.target_modules:
        raise LdmError("lora.target_modules is empty: name the U-Net layers to adapt, e.g. [to_k,to_q,to_v,to_out.0]")
    if cfg.text_encoder and not cfg.text_encoder_target_modules:
        raise LdmError("lora.text_encoder_target_modules is empty: e.g. [q_proj,k_proj,v_proj,out_proj]")
    if cfg.text_encoder and text_encoder is not None and not is_transformers_model(text_encoder):
        raise LdmError(
            f"lora.text_encoder=true needs a transformers CLIPTextModel (as in Stable Diffusion folders), this text encoder "
            f"is a {type(text_encoder).__name__}: set lora.text_encoder=false, or train it whole with text_encoder.trainable=true "
            "and lora.enabled=false"
        )


def peft_version() -> str:
    import peft

    return peft.__version__


def transformers_min_peft() -> str:
    """The oldest peft that transformers' adapter methods (add_adapter, load_adapter) accept."""
    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:
        return "0"
    return MIN_PEFT_VERSION


def transformers_accepts_peft() -> bool:
    """Whether transformers' `add_adapter` accepts this peft; where not, `add_lora` injects a
    text encoder's adapters with peft directly (`inject_lora`)."""
    from packaging.version import Version

    return Version(peft_version()) >= Version(transformers_min_peft())


def is_transformers_model(model) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def lora_config(cfg, target_modules):
    """peft's LoraConfig from a `LoRAConfig`, as diffusers' LoRA training example builds it."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank, lora_dropout=cfg.dropout,
        init_lora_weights="gaussian", target_modules=list(target_modules),
    )


def inject_lora(model, config, adapter_name: str = "default") -> None:
    """Adapters into a transformers model with peft itself, as `PreTrainedModel.add_adapter` does it.

    transformers' `add_adapter` refuses a peft older than its minimum (`transformers_accepts_peft`);
    peft's `inject_adapter_in_model` does not need it. The config is recorded on the model as
    transformers records it (`peft_config`, `_hf_peft_config_loaded`), which is what
    `get_peft_model_state_dict` (saving) reads.
    """
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    if not getattr(model, "_hf_peft_config_loaded", False):
        model.peft_config = {}
    model.peft_config[adapter_name] = config
    model._hf_peft_config_loaded = True


def _uses_peft_directly(model) -> bool:
    """A transformers model whose own adapter methods refuse this peft."""
    return is_transformers_model(model) and not transformers_accepts_peft()


def add_lora(model, cfg, target_modules, what: str) -> None:
    """Freeze `model` and inject trainable adapters into its `target_modules` (peft names: suffixes of module paths)."""
    model.requires_grad_(False)
    try:
        if _uses_peft_directly(model):
            inject_lora(model, lora_config(cfg, target_modules))
        else:
            model.add_adapter(lora_config(cfg, target_modules))
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise LdmError(
            f"lora target modules {list(target_modules)} match no layer of the {what} ({str(e).splitlines()[0][:80]}...): "
            f"its linear layers end in {', '.join(linear[:12])}"
        ) from None


def lora_layers(model) -> dict:
    """The adapters of a peft-adapted model, in diffusers' key format."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def save_lora(folder, unet, text_encoder=None) -> Path:
    """folder/pytorch_lora_weights.safetensors, as StableDiffusionPipeline.save_lora_weights writes it.

    `text_encoder`: also its adapters (None: the U-Net's only). Each part's LoraConfig goes
    into the file's metadata, so that loading restores its alpha, not alpha = rank.
    """
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(folder), unet_lora_layers=lora_layers(unet),
        text_encoder_lora_layers=lora_layers(text_encoder) if text_encoder is not None else None,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_encoder.peft_config["default"].to_dict() if text_encoder is not None else None,
        safe_serialization=True, weight_name=WEIGHT_NAME,
    )
    return Path(folder) / WEIGHT_NAME


def _features(module):
    """(in, out) of a Linear or Conv layer (or of peft's wrapper around one), else None."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    if hasattr(module, "in_channels") and hasattr(module, "out_channels"):
        return module.in_channels, module.out_channels
    return None


def check_lora_fits(state_dict: dict, parts: dict, where: str) -> None:
    """Every adapter in `state_dict` (diffusers keys "unet.<path>.lora.down.weight", ...) names a layer of
    `parts` ({"unet": module, "text_encoder": module}) with the in/out sizes it was made for."""
    for key, tensor in state_dict.items():
        prefix, _, rest = key.partition(".")
        if prefix not in parts or ".lora" not in rest:
            continue
        path, _, kind = rest.partition(".lora")
        down = ".down" in kind or kind.startswith(("_A", "_down", ".A"))  # also text encoders' "lora_linear_layer.down"
        modules = dict(parts[prefix].named_modules())
        if path not in modules:
            raise LdmError(
                f"the LoRA {where} was made for another base: it adapts {prefix}.{path}, which this model's {prefix} "
                "does not have: load it on the model it was trained from"
            )
        sizes = _features(modules[path])
        if sizes is None:
            continue
        size, wanted = (tensor.shape[1], sizes[0]) if down else (tensor.shape[0], sizes[1])
        if size != wanted:
            raise LdmError(
                f"the LoRA {where} was made for another base: its {prefix}.{path} adapter is for {size} "
                f"{'inputs' if down else 'outputs'}, this model's layer has {wanted}: load it on the model it was trained from"
            )


def lora_file(path) -> Path:
    """The LoRA weights file of a folder (or the file itself); one line when there is none."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise LdmError(f"no LoRA at {path}: pass a folder holding {WEIGHT_NAME} (nothing is downloaded)")
    if (path / WEIGHT_NAME).is_file():
        return path / WEIGHT_NAME
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        raise LdmError(f"{path} holds no {WEIGHT_NAME}{' and several .safetensors files' if found else ''}: is it a LoRA folder?")
    return found[0]


class LoraLoading(StableDiffusionLoraLoaderMixin):
    """diffusers' Stable Diffusion LoRA loading (`load_lora_weights`, `set_adapters`, `fuse_lora`, ...), with
    a one-line error for a missing file or a LoRA made for another base before anything is changed.

    An open_clip text tower takes no adapters, so the text encoder is LoRA-loadable only when it
    is a transformers model; diffusers' methods (fuse, unload, set_adapters) then skip it.
    """

    @property
    def _lora_loadable_modules(self):
        return ["unet", "text_encoder"] if is_transformers_model(self.text_encoder) else ["unet"]

    @classmethod
    def load_lora_into_text_encoder(cls, state_dict, network_alphas, text_encoder, *args, **kwargs):
        if not is_transformers_model(text_encoder):
            return  # check_lora_fits has refused text-encoder adapters it could not take
        return super().load_lora_into_text_encoder(state_dict, network_alphas, text_encoder, *args, **kwargs)

    def fuse_lora(self, components=("unet", "text_encoder"), **kwargs):
        return super().fuse_lora(components=[c for c in components if c in self._lora_loadable_modules], **kwargs)

    def unfuse_lora(self, components=("unet", "text_encoder"), **kwargs):
        return super().unfuse_lora(components=[c for c in components if c in self._lora_loadable_modules], **kwargs)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        source = pretrained_model_name_or_path_or_dict
        if not isinstance(source, dict):
            file = lora_file(source)
            source, kwargs = str(file.parent), {"weight_name": file.name, **kwargs}
        read = {k: v for k, v in kwargs.items() if k not in ("low_cpu_mem_usage", "hotswap")}
        state_dict, _ = self.lora_state_dict(source, **read)
        check_lora_fits(state_dict, {"unet": self.unet, "text_encoder": self.text_encoder}, str(pretrained_model_name_or_path_or_dict))
        return super().load_lora_weights(source, adapter_name=adapter_name, **kwargs)


def parse_lora_arg(value: str):
    """`DIR` or `DIR:SCALE` (ldm-sample --lora) -> (DIR, scale)."""
    path, sep, scale = value.rpartition(":")
    if not sep:
        return value, 1.0
    try:
        return path, float(scale)
    except ValueError:
        if Path(value).exists():  # a path that holds a colon
            return value, 1.0
        raise LdmError(f"--lora {value}: the part after ':' must be a scale (a number), e.g. --lora runs/x/final/lora:0.8") from None


def check_lora_args(specs) -> None:
    """ldm-sample --lora DIR[:SCALE] values: each names a LoRA file on disk (checked before any work)."""
    for spec in specs or []:
        lora_file(parse_lora_arg(spec)[0])


def load_loras(pipe, specs) -> None:
    """Load each `DIR[:SCALE]` into `pipe` as adapter lora0, lora1, ... and activate them at their scales."""
    if not specs:
        return
    names, scales = [], []
    for i, spec in enumerate(specs):
        path, scale = parse_lora_arg(spec)
        pipe.load_lora_weights(path, adapter_name=f"lora{i}")
        names.append(f"lora{i}")
        scales.append(scale)
    pipe.set_adapters(names, adapter_weights=scales)
