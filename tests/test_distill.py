"""On-policy distillation: the DISTILL losses against hand-computed values and TRL's generalized JSD, a teacher equal to
the student contributing exactly nothing, the CLI with a separate teacher and with "self", and the bad inputs."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ENV, EXACT_PPO, ROOT, comparable, interrupted_copy, max_diff, metrics, ppo_cli_config, run_cli, torchrun

import hybrid_trainer as ht
import outputs
import runtime


def test_token_reverse_kl_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    teacher = torch.tensor([[-1.5, -1.0, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])  # a gap (an observation) at position 1, padding at 3
    # each token's advantage: -(log pi - log nu) = [-0.5, 1.0, 0.0, 0.0], masked: the student overrates token 0
    assert ht.distill_advantages(logprobs, teacher, mask).tolist() == [[-0.5, 0.0, 0.0, 0.0]]
    # discounted over the later covered tokens (the gap skipped): position 2's term -(-1.0 - -0.5) = 0.5, position 0's
    # -0.5 + 0.5 * 0.5 = -0.25
    logprobs2 = torch.tensor([[-1.0, -2.0, -1.0, 0.0]])
    assert ht.distill_advantages(logprobs2, teacher, mask, discount=0.5).tolist() == [[-0.25, 0.0, 0.5, 0.0]]
    assert ht.distill_advantages(teacher, teacher, mask).abs().sum() == 0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_generalized_jsd_equals_trl(beta):
    """TRL 1.16's GKD generalized_jsd_loss (batchmean over the tokens whose label is not -100) on the same logits."""
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5, 17, dtype=torch.float64), torch.randn(3, 5, 17, dtype=torch.float64)
    mask = torch.ones(3, 5)
    mask[0, 3:], mask[2, 1] = 0, 0
    labels = torch.where(mask > 0, torch.zeros(3, 5, dtype=torch.long), torch.full((3, 5), -100))
    theirs = GKDTrainer.generalized_jsd_loss(student.float(), teacher.float(), labels, beta=beta, temperature=0.7)
    ours = ht.generalized_jsd(student.float(), teacher.float(), mask, beta, temperature=0.7) / mask.sum()
    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())


