"""Store the activations autograd saves for backward in FP8 (E4M3), as COAT does.

Two granularities, after COAT: inputs of linear layers get one scale per tensor (their consumers, the
weight-gradient GEMMs, are what FP8 GEMMs would read); tensors saved by non-linear ops (activation
functions, norms, the gating product of an MLP) get one scale per 1×16 group, because their values
vary too much along a row for a single scale. Group scales are kept in bf16 (rounding them changes a
value by at most 2^-9 relative, well below E4M3's 2^-4), so a 1×16 group costs 18 bytes instead of 64 in
fp32 (0.28x); a per-tensor one costs 1 byte per value (0.25x).

Left alone: integer and bool tensors (indices, masks), parameters, tensors under ``min_numel`` elements,
and everything saved outside the chosen modules (by default the residual stream and attention internals:
rotary embedding and the attention kernel; the attention projections' inputs are compressed).

A third mode, ``"sdpa"`` (see :func:`with_attention`), is for attention modules that call
``torch.nn.functional.scaled_dot_product_attention``: inside them that call keeps q, k and v in FP8
(1×16 groups) and *recomputes* the attention output in backward instead of saving it. Compressing the
saved output itself costs ~9 dB of gradient SQNR (the backward's rowsum(dO·O) no longer matches the
probabilities recomputed from q and k); recomputing it from the same dequantised q, k, v keeps backward
consistent, at the price of one more attention forward per backward.

Built on ``torch.autograd.graph.saved_tensors_hooks``: a forward pre-hook on each chosen module pushes
the hooks, a forward hook pops them, so they apply to exactly what that module's forward saves (the
innermost chosen module decides the granularity). Backward restores the saved tensors in their dtype.
"""

from collections.abc import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from kernels.fp8 import FP8_MAX, dequantize_fp8, quantize_fp8

__all__ = ["ActivationCompressor", "compress_activations", "default_selection", "with_attention"]

_E4M3 = torch.float8_e4m3fn
_SCALE_DTYPE = torch.bfloat16
# Per-tensor codes are dequantised with the group kernels, every group given the tensor's one scale.
_TENSORWISE_GROUP = 128


class _Packed:
    """FP8 codes and scales standing in for one saved tensor until backward needs it."""

    __slots__ = ("codes", "scales", "group_size", "dtype")

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype):
        self.codes, self.scales, self.group_size, self.dtype = codes, scales, group_size, dtype

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes


def _pack_groupwise(x: torch.Tensor, group_size: int) -> _Packed:
    codes, scales = quantize_fp8(x.detach(), group_size, _E4M3)
    return _Packed(codes, scales.to(_SCALE_DTYPE), group_size, x.dtype)


def _pack_tensorwise(x: torch.Tensor) -> _Packed:
    x = x.detach()
    amax = x.abs().amax().float()
    scale = torch.where(amax > 0, amax / FP8_MAX[_E4M3], 1.0).reshape(1)  # one fp32 scale: no rounding
    return _Packed((x.float() / scale).to(_E4M3), scale, 0, x.dtype)


def _unpack(packed: _Packed) -> torch.Tensor:
    if packed.group_size:
        return dequantize_fp8(packed.codes, packed.scales.float(), packed.group_size, packed.dtype)
    n_groups = -(-packed.codes.numel() // _TENSORWISE_GROUP)
    scales = packed.scales.float().expand(n_groups)
    return dequantize_fp8(packed.codes, scales, _TENSORWISE_GROUP, packed.dtype)


_ACTIVATION_MODULES = (torch.nn.SiLU, torch.nn.GELU, torch.nn.ReLU, torch.nn.Tanh, torch.nn.Sigmoid)


def default_selection(name: str, module: torch.nn.Module) -> str | None:
    """Which modules' saved tensors to compress, and how: ``"tensor"``, ``"group"`` or ``None``.

    Linear layers (per tensor), except an output head named ``lm_head`` whose logits gradient is the
    most sensitive; MLP / expert / MoE blocks, norms and activation functions (1×16 groups). Attention
    internals and the residual stream stay in their own precision, as in COAT.
    """
    if isinstance(module, torch.nn.Linear):
        return None if name.split(".")[-1] == "lm_head" else "tensor"
    kind = type(module).__name__.lower()
    if isinstance(module, _ACTIVATION_MODULES) or type(module).__module__ == "transformers.activations":
        return "group"
    if any(part in kind for part in ("mlp", "expert", "moe", "norm")):
        return "group"
    return None


def with_attention(name: str, module: torch.nn.Module) -> str | None:
    """:func:`default_selection` plus ``"sdpa"`` for attention modules (class name containing "attention")."""
    return "sdpa" if "attention" in type(module).__name__.lower() else default_selection(name, module)


_sdpa = torch.nn.functional.scaled_dot_product_attention


class _RecomputedSDPA(torch.autograd.Function):
    """``scaled_dot_product_attention`` saving q, k, v in FP8 and recomputing the output in backward."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale, enable_gqa, packed):
        ctx.packed = packed
        ctx.attn_mask, ctx.options = attn_mask, dict(is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        return _sdpa(q, k, v, attn_mask=attn_mask, **ctx.options)

    @staticmethod
    def backward(ctx, grad_out):
        inputs = [_unpack(p).requires_grad_() for p in ctx.packed]
        with torch.enable_grad():
            out = _sdpa(*inputs, attn_mask=ctx.attn_mask, **ctx.options)
        grads = torch.autograd.grad(out, inputs, grad_out)
        return (*grads, None, None, None, None, None)


def _fp8_sdpa(compressor: "ActivationCompressor") -> Callable:
    """A drop-in ``scaled_dot_product_attention`` for the "sdpa" mode, counting into ``compressor``'s stats."""
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        # Dropout cannot be replayed in backward, and a mask that needs a gradient is not recomputed here.
        if (not needs_grad or dropout_p > 0 or query.numel() < compressor.min_numel
                or (torch.is_tensor(attn_mask) and attn_mask.requires_grad)):
            return _sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)
        packed = [_pack_groupwise(t, compressor.group_size) for t in (query, key, value)]
        compressor.packed_bytes += sum(p.nbytes for p in packed)
        compressor.original_bytes += sum(t.nbytes for t in (query, key, value))
        return _RecomputedSDPA.apply(query, key, value, attn_mask, is_causal, scale, enable_gqa, packed)
    return sdpa


