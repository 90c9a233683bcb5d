"""Hardware: BF16 "auto" (a cached probe on CPU), frozen weights held in bf16, and the rollout forward that
the first minibatch makes redundant when it is the whole batch."""

import dataclasses
import json
import math

import pytest
import torch
from conftest import YesFraction, run_cli, trainer_for
from dist_helper import QUERIES, RESPONSES, SCORES

import hybrid_trainer as ht
import outputs
import runtime


def fixed_step(trainer):
    tok = trainer.tokenizer
    queries = [tok(q)["input_ids"] for q in QUERIES]
    responses = [tok(r)["input_ids"] + [tok.eos_token_id] for r in RESPONSES]
    return trainer.ppo_step(queries, responses, SCORES)


@pytest.mark.parametrize("kl_penalty", ["kl", "mse"])
def test_first_minibatch_forward_replaces_the_rollout_forward(kl_penalty, tiny_model, tiny_data):
    results = []
    for fuse in (False, True):
        trainer, _ = trainer_for(
            {"PPO_BATCH": 8, "PPO_MINI": 8, "PPO_EPOCHS": 3, "LR_PPO": 1e-3, "KL_PENALTY": kl_penalty, "WHITEN_REWARDS": True},
            tiny_model,
            tiny_data,
            None,
        )
        trainer.update.fuse_first_forward = fuse
        calls = []
        trainer.policy.v_head.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        first = fixed_step(trainer)  # the KL is 0 here: the policy still equals the reference
        stats = fixed_step(trainer)  # now the policy moved: rewards carry a KL term
        results.append((first, stats, len(calls), [p.detach().clone() for p in trainer.policy.parameters()]))
    (first_a, a, calls_a, weights_a), (first_b, b, calls_b, weights_b) = results
    assert calls_a == 2 * (3 + 1) and calls_b == 2 * 3  # one policy forward fewer per update
    assert first_b["ppo/policy/ratio_first_minibatch"] == 1.0 and first_b["objective/kl"] == 0.0
    for key in ("objective/kl", "ppo/loss/policy", "ppo/loss/value", "ppo/returns/mean", "ppo/val/mean", "ppo/policy/clipfrac"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    for x, y in zip(weights_a, weights_b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_bf16_auto_resolves_from_a_cached_probe(tiny_model, tiny_data, tmp_path, monkeypatch):
    cfg = ht.Config.from_dict({"MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data), "OUTPUT_DIR": "-", "CACHE_DIR": str(tmp_path)})
    assert cfg.BF16 == "auto"
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: False)
    assert runtime.resolve_bf16(cfg, torch.device("cpu")) == (False, "bf16 off: this CPU has no bfloat16 support")
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: True)
    monkeypatch.setattr(runtime, "cpu_model", lambda: "a CPU (no bf16 instructions named)")  # any ratio is plausible
    speedup, cached = runtime.bf16_speedup(64, tmp_path / "bf16_probe.json")  # a real probe at hidden size 64
    assert math.isfinite(speedup) and not cached
    assert runtime.bf16_speedup(64, tmp_path / "bf16_probe.json") == (speedup, True)
    for measured, choice in ((2.2, True), (0.6, False)):
        monkeypatch.setattr(runtime, "bf16_speedup", lambda hidden, cache, m=measured: (m, True))
        on, why = runtime.resolve_bf16(cfg, torch.device("cpu"))
        assert on is choice and f"bf16 matmul {measured:.2f}x fp32 here" in why and "delete it to probe again" in why
    on, why = runtime.resolve_bf16(dataclasses.replace(cfg, BF16=False), torch.device("cpu"))
    assert "set in the config" in why and on is False


ZEN3 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nstepping\t: 1\n"
    "flags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nmodel name\t: AMD EPYC\n"
)
ZEN5 = ZEN3.replace("cpu family\t: 25", "cpu family\t: 26").replace("avx2 fma", "avx2 fma avx512f avx512_bf16")
ARM = "processor\t: 0\nBogoMIPS\t: 2000.00\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\nCPU part\t: 0xd4f\n"


def test_a_probe_cached_on_one_cpu_is_not_read_on_another_that_is_named_alike(tmp_path, monkeypatch):
    """Two VMs that /proc/cpuinfo both calls "AMD EPYC" (a Zen 3 without bf16 kernels, a Zen 5 with bf16 4.45x fp32)
    sharing a CACHE_DIR: each gets its own probe."""
    for name, text in (("zen3", ZEN3), ("zen5", ZEN5), ("arm", ARM)):
        (tmp_path / name).write_text(text)
    assert runtime.cpu_model(tmp_path / "zen3") == "AMD EPYC (family 25 model 1 stepping 1; avx2)"
    assert runtime.cpu_model(tmp_path / "zen5") == "AMD EPYC (family 26 model 1 stepping 1; avx2 avx512f avx512_bf16)"
    assert runtime.cpu_model(tmp_path / "arm") == "unknown (implementer 0x41 part 0xd4f; asimd sve bf16 i8mm)"
    assert runtime.cpu_model(tmp_path / "absent") == "unknown"
    cache, zen3, zen5 = tmp_path / "probe.json", runtime.cpu_model(tmp_path / "zen3"), runtime.cpu_model(tmp_path / "zen5")
    for label, measure, expected in (
        (zen5, lambda: 4.45, (4.45, False)),
        (zen3, lambda: 0.02, (0.02, False)),
        (zen5, lambda: pytest.fail("probed again"), (4.45, True)),
    ):
        monkeypatch.setattr(runtime, "cpu_model", lambda label=label: label)
        assert runtime.cached_probe(cache, "n=576", measure) == expected  # zen3 measures its own, not zen5's 4.45


def test_run_prints_and_records_the_bf16_choice(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "o"
    proc = run_cli(
        {
            "MODE": "sft",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": str(tiny_data),
            "OUTPUT_DIR": str(out),
            "SEED": 0,
            "CACHE_DIR": str(tmp_path / "cache"),
        },
        tmp_path,
    )
    assert proc.stdout.splitlines()[0].startswith("bf16 ")
    assert isinstance(json.loads((out / "config.json").read_text())["BF16"], bool)


def test_resume_keeps_the_original_bf16_choice(tmp_path):
    checkpoint = tmp_path / "step-1"
    checkpoint.mkdir()
    cfg = ht.Config.from_dict({"TRAIN_FILE": "t", "OUTPUT_DIR": "o", "SEED": 1})
    (checkpoint / "state.json").write_text(json.dumps({"config": {**cfg.resolved(), "BF16": True}}))
    seed, bf16 = outputs.resumed_facts(cfg, checkpoint)
    assert bf16 is True and seed == 1


@pytest.mark.parametrize("lora_r", [0, 4])
def test_bf16_frozen_weights_are_stored_once_and_ratio_kl_hold(lora_r, tiny_model, tiny_data):
    trainer, examples = trainer_for(
        {"BF16": True, "LORA_R": lora_r, "PPO_BATCH": 8, "PPO_MINI": 4, "MAX_NEW_TOKENS": 5}, tiny_model, tiny_data, YesFraction()
    )
    if lora_r:  # the frozen base in bf16; adapter and value head fp32
        assert {p.dtype for n, p in trainer.policy.named_parameters() if not p.requires_grad} == {torch.bfloat16}
        assert {p.dtype for p in trainer.optim.params} == {torch.float32}
    else:  # the policy's master weights fp32, the reference copy bf16
        assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}
        assert {p.dtype for p in trainer.ref_lm.parameters()} == {torch.bfloat16}
    responses, _ = trainer.generate([e.prompt_ids for e in examples])
    stats = trainer.ppo_step([e.prompt_ids for e in examples], responses, [1.0] * 8)
    # bf16 tolerance: the reference's weights are the bf16 rounding of the policy's, which autocast uses anyway
    assert abs(stats["ppo/policy/ratio_first_minibatch"] - 1.0) < 1e-3
    assert abs(stats["objective/kl"]) < 0.05 * stats["ppo/response_length"]


def test_lm_head_gets_a_contiguous_input_and_the_same_logits(tiny_model, tiny_data):
    """The policy's, the reference's and the response forward's LM head see a contiguous input (a strided slice of the
    hidden states made a bf16 CPU bmm copy the expanded head weight), with the logits a strided input gives."""
    cfg = ht.Config.from_dict({"MODE": "ppo", "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data), "OUTPUT_DIR": "-", "BF16": False})
    policy, ref, _ = ht.load_model(cfg, torch.device("cpu"))
    seen = []
    for lm in (policy.lm, ref):
        head = lm.get_output_embeddings()
        head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
        hidden = torch.randn(2, 6, head.in_features)[:, 2:5]  # what logits_to_keep slices: not contiguous
        assert not hidden.is_contiguous()
        torch.testing.assert_close(head(hidden), hidden @ head.weight.T + (0 if head.bias is None else head.bias))
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])  # two rows: a slice of one row would be contiguous anyway
    with torch.no_grad():
        runtime.response_forward(ref, ids, torch.ones_like(ids), 2)
    assert seen == [True, True, True]


def test_the_policy_is_trained_in_memory_not_in_the_files_pages(tiny_model, tiny_data):
    """On the CPU the policy's weights are read into the process's memory: memory-mapped (transformers' default) they
    are the safetensors file's copy-on-write pages, which the first optimizer step faults in one by one. And glibc
    is told to keep freed blocks (keep_freed_memory), which run() does on the CPU."""
    cfg = ht.Config.from_dict({"MODE": "ppo", "MODEL": str(tiny_model), "TRAIN_FILE": str(tiny_data), "OUTPUT_DIR": "-", "BF16": False})
    policy, _, _ = ht.load_model(cfg, torch.device("cpu"))
    weights = str(runtime.resolve_model(cfg).weights)
    mapped = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in open("/proc/self/maps") if weights in line]
    ptrs = [p.data_ptr() for p in policy.parameters()]
    assert not [p for p in ptrs for lo, hi in mapped if lo <= p < hi]
    assert runtime.keep_freed_memory()  # glibc (Linux CI): the settings took


