"""A lean GPT-2 for the benchmarks: the least code that does the same arithmetic as lmlab's parity transformer.

The yardstick for "fast" is a short hand-written PyTorch GPT-2 (SDPA, fused AdamW): no configuration,
no masks, no objective, nothing but the kernels. This is ours, written for the benchmarks; it computes exactly
what ``Transformer(positions="learned", norm="layernorm", mlp="gelu", dropout=0)`` with ``CLM`` computes (a
test copies weights across and compares loss and gradients), so ``lmlab / lean`` measures lmlab's own overhead
and ``lean / HF`` the most that any implementation of the same kernels could gain over Hugging Face.

``LeanGPT(...)(ids)`` takes (B, T + 1) token rows and returns the mean next-token cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LeanBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.fc = nn.Linear(d_model, 4 * d_model, bias=False)
        self.out = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class LeanGPT(nn.Module):
    def __init__(self, vocab: int, d_model: int, n_layers: int, n_heads: int, max_len: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d_model), nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(LeanBlock(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inputs, targets = ids[:, :-1], ids[:, 1:]
        x = self.wte(inputs) + self.wpe.weight[: inputs.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def lean_name(key: str) -> str:
    """The name in ``LeanGPT`` of an lmlab parity ``Transformer``'s parameter ``key``."""
    for old, new in {"attn.qkv.": "qkv.", "attn.out.": "proj.", "mlp.up.": "fc.", "mlp.down.": "out.",
                     "norm1.": "ln1.", "norm2.": "ln2."}.items():
        key = key.replace(old, new)
    for old, new in {"embed.": "wte.", "pos_embed.": "wpe.", "norm.": "ln_f."}.items():
        key = new + key[len(old):] if key.startswith(old) else key
    return key


def copy_from_lmlab(lean: LeanGPT, model) -> None:
    """Load an lmlab parity ``Transformer``'s weights into ``lean`` (same shapes, other names)."""
    lean.load_state_dict({lean_name(k): v for k, v in model.state_dict().items() if not k.startswith("head.")})
