"""eval=lm_eval: the lm-eval adapter against hand computations from the model's logits, the evaluator on the
shipped task, the CLI (train, eval, refusals before training) and lm-eval's own ``hf`` backend on an export."""

from __future__ import annotations

import json
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmlab.attention import BIDIRECTIONAL, CAUSAL, PREFIX, Attention
from lmlab.data.tokenizers import Byte
from lmlab.errors import UserError
from lmlab.evaluation.harness import TASKS_DIR, LmEval, LmlabLM, flat_metrics, kept_random_state
from lmlab.models.mamba import Mamba
from lmlab.models.transformer import Transformer
from lmlab.objectives.clm import CLM
from lmlab.objectives.mlm import MLM
from lmlab.vocab import BOS_ID, EOS_ID

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAST = ["max_steps=4", "val_every=2", "checkpoint_every=2", "batch_size=16", "logger=none"]
ITEMS = [json.loads(line) for line in (TASKS_DIR / "lmlab_tiny" / "lmlab_tiny.jsonl").read_text().splitlines()]


def request(*args):
    return SimpleNamespace(args=args)


def tiny_transformer(attention: str = CAUSAL, seed: int = 0, n_layers: int = 1) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(Byte().vocab_size, attention, d_model=16, n_layers=n_layers, n_heads=2).eval()


def hand_loglik(model, context_ids: list[int], continuation_ids: list[int], attention=None) -> float:
    """log p(continuation | context) from one forward pass over ``context + continuation[:-1]``."""
    ids = torch.tensor([context_ids + continuation_ids[:-1]])
    with torch.no_grad():
        logp = F.log_softmax(model.logits(model(ids, attention or Attention(CAUSAL))).double(), -1)[0]
    start = len(context_ids) - 1
    return float(sum(logp[start + i, t] for i, t in enumerate(continuation_ids)))


# ----- the adapter: known answers from the model's logits -----

def test_loglikelihood_equals_the_hand_computation():
    model, tok = tiny_transformer(), Byte()
    lm = LmlabLM(model, tok, batch_size=2, max_length=64)
    reqs = [("The cat sat on the", " mat"), ("Did Ella see the fox at the ", "beach"), ("", "Hello"),
            ("A longer context, to pad the batch of shorter ones", " end.")]
    out = lm.loglikelihood([request(c, x) for c, x in reqs])
    for (context, continuation), (lp, greedy) in zip(reqs, out):
        # lm-eval's split: trailing spaces move to the continuation; an empty context is BOS alone
        stripped = context.rstrip()
        moved = context[len(stripped):] + continuation
        ctx = [BOS_ID] + tok.encode([stripped])[0] if stripped else [BOS_ID]
        cont = tok.encode([moved])[0]
        assert lp == pytest.approx(hand_loglik(model, ctx, cont), abs=1e-4)
        assert isinstance(greedy, bool)


def test_is_greedy_is_true_exactly_for_the_argmax_continuation():
    model = tiny_transformer()
    lm = LmlabLM(model, Byte(), max_length=64)
    context = [BOS_ID] + Byte().encode(["Tom went to the"])[0]
    greedy = []
    with torch.no_grad():
        for _ in range(4):
            logits = model.logits(model(torch.tensor([context + greedy]), Attention(CAUSAL)))[0, -1]
            greedy.append(int(logits.argmax()))
    other = greedy[:-1] + [(greedy[-1] + 1) % model.vocab_size]
    (lp1, g1), (lp2, g2) = lm.score_requests([(context, greedy), (context, other)])
    assert g1 is True and g2 is False
    assert lp1 == pytest.approx(hand_loglik(model, context, greedy), abs=1e-4)
    assert lp2 == pytest.approx(hand_loglik(model, context, other), abs=1e-4)


