"""The loops refuse what they cannot do yet, before any training starts."""

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from ldm.errors import LdmError
from ldm.train.run import check_distributed_type


def test_fsdp_is_refused_with_the_way_out():
    with pytest.raises(LdmError, match="multi_gpu.yaml") as info:
        check_distributed_type(SimpleNamespace(distributed_type=DistributedType.FSDP))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", [DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU,
                                  DistributedType.DEEPSPEED])
def test_whole_parameter_types_pass(kind):
    check_distributed_type(SimpleNamespace(distributed_type=kind))
