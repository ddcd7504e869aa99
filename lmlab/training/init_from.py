"""``init_from.run=<run dir>``: start a run from a finished run's weights, with a fresh optimiser and schedule;
``init_from.hf=<checkpoint dir>``: start it from a local Hugging Face ``transformers`` checkpoint.

The new run builds its own model from its own config (its data's vocabulary, its objective's attention);
``InitFrom.apply`` then fills it from the parent's ``model.pt`` (``lmlab.run_dir.load_backbone``), composing
the growth operators of ``lmlab.models.grow`` where the two models differ:

1. **attention**: the parent is built for the new objective's pattern (Wang et al. 2022, "What Language Model
   Architecture and Pretraining Objective Work Best for Zero-Shot Generalization?", arXiv 2204.05832:
   non-causal adaptation of a causal model); a model that cannot attend that way is refused;
2. **width**: ``model.d_model`` an integer multiple of the parent's: ``lmlab.models.widen`` (function-preserving;
   heads keep their size, so ``n_heads`` and ``d_ff`` scale by the same factor and the model is untied);
3. **depth**: a larger ``model.n_layers``: SOLAR's depth up-scaling (Kim et al. 2023, arXiv 2312.15166), the
   parent layers listed in ``layers`` or SOLAR's map, copied as they are (``depth=duplicate``) or with the
   residual outputs of every repeated layer set to zero (``depth=zero``: the parent's function exactly);
4. **vocabulary**: the two runs' tokenizers are compared by their tokens (id -> bytes), not by size. An
   identical vocabulary is copied. Another one -- another size, the same size with other tokens (two BPEs
   trained on different corpora), or ``reset=[embeddings]`` -- keeps the body bit for bit, and the token
   embedding and LM head keep the new run's own initialisation (Yao et al. 2022, "Linking Emergent and Natural
   Languages via Corpus Transfer", arXiv 2203.13344), except the rows of tokens both vocabularies share
   (``map_shared_tokens``): the special tokens, and, where both runs have text tokenizers, every token with the
   same bytes, copied from the parent's row of those bytes (mapped by bytes). A run without a text tokenizer
   (grammars, token shards) has ids without bytes: its vocabulary is compared by size. ``reset=[head]``
   re-initialises the LM head alone (an untied model).

With equal model settings and vocabulary the copy is exact. Any other difference (another architecture,
another norm or MLP, a non-integer width ratio, fewer layers) is refused in one sentence naming what can change.

**Import** (``init_from.hf``): a directory written by ``save_pretrained`` (``config.json``, the weights, and the
fast tokenizer's ``tokenizer.json``, as ``lmlab export`` writes them; read offline). The model's Hugging Face
adapter (its spec, ``lmlab.models.spec``: GPT-2, Arcee and Llama for ``model=transformer``, Mamba for
``model=mamba``, Mamba-2 for ``model=mamba2``) turns the checkpoint's config into the run's architecture settings
(``model.*``: ``hf_settings`` writes them into the run's config before anything is built, so the run directory
records the model it trains) and its weights into the model's; the text data read the checkpoint's tokenizer
(``data.tokenizer`` becomes ``Tokenizer.from_hf(<dir>)``, a fixed ``File`` tokenizer). A tokenizer in lmlab's
layout (``[PAD] [BOS] [EOS] [MASK]`` = ids 0..3, as ``lmlab export`` writes it) keeps its ids and the model the
checkpoint's vocabulary; any other (GPT-2's, say) gets lmlab's four special tokens as new ids 0..3 before its own
ids, which move up by 4 (the shifted ``tokenizer.json`` lies in ``<cache_dir>/hf_tokenizers/``), and the
embedding and LM head gain four rows, each a copy of the row of the token the checkpoint's
``tokenizer_config.json`` gives the same role (``bos_token`` for ``[BOS]``, ...), or the mean row where it names
none. Settings the checkpoint does not fix (dropout, activation checkpointing, a Mamba's scan implementation)
stay the run's; a ``model.*`` override of one it fixes is refused. ``parent.json`` records the checkpoint as the
parent. A checkpoint the model does not compute exactly (another activation, grouped-query attention, biases,
another norm eps) is refused in one sentence.

A resumed run (one that holds a checkpoint) does not initialise again: its weights come from the checkpoint,
and its ``parent.json`` from its first start is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from lmlab.errors import UserError
from lmlab.models.grow import EMBED, HEAD, deepen, n_blocks, residual_outputs, revocab, solar_layers, untie
from lmlab.models.spec import declared_models, hf_adapter, importers, spec_of
from lmlab.run_dir import (
    load_backbone,
    model_args,
    read_command,
    read_config,
    read_parent,
    read_results,
    status,
    write_parent,
)
from lmlab.settings import NonNegative
from lmlab.vocab import N_SPECIAL

# model settings that may differ from the parent's (the others must be equal)
MAY_CHANGE = ("d_model", "n_layers", "n_heads", "d_ff", "tie_embeddings", "dropout", "activation_checkpointing",
              "max_len")
HF_TOKENIZERS = "hf_tokenizers"  # in cache_dir: imported tokenizers given lmlab's special ids (init_from.hf)
PARENT_METRICS = ("val/loss", "perplexity/loss", "perplexity/gap", "train/steps")


class InitFrom:
    """The ``init_from`` settings of ``lmlab train`` (see the module docstring).

    ``run``: the parent's run directory (null: train from scratch); ``reset``: parts re-initialised even when
    they fit (``embeddings``: token embedding and LM head; ``head``: the LM head alone); ``depth``: how new
    layers start (``duplicate``: copies of the parent's; ``zero``: copies whose residual outputs are zero);
    ``layers``: the parent layer of every layer of the new model (null: SOLAR's map); ``map_shared_tokens``:
    copy the embedding and head rows of tokens both vocabularies share; ``hf``: a local ``transformers``
    checkpoint directory to import instead of a parent run."""

    def __init__(self, run: Optional[str] = None, reset: list[Literal["embeddings", "head"]] = (),
                 depth: Literal["duplicate", "zero"] = "duplicate", layers: Optional[list[NonNegative]] = None,
                 map_shared_tokens: bool = True, hf: Optional[str] = None) -> None:
        self.run = None if run in (None, "") else Path(str(run)).expanduser().resolve()
        self.hf = None if hf in (None, "") else Path(str(hf)).expanduser().resolve()
        self.reset = [str(r) for r in (reset or [])]
        self.depth = str(depth)
        self.layers = None if layers is None else [int(i) for i in layers]
        self.map_shared_tokens = bool(map_shared_tokens)

    @classmethod
    def from_config(cls, node: DictConfig | dict | None) -> InitFrom:
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
        values.pop("_target_", None)
        return cls(**values)

    # ----- the parent -----

    def _parent_config(self) -> DictConfig:
        if self.run is None:
            raise ValueError("init_from.run is not set")
        if not self.run.is_dir():
            raise UserError(f"init_from.run={self.run} is not a directory: point it at the run directory of a "
                            "finished `lmlab train` run.")
        return read_config(self.run)

    def _check_settings(self, parent_model: DictConfig, model_cfg: DictConfig) -> None:
        a, b = str(parent_model.get("_target_")), str(model_cfg.get("_target_"))
        if a != b:
            raise UserError(f"init_from.run={self.run} trained a {a.rsplit('.', 1)[-1]} and this run builds a "
                            f"{b.rsplit('.', 1)[-1]}: use the parent's model (model= as in its command); only "
                            f"{', '.join(MAY_CHANGE)} and the vocabulary may change.")
        differ = sorted(k for k in set(parent_model) | set(model_cfg)
                        if k not in MAY_CHANGE and k != "_target_" and parent_model.get(k) != model_cfg.get(k))
        if differ:
            keys = ", ".join(f"model.{k}={parent_model.get(k)}" for k in differ)
            raise UserError(f"this run's model differs from its parent's in settings that cannot grow: set {keys} "
                            f"as the parent has them (only {', '.join(MAY_CHANGE)} and the vocabulary may change).")

    # ----- the operators -----

    def apply(self, model: torch.nn.Module, attention: str, model_cfg: DictConfig, tokenizer=None) -> dict[str, Any]:
        """Fill ``model`` (built from this run's config, ``model_cfg``, for ``attention``) from the parent's
        weights; ``tokenizer``: this run's text tokenizer, or None. Returns the record of what was done."""
        pcfg = self._parent_config()
        self._check_settings(pcfg.model, model_cfg)
        trained = model_args(self.run)["attention"]
        parent = load_backbone(self.run, attention=attention)
        operators: list[str] = []
        if attention != trained:
            operators.append(f"attention: {trained} -> {attention}")

        if parent.d_model != model.d_model:
            parent = self._widen(parent, model)
            operators.append(f"widen: d_model {parent.d_model // self._ratio} -> {parent.d_model}")
        state = {k: v.detach().clone() for k, v in parent.state_dict().items()}

        same_size = parent.vocab_size == model.vocab_size
        reset = "embeddings" in self.reset
        tokens = self._tokens(pcfg, tokenizer) if self.map_shared_tokens or (same_size and not reset) else None
        other_tokens = tokens is not None and tokens[0] != tokens[1]
        new_vocab = not same_size or reset or other_tokens
        tied_parent = bool(getattr(parent, "tie_embeddings", False))
        tied_child = bool(getattr(model, "tie_embeddings", False))
        if tied_parent and not tied_child:
            state = untie(state)
            if not new_vocab:
                operators.append("untie: the LM head starts as the embedding")
        elif tied_child and not tied_parent and not new_vocab:
            raise UserError(f"the parent {self.run} has an untied LM head and this run ties it: set "
                            "model.tie_embeddings=false, or init_from.reset=[embeddings] to start both anew.")

        layers = self._layer_map(n_blocks(state), model)
        if layers is not None:
            zero = tuple(residual_outputs(model.blocks[0])) if self.depth == "zero" else ()
            if self.depth == "zero" and not zero:
                raise UserError(f"init_from.depth=zero needs blocks with tagged residual outputs, which the "
                                f"{type(model).__name__} model lacks: use init_from.depth=duplicate.")
            state = deepen(state, layers, zero)
            operators.append(f"depth: {n_blocks(parent.state_dict())} -> {len(layers)} layers ({self.depth}, "
                             f"parent layers {layers})")

        own = model.state_dict()
        if new_vocab:
            rows = self._shared_rows(parent.vocab_size, model.vocab_size, tokens) if self.map_shared_tokens else {}
            why = "" if not same_size else " (init_from.reset=[embeddings])" if reset else " (other tokens)"
            if not self.map_shared_tokens:
                how = "embeddings and head initialised anew"
            elif tokens is not None:
                how = f"rows mapped by bytes: {len(rows)} shared rows copied, the others initialised anew"
            else:
                how = f"{len(rows)} special-token rows copied, the others initialised anew"
            state = revocab(state, own, rows)
            operators.append(f"new vocabulary: {parent.vocab_size} -> {model.vocab_size} tokens{why}, {how}")
        elif "head" in self.reset:
            if tied_child:
                raise UserError("init_from.reset=[head] re-initialises an untied LM head and this model ties it: "
                                "set model.tie_embeddings=false, or use init_from.reset=[embeddings].")
            state = revocab(state, own, {}, reset_head_only=True)
            operators.append("reset: LM head re-initialised")
        if tied_child and new_vocab:
            state[HEAD] = state[EMBED]
        self._load(model, state)
        if not operators:
            operators.append("copy")
        return self.record(operators)

    def _widen(self, parent: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
        from lmlab.models.widen import widen

        d, d_new = parent.d_model, model.d_model
        if spec_of(parent).widen is None:
            raise UserError(f"the parent's {type(parent).__name__} declares no widening (its spec), so it cannot "
                            f"grow wider: keep model.d_model={d}.")
        if d_new < d or d_new % d:
            raise UserError(f"model.d_model={d_new} is not an integer multiple of the parent's d_model={d}: set it "
                            f"to {2 * d} (or another multiple of {d}), or keep {d}.")
        k = self._ratio = d_new // d
        want = {"n_heads": k * parent.n_heads, "d_ff": k * parent.d_ff, "tie_embeddings": False}
        have = {"n_heads": model.n_heads, "d_ff": model.d_ff, "tie_embeddings": model.tie_embeddings}
        if want != have:
            keys = " ".join(f"model.{key}={str(v).lower() if isinstance(v, bool) else v}" for key, v in want.items()
                            if have[key] != v)
            raise UserError(f"widening d_model {d} -> {d_new} keeps the size of each head and of the MLP per "
                            f"width: set {keys}.")
        return widen(parent, d_new)

    def _layer_map(self, n: int, model: torch.nn.Module) -> list[int] | None:
        n_new = len(model.blocks) if hasattr(model, "blocks") else n
        if self.layers is not None:
            if len(self.layers) != n_new:
                raise UserError(f"init_from.layers lists {len(self.layers)} layers and model.n_layers is {n_new}: "
                                "list the parent layer of every layer of the new model.")
            return None if self.layers == list(range(n)) else self.layers
        if n_new == n:
            return None
        if n_new < n:
            raise UserError(f"this run's model has {n_new} layers and its parent {n}: set model.n_layers to {n} "
                            "or more (or list the parent layers to keep in init_from.layers).")
        return solar_layers(n, n_new)

    def _load(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        own = model.state_dict()
        wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
        missing = sorted(set(own) ^ set(state))
        if wrong or missing:
            where = ", ".join((wrong + missing)[:3])
            others = ", ".join(MAY_CHANGE[3:])
            raise UserError(f"the parent's weights do not fit this run's model ({where}): change only the "
                            f"vocabulary, n_layers (larger), d_model (an integer multiple) and {others} from the "
                            "parent's model settings.")
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})

    # ----- shared tokens -----

    def _tokens(self, pcfg: DictConfig, tokenizer) -> tuple[dict[int, bytes], dict[int, bytes]] | None:
        """(parent's, this run's) token id -> bytes, or None unless both runs have text tokenizers."""
        ours = token_bytes(tokenizer) if tokenizer is not None else {}
        theirs = _parent_tokenizer(self.run, pcfg) if ours else None
        theirs = token_bytes(theirs) if theirs is not None else {}
        return (theirs, ours) if theirs else None

    @staticmethod
    def _shared_rows(v_parent: int, v_child: int, tokens) -> dict[int, int]:
        """child id -> parent id: the special tokens, and tokens with the same bytes (``tokens``: the parent's
        and the child's token bytes, or None)."""
        rows = {i: i for i in range(min(N_SPECIAL, v_parent, v_child))}
        if tokens is None:
            return rows
        theirs, ours = tokens
        parent_ids = {b: i for i, b in theirs.items() if i < v_parent}
        for i, b in ours.items():
            if i < v_child and b in parent_ids:
                rows[i] = parent_ids[b]
        return rows

    def record(self, operators: list[str]) -> dict[str, Any]:
        """What ``parent.json`` and ``results.json`` say about the parent."""
        try:
            metrics = read_results(self.run).get("metrics", {})
        except UserError:
            metrics = {}
        return {"run": str(self.run), "command": read_command(self.run), "status": status(self.run),
                "operators": operators, "metrics": {k: metrics[k] for k in PARENT_METRICS if k in metrics},
                "settings": {"reset": self.reset, "depth": self.depth, "layers": self.layers,
                             "map_shared_tokens": self.map_shared_tokens}}


def start_from(cfg: DictConfig, run_dir: Path, model: torch.nn.Module, source, attention: str, resuming: bool,
               write: bool = True) -> dict[str, Any] | None:
    """The pipeline's hook: apply ``cfg.init_from`` to ``model`` and write ``parent.json`` (``write``: rank 0),
    or, for a run that resumes from its checkpoint, return the ``parent.json`` of its first start. None when
    ``init_from.run`` is unset."""
    node = cfg.get("init_from")
    if node is None or not (node.get("run") or node.get("hf")):
        return None
    if resuming:
        return read_parent(run_dir)
    init = InitFrom.from_config(node)
    if init.hf is not None:
        record = import_hf(init.hf, model)
        if write:
            write_parent(run_dir, record)
            print(f"[lmlab] init_from {init.hf}: {'; '.join(record['operators'])}")
        return record
    if init.run == Path(run_dir).resolve():
        raise UserError(f"init_from.run={init.run} is this run's own directory: point it at another, finished run.")
    record = init.apply(model, attention, cfg.model, getattr(source, "tokenizer", None))
    if write:
        write_parent(run_dir, record)
        print(f"[lmlab] init_from {init.run}: {'; '.join(record['operators'])}")
    return record


# ----- token bytes, for matching two vocabularies -----

def token_bytes(tokenizer) -> dict[int, bytes]:
    """Each ordinary token id of a text tokenizer and the bytes it stands for (special tokens left out,
    ``Tokenizer.token_bytes``); {} for a tokenizer of another kind."""
    from lmlab.data.tokenizers import Tokenizer

    return tokenizer.token_bytes() if isinstance(tokenizer, Tokenizer) else {}


def _parent_tokenizer(run: Path, pcfg: DictConfig):
    """The parent's text tokenizer (a trained BPE restored from the parent's data cache), or None when its data
    have none (grammars, token shards)."""
    from hydra.utils import instantiate

    from lmlab.data.tokenizers import TOKENIZER_FILE

    node = pcfg.get("data", {}).get("tokenizer") if pcfg.get("data") is not None else None
    if node is None:
        return None
    tokenizer = instantiate(node)
    if tokenizer.trained:  # a fixed vocabulary
        return tokenizer
    source = instantiate(pcfg.data)
    entry = Path(str(pcfg.cache_dir)).expanduser() / source.cache_key()
    if not (entry / TOKENIZER_FILE).is_file():
        raise UserError(f"the trained tokenizer of the parent {run} is not in its data cache ({entry}): rerun the "
                        "parent's command to rebuild it, or start the embeddings anew with "
                        "init_from.reset=[embeddings] init_from.map_shared_tokens=false.")
    source.restore_state(entry)
    return source.tokenizer


# ----- a Hugging Face checkpoint as the parent (init_from.hf) -----

def _checkpoint_config(directory: Path):
    """The ``transformers`` config of the checkpoint ``directory`` (read offline), or a UserError naming the fix."""
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        raise UserError(f"init_from.hf={directory} holds no config.json: point it at a directory written by a "
                        "transformers model's save_pretrained (or `lmlab export`).")
    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"init_from.hf={directory} holds a config.json transformers cannot read ({e}): point it at "
                        "a transformers checkpoint directory.") from None


def _checkpoint(directory: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """The checkpoint's config and float32 state dict, read offline by ``transformers`` itself (any of its
    weight formats, sharded or not)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        hf = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"transformers cannot load the checkpoint init_from.hf={directory} ({e}): point it at a "
                        "directory written by save_pretrained.") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return hf.config, {k: v.detach() for k, v in hf.state_dict().items()}


def _architecture(directory: Path, config) -> str:
    names = getattr(config, "architectures", None) or []
    if len(names) != 1:
        raise UserError(f"init_from.hf={directory} names {len(names)} architectures in its config.json: import a "
                        "causal LM checkpoint saved by save_pretrained (one architecture).")
    return str(names[0])


def hf_settings(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``init_from.hf``'s architecture in ``model`` and its tokenizer in ``data.tokenizer`` (see the
    module docstring); ``cfg`` itself when ``init_from.hf`` is unset. The pipeline calls it before the run's
    config is written, so the run records what it trains."""
    from hydra.utils import get_class

    from lmlab.data.tokenizers import BPE, File, Tokenizer, hf_layout

    node = cfg.get("init_from")
    init = InitFrom.from_config(node) if node is not None else None
    if init is None or init.hf is None:
        return cfg
    where = f"init_from.hf={init.hf}"
    if init.run is not None:
        raise UserError("init_from.run and init_from.hf are both set: start from one of them (set the other to null).")
    if init.reset or init.layers is not None or init.depth != "duplicate":
        raise UserError("init_from.reset, init_from.depth and init_from.layers apply to init_from.run: drop them "
                        "with init_from.hf.")
    if not init.hf.is_dir():
        raise UserError(f"{where} is not a directory: point it at a local transformers checkpoint directory.")
    config = _checkpoint_config(init.hf)
    architecture = _architecture(init.hf, config)
    target = str(cfg.model.get("_target_"))
    cls = get_class(target)
    adapter = hf_adapter(cls)
    if architecture not in adapter.architectures:
        fit = [c.__module__.rsplit(".", 1)[-1] for c in importers(architecture)]
        known = sorted({a for c in declared_models() if c.spec.hf is not None for a in c.spec.hf.architectures})
        hint = f"choose model={fit[0]}" if fit else f"import a checkpoint of a class lmlab reads ({', '.join(known)})"
        raise UserError(f"{where} holds a {architecture}, which model={cls.__module__.rsplit('.', 1)[-1]} does not "
                        f"import: {hint}.")
    kwargs, _ = adapter.from_hf(*_checkpoint(init.hf))
    clash = sorted(k for k in _model_overrides() if k in kwargs and cfg.model.get(k) != kwargs[k])
    if clash:
        keys = " ".join(f"model.{k}={cfg.model.get(k)}" for k in clash)
        theirs = " ".join(f"{k}={kwargs[k]}" for k in clash)
        raise UserError(f"{where} fixes the model's architecture ({theirs}), so {keys} would not take effect: drop "
                        "the override.")
    data = cfg.get("data")
    tok = data.get("tokenizer") if data is not None else None
    if tok is None:
        raise UserError(f"{where} trains on text read with the checkpoint's tokenizer, and data={_name(data)} has no "
                        "tokenizer: use data=text (or another text source).")
    chosen = str(tok.get("_target_", ""))
    if chosen not in (_path(BPE), _path(File)) or (chosen == _path(File) and tok.get("path") is not None):
        raise UserError(f"{where} reads text with the checkpoint's tokenizer, not data.tokenizer ({chosen}): drop the "
                        "data/tokenizer override.")
    shift, _ = hf_layout(init.hf)
    vocab = int(config.vocab_size) + shift
    tokenizer = Tokenizer.from_hf(init.hf, vocab, Path(str(cfg.cache_dir)).expanduser() / HF_TOKENIZERS)
    out = cfg.copy()
    with open_dict(out):
        for key, value in kwargs.items():
            out.model[key] = value
        out.data.tokenizer = OmegaConf.create({"_target_": _path(File), "path": str(tokenizer.path),
                                               "vocab_size": vocab})
    return out


def _shift_rows(weight: torch.Tensor, shift: int, rows: dict[int, int | None]) -> torch.Tensor:
    """``weight`` (V, d) with ``shift`` rows before it: row i a copy of ``weight[rows[i]]``, or the mean row."""
    first = torch.stack([weight[rows[i]] if rows.get(i) is not None else weight.mean(0) for i in range(shift)])
    return torch.cat([first, weight])


def _model_overrides() -> set[str]:
    """The ``model.<key>`` settings the command line of this job sets (none outside a Hydra job)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    keys = (o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task)
    return {k.removeprefix("model.") for k in keys if k.startswith("model.")}


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _name(data) -> str:
    return str((data or {}).get("_target_", "none")).rsplit(".", 1)[-1]


def import_hf(directory: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Fill ``model`` (built from the settings ``hf_settings`` wrote) with the checkpoint's weights, by its
    adapter; the record ``parent.json`` keeps."""
    from lmlab.data.tokenizers import SPECIAL_TOKENS, hf_layout

    config, state = _checkpoint(directory)
    architecture = _architecture(directory, config)
    _, state = hf_adapter(model).from_hf(config, state)
    operators = [f"import: {architecture} -> {type(model).__name__}"]
    shift, rows = hf_layout(directory)
    if shift:  # lmlab's special tokens are new ids before the checkpoint's: their rows start from the same roles'
        for key in (EMBED, HEAD):
            state[key] = _shift_rows(state[key], shift, rows)
        if getattr(model, "tie_embeddings", False):
            state[HEAD] = state[EMBED]
        named = ", ".join(f"{SPECIAL_TOKENS[i]} from " + (f"id {j}" if j is not None else "the mean row")
                          for i, j in rows.items())
        operators.append(f"vocabulary: ids shifted by {shift} for lmlab's special tokens ({named})")
    own = model.state_dict()
    if set(state) != set(own) or any(own[k].shape != state[k].shape for k in own):
        raise UserError(f"the weights of init_from.hf={directory} do not fit this run's model: leave the model's "
                        "architecture settings to the checkpoint (drop the model.* overrides).")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return {"run": str(directory), "hf": str(directory), "architecture": architecture, "command": None,
            "status": "imported", "operators": operators, "metrics": {},
            "settings": {"hf": str(directory)}}
