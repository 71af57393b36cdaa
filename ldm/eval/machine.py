"""The machine a report or an evaluation was made on: what a reader needs to compare timings."""

import os
import platform
from typing import Dict


def machine_info() -> Dict[str, str]:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu count": str(os.cpu_count()),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["cuda"] = str(torch.version.cuda)
        info["gpus"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        info["gpus"] = "none"
    return info