class ActivationCompressor:
    """Module hooks that store the chosen modules' saved activations in FP8; see the module docstring.

    Create with :func:`compress_activations`; :meth:`remove` uninstalls the hooks (tensors already
    saved stay compressed until their backward). ``packed_bytes`` / ``original_bytes`` count what was
    compressed since the last :meth:`reset_stats` (each saved tensor once, however often it is saved).
    """

    def __init__(self, model: torch.nn.Module, select: Callable[[str, torch.nn.Module], str | None],
                 group_size: int, min_numel: int) -> None:
        self.group_size, self.min_numel = group_size, min_numel
        self.packed_bytes = self.original_bytes = 0
        self._stack: list[torch.autograd.graph.saved_tensors_hooks] = []
        # Viewed tensor -> {view geometry and version: packed}; entries die with the tensor.
        self._packed: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._handles = []
        self.modules: dict[str, str] = {}
        for name, module in model.named_modules():
            mode = select(name, module)
            if mode not in (None, "tensor", "group", "sdpa"):
                raise ValueError(f"selection for module {name!r} returned {mode!r}; "
                                 "expected 'tensor', 'group', 'sdpa' or None")
            if mode is not None:
                self.modules[name] = mode
                self._handles.append(module.register_forward_pre_hook(self._enter_hook(mode)))
                self._handles.append(module.register_forward_hook(self._exit, always_call=True))

    def _enter_hook(self, mode: str) -> Callable:
        def enter(module, args):
            # "sdpa": the module's other saved tensors (rotary products) in groups, its attention call
            # swapped for the recomputing one until the module returns (functional is looked up per call).
            pack_mode = "group" if mode == "sdpa" else mode
            hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(t, pack_mode), _unpack_saved)
            hooks.__enter__()
            previous = torch.nn.functional.scaled_dot_product_attention
            if mode == "sdpa":
                torch.nn.functional.scaled_dot_product_attention = _fp8_sdpa(self)
            self._stack.append((hooks, previous))
        return enter

    def _exit(self, module, args, output) -> None:
        hooks, previous = self._stack.pop()
        torch.nn.functional.scaled_dot_product_attention = previous
        hooks.__exit__(None, None, None)

    def _pack(self, tensor: torch.Tensor, mode: str):
        # Linear layers save views: the input reshaped to 2-D, the weight transposed. Judge and
        # deduplicate by the viewed tensor: a parameter's view stays as is (the parameter is kept
        # anyway), and one input feeding q/k/v or gate/up projections is packed once.
        base = tensor if tensor._base is None else tensor._base
        if (not tensor.is_floating_point() or tensor.dtype in FP8_MAX or tensor.numel() < self.min_numel
                or isinstance(base, torch.nn.Parameter) or (base.is_leaf and base.requires_grad)):
            return tensor
        views = self._packed.setdefault(base, {})
        key = (mode, tuple(tensor.shape), tensor.stride(), tensor.storage_offset(), tensor._version)
        if key not in views:
            views[key] = _pack_tensorwise(tensor) if mode == "tensor" else _pack_groupwise(tensor, self.group_size)
            self.packed_bytes += views[key].nbytes
            self.original_bytes += tensor.nbytes
        return views[key]

    def reset_stats(self) -> None:
        """Zero ``packed_bytes`` and ``original_bytes``."""
        self.packed_bytes = self.original_bytes = 0

    def remove(self) -> None:
        """Uninstall the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _unpack_saved(saved):
    return _unpack(saved) if isinstance(saved, _Packed) else saved


def compress_activations(
    model: torch.nn.Module,
    select: Callable[[str, torch.nn.Module], str | None] = default_selection,
    *,
    group_size: int = 16,
    min_numel: int = 1024,
) -> ActivationCompressor:
    """Store the activations saved by ``model``'s chosen modules in FP8 E4M3 until backward.

    Args:
        model: any ``nn.Module`` (an HF model, a patched MoE model, a plain block).
        select: ``(qualified name, module) -> "tensor" | "group" | "sdpa" | None``; see :func:`default_selection`
            and :func:`with_attention`.
        group_size: values per scale for ``"group"`` modules (COAT: 16).
        min_numel: tensors with fewer elements are saved as they are.

    Returns the :class:`ActivationCompressor`; call ``.remove()`` to stop compressing.
    """
    return ActivationCompressor(model, select, group_size, min_numel)
