"""The fedtrain app (integrations/fedlora/app.py, config.py, report.py, run.py, cli.py).

Configuration and CLI; FedAvg of LoRA adapters against a hand computation; one round driven by hand
through the real strategy wrapper, client mod and ClientApp with Flower's serde in between (raw is
bit-exact, int8 within its bound, a failed client is left out); and one small simulation in Flower's
engine (two codecs, two rounds, three clients, one of which fails in round 1).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("peft")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict  # noqa: E402

import gradcodec  # noqa: E402
from gradcodec.errors import InvalidInput  # noqa: E402
from gradcodec.cli import build_parser  # noqa: E402
from gradcodec.integrations import peft  # noqa: E402
from gradcodec.integrations.fedlora import app as fl_app  # noqa: E402
from gradcodec.integrations.fedlora.cli import resolve_config, to_toml  # noqa: E402
from gradcodec.integrations.fedlora.config import DEFAULT_COMPARE, FedTrainConfig, load_config_file, parse_codec_list  # noqa: E402
from gradcodec.integrations.fedlora.report import format_table, read_records, summarize  # noqa: E402
from gradcodec.integrations.flower import CompressedStrategy  # noqa: E402

from .test_flower import FakeGrid, task_identity, wire  # noqa: E402,F401 (task_identity: a fixture)

APP_DIR = Path(fl_app.__file__).parent

# A fast configuration: the tiny preset with random weights, a few examples, two local steps.
SMALL = FedTrainConfig(pretrained=False, num_clients=3, fraction=1.0, rounds=2, local_steps=2, batch_size=4,
                       train_examples=60, eval_examples=7, progress=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared machine OpenMP's spinning threads slow these tiny models ~5x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(*argv: str):
    return build_parser().parse_args(["fedtrain", *argv])


# ====================================================================== configuration and CLI


def test_settings_come_from_defaults_then_the_file_then_the_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rounds = 3\nlocal-steps = 7\nlr = 0.01\ncodecs = "int4"\n')
    cfg = resolve_config(_args("--config", str(path), "--rounds", "5", "--no-error-feedback", "--bf16"))
    assert (cfg.rounds, cfg.local_steps, cfg.lr, cfg.codecs) == (5, 7, 0.01, ("int4",))
    assert (cfg.error_feedback, cfg.dtype, cfg.batch_size) == (False, "bfloat16", FedTrainConfig.batch_size)


def test_config_files_are_json_or_toml_with_either_key_style_and_unknown_keys_are_named(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"num_clients": 4, "dirichlet-alpha": 0.1}))
    assert FedTrainConfig().replace(**load_config_file(tmp_path / "a.json")).num_clients == 4
    (tmp_path / "b.toml").write_text("num_client = 4\n")
    with pytest.raises(ValueError, match=r"b.toml: unknown fedtrain setting 'num_client'.*num_clients"):
        load_config_file(tmp_path / "b.toml")
    (tmp_path / "c.toml").write_text("rounds = 'many'\n")
    with pytest.raises(ValueError, match="'rounds' must be a int"):
        load_config_file(tmp_path / "c.toml")


def test_invalid_settings_are_explained():
    with pytest.raises(ValueError, match="fraction must be in"):
        FedTrainConfig(fraction=0)
    with pytest.raises(ValueError, match="dtype must be float32 or bfloat16"):
        FedTrainConfig().replace(dtype="float16")
    with pytest.raises(ValueError, match="give one of --compare, --codec"):
        resolve_config(_args("--compare", "--codec", "int8"))


def test_codec_lists_keep_commas_inside_specs_and_expand_default():
    assert parse_codec_list("raw,topk:ratio=0.01,k=0|int8;int4") == ("raw", "topk:ratio=0.01,k=0|int8", "int4")
    assert parse_codec_list("default") == DEFAULT_COMPARE
    assert parse_codec_list("raw,default,cgfed:model=ae.safetensors") == DEFAULT_COMPARE + ("cgfed:model=ae.safetensors",)
    assert resolve_config(_args("--compare")).codecs == DEFAULT_COMPARE


def test_cgfed_model_names_the_file_of_every_cgfed_entry_without_one():
    cfg = FedTrainConfig(codecs=("int8", "cgfed", "cgfed:bits=4|zstd", "cgfed:model=b.safetensors"), cgfed_model="a.safetensors")
    assert cfg.codecs == ("int8", "cgfed:model=a.safetensors", "cgfed:bits=4,model=a.safetensors|zstd", "cgfed:model=b.safetensors")
    assert FedTrainConfig.from_run_config(cfg.to_run_config()) == cfg
    with pytest.raises(ValueError, match="cannot contain"):
        FedTrainConfig(codecs=("cgfed",), cgfed_model="runs/a,b.safetensors")


def test_a_deployment_refuses_cgfed_without_a_model_file():
    with pytest.raises(ValueError, match="name the AutoEncoder file"):
        fl_app.serve(FakeGrid([]), SMALL.replace(codecs=("raw", "cgfed")))


def test_the_flower_app_config_mirrors_the_defaults_and_round_trips():
    pyproject = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == FedTrainConfig().to_run_config()
    cfg = FedTrainConfig(codecs=("raw", "topk:ratio=0.01,k=0|int8"), lora_targets="q_proj,v_proj", fail_partition=2)
    assert FedTrainConfig.from_run_config(cfg.to_run_config()) == cfg
    assert FedTrainConfig().replace(**tomllib.loads(to_toml(cfg))) == cfg  # --print-config output loads back


def test_registering_the_command_imports_neither_flower_nor_transformers():
    code = ("import sys; from gradcodec.cli import build_parser; build_parser().parse_args(['fedtrain', '--compare']);"
            "print(sorted(m for m in ('flwr', 'transformers', 'peft', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ====================================================================== FedAvg of adapters


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"l0.q.lora_A.weight": torch.randn(4, 16, generator=g), "l0.q.lora_B.weight": torch.randn(16, 4, generator=g),
            "l1.v.lora_A.weight": torch.randn(4, 16, generator=g), "l1.v.lora_B.weight": torch.randn(8, 4, generator=g)}


def _reply(state, examples, partition, node):
    msg = Message(RecordDict({"arrays": fl_app._to_record(state),
                              "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0 + partition,
                                                       "partition-id": partition})}),
                  dst_node_id=node, message_type="train")
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def test_fedavg_averages_a_and_b_separately_weighted_by_examples(task_identity):
    states, weights = [_state(s) for s in (1, 2, 3)], [10, 30, 60]
    strategy = fl_app.LoraFedAvg(SMALL, {0: 100, 1: 101, 2: 102})
    replies = [_reply(s, w, p, 100 + p) for p, (s, w) in enumerate(zip(states, weights))]
    arrays, metrics = strategy.aggregate_train(1, replies[::-1])  # arrival order does not matter
    for name in states[0]:
        by_hand = sum(w * s[name].double() for s, w in zip(states, weights)) / sum(weights)
        assert torch.allclose(torch.from_numpy(arrays[name].numpy()).double(), by_hand, atol=1e-6), name
    assert fl_app._to_state(arrays).keys() == states[0].keys()
    expected = peft.fedavg(states, weights)
    assert all(torch.equal(fl_app._to_state(arrays)[k], expected[k]) for k in expected)
    assert metrics["train-loss"] == pytest.approx((10 * 1 + 30 * 2 + 60 * 3) / 100)
    assert strategy.rounds[1]["aggregated"] == [0, 1, 2]


def test_sampling_is_seeded_per_round_and_independent_of_node_ids():
    cfg = FedTrainConfig(num_clients=10, fraction=0.3, seed=4)
    a = fl_app.LoraFedAvg(cfg, {p: 1000 + p for p in range(10)})
    b = fl_app.LoraFedAvg(cfg, {p: 7 * p + 3 for p in range(10)})
    rounds = [a.sample(r) for r in range(1, 6)]
    assert rounds == [b.sample(r) for r in range(1, 6)]
    assert all(len(s) == 3 and s == sorted(s) for s in rounds) and len({tuple(s) for s in rounds}) > 1


# ====================================================================== one round through the app, by hand


def _contexts(n: int) -> dict[int, Context]:
    return {100 + p: Context(run_id=1, node_id=100 + p, node_config={"partition-id": p, "num-partitions": n},
                             state=RecordDict(), run_config={}) for p in range(n)}


def _round(cfg, uplink, contexts, fail=()):
    """configure_train -> serde -> ClientApp (mod + train) -> serde -> aggregate_train, as Flower does it.

    Returns the aggregate, the strategy and the states the clients' app produced (before compression)."""
    partitions = {ctx.node_config["partition-id"]: node for node, ctx in contexts.items()}
    strategy = CompressedStrategy(fl_app.LoraFedAvg(cfg, partitions), uplink_codec=uplink)
    client = fl_app.make_client_app(cfg)
    initial = fl_app._to_record(fl_app.load_model(cfg)[2])
    replies, produced = [], {}
    for msg in strategy.configure_train(1, initial, ConfigRecord(), FakeGrid(contexts)):
        msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        msg = wire(msg)
        ctx = contexts[msg.metadata.dst_node_id]
        partition = ctx.node_config["partition-id"]
        if partition in fail:
            replies.append(wire(Message(Error(code=2, reason="client crashed"), reply_to=msg)))
            continue
        plain = fl_app.client_train(wire(msg), ctx, cfg)  # what the app sends without the mod
        produced[partition] = (fl_app._to_state(plain.content["arrays"]), plain.content["metrics"]["num-examples"])
        replies.append(wire(client(message=msg, context=ctx)))
    arrays, _ = strategy.aggregate_train(1, replies)
    return fl_app._to_state(arrays), strategy, produced


