"""Local weight files of the evaluation metrics: where users get them, and the one-line error when one is missing.

Nothing is downloaded at run time (DESIGN.md): a user fetches each file once, on a
machine with internet, and passes its path.
"""

from pathlib import Path
from typing import Optional

from ldm.errors import LdmError

# torch-fidelity's Inception-v3 (the TF FID network of Heusel et al. 2017, converted); pytorch-fid
# publishes the same tensors as pt_inception-2015-12-05-6726825d.pth.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
WHERE_INCEPTION = (
    f"download torch-fidelity's {INCEPTION_FILE} from {INCEPTION_URL} "
    "(or pytorch-fid's pt_inception-2015-12-05-6726825d.pth, the same weights)"
)
WHERE_OPEN_CLIP = (
    "download the model's open_clip_pytorch_model.bin (or .safetensors) from its Hugging Face repository, "
    "e.g. laion/CLIP-ViT-B-32-laion2B-s34B-b79K for ViT-B-32"
)
WHERE_HF_CLIP = (
    "save a transformers CLIP folder (config.json, weights, tokenizer and preprocessor files), "
    "e.g. `huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR`"
)


def require_file(path: Optional[str], setting: str, what: str, where: str) -> Path:
    """`path` as a Path when it is a file; otherwise an `LdmError` naming `setting` and where to get the file."""
    if path is None:
        raise LdmError(f"{what} needs {setting} (a local file; nothing is downloaded): {where}")
    if not Path(path).is_file():
        raise LdmError(f"{setting}: no file at {path}; {where}")
    return Path(path)


def require_folder(path: Optional[str], setting: str, what: str, where: str, marker: str = "config.json") -> Path:
    """`path` as a Path when it is a folder holding `marker`; otherwise an `LdmError` as `require_file`."""
    if path is None:
        raise LdmError(f"{what} needs {setting} (a local folder; nothing is downloaded): {where}")
    if not (Path(path) / marker).is_file():
        raise LdmError(f"{setting}: {path} is not a folder with {marker}; {where}")
    return Path(path)
