"""LoRA around an ``nn.Embedding``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.layer import AdapterLayer, adapter_dtype
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.init import EMBEDDING_INITIALISERS, initialise
from peftkit.methods.lora.stacking import padded_stack


class LoraEmbedding(AdapterLayer):
    """``e(t) = E0[t] + s · B A[:, t]``: a low-rank update of the (vocab x dim) table ``E0``.

    ``A`` is ``lora_embedding_A[name]`` (r x vocab), looked up by token like an embedding table; ``B`` is
    ``lora_embedding_B[name]`` (dim x r). ``ΔE = s · (B A)ᵀ`` (vocab x dim) merges into the table. Names and
    shapes follow HF PEFT so that checkpoints move between the two. Dropout is not applied: the input is a
    token id, not a vector (HF PEFT does the same). Several active adapters add their updates.
    """

    combines_adapters = True
    adapter_holders = ("lora_embedding_A", "lora_embedding_B")  # AdapterLayer's bookkeeping reads these
    adapter_settings = ("scaling", "configured_scaling")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.configured_scaling: dict[str, float] = {}  # the config's s, which set_scale() multiplies

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        weight = self.base_layer.weight
        dtype = adapter_dtype(config.adapter_dtype, self.base_layer)
        self.lora_embedding_A[name] = nn.Parameter(
            weight.new_empty(config.r, self.num_embeddings, dtype=dtype)
        )
        self.lora_embedding_B[name] = nn.Parameter(
            weight.new_empty(self.embedding_dim, config.r, dtype=dtype)
        )
        self.scaling[name] = self.configured_scaling[name] = config.scaling
        initialise(
            EMBEDDING_INITIALISERS,
            self.lora_embedding_A[name],
            self.lora_embedding_B[name],
            config.init,
            config.r,
        )

    def set_scale(self, name: str, factor: float) -> None:
        """Adapter ``name``'s update scaled by ``factor`` times the configured ``s`` (HF PEFT's set_scale)."""
        self.scaling[name] = factor * self.configured_scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s · (B A)ᵀ``, (vocab, dim): the update of the embedding table."""
        return self.scaling[name] * (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T

    def merge(self, name: str) -> None:
        """``E0 + ΔE`` rounded once to the table's dtype, as a new tensor: a table tied to the output head
        keeps its value there (the unmerged adapter changes only the lookup), and unmerging is exact."""
        if name in self.merged_adapters:
            return
        with torch.no_grad():
            weight = self.base_layer.weight
            total = torch.promote_types(weight.dtype, torch.float32)
            self.put_merged(self.base_layer, "weight", weight.to(total) + self.delta_weight(name).to(total))
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if self.restore_unmerged():
            self.merged_adapters.clear()
            return
        with torch.no_grad():
            while self.merged_adapters:
                self.base_layer.weight -= self.delta_weight(self.merged_adapters.pop()).to(
                    self.base_layer.weight.dtype
                )

    def _lookup(self, tokens: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(
            tokens,
            table,
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(tokens)
        if self.routing is not None:
            return self._mixed_forward(tokens, result)
        out_dtype = result.dtype
        for name in self.running_adapters():
            after_A = self._lookup(tokens, self.lora_embedding_A[name].T)  # (..., r)
            update = (after_A @ self.lora_embedding_B[name].T) * self.scaling[name]  # (..., dim)
            result = result + self._scaled(update)
        return result.to(out_dtype)

    def _scaled(self, update: torch.Tensor) -> torch.Tensor:
        """Embeddings that scale their lookup (Gemma's ``embed_scale``, sqrt(dim)) scale the update alike, so
        the unmerged adapter equals the merged table ``E0 + ΔE`` (the base forward then scales both)."""
        embed_scale = getattr(self.base_layer, "embed_scale", None)
        return update if embed_scale is None else update * embed_scale.to(update.dtype)

    def _mixed_forward(self, tokens: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        routing = self.routing
        present = [n for n in routing.names if self.runs(n)]
        if not present:
            return result
        routing.check_batch(tokens.shape[0], f"LoraEmbedding({self.num_embeddings}x{self.embedding_dim})")
        stack_A, stack_B = padded_stack(
            routing.names,
            lambda n: (
                (self.lora_embedding_A[n], self.lora_embedding_B[n], self.scaling[n])
                if self.runs(n)
                else None
            ),
            a_shape=(self.num_embeddings,),
            b_shape=(self.embedding_dim,),
            like=self.lora_embedding_A[present[0]],
        )  # (n, r_max, vocab), (n, dim, r_max) with each B scaled by its s
        rows = routing.index
        flat = tokens.reshape(tokens.shape[0], -1)  # (batch, tokens)
        after_A = stack_A.transpose(1, 2)[rows[:, None], flat]  # (batch, tokens, r_max)
        update = torch.bmm(after_A, stack_B[rows].transpose(1, 2))  # (batch, tokens, dim)
        return (result + self._scaled(update.reshape(result.shape))).to(result.dtype)
