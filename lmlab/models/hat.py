"""HAT: a byte-level hierarchical autoregressive transformer (byte encoder, word backbone, byte decoder).

Neitemeier et al., "Hierarchical Autoregressive Transformers: Combining Byte- and Word-Level Processing
for Robust, Adaptable Language Models" (ICLR 2025, arXiv 2501.10322). Causal only. This follows the
released modelling code where it and the paper's Fig. 1 differ (word pooling by a learned latent query
that cross-attends to the word's bytes, not a prepended [W] byte), simplified for a CPU bench:

* Bytes: the ids of ``data=text data/tokenizer=byte`` (``N_SPECIAL + byte``; vocabulary 260, which the
  model requires), the tokenizer ``lmlab.data.tokenizers.Byte``.
* Word splitting (``word_starts``; ``split_words`` on a byte string), a byte-level approximation of the
  hat-splitter rules (which use Unicode word breaks): a word starts at the first token; at every special
  token (BOS/EOS/MASK) and right after one; at a newline/tab/CR and right after one (those stay words of
  their own); at a space that follows a non-space (so a word is [leading spaces] + word + trailing
  punctuation); at a letter, digit or non-ASCII lead byte that follows ASCII punctuation; at an
  upper-case letter after a lower-case one (camelCase). PAD and UTF-8 continuation bytes never start a
  word. Words longer than ``max_word_size`` bytes are cut into pieces of exactly that size (a cut may fall
  inside a multi-byte character). Every rule looks only at the current and earlier bytes, so the split
  of a prefix never changes when bytes are appended: the model stays causal.
  "Hello, world!" -> "Hello,", " world!"; "camelCase" -> "camel", "Case".
* Encoder: byte embedding, ``encoder_layers`` pre-norm transformer blocks (causal; ``byte_window``
  restricts them to a sliding window, as the paper's local attention; ``null`` = full causal), RoPE on
  byte positions.
* Encoder connector: per word, a learned latent query cross-attends (``byte_heads`` heads) to the
  encoder outputs of that word's bytes only; projected to ``d_word``.
* Backbone: ``n_layers`` causal transformer blocks of width ``d_word`` over the word sequence (RoPE on
  word positions).
* Decoder connector: the backbone outputs shifted right by one word, a learned ``first_word`` embedding in
  front, so the bytes of word i are predicted from the backbone state after word i-1 (and from the
  byte-level stream, which carries word i's earlier bytes).
* Decoder: starts from the encoder byte activations; each of its ``decoder_layers`` layers first adds a
  cross-attention from every byte of word i to word i's single predictive embedding (attention over one
  key is its value: a linear map ``d_word -> d_model`` of the normed embedding), then a causal byte
  block. Final norm; the LM head (tied to the byte embedding) predicts the next byte.

``d_model`` is the byte width (the width of the hidden states the objectives and probes see), ``d_word``
the backbone's. Not done: HAT's generation loop and any key-value cache.
"""

from __future__ import annotations

import math
import string

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.attention import CAUSAL, Attention
from lmlab.errors import UserError
from lmlab.models.base import Backbone
from lmlab.models.layers import MLPKind, NormKind, Rotary, make_norm
from lmlab.models.spec import ModelSpec
from lmlab.models.transformer import Block
from lmlab.settings import Fraction, Optional, Positive, PositiveFloat
from lmlab.vocab import N_SPECIAL, PAD_ID

BYTE_VOCAB = N_SPECIAL + 256

# byte classes for the splitter
PAD, SPECIAL, SPACE, BREAK, PUNCT, LOWER, UPPER, CONT, WORD = range(9)