def test_rolling_loglikelihood_in_windows_of_max_length():
    model, tok = tiny_transformer(), Byte()
    text = "Clara ran near the farm. Did Ben see the goat at the library?"
    ids = tok.encode([text])[0]  # 61 tokens
    whole = LmlabLM(model, tok, max_length=128).loglikelihood_rolling([request(text)])[0]
    assert whole == pytest.approx(hand_loglik(model, [BOS_ID], ids), abs=1e-4)
    # max_length 16: [BOS] + ids[:15] predicts ids[:16], each next window of 16 tokens reads the token before
    # it, the last (shorter) one as many tokens before it as fill 16 inputs (lm-eval's rolling windows)
    windowed = LmlabLM(model, tok, max_length=16).loglikelihood_rolling([request(text)])[0]
    tokens = [BOS_ID] + ids
    assert len(tokens) == 62
    by_hand = (hand_loglik(model, tokens[:1], tokens[1:17]) + hand_loglik(model, tokens[16:17], tokens[17:33])
               + hand_loglik(model, tokens[32:33], tokens[33:49]) + hand_loglik(model, tokens[45:49], tokens[49:62]))
    assert windowed == pytest.approx(by_hand, abs=1e-4)
    assert windowed != pytest.approx(whole, abs=1e-3)
    # a loglikelihood request longer than the window: the context is cut from the left
    lm = LmlabLM(model, tok, max_length=16)
    context, continuation = text[:40], text[40:45]
    (lp, _), = lm.loglikelihood([request(context, continuation)])
    full = [BOS_ID] + tok.encode([context])[0]
    cont = tok.encode([continuation])[0]
    assert lp == pytest.approx(hand_loglik(model, (full + cont)[-17:-len(cont)], cont), abs=1e-4)


def test_prefix_lm_reads_the_context_as_its_prefix():
    model, tok = tiny_transformer(PREFIX, n_layers=2), Byte()  # (one layer: both readings score alike)
    lm = LmlabLM(model, tok, max_length=64)
    (lp, _), = lm.loglikelihood([request("The sky was grey when", " Rosa")])
    ctx = [BOS_ID] + tok.encode(["The sky was grey when"])[0]
    cont = tok.encode([" Rosa"])[0]
    prefix = Attention(PREFIX, prefix_len=torch.tensor([len(ctx)]))
    assert lp == pytest.approx(hand_loglik(model, ctx, cont, prefix), abs=1e-4)
    assert lp != pytest.approx(hand_loglik(model, ctx, cont), abs=1e-4)  # not the causal reading


def greedy_by_hand(model, context: list[int], n: int) -> list[int]:
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model.logits(model(torch.tensor([context + out]), Attention(CAUSAL)))[0, -1].argmax())
            if token == EOS_ID:
                break
            out.append(token)
    return out


@pytest.mark.parametrize("make", [tiny_transformer, lambda: Mamba(Byte().vocab_size, d_model=16, n_layers=1).eval()],
                         ids=["transformer-recomputed", "mamba-step"])
def test_generate_until_is_the_greedy_continuation(make):
    torch.manual_seed(1)
    model, tok = make(), Byte()
    lm = LmlabLM(model, tok, batch_size=3, max_length=64, max_gen_tokens=6)
    assert lm.recurrent == isinstance(model, Mamba)
    contexts = ["Did Max see", "It was", "Snow fell softly when Lena"]
    out = lm.generate_until([request(c, {"until": [], "max_gen_toks": 10}) for c in contexts])
    for context, text in zip(contexts, out):
        ids = greedy_by_hand(model, [BOS_ID] + tok.encode([context])[0], 6)  # max_gen_tokens caps the task's 10
        assert text == tok.decode(ids)
    # a stop string cuts the text where it first appears
    first = tok.decode(greedy_by_hand(model, [BOS_ID] + tok.encode([contexts[0]])[0], 6))
    stop = first[2:4]
    if stop:
        cut = lm.generate_until([request(contexts[0], {"until": [stop]})])[0]
        assert cut == first[: first.index(stop)]


def test_a_bidirectional_model_is_refused():
    with pytest.raises(UserError, match="objective=clm"):
        LmlabLM(tiny_transformer(BIDIRECTIONAL), Byte())


# ----- the evaluator -----

