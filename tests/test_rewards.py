"""Tier 2: the reward factory on real text, hand-computed numbers and the libraries' own scores."""

import json
import math

import pytest
import torch
from conftest import ROOT

import rewards

PARIS = "The capital of France is Paris."
PARAPHRASE = "Paris is the capital city of France."
UNRELATED = "I enjoy playing the guitar on rainy weekends."


def score(spec, responses, targets, **kw):
    return rewards.make_reward(spec, **kw).scores(responses, targets)


@pytest.mark.parametrize("spec", [{"type": "cosine_sts"}, {"type": "bertscore"}], ids=["cosine_sts", "bertscore"])
def test_paraphrase_beats_unrelated(spec):
    para, unrelated = score(spec, [PARAPHRASE, UNRELATED], [PARIS, PARIS])
    assert para > unrelated + 0.2
    assert -1.0 <= unrelated <= para <= 1.0


@pytest.mark.parametrize("kind, sacre", [("bleu", "sentence_bleu"), ("chrf", "sentence_chrf"), ("ter", "sentence_ter")])
def test_sacrebleu_scores_equal_library_and_order(kind, sacre):
    import sacrebleu

    identical, different = score({"type": kind}, [PARIS, PARAPHRASE], [PARIS, PARIS])
    assert identical == pytest.approx(1.0)
    assert identical > different
    raw = getattr(sacrebleu, sacre)(PARAPHRASE, [PARIS]).score / 100
    assert different == pytest.approx(max(0.0, 1 - raw) if kind == "ter" else raw)


@pytest.mark.parametrize("variant", ["rouge1", "rouge2", "rougeL", "rougeLsum"])
def test_rouge_equals_rouge_score(variant):
    from rouge_score import rouge_scorer

    identical, different = score({"type": "rouge", "variant": variant}, [PARIS, PARAPHRASE], [PARIS, PARIS])
    expected = rouge_scorer.RougeScorer([variant], use_stemmer=True).score(PARIS, PARAPHRASE)[variant].fmeasure
    assert identical == 1.0 and different == pytest.approx(expected) and different < 1.0


@pytest.mark.parametrize(
    "response, target, normalize, expected",
    [
        ("Paris", "paris", True, 1.0),  # case
        ("The answer: Paris!", "answer paris", True, 1.0),  # punctuation and articles
        ("Paris", "paris", False, 0.0),  # strict
        (" Paris ", "Paris", False, 1.0),  # strict still strips outer spaces
        ("Lyon", "Paris", True, 0.0),
    ],
)
def test_exact_match(response, target, normalize, expected):
    assert score({"type": "exact_match", "normalize": normalize}, [response], [target]) == [expected]


def test_length_contains_regex_by_hand():
    # reference "a b c d" has 4 words: 2 words -> 1 - 2/4 = 0.5; 6 words -> 0.5; 4 -> 1
    assert score({"type": "length"}, ["x y", "x y z w v u", "1 2 3 4"], ["a b c d"] * 3) == [0.5, 0.5, 1.0]
    assert score({"type": "length", "target": 10, "unit": "chars"}, ["12345"], [""]) == [0.5]
    assert score({"type": "contains", "pattern": "YES"}, ["oh yes", "no"], ["", ""]) == [1.0, 0.0]
    assert score({"type": "contains", "pattern": "YES", "case_sensitive": True}, ["oh yes"], [""]) == [0.0]
    assert score({"type": "regex", "pattern": r"\d{3}"}, ["call 911", "call 91"], ["", ""]) == [1.0, 0.0]
    assert score({"type": "regex", "pattern": r"\d+", "full_match": True}, ["123", "a123"], ["", ""]) == [1.0, 0.0]


def test_repetition_is_trls_penalty_over_words():
    # "a b a b a" has 2-grams ab ba ab ba: 2 unique of 4 -> (1 - 2/4) * -1 = -0.5
    assert score({"type": "repetition", "ngram_size": 2}, ["a b a b a", "one two three"], ["", ""]) == [-0.5, 0.0]


def test_weighted_sum_and_nested_postprocess_by_hand():
    spec = {
        "type": "weighted_sum",
        "components": [
            {"type": "contains", "pattern": "yes", "weight": 0.6},
            {"type": "exact_match", "weight": 0.4, "postprocess": [{"type": "scale", "factor": 2.0}]},
        ],
        "postprocess": [{"type": "shift", "value": -0.5}, {"type": "clip", "min": 0.0, "max": 1.0}],
    }
    # "yes": 0.6*1 + 0.4*(1*2) = 1.4 -> 0.9 ; "no": 0 + 0 -> -0.5 -> clip 0 ; "yes sir" vs "yes": 0.6 -> 0.1
    out = score(spec, ["yes", "no", "yes sir"], ["yes", "x", "yes"])
    assert out == pytest.approx([0.9, 0.0, 0.1])