def test_generalized_jsd_in_chunks_has_the_same_value_and_gradient():
    torch.manual_seed(1)
    student = torch.randn(2, 9, 31, requires_grad=True)
    teacher = torch.randn(2, 9, 31)
    mask = (torch.rand(2, 9) > 0.3).float()
    grads = []
    for chunk in (2, 1000):
        student.grad = None
        value = ht.generalized_jsd(student, teacher, mask, 0.5, chunk=chunk)
        value.backward()
        grads.append((value.item(), student.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-7, rtol=0)
    assert student.grad[mask == 0].abs().sum() == 0  # masked positions get no gradient


def distill_trainer(tiny_model, keys):
    cfg = ht.Config.from_dict(
        {
            "MODE": "ppo",
            "MODEL": str(tiny_model),
            "TRAIN_FILE": "-",
            "OUTPUT_DIR": "-",
            "SEED": 0,
            "ADVANTAGE": "grpo",
            "NUM_GENERATIONS": 2,
            "PPO_BATCH": 2,
            "PPO_EPOCHS": 1,
            "LR_PPO": 1e-3,
            "INIT_KL_COEF": 0.0,
            **EXACT_PPO,
            **keys,
        }
    )
    torch.manual_seed(0)
    policy, ref, tok = ht.load_model(cfg, torch.device("cpu"))
    teacher = runtime.load_teacher(cfg, torch.device("cpu"), False, ref)
    return ht.HybridTrainer(cfg, policy, ref, tok, teacher=teacher), tok


QUERIES, RESPONSES = ["say yes 1", "say yes 1", "hello world", "hello world"], ["yes yes", "no", "yes", "the cat"]


@pytest.mark.parametrize("distill", ["token_reverse_kl", "jsd"])
def test_a_teacher_equal_to_the_student_adds_nothing(tiny_model, distill):
    """The teacher is the same weights (TEACHER_MODEL = MODEL): the distillation term is exactly 0, and the update equals
    the same update without a teacher (exactly for token_reverse_kl; jsd's gradient at teacher = student is 0 up to
    float rounding of the log-softmaxes, which AdamW's normalisation lifts to ~1e-6 on near-zero parameters)."""

    def step(keys):
        trainer, tok = distill_trainer(tiny_model, keys)
        queries = [tok(q)["input_ids"] for q in QUERIES]
        responses = [tok(r)["input_ids"] + [tok.eos_token_id] for r in RESPONSES]
        stats = trainer.ppo_step(queries, responses, [1.0, 0.0, 0.5, 0.0])
        return stats, outputs.trainable_state(trainer.policy)

    # PACKING off: the teacher's pass (the head on its packed hidden states) and the student's (LOGITS_CHUNK's chunks)
    # would sum in different orders, 4e-8 apart; exactness here needs the same arithmetic on both sides
    taught, taught_state = step({"TEACHER_MODEL": str(tiny_model), "DISTILL": distill, "DISTILL_BETA": 1.0, "PACKING": False})
    plain, plain_state = step({"PACKING": False})
    assert taught["distill/reverse_kl"] == 0.0
    if distill == "jsd":
        assert taught["distill/jsd"] == 0.0
    for name in plain_state:
        torch.testing.assert_close(taught_state[name], plain_state[name], atol=0 if distill == "token_reverse_kl" else 1e-5, rtol=0)


def test_token_reverse_kl_alone_moves_the_student_toward_the_teacher(tiny_model, tiny_lora_model):
    """ADVANTAGE "none": the distillation term is the only signal; a few updates on the same samples lower the reverse KL
    to another model (the teacher)."""
    trainer, tok = distill_trainer(
        tiny_model,
        {
            "TEACHER_MODEL": str(tiny_lora_model),
            "DISTILL": "token_reverse_kl",
            "ADVANTAGE": "none",
            "NUM_GENERATIONS": 1,
            "PPO_BATCH": 4,
            "LR_PPO": 3e-3,
        },
    )
    queries = [tok(q)["input_ids"] for q in QUERIES]
    responses = [tok(r)["input_ids"] + [tok.eos_token_id] for r in RESPONSES]
    kls = [trainer.ppo_step(queries, responses, [0.0] * 4)["distill/reverse_kl"] for _ in range(6)]
    assert kls[-1] < kls[0], kls


@pytest.mark.parametrize("loss", list(ht.POLICY_LOSSES))
def test_every_policy_loss_takes_the_distillation_advantage(tiny_model, tiny_lora_model, loss):
    """ADVANTAGE "none" (the estimators' registry entry that only distillation gives a signal) with each policy loss."""
    trainer, tok = distill_trainer(
        tiny_model,
        {
            "TEACHER_MODEL": str(tiny_lora_model),
            "DISTILL": "token_reverse_kl",
            "ADVANTAGE": "none",
            "NUM_GENERATIONS": 1,
            "PPO_BATCH": 4,
            "POLICY_LOSS": loss,
        },
    )
    before = [p.detach().clone() for p in trainer.policy.lm.parameters()]
    stats = trainer.ppo_step(
        [tok(q)["input_ids"] for q in QUERIES], [tok(r)["input_ids"] + [tok.eos_token_id] for r in RESPONSES], [0.0] * 4
    )
    assert stats["ppo/loss/policy"] != 0 and stats["distill/reverse_kl"] != 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.lm.parameters()))


