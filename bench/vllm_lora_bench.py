#!/usr/bin/env python3
"""Benchmark (not a test): LoRA weights into vLLM two ways, SmolLM2-135M-Instruct with a LoRA r=16 on all linear
layers, this machine, the shapes of bench/generation_bench.py.

- merged (what GENERATION_BACKEND "vllm" does): base + B A scale pushed into a plain engine with reload_weights
  after every update; generation runs the plain model.
- native: the engine starts with enable_lora and the adapter's base weights; after every update the adapter is
  saved (peft, safetensors) and handed over as a new LoRARequest; generation runs the base model plus LoRA kernels.

For each: the seconds to hand over the updated weights (the "sync"), generation tokens/s for the demo's shape
(8 prompts x 4 samples x 24 tokens) and long responses (16 prompts x 256 tokens, no EOS), and whether the greedy
continuations equal HF generate of the same LoRA model (so both engines hold the trained adapter).

    python bench/vllm_lora_bench.py            # one JSON line per way
"""

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from generation_bench import setup  # noqa: E402

R = 16


def main() -> None:
    import torch
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    import runtime

    trainer, examples, tok, why = setup("vllm", R, "auto")
    lm = trainer.policy.lm
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B is zero at initialisation, which would change nothing
        for name, p in lm.named_parameters():
            if "lora_B.default" in name:
                p.normal_(0, 0.02)
    prompts = [e.prompt_ids for e in examples]
    check = prompts[:4]
    with torch.no_grad():
        lm.eval()
        hf_greedy = []
        for p in check:
            out = lm.generate(
                input_ids=torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=16,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=tok.eos_token_id,
            )
            hf_greedy.append(out[0, len(p) :].tolist())

    def shapes(generate) -> dict:
        generate(prompts[:1], 1, 8, False)  # warm-up
        out = {}
        for label, ps, n, new in (("demo_8x4x24", prompts[:8], 4, 24), ("long_16x256", prompts[8:24], 1, 256)):
            t = time.perf_counter()
            tokens = sum(len(c.token_ids) for r in generate(ps, n, new, True) for c in r.outputs)
            seconds = time.perf_counter() - t
            out[label] = {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}
        greedy = [r.outputs[0].token_ids for r in generate(check, 1, 16, True, greedy=True)]
        out["greedy_equals_hf"] = f"{sum(list(g) == h for g, h in zip(greedy, hf_greedy))}/{len(check)}"
        return out

    def params(n, new, ignore_eos, greedy=False):
        return SamplingParams(n=n, max_tokens=new, seed=1, ignore_eos=ignore_eos, temperature=0.0 if greedy else 1.0, top_p=1.0)

    base = {"precision": why, "cpu": runtime.cpu_model(), "threads": torch.get_num_threads(), "lora_r": R}
    if "--native-only" not in sys.argv:  # the trainer's way: merged weights pushed into a plain engine
        engine = trainer.engine
        t = time.perf_counter()
        engine.sync_weights(1)
        sync = time.perf_counter() - t
        llm = engine.llm
        result = shapes(
            lambda ps, n, new, ign, greedy=False: llm.generate(
                [{"prompt_token_ids": p} for p in ps], params(n, new, ign, greedy), use_tqdm=False
            )
        )
        print(json.dumps({"way": "merged", **base, "sync_s": round(sync, 3), **result}), flush=True)
        engine.close()
        return  # one engine per process: run again with --native-only
    from vllm import LLM

    plan = trainer.plan
    t = time.perf_counter()
    with runtime.rng_untouched(torch.device("cpu")):
        llm = LLM(
            model=plan.model,
            dtype="bfloat16" if plan.bf16 else "float32",
            seed=0,
            max_model_len=plan.maxseq,
            enforce_eager=True,
            skip_tokenizer_init=True,
            kv_cache_memory_bytes=2**30,
            enable_lora=True,
            max_lora_rank=R,
            max_loras=1,
        )
    start_s = time.perf_counter() - t
    folder = Path(tempfile.mkdtemp())
    version = [0]

    def sync() -> LoRARequest:
        version[0] += 1
        path = folder / f"v{version[0]}"
        lm.save_pretrained(str(path), selected_adapters=["default"])
        return LoRARequest(f"policy-v{version[0]}", version[0], str(path))

    request = sync()
    one = [{"prompt_token_ids": prompts[0]}]
    llm.generate(one, params(1, 1, True), lora_request=request, use_tqdm=False)  # loads it
    t = time.perf_counter()
    llm.generate(one, params(1, 1, True), lora_request=request, use_tqdm=False)  # cached: the cost of one token
    one_token = time.perf_counter() - t
    t = time.perf_counter()
    request = sync()
    llm.generate(one, params(1, 1, True), lora_request=request, use_tqdm=False)  # save + load of a new version
    sync_s = time.perf_counter() - t - one_token
    result = shapes(
        lambda ps, n, new, ign, greedy=False: llm.generate(
            [{"prompt_token_ids": p} for p in ps], params(n, new, ign, greedy), lora_request=request, use_tqdm=False
        )
    )
    print(json.dumps({"way": "native", **base, "start_s": round(start_s, 2), "sync_s": round(sync_s, 3), **result}), flush=True)
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
