"""General-ability scoring (lm-evaluation-harness's protocol) and the strict generation metric,
against independent references: hand-computed log-probabilities of a hand-built bigram model,
hand-computed acc / acc_norm / perplexity, lm-eval's prompt strings written out by hand, and plain
unpadded per-sequence loops over a model's logits."""

import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from neuraldb_kernels.evaluation import CounterFactCase, ZsRECase, general, strict
from neuraldb_kernels.evaluation.general import (ChoiceItem, ContinuationScores, LastWordItem, TaskScore,
                                                 choice_scores, encode_request, general_abilities,
                                                 last_word_scores, read_task, score_continuations, subsample)
from neuraldb_kernels.evaluation.strict import StrictScores, greedy_continuations, starts_with_answer, strict_metrics


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer from the package's model cache (made by `load_default_model`)."""
    from neuraldb_kernels.integration import load_default_model
    from neuraldb_kernels.integration.default_model import cache_root

    directory = cache_root() / "smollm2-135m-instruct"
    if not directory.is_dir():
        load_default_model()
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def general_dir(data_dir):
    return data_dir / "general"


def _tiny_llama(vocab: int, *, seed: int = 0, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, rms_norm_eps=1e-12, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


SCALE = 3.0  # the bigram model's logit on each planted next token


def _bigram_model(vocab: int, transitions: dict[int, int]) -> LlamaForCausalLM:
    """A Llama whose next-token logits depend only on the last token: SCALE on transitions[t]
    after a token t in `transitions`, 0 on every other token (and 0 everywhere after any other
    token). Attention and MLP outputs are zeroed, so the last hidden state is the token's
    embedding: a one-hot e_i for the i-th source (sqrt(d) e_i after RMSNorm), random in the
    remaining dimensions for other tokens; the head reads only the one-hot dimensions."""
    model = _tiny_llama(vocab)
    d = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        embed[:, : len(transitions)] = 0.0
        model.lm_head.weight.zero_()
        for i, (source, target) in enumerate(transitions.items()):
            embed[source] = 0.0
            embed[source, i] = 1.0
            model.lm_head.weight[target, i] = SCALE / math.sqrt(d)
    return model


def _log_p(vocab: int, planted: bool) -> float:
    """Hand-computed log-probability of one token under the bigram model: the planted token
    (logit SCALE against vocab - 1 zeros), or any token after a token without a transition."""
    if planted:
        return SCALE - math.log(math.exp(SCALE) + vocab - 1)
    return -math.log(vocab)


# ----------------------------------------------------------------------------- lm-eval scoring


def test_encode_request_moves_trailing_space_to_the_continuation(tokenizer):
    assert encode_request(tokenizer, "Answer: ", "A") == encode_request(tokenizer, "Answer:", " A")
    context, continuation = encode_request(tokenizer, "The cat", " sat on")
    assert context == [504, 2644] and continuation == [2643, 335]  # no special tokens, as lm-eval's HFLM
    # "The cats sat" is [The, cats, sat]: the context keeps its own tokens [The, cat], and the
    # continuation is what the whole string has after the context's two tokens, [sat]
    assert encode_request(tokenizer, "The cat", "s sat") == ([504, 2644], [2643])
    with pytest.raises(ValueError, match="adds no tokens"):
        encode_request(tokenizer, "The cat", "s")  # "The cats" is two tokens: nothing left to score
    with pytest.raises(ValueError, match="context"):
        encode_request(tokenizer, "  ", " A")
    with pytest.raises(ValueError, match="continuation"):
        encode_request(tokenizer, "Answer:", "")


def test_score_continuations_equals_hand_computed_bigram_log_probs(tokenizer):
    vocab = len(tokenizer)
    cat, sat, on, paris, rome = 2644, 2643, 335, 7042, 7268
    model = _bigram_model(vocab, {cat: sat, sat: rome, 314: paris})
    requests = [("The cat", " sat on"),  # sat planted (greedy), on not (rome is greedy after sat)
                ("The cat", " sat"),  # the same context, a one-token continuation
                ("The capital of France is", " Paris"),  # planted
                ("The capital of France is", " Rome"),  # not planted: logit 0 against SCALE
                ("Berlin is in", " Rome")]  # " in" has no transition: uniform, argmax = token 0
    scores = score_continuations(model, tokenizer, requests, batch_size=2)
    planted, other = _log_p(vocab, True), SCALE * 0 - math.log(math.exp(SCALE) + vocab - 1)
    expected = [planted + other, planted, planted, other, _log_p(vocab, False)]
    assert scores.log_prob.dtype == torch.float64
    assert scores.log_prob.tolist() == pytest.approx(expected, abs=1e-4)
    assert scores.is_greedy.tolist() == [False, True, True, False, False]
    assert scores.n_tokens.tolist() == [2, 1, 1, 1, 1]


def test_score_continuations_matches_a_plain_loop_with_padding_and_shared_contexts(tokenizer):
    model = _tiny_llama(len(tokenizer), seed=3)
    requests = [("Question: why is the sky blue?\nAnswer:", " Because of Rayleigh scattering."),
                ("Question: why is the sky blue?\nAnswer:", " It is not."),
                ("Short", " and sweet"), ("A much longer context that runs for a while before it", " ends here"),
                ("Answer: ", "B"), ("Another", " x")]
    scores = score_continuations(model, tokenizer, requests, batch_size=2)  # several batches, padding, cache gathers
    for r, (context, continuation) in enumerate(requests):
        if context[-1].isspace():
            context, continuation = context.rstrip(), context[len(context.rstrip()):] + continuation
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        n = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logits = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
        total = sum(logits[j - 1, whole[j]].item() for j in range(n, len(whole)))
        greedy = all(logits[j - 1].argmax().item() == whole[j] for j in range(n, len(whole)))
        assert scores.log_prob[r].item() == pytest.approx(total, abs=1e-4), requests[r]
        assert bool(scores.is_greedy[r]) == greedy
        assert scores.n_tokens[r].item() == len(whole) - n


def test_score_continuations_rejects_bad_input(tokenizer):
    model = _tiny_llama(len(tokenizer))
    with pytest.raises(ValueError, match="no requests"):
        score_continuations(model, tokenizer, [])
    with pytest.raises(ValueError, match="batch_size"):
        score_continuations(model, tokenizer, [("a", " b")], batch_size=0)
    with pytest.raises(ValueError, match="context of 256"):
        score_continuations(model, tokenizer, [("word " * 300, "end")])


def test_acc_and_acc_norm_by_hand():
    # acc: the largest log-likelihood; acc_norm: the largest log-likelihood per character of the choice
    items = [ChoiceItem((("q", " a"), ("q", " bbbb")), ("a", "bbbb"), gold=1),  # -2/1 < -4/4: norm picks 1
             ChoiceItem((("q", " a"), ("q", " bb"), ("q", " c")), ("a", "bb", "c"), gold=0),  # -1 > -2.5/2: both pick 0
             ChoiceItem((("q", " x"), ("q", " y")), ("x", "y"), gold=1)]  # a tie: the first choice wins
    log_prob = torch.tensor([-2.0, -4.0, -1.0, -2.5, -3.0, -0.5, -0.5])
    arc = choice_scores("arc_challenge", items, log_prob)
    assert (arc.acc, arc.acc_norm, arc.items) == (pytest.approx(100 / 3), pytest.approx(200 / 3), 3)
    # hits (0, 1, 0): sample std sqrt(1/3), over sqrt(3), in percent
    assert arc.acc_stderr == pytest.approx(100 * math.sqrt(1 / 3) / math.sqrt(3))
    assert choice_scores("mmlu", items, log_prob).acc_norm is None  # lm-eval reports acc only
    with pytest.raises(ValueError, match="expected 7 log-likelihoods"):
        choice_scores("mmlu", items, log_prob[:6])


def test_lambada_acc_and_perplexity_by_hand():
    items = [LastWordItem("a b", " c"), LastWordItem("d e", " f")]
    scores = ContinuationScores(torch.tensor([-1.0, -3.0], dtype=torch.float64), torch.tensor([True, False]),
                                torch.tensor([1, 2]))
    result = last_word_scores(items, scores)
    assert result == TaskScore("lambada", 2, 50.0, pytest.approx(50.0), perplexity=pytest.approx(math.exp(2.0)))


# ------------------------------------------------------------------------------------- readers


def test_readers_build_lm_eval_prompts(general_dir):
    counts = {"mmlu": 14042, "arc_challenge": 1172, "sciq": 1000, "commonsense_qa": 1221, "wsc273": 273,
              "lambada": 5153}
    items = {task: read_task(task, general_dir) for task in general.TASKS}
    assert {task: len(v) for task, v in items.items()} == counts
    mmlu = items["mmlu"][0]  # abstract_algebra_test.csv row 1
    assert mmlu.requests[1] == ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                                "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
                                "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:", " B")
    assert mmlu.gold == 1 and mmlu.choices == ("A", "B", "C", "D")
    arc = items["arc_challenge"][0]
    assert arc.requests[2] == ("Question: An astronomer observes that a planet rotates faster after a meteorite "
                               "impact. Which is the most likely effect of this increase in rotation?\nAnswer:",
                               " Planetary days will become shorter.")
    assert arc.gold == 2 and len(arc.choices) == 4
    sciq = items["sciq"][0]
    assert sciq.requests[0][0].startswith("Oxidants and Reductants Compounds")
    assert sciq.requests[0][0].endswith("saylor. org/books.\nQuestion: Compounds that are capable of accepting "
                                        "electrons, such as o 2 or f2, are called what?\nAnswer:")
    assert sciq.choices == ("Oxygen", "antioxidants", "oxidants", "residues") and sciq.gold == 2
    csqa = items["commonsense_qa"][0]
    assert csqa.requests[0] == ("Question: A revolving door is convenient for two direction travel, but it also "
                                "serves as a security measure at a what?\nA. bank\nB. library\nC. department store\n"
                                "D. mall\nE. new york\nAnswer:", " A")
    assert csqa.gold == 0 and len(csqa.requests) == 5
    wsc = items["wsc273"][0]  # partial evaluation: the options replace the pronoun, the rest is scored
    assert wsc.requests == (
        ("The city councilmen refused the demonstrators a permit because the city councilmen", "  feared violence."),
        ("The city councilmen refused the demonstrators a permit because the demonstrators", "  feared violence."))
    assert wsc.gold == 0
    assert items["lambada"][0].target == " signs"
    assert items["lambada"][0].context.endswith("his mouth curved in a confident grin, I don't care about")