def test_a_raw_round_is_bit_exact_fedavg_of_what_the_clients_trained(task_identity):
    cfg = SMALL.replace(codecs=("raw",))
    aggregate, strategy, produced = _round(cfg, "raw", _contexts(3))
    expected = peft.fedavg([produced[p][0] for p in sorted(produced)], [produced[p][1] for p in sorted(produced)])
    assert list(aggregate) == list(expected)
    assert all(torch.equal(aggregate[k], expected[k]) for k in expected)
    assert any(not torch.equal(expected[k], fl_app.load_model(cfg)[2][k]) for k in expected)  # it trained
    stats = strategy.history[1]
    assert len(stats.uplink) == 3 and all(t.codec == "raw" for t in stats.uplink.values())


def test_an_int8_round_stays_within_the_quantisation_bound(task_identity):
    cfg = SMALL.replace(codecs=("int8",))
    aggregate, strategy, produced = _round(cfg, "int8", _contexts(3))
    initial = fl_app.load_model(cfg)[2]
    states, weights = [produced[p][0] for p in sorted(produced)], [produced[p][1] for p in sorted(produced)]
    expected = peft.fedavg(states, weights)
    # Each client's update is rounded to scale/2 = absmax(block)/254 per element (no residual yet in
    # round 1); the weighted mean of the errors is bounded by the largest of them.
    bound = max(float((s[k] - initial[k]).abs().max()) for s in states for k in s) / 254 * (1 + 1e-5) + 1e-7
    err = max(float((aggregate[k] - expected[k]).abs().max()) for k in expected)
    assert 0 < err <= bound, (err, bound)
    for t in strategy.history[1].uplink.values():
        assert t.codec == "int8:block=64" and t.message_bytes < 0.35 * t.uncompressed_message_bytes


