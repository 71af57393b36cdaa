"""Sampling schedulers by the names users know ("dpm++2m-karras", "euler-ancestral", ...).

Each name is a diffusers scheduler class and the settings that make it the sampler of that
name (as the A1111 / ComfyUI names map onto diffusers). A scheduler samples a model only if
it fits the model's training objective (`ldm.objectives`): the DDPM-family samplers read the
discrete beta schedule (epsilon, v or x_0 prediction), the EDM ones Karras et al.'s
preconditioning, the flow ones the velocity. The new scheduler is built `from_config` of
the model's own one, so its schedule (betas, prediction type, sigmas) carries over.

    from ldm.schedulers import make_scheduler
    pipe.scheduler = make_scheduler("dpm++2m-karras", pipe.scheduler)
"""

import importlib.util
import json
from pathlib import Path
from typing import Optional

from ldm.errors import LdmError

# name -> (diffusers class name, settings, the objectives it fits, what it is)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}, ("ddpm",), "DDIM (Song et al. 2021); eta > 0 adds noise"),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, ("ddpm",), "PLMS (Liu et al. 2022), Stable Diffusion 1's first sampler"),
    "euler": ("EulerDiscreteScheduler", {}, ("ddpm",), "Euler on the Karras ODE (Karras et al. 2022, Alg. 1)"),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}, ("ddpm",), "Euler with fresh noise each step"),
    "heun": ("HeunDiscreteScheduler", {}, ("ddpm",), "Heun's 2nd order (Karras et al. 2022, Alg. 1): 2 U-Net calls a step"),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                 "use_karras_sigmas": False}, ("ddpm",), "DPM-Solver++(2M) (Lu et al. 2022)"),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}, ("ddpm",), "DPM-Solver++(2M), Karras sigmas"),
    # Its SDE noise comes from one Brownian tree per call, seeded here (else from the global RNG): runs repeat,
    # but an image depends on the batch it is in.
    "dpm++sde-karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True, "noise_sampler_seed": 0}, ("ddpm",),
                        "DPM-Solver++ SDE, Karras sigmas (needs torchsde)"),
    "unipc": ("UniPCMultistepScheduler", {}, ("ddpm",), "UniPC (Zhao et al. 2023)"),
    "lcm": ("LCMScheduler", {}, ("ddpm",), "LCM (Luo et al. 2023): for consistency-distilled U-Nets, 2-8 steps"),
    "edm-euler": ("EDMEulerScheduler", {}, ("edm",), "Euler on the EDM sigmas (Karras et al. 2022)"),
    "edm-dpm++2m": ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, ("edm",),
                    "DPM-Solver++(2M) with EDM preconditioning"),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}, ("flow",), "Euler on the flow's velocity (Esser et al. 2024)"),
}
OBJECTIVES = ("ddpm", "edm", "flow")
NEEDS = {"DPMSolverSDEScheduler": "torchsde"}  # optional packages a scheduler imports


def known_names() -> str:
    return ", ".join(SCHEDULERS)


def names_for(objective: str) -> list:
    return [name for name, (_, _, fits, _) in SCHEDULERS.items() if objective in fits]


def objective_of_scheduler(class_name: str) -> str:
    """The objective a model's own scheduler samples: EDM*, FlowMatch*, else the DDPM family."""
    if class_name.startswith("EDM"):
        return "edm"
    if class_name.startswith("FlowMatch"):
        return "flow"
    return "ddpm"


def model_objective(folder) -> str:
    """The objective a model folder was trained with: ldm_config.yaml's objective.kind, else its scheduler's class."""
    folder = Path(folder)
    recorded = folder / "ldm_config.yaml"
    if recorded.is_file():
        from omegaconf import OmegaConf

        saved = OmegaConf.load(recorded)
        kind = saved.get("objective", {}).get("kind") if saved else None
        if kind in OBJECTIVES:
            return kind
    config = folder / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        raise LdmError(f"{folder} has no scheduler/scheduler_config.json: is it a model folder saved by the trainer?")
    return objective_of_scheduler(json.loads(config.read_text())["_class_name"])


def check_scheduler(name: str, objective: str) -> None:
    """A one-line error for a name that is unknown, does not fit the objective, or lacks its package."""
    if name not in SCHEDULERS:
        raise LdmError(f"unknown scheduler '{name}': known ones are {known_names()}")
    cls_name, _, fits, _ = SCHEDULERS[name]
    if objective not in fits:
        raise LdmError(f"scheduler '{name}' samples {'/'.join(fits)} models but this model was trained with the "
                       f"{objective} objective: use one of {', '.join(names_for(objective))}")
    package = NEEDS.get(cls_name)
    if package and importlib.util.find_spec(package) is None:
        raise LdmError(f"scheduler '{name}' needs {package}: pip install {package}")


def make_scheduler(name: str, base, objective: Optional[str] = None):
    """The scheduler called `name`, built from the config of `base` (the model's scheduler)."""
    import diffusers

    objective = objective or objective_of_scheduler(type(base).__name__)
    check_scheduler(name, objective)
    cls_name, settings, _, _ = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(base.config, **settings)
