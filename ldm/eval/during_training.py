"""Evaluation during training: every `validation.eval_every` steps, sample a small prompt set
with the EMA weights and score it, logged to metrics.jsonl next to the loss as eval_* keys.

    eval_adherence, eval_adherence_held_out  shapes prompts: colour and kind match (ldm.data.checker,
                                             as ldm-demo's adherence table; held out: the demo's pairs)
    eval_fid, eval_kid, eval_kid_std         against the held-out images (validation.eval_inception_weights)
    eval_clip_score                          images against their prompts (a local CLIP)

The scores are ldm-eval's (ldm/eval/scores.py, fid_kid.py, clip_score.py). The weight files are
loaded when the evaluator is built, before training starts, so a missing file is a one-line
error then. It runs in the loop's `validate` (main process, EMA weights, the RNG untouched),
so it changes no training result.
"""

from typing import Dict, List, Optional

import torch

from ldm.errors import LdmError

CLIP_SETTINGS = {"name": "validation.eval_clip_model", "weights": "validation.eval_clip_weights",
                 "folder": "validation.eval_clip_folder"}


def eval_prompts(cfg, data_cfg) -> List[str]:
    """validation.eval_prompts, or the 18 shapes prompts on shapes data."""
    if cfg.eval_prompts:
        return list(cfg.eval_prompts)
    if data_cfg.source == "shapes":
        from ldm.data.shapes import all_pairs, caption

        return [caption(c, k) for c, k in all_pairs()]
    raise LdmError("validation.eval_every needs prompts: set validation.eval_prompts=[...] (only shapes data has default ones)")


def is_shapes(prompts) -> bool:
    """Every prompt a shapes caption (ldm-eval's test, which reads prompt records)."""
    from ldm.cli.eval import is_shapes as records_are_shapes
    from ldm.prompts import PromptRecord

    return records_are_shapes([PromptRecord(line=i + 1, prompt=p) for i, p in enumerate(prompts)])


class TrainingEval:
    """`due(step, last)`, then `evaluate(pipe) -> {eval_*: float}` with the pipeline as it stands."""

    def __init__(self, cfg, data_cfg, device="cpu"):
        self.cfg = cfg
        self.prompts = eval_prompts(cfg, data_cfg)
        self.shapes = is_shapes(self.prompts)
        self.inception = self.clip = None
        if cfg.eval_inception_weights is not None:
            self.inception = self._inception(cfg, data_cfg, device)
        if cfg.eval_clip_model or cfg.eval_clip_weights or cfg.eval_clip_folder:
            from ldm.eval.clip_score import load_clip

            self.clip = load_clip(cfg.eval_clip_model, cfg.eval_clip_weights, cfg.eval_clip_folder, device=device,
                                  settings=CLIP_SETTINGS)

    @staticmethod
    def _inception(cfg, data_cfg, device):
        """The Inception metrics with the held-out images in as the real set (as ldm-eval --data-config)."""
        from ldm.data import build_dataset
        from ldm.eval.fid_kid import InceptionMetrics, from_model_range

        metrics = InceptionMetrics.from_file(cfg.eval_inception_weights, "validation.eval_inception_weights", device=device)
        if data_cfg.num_validation < 2:
            raise LdmError("validation.eval_inception_weights compares with held-out images: set data.num_validation to at least 2")
        real = build_dataset(data_cfg, "validation")
        for i in range(0, len(real), 64):
            batch = [real[j]["pixel_values"] for j in range(i, min(i + 64, len(real)))]
            metrics.update(from_model_range(torch.stack(batch)), real=True)
        return metrics

    def due(self, step: int, last: bool) -> bool:
        return step % self.cfg.eval_every == 0 or last

    @torch.no_grad()
    def evaluate(self, pipe) -> Dict[str, float]:
        from ldm.eval.fid_kid import to_uint8
        from ldm.eval.scores import score_point

        n = self.cfg.eval_images_per_prompt
        pipe.set_progress_bar_config(disable=True)
        images = pipe(
            self.prompts, num_images_per_prompt=n, num_inference_steps=self.cfg.eval_steps,
            guidance_scale=self.cfg.eval_guidance_scale, generator=torch.Generator().manual_seed(self.cfg.seed),
        ).images
        prompts = [p for p in self.prompts for _ in range(n)]  # the pipeline's order: each prompt's n images together
        out = score_point(to_uint8(images), prompts, self.inception, self.clip, shapes=False)
        if self.shapes:
            out.update(self._adherence(images, n))
        return {f"eval_{k}": float(v) for k, v in out.items()}

    def _adherence(self, images, n) -> Dict[str, float]:
        """ldm-demo's adherence table: the mean over all images, and over the demo's held-out pairs when some are asked for."""
        from ldm.cli.demo import HELD_OUT, adherence_table
        from ldm.data.checker import adherence
        from ldm.data.shapes import parse_pair

        out = {"adherence": adherence(images, [p for p in self.prompts for _ in range(n)])}
        held = [" ".join(parse_pair(p)) in HELD_OUT for p in self.prompts]
        if any(held) and not all(held):  # adherence_table averages both groups
            per_prompt = [images[i * n : (i + 1) * n] for i in range(len(self.prompts))]
            out["adherence_held_out"] = adherence_table(self.prompts, per_prompt)[2]
        return out


def build_training_eval(cfg, data_cfg, device="cpu") -> Optional[TrainingEval]:
    """None when validation.eval_every is None; raises LdmError on bad settings or missing weight files."""
    if cfg.eval_every is None:
        return None
    if cfg.eval_every < 1:
        raise LdmError(f"validation.eval_every must be at least 1 (or null: off), got {cfg.eval_every}")
    if cfg.eval_every % cfg.every:
        raise LdmError(f"validation.eval_every={cfg.eval_every} runs at validation steps: make it a multiple of validation.every={cfg.every}")
    if cfg.eval_images_per_prompt < 1 or cfg.eval_steps < 1:
        raise LdmError("validation.eval_images_per_prompt and validation.eval_steps must be at least 1")
    return TrainingEval(cfg, data_cfg, device)