def test_wsc_option_normalisation():
    text = "John couldn't see the stage with Billy in front of him because he is so short."
    loc = text.index("he is")
    assert general._wsc_option("John", text, "he", loc) == "John"
    assert general._wsc_option("The man", text, "he", loc) == "the man"  # mid-sentence: lower-cased
    assert general._wsc_option("The man", "It rained. He left.", "He", 11) == "The man"  # after ". "
    assert general._wsc_option("Bob", text, "his", loc) == "Bob's"  # possessive pronoun


def test_readers_give_clear_errors(tmp_path, general_dir):
    with pytest.raises(FileNotFoundError, match="general-ability data folder"):
        read_task("sciq", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="sciq/test.csv"):
        read_task("sciq", tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        read_task("hellaswag", general_dir)
    (tmp_path / "sciq").mkdir()
    (tmp_path / "sciq" / "test.csv").write_text("question,A,B,C,D,answer\nq,a,b,c,d,A\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['context'\]"):
        read_task("sciq", tmp_path)
    (tmp_path / "sciq" / "test.csv").write_text("question,context,A,B,C,D,answer\nq,,a,b,c,d,F\n")
    with pytest.raises(ValueError, match="answer key 'F'"):
        read_task("sciq", tmp_path)
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no <subject>_test.csv"):
        read_task("mmlu", tmp_path)


def test_subsample_is_seeded_and_in_file_order():
    items = list(range(1000))
    first = subsample(items, 300, seed=0)
    assert first == subsample(items, 300, seed=0) and first == sorted(first) and len(set(first)) == 300
    assert first != subsample(items, 300, seed=1)
    assert subsample(items, 5000, seed=0) == items and subsample(items, None, seed=0) == items
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="limit"):
            subsample(items, bad, seed=0)


