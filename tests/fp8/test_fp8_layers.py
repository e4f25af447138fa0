"""The FP8 family's layering: kernels below moeplug, no import cycle, no Triton or C++ build on import."""

import ast
import subprocess
import sys
from pathlib import Path

import torch

from kernels import fp8_adamw
from kernels.fp8 import dequantize_fp8_expanded

ROOT = Path(__file__).parents[2]


def _imported_modules(path: Path) -> set[str]:
    """Top-level and function-level imports of one kernels module, as dotted names (relative ones resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ("kernels." + (node.module or "")).rstrip(".") if node.level else node.module
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_kernels_never_imports_moeplug_and_fp8_modules_do_not_import_each_other():
    kernels_dir = ROOT / "kernels"
    graph = {f"kernels.{p.stem}": _imported_modules(p) for p in kernels_dir.glob("*.py") if p.stem != "__init__"}
    for module, imports in graph.items():
        assert not any(name.split(".")[0] == "moeplug" for name in imports), module
    # The Triton module reads constants from the format module, never from kernels.fp8 (which imports it).
    assert "kernels.fp8" not in graph["kernels._fp8_triton"]
    assert "kernels._fp8_triton" in graph["kernels.fp8"]
    assert "kernels.fp8_adamw" not in graph["kernels._fp8_cpu"]
    assert graph["kernels._fp8_format"] <= {"math", "torch"}


def test_import_moeplug_loads_neither_triton_nor_the_cpp_step():
    code = ("import sys, moeplug, kernels._fp8_cpu as cpu; "
            "print('triton' in sys.modules, cpu.load_extension.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "0"], out.stdout + out.stderr


def test_fp32_states_step_like_torch_adamw():
    """The Adam math written once: with fp32 states the op is torch.optim.AdamW (same arithmetic, same order)."""
    torch.manual_seed(0)
    ours, ref = torch.randn(300), torch.nn.Parameter(torch.randn(300))
    ours.copy_(ref.detach())
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    state = {"exp_avg": torch.zeros(300), "exp_avg_sq": torch.zeros(300)}
    for step in range(1, 4):
        grad = torch.randn(300)
        ref.grad = grad.clone()
        ref_opt.step()
        fp8_adamw.fp8_adamw_step([ours], [grad], [state], [step], lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                                 weight_decay=0.1, group_size=128)
        # One op per element in torch's order; only a vectorised-vs-scalar tail could round differently.
        torch.testing.assert_close(ours, ref.detach(), rtol=1e-6, atol=0)


def test_fp8_reference_updates_the_param_with_the_fp32_moments():
    """The torch reference: dequantise, the fp32 math, requantise (the param sees the unquantised moments)."""
    torch.manual_seed(1)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    param, grad = torch.randn(1000), torch.randn(1000)
    state = {}
    for key in fp8_adamw.MOMENTS:
        state[key], state[f"{key}_amax"], state[f"{key}_k16"] = fp8_adamw.quantize_fp8_expanded(
            torch.randn(1000).abs() if key == "exp_avg_sq" else torch.randn(1000), 128)
    moments = [dequantize_fp8_expanded(state[k], state[f"{k}_amax"], state[f"{k}_k16"], 128)
               for k in fp8_adamw.MOMENTS]
    expected = param.clone()
    fp8_adamw.adamw_math(expected, grad, *moments, step=3, **hyper)
    fp8_adamw.fp8_adamw_step_torch([param], [grad], [state], [3], **hyper, group_size=128)
    assert torch.equal(param, expected)
    for key, moment in zip(fp8_adamw.MOMENTS, moments):
        codes, amax, k16 = fp8_adamw.quantize_fp8_expanded(moment, 128)  # the new moments, requantised
        assert torch.equal(state[key].view(torch.uint8), codes.view(torch.uint8))
        assert torch.equal(state[f"{key}_amax"], amax) and torch.equal(state[f"{key}_k16"], k16)
        assert not torch.equal(amax, fp8_adamw.quantize_fp8_expanded(grad, 128)[1])  # moments, not the grad