def test_a_failed_client_is_left_out_and_the_others_are_averaged(task_identity):
    cfg = SMALL.replace(codecs=("raw",))
    aggregate, strategy, produced = _round(cfg, "raw", _contexts(3), fail={1})
    assert sorted(produced) == [0, 2]
    expected = peft.fedavg([produced[0][0], produced[2][0]], [produced[0][1], produced[2][1]])
    assert all(torch.equal(aggregate[k], expected[k]) for k in expected)
    assert len(strategy.history[1].dropped) == 1 and strategy.strategy.rounds[1]["aggregated"] == [0, 2]


def test_a_supernode_without_a_partition_is_told_how_to_start(task_identity):
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=5, message_type="train")
    with pytest.raises(ValueError, match='--node-config "partition-id='):
        fl_app.client_train(msg, ctx, SMALL)


def test_cgfed_without_a_model_is_trained_once_on_a_pilot_of_other_data(tmp_path, monkeypatch):
    from gradcodec.integrations.fedlora import capture, run
    from gradcodec.integrations.fedlora.model import lora_shapes

    pilots = []

    def fake_pilot(config, progress=False):  # round updates of the tiny adapter's layout
        pilots.append(config)
        g = torch.Generator().manual_seed(0)
        updates = [{k: torch.randn(shape, generator=g) for k, shape in lora_shapes("tiny").items()} for _ in range(20)]
        return {"records": [{"update": u} for u in updates]}

    monkeypatch.setattr(capture, "run_federated", fake_pilot)
    monkeypatch.setenv("GRADCODEC_CACHE", str(tmp_path))
    cfg = SMALL.replace(cgfed_ratio="1/16", tgap_rounds=3)
    spec = run.train_learned_codec("cgfed:bits=4|zstd", cfg)
    head, model_file = spec.split(",model=")
    assert head == "cgfed:bits=4" and model_file.endswith(".safetensors|zstd") and len(pilots) == 1
    model = gradcodec.get_codec(spec).model
    assert model.config.arch == "block" and model.config.ratio == 1 / 16
    assert model.training["train"]["steps"] == 0  # the PCA start alone, as train-ae does for block AEs
    (pilot,) = pilots
    assert (pilot.rounds, pilot.lora_seed) == (3, cfg.lora_seed)  # the adapter the AE will serve ...
    assert (pilot.seed, pilot.data_seed) != (cfg.seed, cfg.data_seed)  # ... but not the run's own updates
    assert run.train_learned_codec("cgfed:bits=4|zstd", cfg) == spec and len(pilots) == 1  # cached
    assert run.train_learned_codec("cgfed", cfg.replace(cgfed_ratio="1/64")) != spec.split("|")[0]
    ran = len(pilots)
    for bad in ("a lot", "2", "0"):
        with pytest.raises(ValueError, match="fraction in"):
            run.train_learned_codec("cgfed", cfg.replace(cgfed_ratio=bad))
    with pytest.raises(InvalidInput, match="whole number of latents"):  # before any pilot runs
        run.train_learned_codec("cgfed", cfg.replace(cgfed_ratio="1/3"))
    assert len(pilots) == ran  # no pilot ran for a bad ratio


