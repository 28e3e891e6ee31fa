"""benchmarks/gpu/run.sh profile --dry-run: the step profiler's code end to end on CPU at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
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


def test_profile_dry_run(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu/profile_steps.py"), str(tmp_path), "--dry-run", "--steps", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "profile.json").read_text())
    assert result["cuda"] is False and set(result["results"]) == {"trl", "padded", "packing"}
    for method, r in result["results"].items():
        assert "error" not in r, (method, r)
        shares = r["share"]
        assert r["step_s"] > 0 and shares["host-side / idle"] >= 0
        assert shares["matmul"] > 0 and shares["4-bit dequant"] > 0, (method, shares)  # QLoRA's two big costs
    assert result["results"]["packing"]["share"]["attention"] > 0
    table = (tmp_path / "PROFILE.md").read_text()
    assert "NOT a GPU profile" in table and "host-side / idle %" in table and "device reads / step" in table