def _class_table() -> torch.Tensor:
    table = torch.full((BYTE_VOCAB,), WORD, dtype=torch.long)
    table[:N_SPECIAL] = SPECIAL
    table[PAD_ID] = PAD
    for b in range(256):
        c = chr(b)
        if b == 0x20:
            cls = SPACE
        elif c in "\n\t\r\x0b\x0c":
            cls = BREAK
        elif c in string.punctuation:
            cls = PUNCT
        elif c in string.ascii_lowercase:
            cls = LOWER
        elif c in string.ascii_uppercase:
            cls = UPPER
        elif 0x80 <= b <= 0xBF:
            cls = CONT
        else:
            cls = WORD
        table[N_SPECIAL + b] = cls
    return table


CLASSES = _class_table()


def word_starts(ids: torch.Tensor, max_word_size: int | None = None) -> torch.Tensor:
    """(B, T) byte ids -> (B, T) bool, True where a word starts (rules in the module docstring)."""
    cls = CLASSES.to(ids.device)[ids.clamp(0, BYTE_VOCAB - 1)]
    prev = F.pad(cls, (1, 0), value=SPECIAL)  # a virtual special token before the row: position 0 starts
    prev = prev[:, :-1]
    word_like = (cls == WORD) | (cls == LOWER) | (cls == UPPER)
    start = ((cls == SPECIAL) | (prev == SPECIAL) | (cls == BREAK) | (prev == BREAK)
             | ((cls == SPACE) & (prev != SPACE))
             | (word_like & (prev == PUNCT))
             | ((cls == UPPER) & (prev == LOWER)))
    start &= (cls != PAD) & (cls != CONT)
    if max_word_size:
        T = ids.shape[1]
        t = torch.arange(T, device=ids.device).expand_as(ids)
        last = torch.where(start, t, torch.zeros_like(t)).cummax(dim=1).values
        offset = t - last
        start |= (offset > 0) & (offset % max_word_size == 0) & (cls != PAD)
    return start


def split_words(data: bytes, max_word_size: int | None = None) -> list[bytes]:
    """A byte string cut into words with ``word_starts``; ``b"".join(split_words(x)) == x``."""
    if not data:
        return []
    ids = torch.tensor([list(data)]) + N_SPECIAL  # the byte ids: N_SPECIAL + byte
    starts = word_starts(ids, max_word_size)[0].nonzero().flatten().tolist() + [len(data)]
    return [data[a:b] for a, b in zip(starts[:-1], starts[1:])]


