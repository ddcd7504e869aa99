"""``eval=lm_eval``: EleutherAI's lm-evaluation-harness, in-process, on the trained lmlab model.

Two parts:

* ``LmlabLM``, an ``lm_eval.api.model.TemplateLM`` serving any lmlab backbone with its source's tokenizer
  (``lmlab.data.tokenizers``: ``encode(texts)``, ``decode(ids)``). lm-eval's three request types:

  - ``loglikelihood(context, continuation)``: the sum of ``log p(token)`` over the continuation's tokens
    given ``[BOS] + context`` (the model was trained on rows that start with BOS), and whether greedy
    decoding would have produced exactly those tokens. Text is split as lm-eval does for causal models:
    ``[BOS] + encode(context + continuation)`` is cut after ``[BOS] + encode(context)`` (trailing spaces
    of the context move to the continuation); an empty context is ``[BOS]`` alone. This is what lm-eval's
    ``hf`` backend computes with ``add_bos_token=True`` on the same weights and tokenizer.
  - ``loglikelihood_rolling(text)``: the log-likelihood of ``[BOS] + encode(text)`` after BOS, in windows of
    ``max_length`` predicted tokens, each window reading the one token before it and the last, shorter one
    as many tokens before it as fill ``max_length`` inputs (lm-eval's ``get_rolling_token_windows`` with
    ``context_len=1`` and ``make_disjoint_window``, as its ``hf`` backend). The same windows serve a ``loglikelihood``
    request longer than ``max_length + 1`` tokens: the context is cut from the left, and a continuation
    longer than ``max_length`` is scored window by window.
  - ``generate_until(context, gen_kwargs)``: greedy decoding (sampling settings are ignored) from
    ``[BOS] + encode(context)`` until EOS, a stop string of ``until`` or ``min(max_gen_toks,
    max_gen_tokens)`` new tokens. A recurrent model (one whose blocks decode token by token:
    ``init_state``/``step``) reads the context's last ``max_length`` tokens step by step and carries its
    state on; any other model (Transformer, Hyena, HAT, ...) recomputes its forward pass over the last
    ``max_length`` tokens of the sequence for each new token (no key/value cache).

  Requests are sorted by length and run in batches of ``batch_size`` right-padded rows, under
  ``torch.no_grad()`` on the model's device. ``max_length`` defaults to the length of the rows the model
  was trained on (the data's ``block_size``), capped by a model's ``max_len``: the context length ``lmlab
  export`` writes into the checkpoint, so lm-eval's ``hf`` backend on the export cuts long requests into the
  same windows. Causal models are
  served with causal attention; a prefix LM reads the context (the prompt) as its bidirectional prefix
  and the continuation causally, as Wang et al. 2022 (arXiv 2204.05832) score a non-causal decoder. A
  bidirectional (MLM) model is refused.

* ``LmEval``, the evaluator: ``lm_eval.simple_evaluate(model=LmlabLM(...), tasks=...,
  task_manager=lm_eval.tasks.TaskManager(include_path=...))``. The shipped task folder
  (``lmlab/evaluation/tasks/``, task ``lmlab_tiny``) is always on the include path; lm-eval's own tasks
  are indexed only when a requested task is not found there (indexing them takes seconds; most of them
  download their data from the Hugging Face Hub). Metrics come back flat as ``lm_eval/<task>/<metric>``
  (``acc``, ``acc_norm``, ``acc_stderr``, ...; a metric under a named filter gets ``_<filter>``), groups
  likewise. lm-eval seeds Python's, NumPy's and PyTorch's global generators: their states are restored
  afterwards, so an evaluation during training (``eval_every``) does not change the training run.

Refused before any data is generated or any training (``UserError``: a setting out of range when the
evaluator is built, the rest by ``skip_reason``): a source that cannot encode text (the grammar sources: no
``tokenizer``), a bidirectional objective (the pipeline hands ``skip_reason`` the built objective), an
unknown task, a missing ``include_path``. ``lmlab eval run=<dir>
eval=lm_eval`` scores a finished run the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM

from lmlab.attention import BIDIRECTIONAL, CAUSAL, PREFIX, Attention, padding_of
from lmlab.errors import UserError
from lmlab.evaluation.base import Evaluator
from lmlab.readout import model_device, pad_rows
from lmlab.settings import NonNegative, Optional, Positive
from lmlab.vocab import BOS_ID, EOS_ID, PAD_ID

TASKS_DIR = Path(__file__).resolve().parent / "tasks"  # the shipped tasks (lmlab_tiny)
FALLBACK_MAX_LENGTH = 512  # a source without block_size and a model without max_len


def can_encode(source) -> bool:
    """Whether ``source`` turns arbitrary text into its token ids (the text sources do, grammars do not)."""
    tokenizer = getattr(source, "tokenizer", None)
    return callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None))


def default_max_length(model, source) -> int:
    """The length of the rows the model was trained on (``block_size`` of packed text rows; the context length
    of its export), capped by the model's ``max_len`` where it has one."""
    block = getattr(source, "block_size", None)
    length = int(block) if isinstance(block, int) and block >= 2 else FALLBACK_MAX_LENGTH
    cap = getattr(model, "max_len", None)
    return min(length, int(cap)) if isinstance(cap, int) and cap > 0 else length


