"""Checks that a model folder has all its parts and that they fit together.

A folder assembled from two trainings (a U-Net for one text encoder next to another
text encoder, or for another VAE) otherwise fails deep inside diffusers with a shape
error about some matrix, or worse, loads and samples noise. These checks read only the
parts' config files, so they fail in milliseconds before any weights are loaded, and
name the part and both numbers. `check_components` does the same on loaded modules.
"""

import json
from pathlib import Path

from ldm.errors import LdmError

COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
CONFIG_FILES = {
    "vae": "config.json", "unet": "config.json", "text_encoder": "config.json",
    "scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json",
}
WEIGHTS = ("*.safetensors", "*.bin")  # single files, or shards next to their index
NO_LIMIT = 10**6  # transformers' "no maximum length" sentinel is ~1e30


def read_json(file: Path) -> dict:
    """A folder's JSON file, or one line naming it when it is not JSON text (a binary file, a pickle)."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LdmError(f"{file} is not valid JSON ({e.msg}, line {e.lineno})") from None
    except UnicodeDecodeError as e:  # e.g. a binary file (a pickle) in place of the JSON
        raise LdmError(f"{file} is not valid JSON (not UTF-8 text: byte 0x{e.object[e.start]:02x} at {e.start})") from None


def check_model_folder(path, given=()) -> None:
    """Fail with one line naming the missing part before diffusers fails deep inside loading.

    `given`: components passed to `from_pretrained` as objects, which need no folder.
    """
    path = Path(path)
    if not path.is_dir():
        raise LdmError(f"no model folder at {path}: pass a local folder saved by save_pretrained (nothing is downloaded)")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise LdmError(f"{path} has no model_index.json: is it a model folder saved by save_pretrained?")
    index = read_json(index_file)
    for name in COMPONENTS:
        if name in given:
            continue
        entry = index.get(name)
        if not entry or entry[0] is None:
            raise LdmError(f"{index_file} lists no '{name}': the model folder is incomplete")
        part = path / name
        if not part.is_dir():
            raise LdmError(f"the model folder {path} is missing its '{name}' part ({part}/ not found)")
        if not (part / CONFIG_FILES[name]).is_file() and name != "tokenizer":
            raise LdmError(f"the '{name}' part of {path} has no {CONFIG_FILES[name]}: the folder is incomplete")
        if name in ("vae", "unet", "text_encoder") and not any(any(part.glob(w)) for w in WEIGHTS):
            raise LdmError(f"the '{name}' part of {path} has no weights (no .safetensors or .bin file in {part}/)")


def text_width(config: dict):
    """Hidden size of a text encoder config: OpenCLIPTextModel's `width`, CLIPTextModel's `hidden_size`."""
    return config.get("width", config.get("hidden_size"))


def text_length(config: dict):
    return config.get("context_length", config.get("max_position_embeddings"))


def check_parts_agree(vae: dict = None, text_encoder: dict = None, unet: dict = None, tokenizer_length=None, where: str = "the model") -> None:
    """Compare the numbers the parts must share; a part given as None is not checked."""
    if unet is not None and text_encoder is not None:
        width = text_width(text_encoder)
        # A U-Net with encoder_hid_dim projects the text to its cross_attention_dim itself.
        reads = unet.get("encoder_hid_dim") or unet.get("cross_attention_dim")
        reads_all = reads if isinstance(reads, (list, tuple)) else [reads]
        key = "encoder_hid_dim" if unet.get("encoder_hid_dim") else "cross_attention_dim"
        if width is not None and any(r != width for r in reads_all):
            raise LdmError(
                f"{where}: the U-Net reads text of width {reads} (unet {key}) but the text encoder gives "
                f"width {width}: the U-Net was trained with another text encoder"
            )
    if unet is not None and vae is not None:
        latent = vae.get("latent_channels")
        for key in ("in_channels", "out_channels"):
            if latent is not None and unet.get(key) is not None and unet[key] != latent:
                raise LdmError(
                    f"{where}: the U-Net has {unet[key]} channels (unet {key}) but the VAE has {latent} "
                    f"(vae latent_channels): the U-Net was trained on another VAE's latents"
                )
    if text_encoder is not None and tokenizer_length is not None and tokenizer_length < NO_LIMIT:
        length = text_length(text_encoder)
        if length is not None and tokenizer_length > length:
            raise LdmError(
                f"{where}: the tokenizer pads to {tokenizer_length} tokens (tokenizer model_max_length) but the "
                f"text encoder takes at most {length} (its context length)"
            )


def check_folder_parts_agree(path, given=()) -> None:
    """`check_parts_agree` on the config files of a model folder (parts in `given` are skipped)."""
    path = Path(path)

    def config(name):
        file = path / name / CONFIG_FILES[name]
        return None if name in given or not file.is_file() else read_json(file)

    tokenizer = config("tokenizer")
    check_parts_agree(
        vae=config("vae"), text_encoder=config("text_encoder"), unet=config("unet"),
        tokenizer_length=tokenizer.get("model_max_length") if tokenizer else None, where=str(path),
    )


def _as_dict(config):
    # diffusers configs are dicts already; transformers configs convert.
    return dict(config) if isinstance(config, dict) else config.to_dict()


def check_components(vae=None, text_encoder=None, tokenizer=None, unet=None) -> None:
    """`check_parts_agree` on loaded modules (any may be None)."""
    check_parts_agree(
        vae=_as_dict(vae.config) if vae is not None else None,
        text_encoder=_as_dict(text_encoder.config) if text_encoder is not None else None,
        unet=_as_dict(unet.config) if unet is not None else None,
        tokenizer_length=getattr(tokenizer, "model_max_length", None),
    )