class WordPooling(nn.Module):
    """The encoder connector: a learned latent query attends to the bytes of each word."""

    def __init__(self, d_model: int, d_word: int, n_heads: int, norm: str) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.norm = make_norm(norm, d_model)
        self.latent = nn.Parameter(torch.zeros(d_model))
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_word, bias=False)

    def forward(self, x: torch.Tensor, word_id: torch.Tensor, real: torch.Tensor, n_words: int) -> torch.Tensor:
        """(B, T, d_model) byte states, (B, T) word index of each byte, (B, T) real-byte mask -> (B, W, d_word)."""
        B, T, D = x.shape
        k, v = self.kv(self.norm(x)).view(B, T, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = self.q(self.latent).view(1, self.n_heads, 1, self.head_dim).expand(B, -1, n_words, -1)
        mask = (word_id[:, None, :] == torch.arange(n_words, device=x.device)[None, :, None]) & real[:, None, :]
        mask[:, :, 0] |= ~mask.any(-1)  # a word without bytes (padding rows) reads byte 0; its output is unused
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return self.out(y.transpose(1, 2).reshape(B, n_words, D))


class HAT(Backbone):
    """Args: ``d_model`` (byte width), ``d_word`` (backbone width), ``n_layers`` / ``n_heads`` / ``d_ff``
    (backbone), ``encoder_layers``, ``decoder_layers``, ``byte_heads``, ``byte_d_ff`` (byte blocks; default
    4 * d_model), ``byte_window`` (sliding window of the byte blocks, ``null`` = full causal),
    ``max_word_size``, ``bytes_per_word`` (the FLOP formula's assumption), ``norm``, ``mlp``, ``dropout``,
    ``tie_embeddings``, ``activation_checkpointing`` (recompute each encoder, backbone and decoder block in
    the backward pass while training; the pooling and cross maps are cheap and kept). Init as the Transformer
    (N(0, 0.02), residual projections scaled down)."""

    supported_attention = (CAUSAL,)

    spec = ModelSpec(block=Block, lora=("qkv", "out", "up", "gate", "down", "q", "kv", "cross"),
                     ia3=("qkv", "kv", "down"), ia3_feedforward=("down",))

    def __init__(self, vocab_size: int, attention: str = CAUSAL, d_model: Positive = 64, d_word: Positive = 128,
                 n_layers: Positive = 2, n_heads: Positive = 4, d_ff: Optional[Positive] = None,
                 encoder_layers: Positive = 1, decoder_layers: Positive = 1, byte_heads: Positive = 2,
                 byte_d_ff: Optional[Positive] = None, byte_window: Optional[Positive] = None,
                 max_word_size: Positive = 16, bytes_per_word: PositiveFloat = 5.0, norm: NormKind = "rmsnorm",
                 mlp: MLPKind = "gelu", dropout: Fraction = 0.0, max_len: Positive = 512, tie_embeddings: bool = True,
                 activation_checkpointing: bool = False) -> None:
        if vocab_size != BYTE_VOCAB:
            raise UserError(f"model hat reads bytes (vocabulary {BYTE_VOCAB}) but the data has vocabulary "
                            f"{vocab_size}: use data=text data/tokenizer=byte.")
        super().__init__(vocab_size, d_model, attention, activation_checkpointing)
        for name, width, heads in (("d_model", d_model, byte_heads), ("d_word", d_word, n_heads)):
            if width % heads:
                raise UserError(f"model.{name}={width} is not a multiple of its heads ({heads}): change one.")
        self.d_word, self.n_layers, self.n_heads = d_word, n_layers, n_heads
        self.encoder_layers, self.decoder_layers = encoder_layers, decoder_layers
        self.byte_window, self.max_word_size, self.bytes_per_word = byte_window, max_word_size, bytes_per_word
        d_ff, byte_d_ff = d_ff or 4 * d_word, byte_d_ff or 4 * d_model
        byte_rotary = Rotary(d_model // byte_heads, max_len)
        word_rotary = Rotary(d_word // n_heads, max_len)
        self.encoder = nn.ModuleList(Block(d_model, byte_heads, byte_d_ff, norm, mlp, dropout, byte_rotary)
                                     for _ in range(encoder_layers))
        self.pool = WordPooling(d_model, d_word, byte_heads, norm)
        self.backbone = nn.ModuleList(Block(d_word, n_heads, d_ff, norm, mlp, dropout, word_rotary)
                                      for _ in range(n_layers))
        self.backbone_norm = make_norm(norm, d_word)
        self.first_word = nn.Parameter(torch.zeros(d_word))
        self.cross_norm = nn.ModuleList(make_norm(norm, d_word) for _ in range(decoder_layers))
        self.cross = nn.ModuleList(nn.Linear(d_word, d_model, bias=False) for _ in range(decoder_layers))
        self.decoder = nn.ModuleList(Block(d_model, byte_heads, byte_d_ff, norm, mlp, dropout, byte_rotary)
                                     for _ in range(decoder_layers))
        self.add_head(make_norm(norm, d_model), tie_embeddings)
        for c in self.cross:
            c.is_residual_proj = True
        resid_std = 0.02 / math.sqrt(2 * (n_layers + encoder_layers + decoder_layers))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, resid_std if getattr(m, "is_residual_proj", False) else 0.02)
        nn.init.normal_(self.first_word, 0.0, 0.02)
        nn.init.normal_(self.pool.latent, 0.0, 0.02)

    def _byte_mask(self, T: int, device) -> tuple[torch.Tensor | None, bool]:
        if self.byte_window is None or self.byte_window >= T:
            return None, True
        i = torch.arange(T, device=device)
        d = i[:, None] - i[None, :]
        return ((d >= 0) & (d < self.byte_window))[None, None], False

    def forward(self, input_ids: torch.Tensor, attention: Attention) -> torch.Tensor:
        """(B, T) byte ids -> (B, T, d_model); the output at byte t depends on bytes <= t only."""
        if attention.kind != CAUSAL:
            raise UserError(f"model HAT cannot attend {attention.kind!r}: use a causal objective.")
        B, T = input_ids.shape
        real = attention.padding if attention.padding is not None else torch.ones_like(input_ids, dtype=torch.bool)
        real = real.to(input_ids.device)
        starts = word_starts(input_ids, self.max_word_size)
        starts[:, 0] = True  # a row always opens a word (even one that starts with padding)
        word_id = starts.long().cumsum(1) - 1  # (B, T)
        n_words = int(word_id.max()) + 1
        mask, is_causal = self._byte_mask(T, input_ids.device)
        x = self.run_blocks(self.encoder, self.embed(input_ids), mask, is_causal)
        words = self.pool(x, word_id, real, n_words)  # (B, W, d_word)
        words = self.backbone_norm(self.run_blocks(self.backbone, words, None, True))
        predictive = torch.cat([self.first_word.expand(B, 1, -1).to(words.dtype), words[:, :-1]], dim=1)
        per_byte = predictive.gather(1, word_id[:, :, None].expand(-1, -1, self.d_word))  # (B, T, d_word)
        for norm, cross, block in zip(self.cross_norm, self.cross, self.decoder):
            x = self.run_blocks((block,), x + cross(norm(per_byte)), mask, is_causal)
        return self.norm(x)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per byte (3 x forward, 2 per multiply-add), with w = 1 / bytes_per_word words
        per byte and W = seq_len * w words per row:

            6 * N_byte + 6 * d_model * vocab + 12 * (enc + dec layers) * d_model * min(window, T)
            + w * (6 * N_word + 12 * n_layers * d_word * W) + 12 * d_model * W

        N_byte = the byte blocks, decoder cross maps and the pooling's key/value projections (used per
        byte); N_word = the backbone blocks and the pooling's output projection (used per word); the last
        term is the pooling attention (each word's query scores all T bytes under a mask: 4 * d_model * T
        forward FLOPs per word). Attention terms count the full window, masked half included."""
        byte_mods = [*self.encoder, *self.decoder, *self.cross, self.pool.kv]
        word_mods = [*self.backbone, self.pool.out]
        count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
        T = seq_len
        window = min(self.byte_window or T, T)
        w = 1.0 / self.bytes_per_word
        W = T * w
        return float(6 * count(byte_mods) + 6 * self.d_model * self.vocab_size
                     + 12 * (self.encoder_layers + self.decoder_layers) * self.d_model * window
                     + w * (6 * count(word_mods) + 12 * self.n_layers * self.d_word * W)
                     + 12 * self.d_model * W)

    def sparse_targets(self) -> list[tuple[str, nn.Linear, float]]:
        """The matrices of the byte blocks, cross maps and pooling key/value projection (every byte uses them)
        and of the word backbone and pooling output (one word per ``bytes_per_word`` bytes), as
        ``flops_per_token`` counts them; the pooling query stays dense."""
        groups = [("encoder", self.encoder, 1.0), ("decoder", self.decoder, 1.0), ("cross", self.cross, 1.0),
                  ("pool.kv", self.pool.kv, 1.0), ("backbone", self.backbone, 1.0 / self.bytes_per_word),
                  ("pool.out", self.pool.out, 1.0 / self.bytes_per_word)]
        return [(f"{prefix}.{name}".rstrip("."), m, uses) for prefix, group, uses in groups
                for name, m in group.named_modules() if isinstance(m, nn.Linear)]
