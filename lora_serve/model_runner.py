"""``ModelRunner``: the Hugging Face model run on one step's packed batch, with paged attention and LoRA.

The runner owns the model (its attention implementation switched to paged attention, its fused MoE
experts to grouped GEMMs with per-(row, expert) LoRA (``moe_lora.py``), the linears and routers that
adapters target wrapped on demand (``lora_layers.py``, ``router_lora.py``)), the unified page pool and the KV layout. ``execute`` packs a step's
``(request, new tokens)`` pairs into a ``StepBatch`` (built once: attention metadata and LoRA segments),
runs the model once with it active, and returns the logits of the rows whose next token is sampled.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kernels.lora import PagedExpertLoRA, PagedLoRA

from . import moe_lora, router_lora
from .adapter_store import LinearShape, ParamShapes
from .config import EngineConfig
from .kv_layout import KVLayout
from .lora_layers import wrap_linear
from .paged_attention import ATTENTION_NAME, BATCH_KWARG
from .pool import PagePool
from .request import Request
from .shared_lora import SharedLoRA
from .step_batch import ActiveStep, StepBatch


class ModelRunner:
    """Runs ``model`` (an HF causal LM, moved to ``config``'s device and dtype) on packed mixed batches."""

    def __init__(self, model: nn.Module, config: EngineConfig):
        _check_attention(model)
        self.model = model.to(device=config.device or model.device, dtype=config.dtype or model.dtype).eval()
        self.model.set_attn_implementation(ATTENTION_NAME)
        text = model.config.get_text_config()
        width = text.hidden_size
        head_dim = getattr(text, "head_dim", None) or width // text.num_attention_heads
        self.layout = KVLayout(text.num_hidden_layers, text.num_key_value_heads * head_dim, width)
        self.pool = PagePool(config.num_slots(width, self.model.dtype), width, self.model.dtype, self.model.device)
        self.max_context: int | None = getattr(text, "max_position_embeddings", None)
        self.vocab_size: int = self.model.get_input_embeddings().num_embeddings
        self.num_adapters = config.max_resident_adapters  # rows of every adapted layer's page tables
        # module (or fused experts parameter) name -> its tables, as adapters target it
        self.lora_layers: dict[str, PagedLoRA | PagedExpertLoRA] = {}
        self.shared_layers: dict[str, SharedLoRA] = {}  # linear name -> its compressed adapters' tables
        self._active = ActiveStep()
        self._experts = moe_lora.install(self.model, self._active)  # experts module name -> module
        self._routers = {name: m for name, m in self.model.named_modules() if router_lora.is_router(m)}

    def linear_shapes(self) -> dict[str, LinearShape]:
        """The linear layers an adapter may target (every ``nn.Linear`` but the output layer)."""
        output_layer = self.model.get_output_embeddings()
        return {
            name: LinearShape(m.in_features, m.out_features)
            for name, m in self.model.named_modules()
            if isinstance(m, nn.Linear) and m is not output_layer
        }

    def parameter_shapes(self) -> ParamShapes:
        """The parameters an adapter may target (PEFT ``target_parameters``): fused experts projections and
        router weights, as module -> parameter -> shape."""
        shapes: ParamShapes = {name: moe_lora.projections(m) for name, m in self._experts.items()}
        return shapes | {name: {"weight": router_lora.shape(m)} for name, m in self._routers.items()}

    def adapt(self, name: str) -> PagedLoRA | PagedExpertLoRA:
        """The page tables of linear, fused experts parameter or router weight ``name``, set up for batched
        LoRA on first use."""
        if name not in self.lora_layers:
            module, _, param = name.rpartition(".")
            pool, capacity = self.pool.slots, self.num_adapters
            if module in self._experts:
                self.lora_layers[name] = moe_lora.adapt(self._experts[module], param, pool, capacity)
            elif module in self._routers:
                self.lora_layers[name] = router_lora.adapt(self._routers[module], self._active, pool, capacity)
            else:
                wrapper = wrap_linear(self.model, name, self._active, pool, capacity)
                self.lora_layers[name] = wrapper.lora
        return self.lora_layers[name]

    def adapt_shared(self, name: str) -> SharedLoRA:
        """The compressed-adapter tables of linear ``name`` (wrapping it on first use)."""
        if name not in self.shared_layers:
            self.adapt(name)
            wrapper = self.model.get_submodule(name)
            wrapper.shared = SharedLoRA(self.pool.slots, wrapper.lora.in_features, wrapper.lora.out_features,
                                        self.num_adapters, self.num_adapters)
            self.shared_layers[name] = wrapper.shared
        return self.shared_layers[name]

    def execute(
        self, scheduled: list[tuple[Request, int]], adapter_index: Callable[[str], int]
    ) -> tuple[torch.Tensor, list[Request]]:
        """Run the model once on ``scheduled``; return ``(logits [S, vocab], the S requests they sample for)``.

        ``adapter_index`` maps an adapter name to its (resident) page-table index.
        """
        batch, sampled = StepBatch.build(scheduled, adapter_index, self.pool.slots, self.layout, self.num_adapters)
        with torch.inference_mode(), self._active.running(batch):
            logits = self.model(
                input_ids=batch.input_ids,
                position_ids=batch.position_ids,
                use_cache=False,
                logits_to_keep=batch.logits_rows,
                **{BATCH_KWARG: batch},
            ).logits[0]
        return logits, sampled


def _check_attention(model: nn.Module) -> None:
    """Refuse, naming the family, models whose attention paged attention would compute wrongly."""
    text = model.config.get_text_config()
    family = getattr(text, "model_type", None) or type(model).__name__
    if getattr(text, "kv_lora_rank", None):
        raise ValueError(
            f"lora_serve cannot serve {family!r} models: their multi-head latent attention (keys "
            f"{getattr(text, 'qk_head_dim', '?')} and values {getattr(text, 'v_head_dim', '?')} wide per head) does "
            "not fit the paged KV layout, which stores keys and values of one head_dim"
        )
    if any(isinstance(getattr(m, "sinks", None), nn.Parameter) for m in model.modules()):
        raise ValueError(
            f"lora_serve cannot serve {family!r} models: their attention adds learned sink logits to the softmax, "
            "which paged attention does not apply"
        )