def test_general_abilities_rejects_unknown_tasks(tokenizer, general_dir):
    with pytest.raises(ValueError, match="unknown or no tasks"):
        general_abilities(None, tokenizer, general_dir, tasks=["mmlu", "hellaswag"])
    with pytest.raises(ValueError, match="unknown or no tasks"):
        general_abilities(None, tokenizer, general_dir, tasks=[])


# -------------------------------------------------------------------------------- strict metric


def test_answer_matching_normalises_whitespace_and_case_at_a_word_boundary():
    assert starts_with_answer("  PARIS,  France", "Paris")
    assert starts_with_answer("new   york city", " New York ")
    assert starts_with_answer("Paris", "paris")
    assert not starts_with_answer(" Parisian food", "Paris")  # the answer must end at a word boundary
    assert starts_with_answer("U.S.A. today", "U.S.")  # ... unless it ends in punctuation
    assert not starts_with_answer(" the capital", "Paris")
    assert not starts_with_answer("", "Paris")
    with pytest.raises(ValueError, match="non-whitespace"):
        starts_with_answer("Paris", "  ")


def test_strict_metrics_on_a_hand_built_greedy_model(tokenizer):
    vocab = len(tokenizer)
    is_, rome, comma = 314, 7268, 28
    # after " is" the greedy token is " Rome", then ","; after " in" (no transition) token 0,
    # <|endoftext|>, which decodes to nothing
    model = _bigram_model(vocab, {is_: rome, rome: comma})
    case = CounterFactCase(case_id=0, subject="France", prompt="The capital of France is", target_new="Rome",
                           target_true="Paris", paraphrase_prompts=("France's capital city is", "Berlin is in"),
                           neighborhood=(("The capital of Italy is", "Rome"), ("Berlin is in", "Germany")))
    # greedy continuations: " Rome," for every prompt ending in " is", nothing for "... in"
    assert greedy_continuations(model, tokenizer, [case.prompt, "Berlin is in"], [3, 3]) == [" Rome,", ""]
    scores = strict_metrics(model, tokenizer, [case], batch_size=2)
    assert scores == StrictScores(efficacy=100.0, generalization=50.0, specificity=50.0, cases=1,
                                  tests={"efficacy": 1, "generalization": 2, "specificity": 2})
    # a second case that fails everywhere halves each metric (mean over cases)
    miss = CounterFactCase(case_id=1, subject="Berlin", prompt="Berlin is in", target_new="Rome", target_true="Germany")
    both = strict_metrics(model, tokenizer, [case, miss])
    assert (both.efficacy, both.generalization, both.specificity) == (50.0, 50.0, 50.0)
    zsre = ZsRECase(subject="x", src="The capital of France is", rephrase="Berlin is in", alt="Rome",
                    loc="Where is it? It is", loc_ans="Rome,")
    assert strict_metrics(model, tokenizer, [zsre]).as_dict() == {"efficacy": 100.0, "generalization": 0.0,
                                                                  "specificity": 100.0}


