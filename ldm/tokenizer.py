"""A `transformers.CLIPTokenizer` built from the BPE file that open_clip ships.

Nothing can be downloaded at run time, but open_clip carries OpenAI's CLIP BPE
vocabulary inside its package. Written out as vocab.json + merges.txt, it gives a
CLIPTokenizer that tokenizes exactly as open_clip does, so one tokenizer class serves
both text encoders and the model folder stays readable by diffusers.
"""

import gzip
import json
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# open_clip pads with token id 0, which is "!"; HF's SD 2 tokenizer does the same.
OPEN_CLIP_PAD = "!"


def clip_bpe_vocab(bpe_path: str = None):
    """(vocab, merges) as open_clip.tokenizer.SimpleTokenizer builds them."""
    with gzip.open(bpe_path or default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # The same slice as SimpleTokenizer: 49152 - 256 - 2 merges after the header line.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer_files(folder, bpe_path: str = None) -> None:
    """Write vocab.json and merges.txt (the files CLIPTokenizer.from_pretrained reads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_vocab(bpe_path)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def open_clip_tokenizer(folder, context_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer saved in `folder` that matches open_clip's tokenizer at `context_length`."""
    write_clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer.from_pretrained(
        str(folder), pad_token=OPEN_CLIP_PAD, model_max_length=context_length
    )
    tokenizer.save_pretrained(str(folder))
    return tokenizer