def tiny_gqa_llama(path):
    """A 2-layer Llama with grouped-query attention (4 query heads on 2 key-value heads), as SmolLM2 and Qwen have."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_cpu_attention_gives_sdpas_numbers_in_fp32_and_fp32_attention_in_bf16(tmp_path):
    """load_model's attention (runtime.cpu_attention): in fp32 the logits, gradients and greedy tokens of transformers'
    "sdpa" exactly, with padding (grouped heads go to SDPA whole) and without; in bf16 autocast, attention computed in
    fp32: nearer the fp32 logits than "sdpa"'s bf16 attention. A saved model names no attention of ours."""
    from transformers import AutoModelForCausalLM

    path = tiny_gqa_llama(tmp_path / "llama")
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    runtime.use_cpu_attention(ours)
    assert (stock.config._attn_implementation, ours.config._attn_implementation) == ("sdpa", runtime.CPU_ATTENTION)
    ids = torch.randint(0, 64, (3, 12))
    calls = []
    ours.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    for padded in (True, False):
        mask = torch.ones_like(ids)
        if padded:
            mask[:2, :5] = 0  # left padding, as generation and the update batch it
        stock.zero_grad(), ours.zero_grad()
        a, b = stock(input_ids=ids, attention_mask=mask).logits, ours(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(a, b)
        a[:, -4:].logsumexp(-1).sum().backward(), b[:, -4:].logsumexp(-1).sum().backward()
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(stock.parameters(), ours.parameters()))
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            a16, b16 = (m(input_ids=ids, attention_mask=mask).logits.float() for m in (stock, ours))
        assert not torch.equal(a16, b16)
        assert (b16 - a).abs().mean() < (a16 - a).abs().mean()
    assert calls
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    mask[:1, :3] = 0
    assert torch.equal(stock.generate(ids, **kw), ours.generate(ids, **kw))
    ours.save_pretrained(tmp_path / "saved")
    assert runtime.CPU_ATTENTION not in (tmp_path / "saved" / "config.json").read_text()