def check_positive(**settings) -> None:
    for name, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"eval.lm_eval.{name} must be a positive whole number, got {value!r}: "
                            f"fix eval.lm_eval.{name}.")


class LmlabLM(TemplateLM):
    """lm-eval's model interface over an lmlab backbone and its source's tokenizer (see the module
    docstring for BOS handling, windows and decoding)."""

    backend = "causal"

    def __init__(self, model, tokenizer, batch_size: int = 32, max_length: int = 63,
                 max_gen_tokens: int = 64) -> None:
        super().__init__()
        kind = getattr(model, "attention_kind", CAUSAL)
        if kind == BIDIRECTIONAL:
            raise UserError("eval=lm_eval scores text left to right and this model attends bidirectionally (an MLM): "
                            "train it with a causal objective (objective=clm or objective=prefix_lm).")
        if kind not in (CAUSAL, PREFIX):
            raise UserError(f"eval=lm_eval cannot read a model built for {kind!r} attention: train it with "
                            "objective=clm or objective=prefix_lm.")
        check_positive(batch_size=batch_size, max_length=max_length, max_gen_tokens=max_gen_tokens)
        self.model, self.lm_tokenizer, self.kind = model, tokenizer, kind
        self._batch_size, self._max_length, self.max_gen_tokens = batch_size, max_length, max_gen_tokens
        self.recurrent = bool(getattr(model, "decodes_by_step", False))

    # ----- what lm-eval reads -----

    @property
    def eot_token_id(self) -> int:
        return EOS_ID

    @property
    def prefix_token_id(self) -> int:
        return BOS_ID

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def get_model_info(self) -> dict[str, Any]:
        return {"model": type(self.model).__name__, "model_num_parameters": self.model.num_parameters(),
                "attention": self.kind, "max_length": self._max_length}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The text's ids, after BOS unless ``add_special_tokens`` is False (lm-eval asks for the bare ids
        of a continuation whose context is empty)."""
        ids = self.lm_tokenizer.encode([string])[0]
        return ids if add_special_tokens is False else [BOS_ID, *ids]

    def tok_decode(self, ids) -> str:
        return self.lm_tokenizer.decode(list(ids))

    # ----- log-likelihoods -----

    def windows(self, context: list[int], continuation: list[int]) -> list[tuple[list[int], list[int]]]:
        """``(context piece, continuation piece)`` pairs whose joined length is at most ``max_length + 1``:
        the continuation in consecutive pieces of ``max_length`` tokens (one piece when it fits), each after
        as many of the tokens just before it as fit (a full piece after one token, the first after the
        context cut from the left, the last and shorter one after more), as lm-eval's rolling windows."""
        tokens = context + continuation
        start, length = len(context), self._max_length
        pieces = []
        for s in range(start, len(tokens), length):
            e = min(s + length, len(tokens))
            lo = max(0, e - 1 - length)
            pieces.append((tokens[lo:s], tokens[s:e]))
        return pieces

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation | context), greedy)`` of each pair; every ``context + continuation``
        fits in ``max_length + 1`` tokens and each context holds at least one token."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        device = self.device
        for b in range(0, len(order), self._batch_size):
            chunk = order[b : b + self._batch_size]
            inputs = [(pairs[i][0] + pairs[i][1])[:-1] for i in chunk]
            ids = pad_rows(inputs).to(device)
            prefix = torch.tensor([len(pairs[i][0]) for i in chunk], dtype=torch.long, device=device)
            hidden = self.model(ids, self.attention(ids, prefix))
            # the LM head on the continuation positions only: (sum of continuation lengths, vocab)
            rows = [row for row, i in enumerate(chunk) for _ in pairs[i][1]]
            cols = [len(inputs[row]) - len(pairs[i][1]) + k for row, i in enumerate(chunk)
                    for k in range(len(pairs[i][1]))]
            logp = F.log_softmax(self.model.logits(hidden[rows, cols]).float(), dim=-1)
            targets = torch.tensor([t for i in chunk for t in pairs[i][1]], dtype=torch.long, device=device)
            picked = logp.gather(1, targets[:, None])[:, 0].tolist()
            hits = (logp.argmax(-1) == targets).tolist()
            at = 0
            for i in chunk:
                n = len(pairs[i][1])
                out[i] = (float(sum(picked[at : at + n])), all(hits[at : at + n]))
                at += n
        return out

    def attention(self, ids: torch.Tensor, prefix_len: torch.Tensor) -> Attention:
        """Causal attention, or for a prefix LM the context as its bidirectional prefix."""
        if self.kind == PREFIX:
            return Attention(PREFIX, padding=padding_of(ids), prefix_len=prefix_len.clamp_min(1))
        return Attention(CAUSAL, padding=padding_of(ids))

    def score_requests(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Each ``(context ids, continuation ids)`` scored whole, through ``windows`` where it is long."""
        pieces, owner = [], []
        for r, (context, continuation) in enumerate(requests):
            for piece in self.windows(context, continuation):
                pieces.append(piece)
                owner.append(r)
        scores = self.score(pieces)
        totals = [[0.0, True] for _ in requests]
        for r, (lp, greedy) in zip(owner, scores):
            totals[r][0] += lp
            totals[r][1] = totals[r][1] and greedy
        return [(float(t), bool(g)) for t, g in totals]

    def loglikelihood(self, requests, disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)  # lmlab prints its own lines

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self.score_requests([(list(ctx), list(cont)) for _, ctx, cont in requests])
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        results = self.score_requests([([BOS_ID], self.tok_encode(t, add_special_tokens=False)) for t in texts])
        out = [lp for lp, _ in results]
        for text, lp in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), lp)
        return out

    # ----- generation -----

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        jobs = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else [u for u in until if u]
            max_new = min(int(gen_kwargs.get("max_gen_toks", self.max_gen_tokens)), self.max_gen_tokens)
            jobs.append((self.tok_encode(context)[-self._max_length :], max(max_new, 1), until))
        order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][0]))
        out = [""] * len(jobs)
        for b in range(0, len(order), self._batch_size):
            chunk = order[b : b + self._batch_size]
            texts = self.generate([jobs[i] for i in chunk])
            for i, text in zip(chunk, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    @torch.no_grad()
    def generate(self, jobs: list[tuple[list[int], int, list[str]]]) -> list[str]:
        """Greedy continuations of a batch of ``(context ids, max new tokens, stop strings)``."""
        made: list[list[int]] = [[] for _ in jobs]
        done = [False] * len(jobs)

        def accept(row: int, token: int) -> None:
            _, max_new, until = jobs[row]
            if token == EOS_ID:
                done[row] = True
                return
            made[row].append(token)
            if len(made[row]) >= max_new or (until and any(u in self.tok_decode(made[row]) for u in until)):
                done[row] = True

        if self.recurrent:
            self._decode_by_step(jobs, done, accept)
        else:
            while not all(done):
                rows = [r for r in range(len(jobs)) if not done[r]]
                for row, token in zip(rows, self._next_tokens([jobs[r][0] for r in rows], [made[r] for r in rows])):
                    accept(row, token)
        return [self._cut(self.tok_decode(ids), until) for ids, (_, _, until) in zip(made, jobs)]

    @staticmethod
    def _cut(text: str, until: list[str]) -> str:
        ends = [text.index(u) for u in until if u in text]
        return text[: min(ends)] if ends else text

    def _next_tokens(self, contexts: list[list[int]], made: list[list[int]]) -> list[int]:
        """The argmax next token of each ``context + made``, from one forward pass over the last
        ``max_length`` tokens of each (recomputed at every step: no key/value cache)."""
        device = self.device
        windows, prefix = [], []
        for context, new in zip(contexts, made):
            seq = context + new
            start = max(0, len(seq) - self._max_length)
            windows.append(seq[start:])
            prefix.append(max(1, len(context) - start))  # a prefix LM: what is left of the prompt
        ids = pad_rows(windows).to(device)
        hidden = self.model(ids, self.attention(ids, torch.tensor(prefix, dtype=torch.long, device=device)))
        last = torch.tensor([len(w) - 1 for w in windows], device=device)
        return self.model.logits(hidden[torch.arange(len(windows), device=device), last]).argmax(-1).tolist()

    def _decode_by_step(self, jobs, done: list[bool], accept) -> None:
        """Every row advances one token per ``model.step``: it reads its context, then its own previous
        token; once its context is read, each step's argmax is its next token."""
        device = self.device
        n = len(jobs)
        state = self.model.init_state(n, device)
        lengths = [len(context) for context, _, _ in jobs]
        previous = [PAD_ID] * n
        t = 0
        while not all(done):
            feed = [jobs[r][0][t] if t < lengths[r] else previous[r] for r in range(n)]
            hidden, state = self.model.step(torch.tensor(feed, dtype=torch.long, device=device), state)
            next_ids = self.model.logits(hidden).argmax(-1).tolist()
            for r in range(n):
                if t >= lengths[r] - 1 and not done[r]:
                    previous[r] = next_ids[r]
                    accept(r, next_ids[r])
            t += 1


@contextlib.contextmanager
def quiet_git() -> Iterator[None]:
    """lm-eval records the git commit of the working directory with ``git describe``, whose stderr says
    ``fatal: not a git repository`` outside one: the same command with its stderr discarded, during the block."""
    import lm_eval.evaluator

    def commit() -> str | None:
        try:
            out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
        except OSError:
            return None
        return (out.stdout.strip() or None) if out.returncode == 0 else None

    original = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = commit
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = original


@contextlib.contextmanager
def kept_random_state() -> Iterator[None]:
    """Restore Python's, NumPy's and PyTorch's (CPU and CUDA) global generators after the block."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def flat_metrics(prefix: str, results: dict[str, Any]) -> dict[str, float]:
    """``{"<prefix>/<task>/<metric>": value}`` of lm-eval's ``results`` and ``groups`` sections: the filter
    ``none`` is dropped from lm-eval's ``"<metric>,<filter>"`` keys, another filter becomes ``_<filter>``;
    values that are not numbers (lm-eval's ``"N/A"`` stderr) are left out."""
    out: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, values in (results.get(section) or {}).items():
            for key, value in values.items():
                if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                metric, filt = key.split(",", 1)
                name = metric if filt == "none" else f"{metric}_{filt}"
                if math.isfinite(float(value)):
                    out[f"{prefix}/{task}/{name}"] = float(value)
    return out


class LmEval(Evaluator):
    """lm-evaluation-harness tasks on the trained model (see the module docstring)."""

    name = "lm_eval"

    def __init__(self, tasks: list[str] | str = ("lmlab_tiny",), include_path: str | list[str] | None = None,
                 num_fewshot: Optional[NonNegative] = None, limit: int | float | None = None, batch_size: Positive = 32,
                 max_gen_tokens: Positive = 64, max_length: Optional[Positive] = None,
                 bootstrap_iters: NonNegative = 1000) -> None:
        tasks = [tasks] if isinstance(tasks, str) else list(tasks or [])
        if not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise UserError(f"eval.lm_eval.tasks must list task names, got {tasks!r}: "
                            "pass e.g. eval.lm_eval.tasks=[lmlab_tiny].")
        check_positive(batch_size=batch_size, max_gen_tokens=max_gen_tokens,
                       **({} if max_length is None else {"max_length": max_length}))
        for name, value in (("num_fewshot", num_fewshot), ("bootstrap_iters", bootstrap_iters)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise UserError(f"eval.lm_eval.{name} must be a whole number (0 or more), got {value!r}: "
                                f"fix eval.lm_eval.{name}.")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
            raise UserError(f"eval.lm_eval.limit must be null, a number of items or a fraction, got {limit!r}: "
                            "fix eval.lm_eval.limit.")
        paths = [] if include_path is None else [include_path] if isinstance(include_path, str) else list(include_path)
        self.include_path = [TASKS_DIR, *(Path(str(p)).expanduser() for p in paths)]
        self.tasks, self.num_fewshot, self.limit = tasks, num_fewshot, limit
        self.batch_size, self.max_gen_tokens, self.max_length = batch_size, max_gen_tokens, max_length
        self.bootstrap_iters = bootstrap_iters
        self._task_manager = None

    def skip_reason(self, source, objective=None) -> str | None:
        """Never skips: refuses (``UserError``) what cannot run, before any data is generated."""
        if not can_encode(source):
            raise UserError(f"eval=lm_eval scores text and data {getattr(source, 'name', source)} cannot encode "
                            "text (it has no tokenizer): train on text (data=text or data=hf) or drop lm_eval from "
                            "eval.")
        if getattr(objective, "attention", None) == BIDIRECTIONAL:
            raise UserError(f"eval=lm_eval scores text left to right and objective {type(objective).__name__} "
                            "trains a bidirectional model: use objective=clm or objective=prefix_lm, or drop lm_eval "
                            "from eval.")
        self.task_manager()  # an unknown task or a missing include_path stops here
        return None

    def task_manager(self):
        """lm-eval's ``TaskManager`` over the include path, with lm-eval's own tasks only when a requested
        task is not in the include path."""
        if self._task_manager is not None:
            return self._task_manager
        from lm_eval.tasks import TaskManager

        for path in self.include_path:
            if not path.is_dir():
                raise UserError(f"eval.lm_eval.include_path {str(path)!r} is not a directory: point it at a folder "
                                "of lm-eval task YAMLs.")
        manager = TaskManager(include_path=[str(p) for p in self.include_path], include_defaults=False)
        if any(t not in manager.all_tasks for t in self.tasks):
            manager = TaskManager(include_path=[str(p) for p in self.include_path], include_defaults=True)
        unknown = [t for t in self.tasks if t not in manager.all_tasks]
        if unknown:
            raise UserError(f"lm-eval knows no task {unknown[0]!r}: name a task of lm-eval (`lm-eval ls tasks`) or "
                            "of a folder given as eval.lm_eval.include_path.")
        self._task_manager = manager
        return manager

    def __call__(self, module, datamodule, run_dir=None) -> dict[str, float]:
        import lm_eval

        model, source = module.model, datamodule.source
        if not can_encode(source):
            raise UserError(f"eval=lm_eval scores text and data {source.name} cannot encode text: "
                            "train on text (data=text or data=hf) or drop lm_eval from eval.")
        max_length = default_max_length(model, source) if self.max_length is None else self.max_length
        lm = LmlabLM(model, source.tokenizer, batch_size=self.batch_size, max_length=max_length,
                     max_gen_tokens=self.max_gen_tokens)
        was_training = model.training
        model.eval()
        quiet = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            with kept_random_state(), quiet_git():
                results = lm_eval.simple_evaluate(
                    model=lm, tasks=list(self.tasks), task_manager=self.task_manager(), num_fewshot=self.num_fewshot,
                    limit=self.limit, bootstrap_iters=self.bootstrap_iters, log_samples=False)
        finally:
            model.train(was_training)
            for q, level in zip(quiet, levels):
                q.setLevel(level)
        metrics = flat_metrics(self.name, results or {})
        for task in self.tasks:
            shown = {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{self.name}/{task}/")}
            n = (results or {}).get("n-samples", {}).get(task, {}).get("effective")
            text = ", ".join(f"{k} {v:.4g}" for k, v in shown.items() if not k.endswith("stderr"))
            print(f"[lmlab] lm_eval {task}: {text or 'no metrics'}" + (f" ({n} items)" if n else ""))
        return metrics
