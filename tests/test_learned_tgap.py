"""TGAP end to end on the tiny model: capture round updates, train an AE, evaluate it; the CLI commands."""
import json

import pytest
import torch

import gradcodec
from gradcodec.cli import main
from gradcodec.errors import InvalidInput
from gradcodec.capture import FORMAT, load_capture, save_capture
from gradcodec.integrations.fedlora.capture import CaptureConfig, run_federated
from gradcodec.learned.evaluate import evaluate_uplink, evaluation_rows
from gradcodec.learned.modelfile import load_model
from gradcodec.learned.tgap import snapshots_from_capture

SMALL_RUN = dict(pretrained=False, examples=60, rank=4, num_clients=4, clients_per_round=2, rounds=3, local_steps=2,
                 batch_size=4)


@pytest.fixture(scope="module")
def capture_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("capture") / "capture.pt"
    save_capture(run_federated(CaptureConfig(**SMALL_RUN)), path)
    return path


def test_capture_records_every_upload_with_its_update_and_state(capture_file):
    capture = load_capture(capture_file)
    assert capture["format"] == FORMAT and capture["config"]["rounds"] == 3
    records = capture["records"]
    assert [(r["round"]) for r in records] == [0, 0, 1, 1, 2, 2]
    first = records[0]
    assert set(first["update"]) == set(first["state"]) and len(first["update"]) == 4 * 4 * 2
    a = next(k for k in first["update"] if k.endswith("q_proj.lora_A.weight"))
    assert first["update"][a].shape == (4, 128) and first["update"][a].abs().sum() > 0
    # a round-0 update is the delta from the initial adapter, whose B is zero
    b = a.replace("lora_A", "lora_B")
    assert torch.equal(first["update"][b], first["state"][b])


def test_capture_loads_with_weights_only_and_refuses_other_files(tmp_path, capture_file):
    torch.load(capture_file, weights_only=True)
    torch.save({"format": "something-else"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a gradcodec-capture-v1"):
        load_capture(tmp_path / "x.pt")


def test_the_codec_in_the_loop_sees_every_update():
    seen = []

    def transmit(client, rnd, update):
        seen.append((rnd, client))
        return {k: torch.zeros_like(v) for k, v in update.items()}  # nothing reaches the server

    capture = run_federated(CaptureConfig(**{**SMALL_RUN, "rounds": 2}), transmit=transmit)
    assert seen == [(r["round"], r["client"]) for r in capture["records"]]
    # with nothing transmitted, round 1 starts from the initial adapter again: its B update is its B state
    rec = capture["records"][-1]
    b = next(k for k in rec["update"] if k.endswith("lora_B.weight"))
    assert torch.equal(rec["update"][b], rec["state"][b])


def test_the_in_process_loop_follows_the_cosine_schedule_and_stops_where_told(monkeypatch):
    from gradcodec.integrations.fedlora import train

    lrs, seen = [], []
    real = train.local_train
    monkeypatch.setattr(train, "local_train", lambda *a, **kw: (lrs.append(kw["lr"]), real(*a, **kw))[1])
    config = CaptureConfig(**{**SMALL_RUN, "rounds": 4, "lr": 2e-3, "lr_schedule": "cosine"})
    capture = run_federated(config, on_round=lambda rnd, state: seen.append((rnd, len(state))) or rnd >= 2)
    # the learning rates of rounds 1 and 2 of a 4-round cosine (2 clients a round), then the run stops
    assert lrs == pytest.approx([2e-3, 2e-3, 1e-3 * (1 + 2 ** -0.5), 1e-3 * (1 + 2 ** -0.5)])
    assert seen == [(1, 32), (2, 32)] and [r["round"] for r in capture["records"]] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="lr_schedule"):
        CaptureConfig(lr_schedule="step")


def test_snapshots_pick_the_representation(capture_file):
    capture = load_capture(capture_file)
    assert snapshots_from_capture(capture)[0] is not capture["records"][0]["update"]
    assert torch.equal(snapshots_from_capture(capture, "state")[1][next(iter(capture["records"][1]["state"]))],
                       next(iter(capture["records"][1]["state"].values())))
    with pytest.raises(InvalidInput):
        snapshots_from_capture(capture, "gradient")


def test_train_ae_and_eval_ae_commands(tmp_path, capture_file, capsys):
    out = tmp_path / "ae.safetensors"
    assert main(["train-ae", "--capture", str(capture_file), "--ratio", "1/64", "--out", str(out),
                 "--encoder-out", str(tmp_path / "enc.safetensors"), "--decoder-out", str(tmp_path / "dec.safetensors")]) == 0
    model = load_model(out)
    assert model.config.arch == "block" and model.config.ratio == 1 / 64
    assert model.training["representation"] == "update" and "cosine" in model.training["held_out"]
    assert load_model(tmp_path / "enc.safetensors").fingerprint == model.fingerprint
    assert "held-out" in capsys.readouterr().out

    js = tmp_path / "rows.json"
    assert main(["eval-ae", "--capture", str(capture_file), "--model", str(out), "--baselines", "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    names = [r["name"] for r in rows]
    assert names[0] == "cgfed block (update)" and any(n.startswith("topk") for n in names) and "int4" in names
    assert all(-1 <= r["cosine"] <= 1 and r["bytes"] > r["data_bytes"] > 0 for r in rows)


def test_train_ae_reports_a_bad_ratio(capture_file, capsys):
    with pytest.raises(SystemExit):
        main(["train-ae", "--capture", str(capture_file), "--ratio", "3/2", "--out", "x"])
    assert "ratio" in capsys.readouterr().err


def test_state_representation_is_scored_against_the_update(capture_file, tmp_path):
    """The paper's input: the server's update is the decoded state minus the global adapter it sent."""
    capture = load_capture(capture_file)
    identity = type("Lossless", (), {"encode": lambda self, x: gradcodec.encode(x, "raw"),
                                     "decode": lambda self, b: gradcodec.decode(b)})
    row = evaluate_uplink(identity, capture["records"], "state")
    assert row["cosine"] == pytest.approx(1) and row["rel_l2"] < 1e-5
    model_path = tmp_path / "state.safetensors"
    main(["train-ae", "--capture", str(capture_file), "--representation", "state", "--out", str(model_path)])
    rows = evaluation_rows(load_model(model_path), capture["records"], baselines=True)
    assert [r["name"] for r in rows] == ["cgfed block (state)"]  # no feedback or baselines for states


def test_eval_ae_compares_tgap_and_faf_adapted_decoders(tmp_path, capture_file):
    out = tmp_path / "ae.safetensors"
    main(["train-ae", "--capture", str(capture_file), "--out", str(out)])
    js = tmp_path / "faf.json"
    assert main(["eval-ae", "--capture", str(capture_file), "--model", str(out), "--residual", "0",
                 "--faf-calibration-rounds", "1", "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert all(r["uploads"] == 4 for r in rows)  # rounds 1 and 2, two clients each
    assert rows[-1]["name"] == "cgfed block (update), FAF decoder (2 pairs)"