def test_weight_first_decoding_is_a_cached_probes_choice_and_samples_the_same_tokens(tiny_model, tmp_path, monkeypatch):
    """resolve_weight_first: only hf generation on a CPU in fp32, and only where the probe (cached like the bf16 one)
    finds weight-first faster; the plan's generation line says so. With Plan.weight_first the engine's decoding runs
    every linear layer of a Llama through weight_first_linear (the update does not) and samples the same tokens, greedy
    and at temperature 1, as without it."""
    from transformers import AutoTokenizer

    llama = tiny_gqa_llama(tmp_path / "llama")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(llama)  # its ids above 63 are never used here
    cfg = ht.Config.from_dict(
        {
            "MODEL": str(llama),
            "TRAIN_FILE": "t",
            "OUTPUT_DIR": "-",
            "CACHE_DIR": str(tmp_path / "cache"),
            "GENERATION_BACKEND": "hf",
            "SEED": 0,
            "MAX_NEW_TOKENS": 6,
            "TEMPERATURE": 1.0,
            "TOP_P": 1.0,
            "REPETITION_PENALTY": 1.0,
            "NO_REPEAT_NGRAM_SIZE": 0,
        }
    )
    paths, cpu = runtime.resolve_model(cfg), torch.device("cpu")
    shapes = runtime.decoding_shapes(paths)  # q, k, v, o (4 heads of 16 on 2 key-value heads), gate, up, down, the head
    assert shapes == [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128), (64, 64)]
    speedup, cached = runtime.weight_first_speedup(shapes, tmp_path / "probe.json")  # a real probe at these shapes
    assert math.isfinite(speedup) and not cached and runtime.weight_first_speedup(shapes, tmp_path / "probe.json") == (speedup, True)
    for measured, choice in ((1.9, True), (0.8, False)):
        monkeypatch.setattr(runtime, "weight_first_speedup", lambda shapes, cache, m=measured: (m, True))
        on, why = runtime.resolve_weight_first(cfg, cpu, False, paths)
        assert on is choice and f"weight-first {measured:.2f}x F.linear" in why
        plan = ht.make_plan(cfg, 8, 1, 0, False, False, "p", "m", weight_first=(on, why))
        assert plan.weight_first is choice and plan.generation.endswith(why)
    for other in ({"bf16": True}, {"device": torch.device("meta")}, {"cfg": dataclasses.replace(cfg, GENERATION_BACKEND="vllm")}):
        args = {"cfg": cfg, "device": cpu, "bf16": False, **other}
        assert runtime.resolve_weight_first(args["cfg"], args["device"], args["bf16"], paths) == (False, "")
    policy, ref, tok = ht.load_model(cfg, cpu, False, paths)
    calls = []
    real = runtime.weight_first_linear
    monkeypatch.setattr(runtime, "weight_first_linear", lambda layer, x: calls.append(layer) or real(layer, x))
    prompts = [[1, 5, 9, 3], [2, 7], [4, 4, 4]]
    outputs = []
    for on in (False, True):
        plan = ht.make_plan(cfg, 8, 1, 0, False, False, "p", "m", weight_first=(on, "w"))
        trainer = ht.HybridTrainer(cfg, policy, ref, tok, plan=plan)
        torch.manual_seed(3)
        outputs.append((trainer.generate(prompts, greedy=True), trainer.generate(prompts, n=2)))
        if on:
            assert {id(m) for m in calls} == {id(m) for m in policy.lm.modules() if type(m) is torch.nn.Linear}
        else:
            assert not calls
    (greedy_a, sampled_a), (greedy_b, sampled_b) = outputs
    assert greedy_a[0] == greedy_b[0] and sampled_a[0] == sampled_b[0]
    calls.clear()
    trainer.ppo_step(prompts, [r[:3] or [5] for r in greedy_b[0]], [1.0, 0.0, 0.5])
    assert not calls  # the update's forwards are F.linear's