@pytest.mark.parametrize(
    "post, expected",
    [
        ({"type": "clip", "min": -1, "max": 1}, [-1.0, 0.5, 1.0]),
        ({"type": "clip", "max": 0}, [-2.0, 0.0, 0.0]),
        ({"type": "scale", "factor": -2}, [4.0, -1.0, -6.0]),
        ({"type": "shift", "value": 1.5}, [-0.5, 2.0, 4.5]),
        ({"type": "tanh"}, [math.tanh(-2), math.tanh(0.5), math.tanh(3)]),
        # normalize: mean of [-2, .5, 3] = 0.5, population std = sqrt(((-2.5)^2 + 0 + 2.5^2)/3) = 2.0412
        ({"type": "normalize"}, [-2.5 / math.sqrt(12.5 / 3), 0.0, 2.5 / math.sqrt(12.5 / 3)]),
    ],
)
def test_each_postprocess_by_hand(post, expected):
    reward = rewards.Reward(
        "x", lambda r, t, p, i: [float(v) for v in r], [rewards.POSTPROCESS[post["type"]](**{k: v for k, v in post.items() if k != "type"})]
    )
    assert reward.scores([-2, 0.5, 3], [0, 0, 0]) == pytest.approx(expected, rel=1e-6)


def test_normalize_is_running_and_checkpointable():
    spec = {"type": "length", "target": 1, "unit": "chars", "postprocess": [{"type": "normalize"}]}
    r = rewards.make_reward(spec)
    r.scores(["", "x"], ["", ""])  # raw 0, 1 -> running mean .5
    state = json.loads(json.dumps(r.state_dict()))
    out = r.scores(["x"], [""], update=False)  # evaluation does not move the statistics
    assert out == pytest.approx([0.5 / 0.5])  # (1 - 0.5) / std 0.5
    r2 = rewards.make_reward(spec)
    r2.load_state_dict(state)
    assert r2.scores(["x"], [""], update=False) == out


def test_per_sample_call_matches_batch():
    r = rewards.make_reward({"type": "chrf"})
    assert r(PARAPHRASE, PARIS, prompt="q", item={"q": 1}) == r.scores([PARAPHRASE], [PARIS])[0]


def test_packaged_toxicity_reproduces_published_example():
    model = rewards.PackagedToxicity()
    probs = dict(zip(rewards.TOXIC_LABELS, model.predict(["You are so dumb and stupid!"])[0]))
    assert probs["toxic"] == pytest.approx(0.989, abs=0.001)
    assert probs["insult"] == pytest.approx(0.866, abs=0.001)


def test_toxicity_reward_polite_beats_toxic():
    polite, toxic = score({"type": "toxicity"}, ["Thank you so much, that was very helpful.", "You are an idiot, shut up."], ["", ""])
    assert polite > 0.8 and toxic < 0.3
    insult_polite, insult_toxic = score({"type": "toxicity", "label": "insult"}, ["Have a nice day.", "You stupid moron."], ["", ""])
    assert insult_polite > insult_toxic