def test_flat_metrics_and_kept_random_state():
    results = {"results": {"lmlab_tiny": {"alias": "lmlab_tiny", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                          "acc_norm,none": 0.75, "acc_norm_stderr,none": "N/A",
                                          "exact_match,strict-match": 0.25, "sample_len": 32}},
               "groups": {"g": {"acc,none": 0.4}}}
    assert flat_metrics("lm_eval", results) == {
        "lm_eval/lmlab_tiny/acc": 0.5, "lm_eval/lmlab_tiny/acc_stderr": 0.1, "lm_eval/lmlab_tiny/acc_norm": 0.75,
        "lm_eval/lmlab_tiny/exact_match_strict-match": 0.25, "lm_eval/g/acc": 0.4}
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    with kept_random_state():
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_evaluator_accuracy_on_the_shipped_task_matches_hand_scoring():
    """The whole chain (lm-eval's prompts, the adapter, the metrics) against scoring each item by hand: the
    model's log-likelihood of " <choice>" after "[BOS] <context>"; acc_norm divides it by the choice's length."""
    model, tok = tiny_transformer(seed=3), Byte()
    module = SimpleNamespace(model=model)
    dm = SimpleNamespace(source=SimpleNamespace(tokenizer=tok, block_size=65, name="text"))
    evaluator = LmEval(tasks=["lmlab_tiny"])
    assert evaluator.skip_reason(dm.source, CLM()) is None
    metrics = evaluator(module, dm)
    acc, acc_norm = [], []
    for item in ITEMS:
        ctx = [BOS_ID] + tok.encode([item["context"]])[0]
        lls = [hand_loglik(model, ctx, tok.encode([" " + c])[0]) for c in item["choices"]]
        acc.append(int(np.argmax(lls)) == item["label"])
        acc_norm.append(int(np.argmax([ll / len(c) for ll, c in zip(lls, item["choices"])])) == item["label"])
    assert len(ITEMS) == 32
    assert metrics["lm_eval/lmlab_tiny/acc"] == pytest.approx(np.mean(acc))
    assert metrics["lm_eval/lmlab_tiny/acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert metrics["lm_eval/lmlab_tiny/acc_stderr"] == pytest.approx(np.std(acc, ddof=1) / np.sqrt(len(acc)))


def test_evaluator_refuses_what_cannot_run():
    grammar = SimpleNamespace(name="PCFGSource", vocab_size=20)
    with pytest.raises(UserError, match="data=text"):
        LmEval().skip_reason(grammar)
    text = SimpleNamespace(tokenizer=Byte(), block_size=64, name="text")
    with pytest.raises(UserError, match="objective=clm"):
        LmEval().skip_reason(text, MLM())
    with pytest.raises(UserError, match="include_path"):
        LmEval(include_path="/no/such/folder").skip_reason(text)
    with pytest.raises(UserError, match="eval.lm_eval.tasks"):
        LmEval(tasks=[])
    for bad in ({"batch_size": 0}, {"limit": -1}, {"num_fewshot": 1.5}, {"max_length": 0}):
        with pytest.raises(UserError, match=f"fix eval.lm_eval.{next(iter(bad))}"):
            LmEval(**bad)


# ----- the CLI -----

def test_train_with_lm_eval_then_eval_the_finished_run(lmlab):
    code, out = lmlab("train", "data=text", "eval=[perplexity,lm_eval]", "eval.lm_eval.tasks=[lmlab_tiny]",
                      "model.d_model=32", "model.n_layers=1", *FAST)
    assert code == 0, out
    assert "[lmlab] lm_eval lmlab_tiny: acc" in out and "(32 items)" in out
    run = next(p.parent for p in lmlab.runs.rglob("DONE"))
    metrics = json.loads((run / "results.json").read_text())["metrics"]
    for key in ("lm_eval/lmlab_tiny/acc", "lm_eval/lmlab_tiny/acc_norm", "lm_eval/lmlab_tiny/acc_stderr",
                "perplexity/loss"):
        assert key in metrics, key
    assert 0.0 <= metrics["lm_eval/lmlab_tiny/acc"] <= 1.0
    code, out = lmlab("eval", f"run={run}", "eval=lm_eval", "eval.lm_eval.limit=8")
    assert code == 0, out
    assert "lm_eval/lmlab_tiny/acc" in out and "(8 items)" in out


@pytest.mark.parametrize("args,needle", [([], "data=text"), (["data=text", "objective=mlm"], "objective=clm")],
                         ids=["grammar-data", "mlm"])
def test_refused_before_training(lmlab, args, needle):
    code, out = lmlab("train", "eval=lm_eval", *args, *FAST)
    assert code == 2, out
    message = out.strip().splitlines()[-1]
    assert message.startswith("lmlab: error: eval=lm_eval") and needle in message
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence
    assert not list(lmlab.runs.rglob("DONE")) and not list(lmlab.runs.rglob("model.pt"))


# ----- the cross-check: lm-eval's own hf backend on the exported run -----

def long_tasks(folder) -> list[str]:
    """Two local tasks whose requests are longer than a block of 64 tokens: the shipped items behind a context
    of about 100 words (multiple choice), and documents of about 150 words (rolling log-likelihood)."""
    words = " ".join(item["context"] for item in ITEMS).split()
    long_items = [{**item, "context": " ".join(words[i : i + 100]) + " " + item["context"]}
                  for i, item in enumerate(ITEMS[:12])]
    docs = [{"text": " ".join(words[i : i + 150])} for i in range(0, 120, 20)]
    folder.mkdir()
    (folder / "long.py").write_text(
        "import datasets\n\n"
        f"ITEMS = {long_items!r}\nDOCS = {docs!r}\n\n"
        "def items(**_):\n    return datasets.DatasetDict({'test': datasets.Dataset.from_list(ITEMS)})\n\n"
        "def docs(**_):\n    return datasets.DatasetDict({'test': datasets.Dataset.from_list(DOCS)})\n")
    (folder / "long_mc.yaml").write_text(
        "task: long_mc\ncustom_dataset: !function long.items\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "long_rolling.yaml").write_text(
        "task: long_rolling\ncustom_dataset: !function long.docs\noutput_type: loglikelihood_rolling\n"
        "test_split: test\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return ["long_mc", "long_rolling"]


@pytest.mark.parametrize("model", ["transformer", "mamba"])
def test_hf_backend_on_the_export_scores_every_item_as_lmlab_does(lmlab, tmp_path, model):
    """The run exported as a transformers checkpoint (``lmlab.export``), scored by lm-eval's ``hf`` backend with
    BOS prepended as lmlab's rows start (``add_bos_token=True``), gives every request the log-likelihood and
    greedy flag that ``LmlabLM`` gives it, and so the same metrics: the shipped task, and requests longer than
    the run's block of 64 tokens (both cut them into windows of the export's context length, data.block_size)."""
    pytest.importorskip("accelerate")  # lm-eval's hf backend imports it
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from omegaconf import OmegaConf

    from lmlab.evaluation.harness import default_max_length
    from lmlab.export import export_run
    from lmlab.pipeline import rebuild

    code, out = lmlab("train", "data=text", f"model={model}", "model.d_model=32", "model.n_layers=1", "eval=[]",
                      "max_steps=20", "val_every=10", "checkpoint_every=20", "batch_size=16", "logger=none")
    assert code == 0, out
    run = next(p.parent for p in lmlab.runs.rglob("DONE"))
    exported = export_run(run, tmp_path / "hf")
    config = json.loads((exported / "config.json").read_text())
    assert config.get("max_position_embeddings", config.get("n_positions", 64)) == 64  # data.block_size
    assert json.loads((exported / "tokenizer_config.json").read_text())["model_max_length"] == 64
    _, module, dm, _ = rebuild(run, OmegaConf.create({}))
    ours = LmlabLM(module.model, dm.source.tokenizer, batch_size=16,
                   max_length=default_max_length(module.model, dm.source))
    theirs = HFLM(pretrained=str(exported), add_bos_token=True, batch_size=16, device="cpu", dtype="float32")
    assert ours.max_length == theirs.max_length == 64
    tasks = ["lmlab_tiny", *long_tasks(tmp_path / "tasks")]
    manager = TaskManager(include_path=[str(TASKS_DIR), str(tmp_path / "tasks")], include_defaults=False)
    # the rolling task through the hf backend without add_bos_token: with it, lm-eval encodes the text with BOS
    # and puts its prefix BOS before that too (scoring BOS after BOS); without it, the text after one BOS, as
    # lmlab's adapter and lm-eval's other backends score a rolling log-likelihood
    theirs_rolling = HFLM(pretrained=str(exported), add_bos_token=False, batch_size=16, device="cpu",
                          dtype="float32")
    results = {name: lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True,
                                             bootstrap_iters=0)
               for name, lm in (("lmlab", ours), ("hf", theirs))}
    rolling = lm_eval.simple_evaluate(model=theirs_rolling, tasks=["long_rolling"], task_manager=manager,
                                      log_samples=True, bootstrap_iters=0)
    for section in ("samples", "results"):
        results["hf"][section]["long_rolling"] = rolling[section]["long_rolling"]
    longest = 0
    for task, n_docs, per_doc in (("lmlab_tiny", len(ITEMS), 4), ("long_mc", 12, 4), ("long_rolling", 6, 1)):
        a, b = (results[name]["samples"][task] for name in ("lmlab", "hf"))
        assert len(a) == len(b) == n_docs
        diffs = []
        for x, y in zip(a, b):
            assert x["doc_id"] == y["doc_id"] and x["arguments"] == y["arguments"]
            for r_x, r_y in zip((r[0] for r in x["resps"]), (r[0] for r in y["resps"])):
                if task == "long_rolling":  # a float: the document's log-likelihood
                    diffs.append(abs(r_x - r_y))
                    longest = max(longest, len(dm.source.tokenizer.encode([x["arguments"][0][0]])[0]))
                    continue
                (lp_x, greedy_x), (lp_y, greedy_y) = r_x, r_y
                diffs.append(abs(lp_x - lp_y))
                assert greedy_x == greedy_y
            if task == "long_mc":
                longest = max(longest, len(dm.source.tokenizer.encode([x["arguments"][0][0]])[0]))
        print(f"{task}: max |loglikelihood difference| over {len(diffs)} requests: {max(diffs):.2e}")
        assert len(diffs) == per_doc * n_docs and max(diffs) < 1e-4
        for metric, value in results["lmlab"]["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert value == pytest.approx(results["hf"]["results"][task][metric], rel=1e-5), (task, metric)
    assert longest > 2 * 64  # the long requests span several windows


def test_a_generation_task_from_include_path(tmp_path):
    """A user's folder of task YAMLs joins the shipped one; its generate_until task is scored on lmlab's greedy
    decoding: the targets are the model's own greedy continuations (computed here by hand), so exact_match is 1,
    and 0 on a task whose targets are something else."""
    model, tok = tiny_transformer(seed=4), Byte()
    prompts = ["Did Max see the", "It was raining when", "There was a"]
    answers = [tok.decode(greedy_by_hand(model, [BOS_ID] + tok.encode([p])[0], 5)) for p in prompts]
    folder = tmp_path / "mytasks"
    folder.mkdir()
    (folder / "data.py").write_text(
        "import datasets\n\n"
        f"ROWS = {[{'prompt': p, 'answer': a} for p, a in zip(prompts, answers)]!r}\n\n"
        "def load(**_):\n"
        "    return datasets.DatasetDict({'test': datasets.Dataset.from_list(ROWS)})\n\n"
        "def load_wrong(**_):\n"
        "    return datasets.DatasetDict({'test': datasets.Dataset.from_list(\n"
        "        [{'prompt': r['prompt'], 'answer': r['answer'] + 'x'} for r in ROWS])})\n")
    for name, loader in (("mine_gen", "load"), ("mine_gen_wrong", "load_wrong")):
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ncustom_dataset: !function data.{loader}\noutput_type: generate_until\n"
            "test_split: test\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
            "generation_kwargs:\n  until: []\n  max_gen_toks: 5\n"
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    module = SimpleNamespace(model=model)
    dm = SimpleNamespace(source=SimpleNamespace(tokenizer=tok, block_size=65, name="text"))
    evaluator = LmEval(tasks=["mine_gen", "mine_gen_wrong", "lmlab_tiny"], include_path=str(folder), limit=3)
    evaluator.skip_reason(dm.source)
    metrics = evaluator(module, dm)
    assert metrics["lm_eval/mine_gen/exact_match"] == 1.0
    assert metrics["lm_eval/mine_gen_wrong/exact_match"] == 0.0
    assert "lm_eval/lmlab_tiny/acc" in metrics