# ====================================================================== Flower's simulation engine


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """raw, int8, then cgfed with an AE that TGAP trains first on a 2-round pilot; 2 rounds x 3 clients;
    partition 1 fails in round 1 (about 60 s, mostly Ray start-up)."""
    from gradcodec.integrations.fedlora.run import simulate

    out = tmp_path_factory.mktemp("fedtrain")
    cfg = SMALL.replace(codecs=("raw", "int8", "cgfed"), tgap_rounds=2, fail_partition=1, fail_round=1, out_dir=str(out))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADCODEC_CACHE", str(tmp_path_factory.mktemp("cache")))
        return simulate(cfg), out


def test_simulation_runs_every_codec_and_writes_a_record_per_round(simulated):
    result, out = simulated
    raw, int8, cgfed = result.config["codecs"]
    assert (raw, int8) == ("raw", "int8") and cgfed.startswith("cgfed:model=") and Path(cgfed[12:]).is_file()
    assert [(r["codec"], r["round"]) for r in result.records] == [(c, r) for c in (raw, int8, cgfed) for r in (0, 1, 2)]
    assert read_records(out / "rounds.jsonl") == json.loads(json.dumps(result.records))
    assert {p.name for p in out.iterdir()} >= {"rounds.jsonl", "summary.json", "table.md", "compare.png"}
    for r in result.records:
        assert r["eval_loss"] > 0 and 0 <= r["eval_accuracy"] <= 1 and r["eval_categories"]
        if r["round"]:
            assert r["uplink_message_bytes"] > r["uplink_payload_bytes"] > 0 and r["downlink_message_bytes"] > 0
            assert r["encode_s"] > 0 and r["decode_s"] > 0 and r["uncompressed_replies"] == 0
    raw = [r for r in result.records if r["codec"] == "raw"]
    assert raw[2]["eval_loss"] < raw[0]["eval_loss"]  # it trained


def test_simulation_leaves_the_failed_client_out_of_its_round_and_continues(simulated):
    result, _ = simulated
    for r in (r for r in result.records if r["round"] > 0):
        if r["round"] == 1:
            assert r["aggregated"] == [0, 2] and r["failed"] == [1]
            assert "injected failure of partition 1" in r["dropped"]["1"]
        else:
            assert r["aggregated"] == [0, 1, 2] and not r["failed"]


