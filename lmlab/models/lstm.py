"""The LSTM baseline: a stacked LSTM language model, causal or bidirectional.

Hochreiter & Schmidhuber, "Long Short-Term Memory" (Neural Computation 1997), in the stacked form of
Zaremba, Sutskever & Vinyals, "Recurrent Neural Network Regularization" (arXiv 1409.2329): embedding ->
dropout -> ``n_layers`` LSTM layers (dropout between them) -> dropout -> LM head. It is the recurrent
baseline for the HMM setting (Liu et al., arXiv 2210.14199, whose HMM experiments compare architectures
on the same data; their exact LSTM sizes are not taken from the paper [unverified]).

* ``causal``: a one-directional LSTM of width ``d_model``; ``init_state``/``step`` decode token by token
  and equal ``forward``.
* ``bidirectional`` (for masked LM): an ELMo/BiLSTM stack (Peters et al. 2018, arXiv 1802.05365), each layer
  reading the concatenated outputs of both directions of the layer below, each direction ``d_model / 2``
  wide, so a position's hidden state sees the whole row. Right padding is honoured: the backward direction
  starts at each row's last real token (packed sequences), so real tokens never see a pad.
* ``prefix`` attention is not supported.

It uses ``torch.nn.LSTM`` (cuDNN on CUDA, PyTorch's own kernel on the CPU). With activation checkpointing the
stack runs one layer at a time (the same weights and kernel, one layer per call) so that each layer is recomputed
on its own: recomputing the whole fused stack as one block would rebuild all its activations at once in the
backward pass and save no peak memory.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import _VF, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lmlab.attention import BIDIRECTIONAL, CAUSAL, Attention
from lmlab.errors import UserError
from lmlab.models.base import Backbone
from lmlab.models.spec import ModelSpec
from lmlab.settings import Fraction, Positive


class LSTM(Backbone):
    """Args: ``d_model`` (hidden width; embeddings have it too), ``n_layers``, ``dropout`` (embedding,
    between layers, output), ``tie_embeddings``, ``activation_checkpointing`` (recompute each layer in the
    backward pass while training; the stack then runs layer by layer). Weights: PyTorch's LSTM init
    (U(-1/sqrt(h), 1/sqrt(h))) with the forget-gate bias at 1 (Jozefowicz et al. 2015); embeddings N(0, 0.02)."""

    supported_attention = (CAUSAL, BIDIRECTIONAL)

    # one unit (no blocks); peft adapts the embedding only: torch.nn.LSTM is no layer peft supports
    spec = ModelSpec(lora=("embed",))

    def __init__(self, vocab_size: int, attention: str = CAUSAL, d_model: Positive = 64, n_layers: Positive = 2,
                 dropout: Fraction = 0.0, tie_embeddings: bool = True, activation_checkpointing: bool = False) -> None:
        super().__init__(vocab_size, d_model, attention, activation_checkpointing)
        self.bidirectional = attention == BIDIRECTIONAL
        if self.bidirectional and d_model % 2:
            raise UserError(f"a bidirectional LSTM needs an even model.d_model, got {d_model}: change it.")
        self.n_layers = n_layers
        hidden = d_model // 2 if self.bidirectional else d_model
        self.dropout = nn.Dropout(dropout)
        self.rnn = nn.LSTM(d_model, hidden, n_layers, batch_first=True, dropout=dropout if n_layers > 1 else 0.0,
                           bidirectional=self.bidirectional)
        self.add_head(None, tie_embeddings)  # no final norm
        nn.init.normal_(self.embed.weight, 0.0, 0.02)
        if not tie_embeddings:
            nn.init.normal_(self.head.weight, 0.0, 0.02)
        for name, p in self.rnn.named_parameters():
            if name.startswith("bias_ih"):
                with torch.no_grad():
                    p[hidden : 2 * hidden].fill_(1.0)  # gate order i, f, g, o: forget gate at 1 (b_hh adds 0)
            elif name.startswith("bias_hh"):
                nn.init.zeros_(p)

    def forward(self, input_ids: torch.Tensor, attention: Attention) -> torch.Tensor:
        """(B, T) -> (B, T, d_model)."""
        if attention.kind not in self.supported_attention or (attention.kind == BIDIRECTIONAL) != self.bidirectional:
            raise UserError(f"this LSTM was built for {self.attention_kind!r} attention, not {attention.kind!r}: "
                            "build it with the objective that runs it.")
        x = self.dropout(self.embed(input_ids))
        packed = None  # causal: right padding is never seen by real tokens
        if self.bidirectional and attention.padding is not None:
            lengths = attention.padding.sum(1).clamp(min=1).cpu()
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        if self.activation_checkpointing:
            layers = [partial(self._layer, i) for i in range(self.n_layers)]
            if packed is None:
                out = self.run_blocks(layers, x, None)
            else:
                out = packed._replace(data=self.run_blocks(layers, packed.data, packed.batch_sizes))
        else:
            out, _ = self.rnn(x if packed is None else packed)
        if packed is not None:
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.dropout(out)

    def _layer(self, index: int, x: torch.Tensor, batch_sizes: torch.Tensor | None) -> torch.Tensor:
        """Layer ``index`` of ``self.rnn`` alone, from a zero state, then the dropout between layers (none
        after the last): the fused stack's computation, one layer per call. ``x``: (B, T, d_model), or a
        packed sequence's data with its ``batch_sizes``."""
        dirs = 2 if self.bidirectional else 1
        weights = [getattr(self.rnn, f"{w}_l{index}{s}") for s in ("", "_reverse")[:dirs]
                   for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        h0 = x.new_zeros(dirs, x.shape[0] if batch_sizes is None else int(batch_sizes[0]), self.rnn.hidden_size)
        if batch_sizes is None:
            out = _VF.lstm(x, (h0, h0), weights, True, 1, 0.0, self.training, self.bidirectional, True)[0]
        else:
            out = _VF.lstm(x, batch_sizes, (h0, h0), weights, True, 1, 0.0, self.training, self.bidirectional)[0]
        return out if index == self.n_layers - 1 else F.dropout(out, self.rnn.dropout, self.training)

    decodes_by_step = True  # through nn.LSTM's own state, not per-block steps

    def init_state(self, batch_size: int, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, c)`` of ``torch.nn.LSTM``, zeros (n_layers, B, d_model)."""
        if self.bidirectional:
            raise UserError("a bidirectional LSTM cannot decode token by token: build it for causal attention.")
        zeros = torch.zeros(self.n_layers, batch_size, self.d_model, device=device or self.device,
                            dtype=dtype or self.embed.weight.dtype)
        return zeros, zeros.clone()

    def step(self, input_ids: torch.Tensor, state):
        """(B,) ids at the next position -> ((B, d_model) hidden, new (h, c))."""
        out, state = self.rnn(self.dropout(self.embed(input_ids))[:, None], state)
        return self.dropout(out[:, 0]), state

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: ``6 * N + 6 * d_model * vocab_size``, with N the LSTM's parameters
        (each weight is used once per token and direction: ``4 h (d_in + h) + 8 h`` per layer and
        direction); the gate nonlinearities and the embedding lookup are ignored."""
        n = self.non_embedding_parameters()
        return float(6 * n + 6 * self.d_model * self.vocab_size)
