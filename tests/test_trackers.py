"""REPORT_TO trackers (through accelerate.tracking): each is read back from what it wrote locally (offline by default):
the same keys at the same steps as metrics.jsonl, every step once also after a resume from an earlier checkpoint, the
resolved config as the run's parameters, eval samples as a table; and a missing tracker is one error line."""

import glob
import importlib.util
import json
import sqlite3
import struct

import pytest
from conftest import interrupted_copy, metrics, run_cli

import hybrid_trainer as ht
import outputs

TAGS = ("sft/loss", "reward/mean", "objective/kl")


def wandb_history(out) -> tuple[dict, dict, list]:
    """({step: {key: value}}, config, tags) from the offline run files (the .wandb log: leveldb-style records of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    history, config, tags = {}, {}, []
    for path in sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data, pos, buf = open(path, "rb").read(), 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if length == 0 and kind == 0:
                pos += left
                continue
            buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind not in (1, 4):
                continue
            record, buf = pb.Record.FromString(buf), b""
            which = record.WhichOneof("record_type")
            if which == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history.setdefault(items["_step"], []).append(items)
            elif which == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif which == "run":
                tags = list(record.run.tags)
    return history, config, tags


def check_trackers(out, cfg, name="run"):
    records = [r for r in metrics(out) if r["phase"] != "eval"]
    eval_steps = [r["step"] for r in metrics(out) if r["phase"] == "eval"]
    ids = json.loads((out / "trackers.json").read_text())
    # wandb (offline): every step once, the values of metrics.jsonl; the config; tables at the evaluations
    history, config, tags = wandb_history(out)
    assert all(len(v) == 1 for v in history.values()), {k: len(v) for k, v in history.items() if len(v) > 1}
    for tag in TAGS:
        expected = [(r["step"], r[tag]) for r in records if tag in r]
        got = [(step, items[0][tag]) for step, items in sorted(history.items()) if tag in items[0]]
        assert [s for s, _ in got] == [s for s, _ in expected] and [v for _, v in got] == pytest.approx([v for _, v in expected])
    assert config["MODE"] == "hybrid" and json.loads(config["REWARD"]) == cfg["REWARD"] and config["SEED"] == 0
    assert set(tags) == {"hybrid", "gae", "alternate"}
    assert all(history[s][0].get("eval/samples/_type") == "table-file" for s in eval_steps)
    # mlflow (a local SQLite store): every step once; the params; a table per evaluation
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(ids["mlflow"])
    assert run.data.params["MODE"] == "hybrid" and run.info.run_name == name  # a resumed copy continues the run
    for tag in TAGS:
        got = sorted((m.step, m.value) for m in client.get_metric_history(ids["mlflow"], tag))
        expected = [(r["step"], r[tag]) for r in records if tag in r]
        assert [s for s, _ in got] == [s for s, _ in expected] and [v for _, v in got] == pytest.approx([v for _, v in expected])
    tables = [a.path for a in client.list_artifacts(ids["mlflow"], "eval_samples")]
    assert tables == [f"eval_samples/step_{s:06d}.json" for s in eval_steps]
    # trackio (a local directory): every step once; the config
    db = sqlite3.connect(out / "trackio" / "hybrid_trainer.db")
    rows = db.execute("select step, metrics from metrics where run_name = ?", (name,)).fetchall()
    pairs = [(s, k) for s, m in rows for k in json.loads(m)]
    assert len(pairs) == len(set(pairs))  # each key once per step (a step's record and its eval are two rows)
    logged = {}
    for s, m in rows:
        logged.setdefault(s, {}).update(json.loads(m))
    for tag in TAGS:
        expected = [(r["step"], r[tag]) for r in records if tag in r]
        assert [logged[s][tag] for s, _ in expected] == pytest.approx([v for _, v in expected])
    assert all("eval/samples" in logged[s] for s in eval_steps)
    config = json.loads(db.execute("select config from configs where run_name = ?", (name,)).fetchone()[0])
    assert config["MODE"] == "hybrid" and config["SEED"] == 0


def test_trackers_read_back_also_after_resume(tiny_model, tiny_data, tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "TRACKIO_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    cfg = {
        "MODE": "hybrid",
        "MODEL": str(tiny_model),
        "TRAIN_FILE": str(tiny_data),
        "EVAL_FILE": str(tiny_data),
        "EVAL_SAMPLES": 2,
        "EVAL_EVERY": 4,
        "OUTPUT_DIR": str(out),
        "SEED": 0,
        "SFT_BATCH": 2,
        "PPO_BATCH": 2,
        "MAX_NEW_TOKENS": 4,
        "REPORT_TO": ["wandb", "mlflow", "trackio"],
        "SAVE_EVERY": 1,
        "KEEP_CHECKPOINTS": 10,
        "KEEP_CHECKPOINTS_AT_END": True,
        "REWARD": {"type": "contains", "pattern": "yes"},
    }
    run_cli(cfg, tmp_path)  # a process per run, as users run it (trackio fixes its directory at its first import)
    assert glob.glob(str(out / "wandb" / "offline-run-*"))  # offline by default
    check_trackers(out, cfg)
    # an interrupted run: it logged to step 8, its checkpoint is step 3; resuming continues the same runs once each
    killed = interrupted_copy(out, tmp_path / "killed", 3)
    run_cli({**cfg, "OUTPUT_DIR": str(killed)}, tmp_path)
    check_trackers(killed, cfg)


def test_missing_tracker_is_one_error_line(tiny_model, tiny_data, tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
    (tmp_path / "c.json").write_text(
        json.dumps(
            {
                "MODE": "sft",
                "MODEL": str(tiny_model),
                "TRAIN_FILE": str(tiny_data),
                "OUTPUT_DIR": str(tmp_path / "o"),
                "REPORT_TO": ["tensorboard", "mlflow"],
            }
        )
    )
    assert ht.main([str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "REPORT_TO 'mlflow' needs mlflow" in err and "pip install mlflow-skinny" in err
    assert not (tmp_path / "o").exists()


def test_unknown_tracker_names_the_choices(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"TRAIN_FILE": "t", "OUTPUT_DIR": "o", "REPORT_TO": ["wandbb"]}))
    assert ht.main([str(tmp_path / "c.json")]) == 2
    assert "REPORT_TO must be one of tensorboard, wandb, mlflow, trackio; got 'wandbb' - did you mean 'wandb'?" in capsys.readouterr().err


def test_an_empty_wandb_variable_is_unset(tmp_path, monkeypatch):
    """WANDB_MODE="" in the user's environment (an empty variable) is unset, as an empty MLFLOW_TRACKING_URI is:
    wandb's own settings would end the run with a pydantic traceback."""
    monkeypatch.setenv("WANDB_MODE", "")
    monkeypatch.setenv("WANDB_PROJECT", "")
    cfg = ht.Config.from_dict({"TRAIN_FILE": "-", "OUTPUT_DIR": str(tmp_path), "REPORT_TO": ["wandb"]})
    from accelerate import PartialState

    PartialState()
    tracker = outputs.start_wandb(cfg, tmp_path, "run", [], 0, {})
    tracker.start()
    tracker.log({"x": 1.0}, step=1)
    tracker.finish()
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*"))  # offline, as with the variable unset
