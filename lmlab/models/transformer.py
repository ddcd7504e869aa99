"""A pre-LN decoder/encoder Transformer (Vaswani et al. 2017, arXiv 1706.03762; pre-LN as in GPT-2,
Radford et al. 2019) that honours causal, bidirectional and prefix attention.

One stack serves every objective: the attention pattern comes with each batch (``Attention``), so the
same weights can run as a causal LM (GPT), a masked LM (BERT) or a prefix LM (T5/UniLM-style).

Beyond the training length a causal model can attend through a sliding window with attention sinks
(StreamingLLM, Xiao et al. 2023, arXiv 2309.17453): the record's ``window`` keeps the last ``window`` keys of
each query plus the first ``sinks`` (``model.sinks``, 4 as in the paper, unless the record says otherwise). With
rotary positions and ``cache_positions`` (the paper's scheme), the sink keys are scored as if the query sat at
its slot of a rolling cache of ``sinks + window`` entries (``min(i, sinks + window - 1)``), while the window keys
keep their true distances (the same in the cache, where they are contiguous); this is an explicit softmax over
the window scores and the sink scores together (``_attend_with_sinks``), not the fused kernel.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.attention import BIDIRECTIONAL, CAUSAL, PREFIX, Attention
from lmlab.errors import UserError
from lmlab.models.base import Backbone
from lmlab.models.layers import MLP, MLPKind, NormKind, Rotary, make_norm, norm_kind
from lmlab.models.parametrization import Parametrization, ParametrizationKind
from lmlab.models.spec import HF_SPECIAL_IDS, HFAdapter, ModelSpec, Unmappable
from lmlab.settings import Fraction, NonNegative, Positive, PositiveFloat

POSITIONS = ("rotary", "learned")


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``; scores scaled by ``scale``
    (``None``: ``1/sqrt(head_dim)``)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, rotary: Rotary | None,
                 scale: float | None = None) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.scale = scale
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.out.is_residual_proj = True
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)
        self.rotary = rotary
        # ``inspect(q, k, mask, is_causal)``, when set (``lmlab.training.stats``, on the steps it records), sees
        # the queries and keys (B, H, T, d_head) that the attention kernel reads
        self.inspect: Callable | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                stream: tuple[int, int] | None = None) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)
        if stream is not None and self.rotary is not None:
            y = self._attend_with_sinks(qkv, mask, *stream)
        elif self.rotary is not None:  # queries and keys rotated together, in one set of kernels
            qk, v = qkv.split([2, 1], dim=2)  # split's backward is one cat (slicing's: zeros + copies)
            q, k = self.rotary(qk).permute(2, 0, 3, 1, 4)
            v = v.squeeze(2).transpose(1, 2)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
        if stream is None or self.rotary is None:
            if self.inspect is not None:  # queries as the kernel's default 1/sqrt(head_dim) scale would see them
                self.inspect(q if self.scale is None else q * (self.scale * math.sqrt(self.head_dim)), k, mask,
                             is_causal)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
            )
        return self.resid_dropout(self.out(y.transpose(1, 2).reshape(B, T, D)))

    def _attend_with_sinks(self, qkv: torch.Tensor, allowed: torch.Tensor, sinks: int,
                           window: int) -> torch.Tensor:
        """Attention over ``allowed`` (the window and sink mask) with the sink keys at cache positions: the
        window keys scored with queries at their own positions, the sink keys (``j < sinks``, outside the
        window) with each query rotated to cache slot ``min(i, sinks + window - 1)``; one softmax over both."""
        T = qkv.shape[1]
        sinks = min(sinks, T)
        qk, v = qkv.split([2, 1], dim=2)
        q, k = self.rotary(qk).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        v = v.squeeze(2).transpose(1, 2)
        slot = torch.arange(T, device=qkv.device).clamp(max=sinks + window - 1)
        q_slot = self.rotary.rotate_at(qk[:, :, 0], slot).transpose(1, 2)
        i = torch.arange(T, device=qkv.device)
        near = (i[:, None] - i[None, :]) < window
        scale = 1.0 / math.sqrt(self.head_dim) if self.scale is None else self.scale
        s_near = (q @ k.transpose(-1, -2)).float().mul(scale).masked_fill(~(allowed & near), float("-inf"))
        s_sink = (q_slot @ k[:, :, :sinks].transpose(-1, -2)).float().mul(scale)
        s_sink = s_sink.masked_fill(~(allowed[..., :sinks] & ~near[:, :sinks]), float("-inf"))
        w = torch.softmax(torch.cat([s_near, s_sink], dim=-1), dim=-1).to(v.dtype)
        return w[..., :T] @ v + w[..., T:] @ v[:, :, :sinks]


class Block(nn.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``; each branch multiplied by ``branch_mult`` where it is
    not 1 (CompleteP)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, norm: str, mlp: str, dropout: float,
                 rotary: Rotary | None, ffn: nn.Module | None = None, norm_eps: float | None = None,
                 attn_scale: float | None = None, branch_mult: float = 1.0) -> None:
        super().__init__()
        self.branch_mult = branch_mult
        self.norm1 = make_norm(norm, d_model, norm_eps)
        self.attn = SelfAttention(d_model, n_heads, dropout, rotary, attn_scale)
        self.norm2 = make_norm(norm, d_model, norm_eps)
        # ``ffn`` replaces the dense MLP (a mixture of experts, say); it maps (B, T, d) -> (B, T, d)
        self.mlp = ffn if ffn is not None else MLP(d_model, d_ff, mlp, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                stream: tuple[int, int] | None = None) -> torch.Tensor:
        if self.branch_mult != 1.0:
            x = x + self.branch_mult * self.attn(self.norm1(x), mask, is_causal, stream)
            return x + self.branch_mult * self.mlp(self.norm2(x))
        x = x + self.attn(self.norm1(x), mask, is_causal, stream)
        return x + self.mlp(self.norm2(x))


class Transformer(Backbone):
    """Pre-LN Transformer backbone.

    Args: ``vocab_size`` and ``attention`` (the objective's pattern) come from the pipeline;
    ``d_model``, ``n_layers``, ``n_heads``, ``head_dim`` (if set, the heads' size: ``n_heads = d_model //
    head_dim``, so the head size stays fixed when the width changes; it wins over ``n_heads`` when both are
    given), ``d_ff`` (default ``4 * d_model``), ``norm`` (rmsnorm or
    layernorm), ``positions`` (rotary or learned; learned positions cover ``max_len`` tokens),
    ``mlp`` (gelu or swiglu), ``dropout`` (attention, residual and embedding dropout),
    ``tie_embeddings`` (the LM head reuses the token embedding), ``activation_checkpointing``
    (recompute each block in the backward pass while training), ``rope_base`` (the rotary base, 10000 as in
    RoFormer; rotary positions only), ``norm_eps`` (the norms' eps; null: RMSNorm's 1e-6, LayerNorm's 1e-5),
    ``sinks`` (the first positions every query keeps under sliding-window
    attention, see the module docstring; full attention, as in training, never reads it),
    ``parametrization`` (sp, mup or completep; ``lmlab.models.parametrization``) with ``base_width`` (mup,
    completep) and ``base_depth`` (completep).
    ``ffn_factory(layer_index)``, for
    subclasses (not a config key), builds each block's feed-forward module in place of the dense MLP.

    Initialisation (GPT-2): every weight N(0, 0.02), the residual output projections (attention out,
    MLP down) N(0, 0.02 / sqrt(2 * n_layers)), norms at one. Under mup and completep the hidden weights (the
    blocks' matrices, readouts such as a router excepted) have these deviations divided by ``sqrt(d_model /
    base_width)`` and learning rate multiplier ``base_width / d_model``; the logits are multiplied by
    ``base_width / d_model``.
    """

    supported_attention = (CAUSAL, BIDIRECTIONAL, PREFIX)
    reads_documents = True  # the attention record's ``documents`` (``data.doc_mask``) mask attention

    def __init__(self, vocab_size: int, attention: str = CAUSAL, d_model: Positive = 64, n_layers: Positive = 2,
                 n_heads: Positive = 4, head_dim: Optional[Positive] = None, d_ff: Optional[Positive] = None,
                 norm: NormKind = "rmsnorm",
                 positions: str = "rotary", max_len: Positive = 512, dropout: Fraction = 0.0,
                 tie_embeddings: bool = True, activation_checkpointing: bool = False,
                 mlp: MLPKind = "gelu", rope_base: float = 10000.0, sinks: NonNegative = 4,
                 norm_eps: Optional[PositiveFloat] = None, parametrization: ParametrizationKind = "sp",
                 base_width: Optional[Positive] = None, base_depth: Optional[Positive] = None,
                 ffn_factory: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__(vocab_size, d_model, attention, activation_checkpointing)
        self.parametrization = Parametrization.of(parametrization, d_model, n_layers, base_width, base_depth)
        if head_dim is not None:
            if d_model % head_dim:
                raise UserError(f"d_model={d_model} is not a multiple of head_dim={head_dim}: change one of them "
                                "(or set head_dim to null and use n_heads).")
            n_heads = d_model // head_dim
        if d_model % n_heads:
            raise UserError(f"d_model={d_model} is not a multiple of n_heads={n_heads}: change one "
                            "of them.")
        if positions not in POSITIONS:
            raise UserError(f"unknown positions {positions!r}: choose one of {', '.join(POSITIONS)}.")
        if not (math.isfinite(rope_base) and rope_base > 1.0):
            raise UserError(f"model.rope_base={rope_base} must be a finite number above 1: set it to 10000 "
                            "(RoFormer's).")
        if positions != "rotary" and rope_base != 10000.0:
            raise UserError(f"model.rope_base={rope_base} only applies to rotary positions and model.positions is "
                            f"{positions}: drop model.rope_base or set model.positions=rotary.")
        self.n_layers, self.n_heads = n_layers, n_heads
        par = self.parametrization
        if not par.standard and head_dim is None and base_width % n_heads:
            raise UserError(f"model.base_width={base_width} is not a multiple of n_heads={n_heads}: change one of "
                            "them (or set model.head_dim).")
        # the head size at the base width: unchanged with head_dim fixed, base_width / n_heads otherwise
        base_head_dim = d_model // n_heads if head_dim is not None or par.standard else base_width // n_heads
        attn_scale = par.attention_scale(d_model // n_heads, base_head_dim)
        self.rope_base, self.sinks = float(rope_base), int(sinks)
        self.d_ff = d_ff or 4 * d_model
        self.positions, self.max_len = positions, max_len

        self.pos_embed = nn.Embedding(max_len, d_model) if positions == "learned" else None
        rotary = Rotary(d_model // n_heads, max_len, base=rope_base) if positions == "rotary" else None
        self.emb_dropout = nn.Dropout(dropout)
        # one Rotary module shared by all blocks (its tables are non-persistent buffers)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, self.d_ff, norm, mlp, dropout, rotary,
                  ffn=ffn_factory(i) if ffn_factory is not None else None, norm_eps=norm_eps,
                  attn_scale=attn_scale, branch_mult=par.branch_mult)
            for i in range(n_layers)
        )
        self.add_head(make_norm(norm, d_model, norm_eps), tie_embeddings)
        self.output_mult = par.output_mult
        self._init_weights()

    def _hidden(self) -> dict[str, nn.Linear]:
        """The hidden (matrix-like) weights of muP by parameter name: the blocks' linear layers, readouts (a
        router, ``is_readout``) excepted."""
        return {f"blocks.{name}.weight": m for name, m in self.blocks.named_modules()
                if isinstance(m, nn.Linear) and not getattr(m, "is_readout", False)}

    def lr_multipliers(self) -> dict[str, float]:
        """The hidden weights' learning-rate multiplier under mup and completep away from the base shape."""
        par = self.parametrization
        return {} if par.standard else {name: par.hidden_lr for name in self._hidden()}

    def _init_weights(self) -> None:
        par = self.parametrization
        resid_std = 0.02 / math.sqrt(2 * par.residual_depth(self.n_layers))
        hidden = set() if par.standard else {id(m) for m in self._hidden().values()}
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                std = resid_std if getattr(m, "is_residual_proj", False) else 0.02
                if id(m) in hidden:
                    std *= par.hidden_init
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor, attention: Attention) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d_model) hidden states after the final norm."""
        if attention.kind not in self.supported_attention:
            raise UserError(f"model Transformer cannot attend {attention.kind!r}: choose causal, "
                            "bidirectional or prefix.")
        T = input_ids.shape[1]
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            if T > self.max_len:
                raise UserError(f"sequence of {T} tokens is longer than model.max_len={self.max_len}: "
                                "raise model.max_len or use model.positions=rotary.")
            x = x + self.pos_embed.weight[:T]  # positions 0..T-1: a slice, not a lookup (cheaper backward)
        x = self.emb_dropout(x)
        if attention.window is not None:  # sliding-window attention: the model's sinks unless the record says
            attention = replace(attention, sinks=self.sinks if attention.sinks is None else attention.sinks)
        mask = attention.mask(T, input_ids.device)
        # ``mask() is None`` means "no restriction" for bidirectional and "plain causal" for causal
        is_causal = mask is None and attention.kind == CAUSAL
        stream = None
        if attention.windowed(T) and attention.sinks and attention.cache_positions and self.positions == "rotary":
            stream = (attention.sinks, attention.window)
        x = self.run_blocks(self.blocks, x, mask, is_causal, stream)
        return self.norm(x)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add):

            6 * N + 6 * d_model * vocab_size + 12 * n_layers * d_model * seq_len

        where N = ``non_embedding_parameters()`` (every weight matmul of the blocks, plus the norm
        gains, which are negligible), ``d_model * vocab_size`` is the LM-head matmul (counted whether
        or not it is tied to the embedding; the embedding lookup itself costs nothing), and the last
        term is the attention scores and the weighted sum of values (``q.k`` and ``a.v``: 2 * 2 *
        seq_len * d_model forward FLOPs per layer), counted over the full T x T score matrix even for
        causal attention (as Kaplan et al. 2020, arXiv 2001.08361, without their causal halving).
        Softmax, norms, rotary and activations are ignored.
        """
        return float(6 * self.non_embedding_parameters() + 6 * self.d_model * self.vocab_size
                     + 12 * self.n_layers * self.d_model * seq_len)