def test_batched_greedy_generation_matches_an_unpadded_loop(tokenizer):
    model = _tiny_llama(len(tokenizer), seed=5)
    prompts = ["The capital of France is", "Hi", "A much longer prompt about the history of the city of Rome is",
               "Berlin is in"]
    budgets = [4, 2, 3, 4]
    generated = greedy_continuations(model, tokenizer, prompts, budgets, batch_size=3)  # left padding
    for prompt, budget, text in zip(prompts, budgets, generated):
        ids = tokenizer(prompt)["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(budget):
                new.append(int(model(torch.tensor([ids + new])).logits[0, -1].argmax()))
        assert text == tokenizer.decode(new, skip_special_tokens=True), prompt


def test_strict_metrics_rejects_bad_input(tokenizer):
    model = _tiny_llama(len(tokenizer))
    with pytest.raises(ValueError, match="no cases"):
        strict_metrics(model, tokenizer, [])
    with pytest.raises(TypeError, match="CounterFactCase or ZsRECase"):
        strict_metrics(model, tokenizer, [{"prompt": "x"}])
    empty_answer = CounterFactCase(case_id=0, subject="s", prompt="p is", target_new=" ", target_true="t")
    with pytest.raises(ValueError, match="efficacy answer"):
        strict_metrics(model, tokenizer, [empty_answer])
    with pytest.raises(ValueError, match="batch_size"):
        greedy_continuations(model, tokenizer, ["p"], [1], batch_size=0)
    with pytest.raises(ValueError, match="token budgets"):
        greedy_continuations(model, tokenizer, ["p"], [1, 2])


# ------------------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_general_abilities_on_smollm2_match_a_plain_loop(general_dir):
    from neuraldb_kernels.integration import load_default_model

    model, tokenizer = load_default_model()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = general_abilities(model, tokenizer, general_dir, limit=4, seed=0, batch_size=4)
        assert list(results) == list(general.TASKS)
        for task, score in results.items():
            assert score.task == task and score.items == 4 and 0.0 <= score.acc <= 100.0
            assert (score.acc_norm is not None) == (task in general.ACC_NORM_TASKS)
            assert (score.perplexity is not None) == (task == "lambada")
        # each task's first sampled item, scored request by request without batching or caching
        for task in general.TASKS:
            item = subsample(read_task(task, general_dir), 4, 0)[0]
            requests = [(item.context, item.target)] if task == "lambada" else list(item.requests)
            batched = score_continuations(model, tokenizer, requests, batch_size=4).log_prob
            for r, (context, continuation) in enumerate(requests):
                context_ids, continuation_ids = encode_request(tokenizer, context, continuation)
                with torch.no_grad():
                    logits = model(torch.tensor([context_ids + continuation_ids])).logits[0].double()
                rows = torch.log_softmax(logits[len(context_ids) - 1 : -1], dim=-1)
                total = rows[torch.arange(len(continuation_ids)), torch.tensor(continuation_ids)].sum().item()
                assert batched[r].item() == pytest.approx(total, abs=2e-3), (task, r)
    finally:
        torch.set_num_threads(threads)
