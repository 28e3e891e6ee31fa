"""benchmarks/gpu/profile_steps.py: how kernels are named (its phase runs end to end on CPU inside
test_gpu_bench.py::test_gpu_bench_dry_run, `--parts ...,profile`, the same code as `run.sh profile`)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))


def test_classify_names_kernels_by_what_they_compute():
    import profile_steps as ps

    assert ps.classify("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>") == "4-bit dequant"
    assert ps.classify("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert ps.classify("aten::addmm") == "matmul"
    assert ps.classify("flash_fwd_kernel<Flash_fwd_kernel_traits<128, 64, 128>>") == "attention"
    assert ps.classify("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert ps.classify("cunn_SoftMaxForward<4, float, float, float, LogSoftMaxForwardEpilogue>") == "loss head"
    assert ps.classify("void multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>>") == "optimizer"
    assert ps.classify("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>") == "other kernels"
