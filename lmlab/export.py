"""``lmlab export``: a finished run as a Hugging Face ``transformers`` checkpoint that computes the same function.

``export_run(run_dir, out_dir)`` builds the run's backbone (``lmlab.run_dir.load_backbone``), has the model's
own Hugging Face adapter (its spec's ``HFAdapter.to_hf``, ``lmlab.models.spec``, declared in the model's module)
rename and reshape its weights for the ``transformers`` class whose forward pass is the same arithmetic, and writes
``config.json``, ``generation_config.json`` and ``model.safetensors`` (``save_pretrained``), the tokenizer
files, and ``lmlab_export.json`` (the run, the class, the check below). What exports:

========================================================  ===================  ============================
lmlab model (causal attention, i.e. ``objective=clm``)     ``transformers``     notes
========================================================  ===================  ============================
transformer ``norm=rmsnorm positions=rotary mlp=gelu``    ``ArceeForCausalLM``  Llama with a non-gated MLP
(the default)                                                                   ``down(act(up(x)))``, act
                                                                                ``gelu`` (exact erf)
transformer ``norm=rmsnorm positions=rotary mlp=swiglu``  ``LlamaForCausalLM``  q/k/v cut from the fused
                                                                                ``qkv`` rows
transformer ``norm=layernorm positions=learned mlp=gelu`` ``GPT2LMHeadModel``   ``Conv1D`` weights are the
                                                                                transposes; biases zero
mamba ``norm=rmsnorm``                                    ``MambaForCausalLM``  ``layer_norm_epsilon`` the
                                                                                norms' eps
mamba2 ``norm=rmsnorm ngroups=1``                         ``Mamba2ForCausalLM`` one gated-norm group
========================================================  ===================  ============================

The conventions that make these exact: lmlab's rotary embedding is the "rotate half" layout (Llama's ``default``
rope, ``model.rope_base`` as ``rope_theta``), RMSNorm is ``x * rsqrt(mean(x^2) + eps) * weight`` computed in
float32 (``eps`` = ``model.norm_eps``, 1e-6 by default, as ``rms_norm_eps`` or ``layer_norm_epsilon``), GELU is the
exact erf form (``transformers``' ``"gelu"``, not ``"gelu_new"``), ``nn.LayerNorm``'s eps (1e-5 by default) is
GPT-2's ``layer_norm_epsilon``, lmlab's linear layers have no biases (GPT-2's are set to zero), the fused ``qkv``
projection holds q, k, v one after the other with heads in order inside each, and the Mamba mixers split their
input projections in the same order as ``transformers`` (Mamba: ``x, z``; Mamba-2: ``z, xBC, dt``). Mamba-2's gated
RMSNorm normalises over all ``expand * d_model`` channels, which ``transformers`` does with ``n_groups=1`` only.
The default model's non-gated MLP goes to Arcee (Llama's blocks with ``down(act(up(x)))``, ``transformers`` >=
4.53) rather than to Llama with an up projection of zero weights and unit bias (``act(gate(x)) * 1``): the same
function, without a dead matrix, so the checkpoint holds exactly lmlab's parameters and costs lmlab's FLOPs.
Everything else (other models, other norm/position/MLP combinations, runs trained with bidirectional or prefix
attention) is refused with one sentence naming what exports.

The same adapters read these checkpoints back (``from_hf``: ``init_from.hf``, ``lmlab.training.init_from``).

The tokenizer is a ``transformers`` fast tokenizer whose ids equal lmlab's (``Tokenizer.to_hf``): the trained
byte-level BPE as it is; the byte tokenizer as a merge-free byte-level BPE (id = 4 + byte); a character alphabet (DNA,
protein) as a merge-free BPE over its letters behind a normaliser that does what lmlab's table does (drop
what is not an ASCII letter, upper-case, map other letters to the unknown one). ``[PAD] [BOS] [EOS] [MASK]``
are ids 0..3 and the tokenizer's pad, bos, eos and mask tokens; encoding with special tokens prepends
``[BOS]`` (as lmlab's rows start), and special-token strings inside a text are encoded as plain text (as
lmlab does). Runs whose data have no text tokenizer (the grammars pcfg, hmm, planted, whose ids are word
indices, and token shards) export the model alone, and ``lmlab_export.json`` says so.

The checkpoint's context length (``max_position_embeddings``, GPT-2's ``n_positions`` and the learned positions
kept, the tokenizer's ``model_max_length``) is the length of the rows the run was trained on, ``data.block_size``,
so that lm-eval's ``hf`` backend cuts long requests into the windows lmlab's own adapter uses
(``lmlab.evaluation.harness``).

Before writing, the export checks its work: the lmlab and ``transformers`` models score a probe batch (one
row full, one right-padded, with an attention mask), and the tokenizers encode a probe text; a difference
beyond float rounding is an error of this module, raised as such.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from lmlab.attention import CAUSAL, Attention
from lmlab.data.tokenizers import TOKENIZER_FILE
from lmlab.data.tokenizers import Tokenizer as LmlabTokenizer
from lmlab.errors import UserError
from lmlab.io import atomic_dir, write_json
from lmlab.models.spec import Unmappable, declared_models, spec_of
from lmlab.run_dir import load_backbone, model_args, read_config
from lmlab.vocab import BOS_ID, N_SPECIAL, PAD_ID

EXPORT_DIR = "hf"  # the default output folder, inside the run directory
RECORD = "lmlab_export.json"  # what was exported, from where, and the check's result
PROBE_TEXT = ("The quick brown fox jumps over the lazy dog. ACGT acgtn RYKM 12345 \t [BOS] [EOS]\n"
              "Ünïcödé, 中文, emoji 🙂; MKTAYIAKQR*-x")
TOLERANCE = 1e-4  # the self-check's bound on |logit difference|, relative to 1 + max |logit|


def _exportable() -> str:
    """What exports, from the models' specs: each adapter's phrase, and the attention every export needs."""
    phrases = [cls.spec.hf.exports for cls in declared_models() if cls.spec.hf is not None]
    listed = ", ".join(phrases[:-1]) + " and " + phrases[-1] if len(phrases) > 1 else "".join(phrases)
    return f"{listed}, all trained with causal attention (objective=clm)"


EXPORTABLE = _exportable()


def _refuse(reason: str) -> UserError:
    return UserError(f"{reason}, which lmlab cannot export exactly: only {EXPORTABLE} export.")


# ----- the model: lmlab weights under transformers names, by the model's own adapter -----

def context_length(model: nn.Module, block_size: int | None) -> int:
    """The number of positions a checkpoint advertises: the length of the rows the model was trained on
    (``data.block_size``; as in a ``transformers`` training run, the rows it reads whole), capped by a model's
    ``max_len``; a run without blocks (the grammars' sentences) keeps the model's ``max_len``, else 512."""
    cap = getattr(model, "max_len", None)
    if isinstance(block_size, int) and not isinstance(block_size, bool) and block_size >= 2:
        return min(block_size, cap) if isinstance(cap, int) and cap > 0 else block_size
    return cap if isinstance(cap, int) and cap > 0 else 512


def hf_model(model: nn.Module, context: int | None = None) -> Any:
    """The ``transformers`` causal LM (float32, eval mode) that computes what the lmlab backbone ``model``
    computes (``model.logits(model(ids, causal attention))``) on up to ``context`` positions (default
    ``context_length(model, None)``), built by the model's Hugging Face adapter (its spec); a ``UserError``
    for a model that does not export."""
    import transformers

    name = type(model).__name__
    adapter = spec_of(model).hf
    if adapter is None:
        raise _refuse(f"the run's model is {name}")
    if model.attention_kind != CAUSAL:
        raise _refuse(f"the run's {name} was trained with {model.attention_kind} attention")
    try:
        config, weights = adapter.to_hf(model, context_length(model, None) if context is None else context)
    except Unmappable as e:
        raise _refuse(e.reason) from None
    hf = getattr(transformers, config.architectures[0])(config)
    expected = set(hf.state_dict())
    if set(weights) != expected:  # a mapping that misses or invents a weight is a bug here, not the user's
        raise RuntimeError(f"the adapter of {name} maps it to {type(hf).__name__} incompletely: missing "
                           f"{sorted(expected - set(weights))}, unknown {sorted(set(weights) - expected)}")
    hf.load_state_dict({k: v.detach().float().contiguous() for k, v in weights.items()}, strict=True)
    if model.tie_embeddings:
        hf.tie_weights()
    return hf.float().eval()


# ----- the tokenizer: lmlab ids as a tokenizers model -----

def hf_tokenizer(tokenizer: LmlabTokenizer, model_max_length: int | None = None):
    """A ``transformers`` fast tokenizer with ``tokenizer``'s ids (``Tokenizer.to_hf``)."""
    return tokenizer.to_hf(model_max_length)


def run_tokenizer(run_dir: str | os.PathLike) -> LmlabTokenizer | None:
    """The tokenizer of a run's data (a trained BPE restored from the run's data cache), or ``None`` when its
    data have none (grammars, token shards)."""
    cfg = read_config(run_dir)
    node = cfg.get("data", {}).get("tokenizer") if cfg.get("data") is not None else None
    if node is None:
        return None
    tokenizer = instantiate(node)
    if tokenizer.trained:  # a fixed vocabulary: nothing was learned from the data
        return tokenizer
    source = instantiate(cfg.data)  # the BPE was trained on the run's documents: read it from the data cache
    entry = Path(str(cfg.cache_dir)).expanduser() / source.cache_key()
    if not (entry / TOKENIZER_FILE).is_file():
        raise UserError(f"the trained BPE tokenizer of {run_dir} is not in its data cache ({entry} holds no "
                        f"{TOKENIZER_FILE}): rerun the run's `lmlab train` command on the same data files with "
                        f"cache_dir={cfg.cache_dir} to rebuild it, then export again.")
    source.restore_state(entry)
    return source.tokenizer


# ----- checking and writing -----

def probe_ids(vocab_size: int, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows that start with BOS, the second right-padded to two thirds of the length, and their mask."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(N_SPECIAL, max(vocab_size, N_SPECIAL + 1), (2, length), generator=gen)
    ids[:, 0] = BOS_ID
    mask = torch.ones_like(ids)
    mask[1, (2 * length) // 3:] = 0
    return ids.masked_fill(mask == 0, PAD_ID), mask


@torch.no_grad()
def logit_difference(model: nn.Module, hf: Any, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """max |lmlab logits - transformers logits| over the real (mask 1) positions, and max |lmlab logits|."""
    padding = mask.bool() if not bool(mask.all()) else None
    ours = model.logits(model(ids, Attention(CAUSAL, padding=padding)))
    theirs = hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    return float((ours - theirs)[real].abs().max()), float(ours[real].abs().max())


def _check_tokenizer(tokenizer: LmlabTokenizer, hf_tok: Any) -> None:
    ours = tokenizer.encode([PROBE_TEXT])[0]
    theirs = hf_tok(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if ours != theirs or hf_tok(PROBE_TEXT)["input_ids"] != [BOS_ID, *ours]:
        raise RuntimeError(f"lmlab.export built a tokenizer whose ids differ from the run's {tokenizer!r}")


@contextmanager
def _quiet() -> Iterator[None]:
    """``transformers`` without progress bars and notices (a missing optional CUDA kernel, say) while the export
    builds, checks and writes; its settings are restored afterwards."""
    from transformers.utils import logging as hf_logging

    shown, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if shown:
            hf_logging.enable_progress_bar()


def _clear_previous(out: Path, keep: set[str]) -> None:
    """Remove the entries of a previous export in ``out`` that the new one does not write (temporary folders
    of ``atomic_dir`` excepted)."""
    for entry in out.iterdir():
        if entry.name in keep or entry.name.startswith(".tmp-"):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Write the Hugging Face checkpoint of the finished run ``run_dir`` into ``out_dir`` (default
    ``<run_dir>/hf``) and return its path: ``AutoModelForCausalLM.from_pretrained(out)`` computes the run's
    logits and ``AutoTokenizer.from_pretrained(out)`` its token ids (see the module docstring for what
    exports). ``out_dir`` must be new, empty, or an earlier export, which is replaced."""
    with _quiet():
        return _export(Path(run_dir).expanduser(), out_dir)


def _export(run: Path, out_dir: str | os.PathLike | None) -> Path:
    args = model_args(run)  # refuses a directory that is not a finished run
    out = Path(out_dir).expanduser() if out_dir is not None else run / EXPORT_DIR
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: pass a directory as out=.")
    previous = out.is_dir() and any(out.iterdir())
    if previous and not (out / RECORD).is_file():
        raise UserError(f"{out} already holds files that no export wrote: pass an empty or new directory as out=.")
    cfg = read_config(run)
    model = load_backbone(run).float()
    context = context_length(model, OmegaConf.select(cfg, "data.block_size", default=None))
    hf = hf_model(model, context)
    tokenizer = run_tokenizer(run)
    if tokenizer is not None and tokenizer.vocab_size != args["vocab_size"]:
        raise UserError(f"the tokenizer of {run} has {tokenizer.vocab_size} ids but its model {args['vocab_size']}: "
                        "export a run whose config_resolved.yaml is the one it was trained with.")
    hf_tok = hf_tokenizer(tokenizer, model_max_length=context) if tokenizer is not None else None
    if hf_tok is not None:
        _check_tokenizer(tokenizer, hf_tok)
    ids, mask = probe_ids(args["vocab_size"], min(12, context))
    diff, scale = logit_difference(model, hf, ids, mask)
    if not diff <= TOLERANCE * (1.0 + scale):
        raise RuntimeError(f"lmlab.export: {type(hf).__name__} differs from the run's model by {diff:.3g} on the "
                           "probe batch; the mapping is wrong")

    data = str(cfg.get("data", {}).get("_target_", "?")).rsplit(".", 1)[-1] if cfg.get("data") is not None else "?"
    record = {
        "run": str(run.resolve()),
        "architecture": type(hf).__name__,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "model_args": args,
        "tokenizer": None if tokenizer is None else repr(tokenizer),
        "context_length": context,
        "probe_max_abs_logit_difference": diff,
        "note": None if tokenizer is not None else f"the run's data ({data}) have no text tokenizer: the model is "
                                                   "exported without one and reads the data's own token ids",
    }
    with atomic_dir(out, merge=previous) as tmp:
        hf.save_pretrained(tmp)
        if hf_tok is not None:
            hf_tok.save_pretrained(tmp)
        write_json(tmp / RECORD, record)
        if previous:
            _clear_previous(out, {p.name for p in tmp.iterdir()})
    return out


def describe(out_dir: str | os.PathLike) -> str:
    """One line about an export: its class, its tokenizer and the self-check's logit difference."""
    record = json.loads((Path(out_dir) / RECORD).read_text())
    tok = record["tokenizer"] or "none (the run's data have no text tokenizer)"
    diff = record["probe_max_abs_logit_difference"]
    return f"{record['architecture']}, tokenizer {tok}, max |logit difference| {diff:.2g} on a probe batch"