@pytest.mark.parametrize(
    "keys",
    [
        {"DISTILL": "token_reverse_kl", "ADVANTAGE": "none", "NUM_GENERATIONS": 1},
        {"DISTILL": "jsd", "TEACHER_MODEL": "self", "LORA_R": 4, "DISTILL_BETA": 0.5},
        {"DISTILL": "token_reverse_kl", "TEACHER_MODEL": "self", "MODE": "hybrid", "HYBRID": "alternate", "SFT_BATCH": 2},
    ],
)
def test_cli_distills(tmp_path, tiny_model, tiny_lora_model, tiny_data, keys):
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps([{"instruction": "say yes", "output": "yes yes"}] * 2))
    model = tiny_lora_model if keys.get("LORA_R") else tiny_model
    cfg = ppo_cli_config(tmp_path, model, tiny_data, EVAL_FILE=str(eval_file), **{"TEACHER_MODEL": str(tiny_lora_model), **keys})
    run_cli(cfg, tmp_path)
    records = metrics(tmp_path / "out")
    ppo = [r for r in records if r.get("phase") == "ppo"]
    assert ppo and all("distill/reverse_kl" in r and r["distill/coef"] == 1.0 for r in ppo)
    assert all("distill/jsd" in r for r in ppo) == (keys["DISTILL"] == "jsd")
    evals = [r for r in records if r.get("phase") == "eval"]
    assert len(evals) == 2 and all("eval/reverse_kl_to_teacher" in r for r in evals)
    if keys.get("TEACHER_MODEL") == "self":  # the teacher, knowing the answer, judges the student's tokens
        assert evals[0]["eval/reverse_kl_to_teacher"] != 0


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"DISTILL": "jsd"}, "DISTILL 'jsd' needs a teacher: set TEACHER_MODEL"),
        ({"TEACHER_MODEL": "self"}, "TEACHER_MODEL is set but DISTILL is empty"),
        ({"TEACHER_MODEL": "self", "DISTILL": "jsd", "DISTILL_BETA": 1.5}, "DISTILL_BETA must be in [0, 1]"),
        ({"TEACHER_MODEL": "/no/such/teacher", "DISTILL": "jsd"}, "TEACHER_MODEL '/no/such/teacher' not found"),
        ({"TEACHER_MODEL": "CHAT", "DISTILL": "token_reverse_kl"}, "has another vocabulary than MODEL"),
        # a row without a reference response is refused by the data loader already (every data format needs one)
        ({"TEACHER_MODEL": "self", "DISTILL": "jsd", "TRAIN_FILE": "PROMPTS"}, "row 0, column 'completion': empty"),
    ],
)
def test_bad_distillation_input_is_one_error_before_weights(tmp_path, tiny_model, tiny_chat_model, tiny_data, keys, message, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "say yes", "completion": ""}\n{"prompt": "say no", "completion": ""}\n')
    keys = {k: {"CHAT": str(tiny_chat_model), "PROMPTS": str(prompts)}.get(v, v) if isinstance(v, str) else v for k, v in keys.items()}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(ppo_cli_config(tmp_path, tiny_model, tiny_data, **keys)))
    assert ht.main([str(path), "--check"]) == 2  # --check: nothing loads weights
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and message in err and "Traceback" not in err, err