def test_simulation_table_compares_codecs_against_raw(simulated):
    result, out = simulated
    rows = {row["codec"].split(":")[0]: row for row in result.rows}
    assert rows["raw"]["delta_loss"] == 0 and 3.5 < rows["int8"]["compression"] < 4.5
    assert rows["cgfed"]["compression"] > 5 * rows["int8"]["compression"]  # every client encoded with the AE
    assert abs(rows["int8"]["delta_loss"]) < 0.05  # int8 with error feedback is close to lossless here
    assert result.rows == summarize(result.records)
    assert (out / "table.md").read_text().strip() == format_table(result.rows)
    assert "| `raw`¹ |" in result.table() and "| `int8` + EF¹ |" in result.table()
    assert f"| `cgfed:model={Path(result.config['codecs'][2]).name}` + EF¹ |" in result.table()  # the file, not its path
    assert "¹ some clients' replies failed" in result.table()
    summary = json.loads((out / "summary.json").read_text())
    assert FedTrainConfig().replace(**summary["config"]) == SMALL.replace(**result.config)


def test_loading_the_compare_image_gives_a_png(simulated):
    _, out = simulated
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_dp_codec_reports_epsilon_per_round_as_the_accountant_computes_it():
    from gradcodec.integrations.fedlora.app import _epsilons
    from gradcodec.integrations.fedlora.config import FedTrainConfig, learned_codec_needs_model, with_model
    from gradcodec.privacy import epsilon_per_round

    cfg = FedTrainConfig(rounds=3, num_clients=10, fraction=0.2)
    dp = gradcodec.get_codec("dp:clip=1.0,noise=1.0|int8").prepass
    assert _epsilons(dp, cfg) == epsilon_per_round(1.0, 0.2, 3, 1e-5)
    assert _epsilons(gradcodec.get_codec("int8").prepass, cfg) == []
    assert learned_codec_needs_model("dp:clip=1.0,noise=1.0|cgfed") and not learned_codec_needs_model("dp:clip=1.0,noise=1.0|int8")
    assert with_model("dp:clip=1.0,noise=1.0|cgfed", "/m/ae.safetensors") == "dp:clip=1.0,noise=1.0|cgfed:model=/m/ae.safetensors"


@pytest.mark.slow
def test_the_in_process_loop_gives_the_flower_apps_run(tmp_path, monkeypatch):
    """The TGAP pilot's in-process FedAvg loop (capture.run_federated) and the Flower app, raw, same
    settings: the same held-out loss after every round (about 60 s, mostly Ray start-up)."""
    from gradcodec.integrations.fedlora.capture import run_federated
    from gradcodec.integrations.fedlora.run import capture_config, simulate

    monkeypatch.setenv("GRADCODEC_CACHE", str(tmp_path / "cache"))
    cfg = SMALL.replace(codecs=("raw",), num_clients=4, fraction=0.5, rounds=3, out_dir=str(tmp_path / "run"))
    app = [r["eval_loss"] for r in simulate(cfg).records if r["round"] > 0]
    loop = [h["eval_loss"] for h in run_federated(capture_config(cfg, eval_examples=cfg.eval_examples))["history"]]
    assert loop == pytest.approx(app, rel=1e-4)


@pytest.mark.parametrize("model, rank, targets, arch", [
    ("tiny", 8, "q_proj,k_proj,v_proj,o_proj", "block"),
    ("tiny", 32, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "block"),
    ("llama-3.2-1b", 16, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "shared"),   # block: 12.35 G weights
    ("llama-2-7b", 8, "q_proj,k_proj,v_proj,o_proj", "shared"),
])
def test_tgap_fits_the_shared_ae_where_the_block_ae_would_not_fit(model, rank, targets, arch):
    from gradcodec.integrations.fedlora.model import lora_shapes
    from gradcodec.integrations.fedlora.run import _arch_for
    from gradcodec.learned import AEConfig, CanvasLayout

    layout = CanvasLayout.for_shapes(lora_shapes(model, rank, tuple(targets.split(","))))
    assert _arch_for(AEConfig.block(layout, 1 / 64), layout) == arch