# ----- the model's spec: blocks, adapter targets, widening, and the Hugging Face mapping -----

HF_EXPORTS = ("model=transformer with norm=rmsnorm positions=rotary (mlp=gelu or swiglu) or norm=layernorm "
              "positions=learned mlp=gelu")


def rope_theta(config) -> float | None:
    """The rotary base of a ``transformers`` config (``rope_parameters`` in transformers 5, ``rope_theta``
    before), or None when its rope is not the plain one."""
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default" or getattr(config, "rope_scaling", None) not in (None, params):
        return None
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return None if theta is None else float(theta)


def _to_hf(model: Transformer, context: int):
    """lmlab -> GPT-2 (layernorm, learned positions, gelu), Arcee (rmsnorm, rotary, gelu) or Llama (swiglu)."""
    from transformers import ArceeConfig, GPT2Config, LlamaConfig

    if not model.parametrization.standard:
        raise Unmappable(f"the run's model has parametrization={model.parametrization.kind} away from its base shape "
                         "(attention scale, logit or branch multipliers)")
    norm, mlp = norm_kind(model.norm), model.blocks[0].mlp.kind
    setting = (norm, model.positions, mlp)
    d, L, H, F_ = model.d_model, model.n_layers, model.n_heads, model.d_ff
    w: dict[str, torch.Tensor] = {}
    if setting == ("layernorm", "learned", "gelu"):
        config = GPT2Config(vocab_size=model.vocab_size, n_positions=context, n_embd=d, n_layer=L, n_head=H,
                            n_inner=F_, activation_function="gelu", layer_norm_epsilon=model.norm.eps,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_weights=True,
                            scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                            tie_word_embeddings=model.tie_embeddings, architectures=["GPT2LMHeadModel"],
                            **HF_SPECIAL_IDS)
        w["transformer.wte.weight"] = model.embed.weight
        w["transformer.wpe.weight"] = model.pos_embed.weight[:context]  # the positions it was trained on
        for i, block in enumerate(model.blocks):
            p = f"transformer.h.{i}."
            if not (block.norm1.eps == block.norm2.eps == model.norm.eps):
                raise Unmappable("the run's layer norms have different eps")
            w[p + "ln_1.weight"], w[p + "ln_1.bias"] = block.norm1.weight, block.norm1.bias
            w[p + "ln_2.weight"], w[p + "ln_2.bias"] = block.norm2.weight, block.norm2.bias
            # GPT-2's Conv1D computes x @ W + b: its weights are the transposes of nn.Linear's
            w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"] = block.attn.qkv.weight.T, torch.zeros(3 * d)
            w[p + "attn.c_proj.weight"], w[p + "attn.c_proj.bias"] = block.attn.out.weight.T, torch.zeros(d)
            w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"] = block.mlp.up.weight.T, torch.zeros(F_)
            w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"] = block.mlp.down.weight.T, torch.zeros(d)
        w["transformer.ln_f.weight"], w["transformer.ln_f.bias"] = model.norm.weight, model.norm.bias
    elif setting in (("rmsnorm", "rotary", "gelu"), ("rmsnorm", "rotary", "swiglu")):
        common = dict(vocab_size=model.vocab_size, hidden_size=d, intermediate_size=F_, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=H, head_dim=d // H,
                      max_position_embeddings=context, rms_norm_eps=model.norm.eps, rope_theta=model.rope_base,
                      attention_bias=False, attention_dropout=0.0, mlp_bias=False,
                      tie_word_embeddings=model.tie_embeddings, **HF_SPECIAL_IDS)
        if mlp == "gelu":  # Arcee is Llama with the non-gated MLP down(act(up(x)))
            config = ArceeConfig(hidden_act="gelu", architectures=["ArceeForCausalLM"], **common)
        else:
            config = LlamaConfig(hidden_act="silu", architectures=["LlamaForCausalLM"], **common)
        w["model.embed_tokens.weight"] = model.embed.weight
        for i, block in enumerate(model.blocks):
            p = f"model.layers.{i}."
            q, k, v = block.attn.qkv.weight.chunk(3, dim=0)
            w[p + "self_attn.q_proj.weight"], w[p + "self_attn.k_proj.weight"] = q, k
            w[p + "self_attn.v_proj.weight"], w[p + "self_attn.o_proj.weight"] = v, block.attn.out.weight
            w[p + "input_layernorm.weight"] = block.norm1.weight
            w[p + "post_attention_layernorm.weight"] = block.norm2.weight
            w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"] = block.mlp.up.weight, block.mlp.down.weight
            if mlp == "swiglu":
                w[p + "mlp.gate_proj.weight"] = block.mlp.gate.weight
        w["model.norm.weight"] = model.norm.weight
    else:
        raise Unmappable(f"the run's transformer has norm={norm} positions={model.positions} mlp={mlp}")
    w["lm_head.weight"] = model.embed.weight if model.tie_embeddings else model.head.weight
    return config, w