@pytest.mark.parametrize(
    "fp32, bf16, flags, calls_expected, cached_after",
    [(2.0, 0.5, "", 2, True), (0.1, 1.0, "", 1, True), (1.0, 2.0, "avx512_bf16", 6, False), (2.0, 0.5, "amx_bf16", 2, True)],
)
def test_the_bf16_probe_is_fp32_time_over_bf16_time_taken_in_turn(tmp_path, monkeypatch, fp32, bf16, flags, calls_expected, cached_after):
    """bf16_speedup with a stand-in clock (fp32 products take `fp32` s, bf16 ones `bf16` s), timed in turn
    (alternating_ratio): the ratio is fp32 / bf16, not its inverse; a bf16 kernel 10x slower at 16 rows ends the probe
    there; on a CPU with bf16 matmul instructions a ratio below 1 (a busy machine) is measured twice more, kept as
    the median and not cached; one thread measures whatever the process has."""
    calls, threads = [], []
    monkeypatch.setattr(runtime, "cpu_model", lambda: f"a CPU ({flags})")

    def in_turn(a, b, rounds=15):
        calls.append(rounds)
        threads.append(torch.get_num_threads())
        clock = lambda fn: fp32 if fn().dtype == torch.float32 else bf16  # noqa: E731
        return clock(a) / clock(b)

    monkeypatch.setattr(runtime, "alternating_ratio", in_turn)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the process's own count: the probe measures with one, then gives it back
    try:
        speedup, cached = runtime.bf16_speedup(64, tmp_path / "probe.json")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert (speedup, cached, len(calls)) == (fp32 / bf16, False, calls_expected) and set(threads) == {1}
    assert runtime.bf16_speedup(64, tmp_path / "probe.json")[1] is cached_after


