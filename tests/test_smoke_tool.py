"""The smoke script's step accounting: operations counted as a GPU would launch them."""

import torch

from tests.helpers import load_tool

OperatorCount = load_tool("bench/gpu_smoke").OperatorCount


def test_operation_count_takes_innermost_launching_operators():
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(8, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        OperatorCount.mark("forward")
        y = torch.nn.functional.linear(x, w).view(32).relu().to(torch.float64)
        OperatorCount.mark("backward")
        y.sum().backward()
    counts = OperatorCount.count(profile.events())
    # linear is mm (its transpose and the view launch nothing), relu is clamp_min, to is one copy
    assert counts["forward"] == {"mm": 1, "clamp_min": 1, "copy_": 1}
    assert counts["backward"].get("mm") == 1 and "threshold_backward" in counts["backward"]
    assert counts["optimizer"] == {}
    assert not OperatorCount.launches("aten::result_type") and not OperatorCount.launches("aten::view")
    assert OperatorCount.launches("aten::_local_scalar_dense") and OperatorCount.launches("graph_0_cpp_fused_add_mul_0")
    assert OperatorCount.launches("cudaLaunchKernel") and OperatorCount.launches("cuLaunchKernelEx")