def _from_hf(config, state: dict[str, torch.Tensor]):
    """GPT-2, Arcee or Llama -> lmlab's Transformer: the inverse of ``_to_hf``, for the checkpoints that
    lmlab's Transformer computes exactly (the others are refused in one sentence naming the setting)."""
    kind = (getattr(config, "architectures", None) or ["?"])[0]
    tied = bool(getattr(config, "tie_word_embeddings", True))

    def refuse(what: str) -> UserError:
        return UserError(f"the {kind} checkpoint has {what}, which lmlab's Transformer does not compute: import a "
                         "checkpoint without it (lmlab export writes such checkpoints).")

    s: dict[str, torch.Tensor] = {}
    if kind == "GPT2LMHeadModel":
        d, L, H = config.n_embd, config.n_layer, config.n_head
        F_ = config.n_inner or 4 * d
        if config.activation_function != "gelu":
            raise refuse(f"activation_function={config.activation_function} (lmlab's GELU is the exact 'gelu')")
        if config.scale_attn_by_inverse_layer_idx or not config.scale_attn_weights:
            raise refuse("an attention scale other than 1/sqrt(head_dim)")
        biases = [k for k, v in state.items() if k.endswith("bias") and ".ln_" not in k and "ln_f" not in k
                  and v.dim() == 1 and bool(v.any())]
        if biases:
            raise refuse(f"non-zero linear biases ({biases[0]}) where lmlab's layers have none")
        kwargs = dict(d_model=d, n_layers=L, n_heads=H, head_dim=None, d_ff=F_, norm="layernorm",
                      positions="learned", max_len=config.n_positions, mlp="gelu", rope_base=10000.0,
                      norm_eps=float(config.layer_norm_epsilon), tie_embeddings=tied)
        s["embed.weight"], s["pos_embed.weight"] = state["transformer.wte.weight"], state["transformer.wpe.weight"]
        for i in range(L):
            p, q = f"transformer.h.{i}.", f"blocks.{i}."
            for a, b in (("ln_1", "norm1"), ("ln_2", "norm2")):
                s[q + b + ".weight"], s[q + b + ".bias"] = state[p + a + ".weight"], state[p + a + ".bias"]
            s[q + "attn.qkv.weight"] = state[p + "attn.c_attn.weight"].T
            s[q + "attn.out.weight"] = state[p + "attn.c_proj.weight"].T
            s[q + "mlp.up.weight"] = state[p + "mlp.c_fc.weight"].T
            s[q + "mlp.down.weight"] = state[p + "mlp.c_proj.weight"].T
        s["norm.weight"], s["norm.bias"] = state["transformer.ln_f.weight"], state["transformer.ln_f.bias"]
    elif kind in ("LlamaForCausalLM", "ArceeForCausalLM"):
        d, L, H = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
        act = "silu" if kind == "LlamaForCausalLM" else "gelu"
        if config.hidden_act != act:
            raise refuse(f"hidden_act={config.hidden_act} (lmlab's {'SwiGLU' if act == 'silu' else 'MLP'} uses {act})")
        if (config.num_key_value_heads or H) != H:
            raise refuse(f"num_key_value_heads={config.num_key_value_heads} (grouped-query attention)")
        if getattr(config, "head_dim", None) not in (None, d // H) or d % H:
            raise refuse(f"head_dim={getattr(config, 'head_dim', None)} other than hidden_size / num_attention_heads")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise refuse("biases in its attention or MLP layers")
        theta = rope_theta(config)
        if theta is None or not theta > 1.0:
            raise refuse("a scaled or non-default rotary embedding")
        kwargs = dict(d_model=d, n_layers=L, n_heads=H, head_dim=None, d_ff=config.intermediate_size,
                      norm="rmsnorm", positions="rotary", max_len=config.max_position_embeddings,
                      mlp="swiglu" if act == "silu" else "gelu", rope_base=theta,
                      norm_eps=float(config.rms_norm_eps), tie_embeddings=tied)
        s["embed.weight"] = state["model.embed_tokens.weight"]
        for i in range(L):
            p, q = f"model.layers.{i}.", f"blocks.{i}."
            s[q + "attn.qkv.weight"] = torch.cat([state[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
            s[q + "attn.out.weight"] = state[p + "self_attn.o_proj.weight"]
            s[q + "norm1.weight"] = state[p + "input_layernorm.weight"]
            s[q + "norm2.weight"] = state[p + "post_attention_layernorm.weight"]
            s[q + "mlp.up.weight"], s[q + "mlp.down.weight"] = state[p + "mlp.up_proj.weight"], \
                state[p + "mlp.down_proj.weight"]
            if act == "silu":
                s[q + "mlp.gate.weight"] = state[p + "mlp.gate_proj.weight"]
        s["norm.weight"] = state["model.norm.weight"]
    else:
        raise UserError(f"lmlab's Transformer imports GPT2LMHeadModel, LlamaForCausalLM and ArceeForCausalLM "
                        f"checkpoints, not {kind}: choose the model that imports it.")
    s["head.weight"] = s["embed.weight"] if tied else state["lm_head.weight"]
    return kwargs, s


def _widen(model: Transformer, d_model: int) -> Transformer:
    from lmlab.models.widen import tile_transformer

    if model.parametrization.kind != "sp":
        raise UserError(f"widening preserves the function of a model in the standard parameterisation, not "
                        f"parametrization={model.parametrization.kind}: widen a model with parametrization=sp.")
    return tile_transformer(model, d_model)


Transformer.spec = ModelSpec(
    block=Block,
    lora=("qkv", "out", "up", "gate", "down"), ia3=("qkv", "down"), ia3_feedforward=("down",),
    widen=_widen,
    hf=HFAdapter(("GPT2LMHeadModel", "LlamaForCausalLM", "ArceeForCausalLM"), _to_hf, _from_hf, HF_EXPORTS),
)