def test_the_weight_first_probe_times_the_same_products_both_ways(tmp_path, monkeypatch):
    """weight_first_speedup hands alternating_ratio F.linear first and weight-first second, over the same layers and
    inputs: their products agree, and the ratio it returns is the probe's."""

    def ratio(a, b, rounds=15):
        for x, y in zip(a(), b()):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
        return 1.25

    monkeypatch.setattr(runtime, "alternating_ratio", ratio)
    linear_calls = []
    real = runtime.weight_first_linear
    monkeypatch.setattr(runtime, "weight_first_linear", lambda layer, x: linear_calls.append(layer) or real(layer, x))
    assert runtime.weight_first_speedup([(32, 16), (16, 32), (64, 16)], tmp_path / "probe.json") == (1.25, False)
    assert linear_calls, "the second side must be the weight-first one"


def test_an_implausible_decoding_probe_is_measured_again_and_not_cached(tmp_path, monkeypatch):
    """The same products either way round: a ratio beyond 4x either way (a busy machine) is measured twice more, the
    median used and not cached; a plausible one is cached with its date, and the plan's line says where and how to
    probe again."""
    ratios = iter([9.0, 1.5, 8.0, 1.2])
    monkeypatch.setattr(runtime, "alternating_ratio", lambda a, b, rounds=15: next(ratios))
    shapes, cache = [(32, 16), (64, 16)], tmp_path / "probe.json"
    assert runtime.weight_first_speedup(shapes, cache) == (8.0, False) and not cache.exists()  # median of 9, 1.5, 8: refused
    assert runtime.weight_first_speedup(shapes, cache) == (1.2, False)  # plausible at once: cached
    assert runtime.weight_first_speedup(shapes, cache) == (1.2, True)
    assert runtime.probe_date(cache, runtime.weight_first_what(shapes))
