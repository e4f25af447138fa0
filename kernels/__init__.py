"""Triton kernels for MoE and multi-LoRA work, each with a plain-torch reference.

Importable on its own (torch and triton only). Not the Hugging Face ``kernels`` hub package:
see the README's note on the name clash.
"""

from .backend import use_backend
from .fp8 import FP8_MAX, dequantize_fp8, dequantize_fp8_expanded, quantize_fp8, quantize_fp8_expanded
from .fp8_adamw import adamw_math, fp8_adamw_step
from .gated_mlp import grouped_gated_mlp, grouped_swiglu
from .grouped_gemm import grouped_mm
from .lora import LoRASegments, PagedLoRA, add_lora, lora_expand, lora_shrink

__all__: list[str] = [
    "FP8_MAX",
    "LoRASegments",
    "PagedLoRA",
    "adamw_math",
    "add_lora",
    "dequantize_fp8",
    "dequantize_fp8_expanded",
    "fp8_adamw_step",
    "grouped_gated_mlp",
    "grouped_mm",
    "grouped_swiglu",
    "lora_expand",
    "lora_shrink",
    "quantize_fp8",
    "quantize_fp8_expanded",
    "use_backend",
]