def test_tokenizer_pickle_refuses_other_classes(tmp_path):
    import io
    import pickle

    payload = pickle.dumps(print)  # a global outside the allow-list
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        rewards._TokenizerUnpickler(io.BytesIO(payload)).load()


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A 2-label BERT classifier and WordPiece tokenizer written at test time."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path = tmp_path_factory.mktemp("clf")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "you", "are", "nice", "bad", "good", "day", "."]
    (path / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(path)
    return path, model


def test_classifier_reward_is_label_probability(tiny_classifier):
    path, model = tiny_classifier
    from transformers import AutoTokenizer

    texts = ["you are nice .", "bad day"]
    got = score({"type": "classifier", "model": str(path), "label": "positive"}, texts, ["", ""])
    enc = AutoTokenizer.from_pretrained(path)(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = torch.softmax(model(**enc).logits, -1)[:, 1].tolist()
    assert got == pytest.approx(expected, abs=1e-5)
    by_index = score({"type": "classifier", "model": str(path), "label": 0}, texts, ["", ""])
    assert by_index == pytest.approx([1 - e for e in expected], abs=1e-5)
    with pytest.raises(rewards.RewardSpecError, match="not one of the model's labels"):
        rewards.make_reward({"type": "classifier", "model": str(path), "label": "neutral"})


def test_detoxify_local_checkpoint(tiny_classifier, tmp_path):
    path, model = tiny_classifier
    ckpt = tmp_path / "toxic.ckpt"
    torch.save(
        {
            "config": {
                "arch": {
                    "args": {
                        "model_type": "bert-base-uncased",
                        "model_name": "BertForSequenceClassification",
                        "tokenizer_name": "BertTokenizerFast",
                        "num_classes": 2,
                    }
                },
                "dataset": {"args": {"classes": ["toxic", "insult"]}},
            },
            "state_dict": model.state_dict(),
        },
        ckpt,
    )
    spec = {"type": "toxicity", "backend": "detoxify", "checkpoint": str(ckpt), "huggingface_config_path": str(path)}
    got = score(spec, ["you are nice ."], [""])
    from transformers import AutoTokenizer

    with torch.no_grad():
        logits = model(**AutoTokenizer.from_pretrained(path)(["you are nice ."], return_tensors="pt")).logits
    assert got == pytest.approx([1 - torch.sigmoid(logits)[0, 0].item()], abs=1e-5)
    with pytest.raises(rewards.RewardSpecError, match="huggingface_config_path"):
        rewards.make_reward({"type": "toxicity", "backend": "detoxify", "checkpoint": str(ckpt)})


def test_perplexity_is_inverse_perplexity(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm, tok = AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)
    text = "the cat sat on the mat"
    ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        nll = lm(ids, labels=ids).loss.item()  # mean token NLL
    for spec, kw in [({"type": "perplexity", "model": str(tiny_model)}, {}), ({"type": "perplexity"}, {"reference": (lm, tok)})]:
        (got, empty) = score(spec, [text, ""], ["", ""], **kw)
        assert got == pytest.approx(math.exp(-nll), rel=1e-4)
        assert 0 < got <= 1 and empty == 0.0


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"type": "bleurt"}, "available: cosine_sts, perplexity"),
        ({"type": "cosine_sts", "modle": "x"}, "did you mean 'model'"),
        ({"type": "rouge", "variant": 3}, "variant must be one of"),
        ({"type": "contains"}, 'needs "pattern"'),
        ({"type": "regex", "pattern": "("}, "not a valid regular expression"),
        ({"type": "weighted_sum", "components": []}, 'needs "components"'),
        ({"type": "weighted_sum", "components": [{"type": "bleu"}, {"type": "nope"}]}, "components[1]: unknown type"),
        ({"type": "bleu", "postprocess": {"type": "clip"}}, "postprocess must be a list"),
        ({"type": "bleu", "postprocess": [{"type": "clip", "min": 2, "max": 1}]}, "min (2) is greater than max (1)"),
        ({"type": "cosine_sts", "model": "/no/such/model"}, "not available offline: no directory at /no/such/model"),
        ({"type": "perplexity", "model": "gpt2"}, 'Use "reference"'),
        ({"type": "toxicity", "label": "rude"}, "not a head of the packaged model"),
        ({"type": "toxicity", "backend": "detoxify"}, 'needs "checkpoint"'),
        ({"type": "toxicity", "backend": "detoxify", "checkpoint": "/no/toxic.ckpt"}, "not available offline: no file at /no/toxic.ckpt"),
        ({"type": "classifier"}, 'needs "model"'),
        ("cosine_sts", "must be a JSON object"),
    ],
)
def test_error_messages(spec, message):
    with pytest.raises(rewards.RewardSpecError) as err:
        rewards.make_reward(spec)
    assert message in str(err.value)


def test_every_registered_type_documented_in_the_rewards_page():
    page = (ROOT / "docs" / "rewards.md").read_text()
    for name in list(rewards.REWARDS) + list(rewards.POSTPROCESS):
        assert f"`{name}`" in page, name


@pytest.mark.parametrize(
    "spec, uses",
    [
        ({"type": "perplexity"}, True),  # its model defaults to "reference"
        ({"type": "perplexity", "model": "some/local/dir"}, False),
        ({"type": "weighted_sum", "components": [{"type": "chrf"}, {"type": "perplexity", "model": "reference"}]}, True),
        ({"type": "weighted_sum", "components": [{"type": "chrf"}, {"type": "contains", "pattern": "perplexity"}]}, False),
        ({"type": "contains", "pattern": '"perplexity"'}, False),  # the old text search said True here
    ],
)
def test_uses_reference(spec, uses):
    assert rewards.uses_reference(spec) is uses


@pytest.mark.parametrize(
    "spec, reads",
    [
        ({"type": "chrf"}, True),  # the text metrics compare with the reference response
        ({"type": "cosine_sts"}, True),
        ({"type": "exact_match"}, True),
        ({"type": "math"}, True),  # without answer_field its gold answer is the reference's
        ({"type": "math", "answer_field": "answer"}, False),
        ({"type": "contains", "pattern": "yes"}, False),
        ({"type": "weighted_sum", "components": [{"type": "length"}, {"type": "rouge"}]}, True),
        ({"type": "weighted_sum", "components": [{"type": "length"}]}, False),
        ({"type": "no_such_type"}, False),
    ],
)
def test_reads_reference_asks_what_each_type_declares(spec, reads):
    """A prompt-only row has no reference response: the trainer asks the reward whether it reads one."""
    assert rewards.reads_reference(spec) is reads