def test_presets_include_distill(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert ht.main(["configs/distill.json", "--check"]) == 0
    assert "ok: " in capsys.readouterr().out


@pytest.mark.parametrize("distill", ["token_reverse_kl", "jsd"])
def test_one_process_equals_two_with_a_teacher(tiny_model, tiny_lora_model, tmp_path, distill):
    """The teacher's log-probs (step 4, each process its share) and jsd's term (each process its rows, over the
    minibatch's global token count) do not depend on the process count: every number the update logs is the same
    within 1e-6, and the weights within Adam's rounding (below)."""

    helper = ROOT / "tests" / "dist_helper.py"
    extra = json.dumps(
        {"TEACHER_MODEL": str(tiny_lora_model), "DISTILL": distill, "NUM_GENERATIONS": 2, "ADVANTAGE": "grpo", "DISTILL_BETA": 0.5}
    )
    one = subprocess.run(
        [sys.executable, str(helper), "ppo_step", str(tiny_model), str(tmp_path / "one.st"), "0", extra],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([helper, "ppo_step", tiny_model, tmp_path / "two.st", "0", extra])
    numbers = [json.loads(next(x for x in p.stdout.splitlines() if x.startswith("numbers "))[8:]) for p in (one, two)]
    assert numbers[0].keys() == numbers[1].keys() and {"distill/reverse_kl", "ppo/loss/policy"} <= numbers[0].keys()
    for key, value in numbers[0].items():  # every logged number of the update, the teacher's included, within 1e-6
        if key == "perf/update_tokens":  # the positions each process's forwards ran: its own rows' padding
            continue
        assert numbers[1][key] == pytest.approx(value, abs=1e-6, rel=1e-6), key
    # Adam's first steps are about LR_PPO (1e-3) x sign(gradient) whatever its size, so where a gradient is at rounding
    # level (terms over the whole vocabulary cancelling) the summation order of 1 vs 2 processes moves the weight by a
    # few % of one step (measured 2.4e-5 with jsd on an AMX Xeon, under 1e-5 on the EPYCs; with PACKING, which packs each
    # process's rows apart, 1.1e-5 with token_reverse_kl on a Xeon); a real error (a local instead of the global token
    # count, a process's rows missing) moves it by a whole step
    assert max_diff(tmp_path / "one.st", tmp_path / "two.st") <= 5e-5


def test_resume_with_a_teacher_is_exact(tmp_path, tiny_model, tiny_lora_model, tiny_data):
    """A run killed after its checkpoint at step 2 (its directory as SIGKILL leaves it) and resumed logs the same
    numbers and ends with the same weights as the run that was not interrupted."""

    cfg = ppo_cli_config(
        tmp_path,
        tiny_model,
        tiny_data,
        TEACHER_MODEL=str(tiny_lora_model),
        DISTILL="token_reverse_kl",
        NUM_SAMPLES=8,
        SAVE_EVERY=1,
        KEEP_CHECKPOINTS=10,
        KEEP_CHECKPOINTS_AT_END=True,
        LR_PPO=1e-3,
    )
    run_cli(cfg, tmp_path)
    straight = tmp_path / "out"
    killed = interrupted_copy(straight, tmp_path / "killed", 2)
    resumed = run_cli({**cfg, "OUTPUT_DIR": str(killed)}, tmp_path)
    assert "resuming from" in resumed.stdout
    assert comparable(metrics(killed)) == comparable(metrics(straight))
    assert max_diff(straight / "inference_lm/model.safetensors", killed / "inference_lm/model.safetensors") <= 1e-6


def test_distillation_with_vllm_and_an_environment(tmp_path, tiny_chat_model):
    """The engine samples (vLLM), the trainer scores teacher and student; with the calculator environment the teacher
    scores the model's tokens only (the loss mask)."""
    data = ROOT / "data" / "tool_train.json"
    cfg = {
        "MODE": "ppo",
        "MODEL": str(tiny_chat_model),
        "TRAIN_FILE": str(data),
        "OUTPUT_DIR": str(tmp_path / "out"),
        "SEED": 0,
        "NUM_SAMPLES": 2,
        "ADVANTAGE": "grpo",
        "NUM_GENERATIONS": 2,
        "PPO_BATCH": 2,
        "PPO_EPOCHS": 1,
        "MAX_NEW_TOKENS": 16,
        "MAXSEQ": 384,
        "REWARD": {"type": "math"},
        "ENVIRONMENT": {"type": "calculator"},
        "MAX_TURNS": 2,
        "ACTION_FORMAT": {"open": "o", "close": "n"},
        "TEACHER_MODEL": "self",
        "DISTILL": "token_reverse_kl",
        **EXACT_PPO,
        "GENERATION_BACKEND": "vllm",
        "VLLM_KV_CACHE_GB": 0.25,
        "BF16": False,
        "LOG_EVERY": 1,
    }
    run_cli(cfg, tmp_path)
    ppo = [r for r in metrics(tmp_path / "out") if r.get("phase") == "ppo"]
    assert ppo and all("distill/reverse_kl" in r and "rollout/logprob_abs_diff" in r for r in ppo)
    assert any(r["env/actions"] > 0 for r in ppo), "no trajectory acted: the observations' loss mask went untested"
    assert all(math.isfinite(r["distill/reverse_kl"]) for r in ppo)
