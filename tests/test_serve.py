"""lit_cascades.serving and recipes.serve, tested as a client would: a real server on localhost (its own
process, two inference workers and two API servers), 500 requests from 8 concurrent HTTP clients compared with
``Cascade.predict``, the live stats against the requests sent and the calibrated bound, bad requests, and a clean
shutdown; the request parser on its own; the recipe's argument errors and its run= path."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binom

from lit_cascades.cascade import Cascade
from lit_cascades.data import ImageClassificationDataModule
from lit_cascades.models import MLP
from lit_cascades.serving import BadRequest, ClassificationAdapter, ServingStats, clopper_pearson_interval

ROOT = Path(__file__).resolve().parents[1]
TARGET, CONFIDENCE = 0.2, 0.95
N_REQUESTS, N_CLIENTS = 500, 8
STARTUP_S = 150  # LitServe spawns workers that import torch: ~15-40 s on 2 busy cores


def _spec(dm: ImageClassificationDataModule, hidden: list[int]) -> dict:
    return {"_target_": "lit_cascades.models.MLP", "in_shape": list(dm.input_shape), "num_classes": dm.num_classes,
            "hidden": hidden}


def _fit(dm: ImageClassificationDataModule, hidden: list[int], steps: int) -> MLP:
    torch.manual_seed(0)
    model = MLP(dm.input_shape, dm.num_classes, hidden=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = dm.splits["train"].x, dm.splits["train"].y
    for _ in range(steps):  # full-batch: a second or two on digits
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits() -> ImageClassificationDataModule:
    dm = ImageClassificationDataModule(source="digits")
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def saved_cascade(digits, tmp_path_factory) -> tuple[Cascade, Path]:
    """A digits cascade (small MLP ~87% accurate, large ~97%), Clopper–Pearson-calibrated on the val split."""
    cascade = Cascade(_fit(digits, [8], 40), _fit(digits, [64, 64], 150), small_spec=_spec(digits, [8]),
                      large_spec=_spec(digits, [64, 64]))
    cascade.calibrate(digits.predict_dataloader("val"), TARGET, confidence=CONFIDENCE, method="clopper_pearson")
    return cascade, cascade.save(tmp_path_factory.mktemp("serve") / "cascade")


# --------------------------------------------------------------------------------------------------------
# the parts, without a server
# --------------------------------------------------------------------------------------------------------
def test_parse_accepts_nested_and_flat_rows_and_names_what_is_wrong(saved_cascade, digits):
    adapter = ClassificationAdapter(saved_cascade[0], max_rows=4)
    x = digits.splits["test"].x[:3]
    assert np.array_equal(adapter.parse({"inputs": x.tolist()}), x.numpy())
    assert np.array_equal(adapter.parse({"inputs": x.reshape(3, -1).tolist()}), x.numpy())
    assert adapter.parse({"inputs": [[1] * 64]}).dtype == np.float32  # ints read as floats
    bad = {
        "request: expected a JSON object": [[0.0] * 64],
        "request: unknown keys \\['x'\\]": {"inputs": [[0.0] * 64], "x": 1},
        "inputs: expected a list of rows; got dict": {"inputs": {"a": 1}},
        "inputs: empty": {"inputs": []},
        "inputs\\[1\\]: expected 64 numbers, flat or nested as \\[1, 8, 8\\]; got shape \\[63\\]":
            {"inputs": [[0.0] * 64, [0.0] * 63]},
        "inputs\\[0\\]: expected 64 numbers.*shape \\[2, 32\\]": {"inputs": [[[0.0] * 32] * 2]},
        "inputs\\[0\\]: expected 64 numbers.*inhomogeneous": {"inputs": [[[0.0] * 32, [0.0] * 31]]},
        "inputs\\[0\\]: expected numbers; found \"a\" \\(str\\)": {"inputs": [[0.0] * 63 + ["a"]]},
        "inputs\\[0\\]: expected numbers; found true \\(bool\\)": {"inputs": [[True] * 64]},
        "inputs\\[0\\]: expected numbers; found null": {"inputs": [[None] * 64]},
        "inputs\\[0\\]: expected finite numbers \\(float32 range\\); value 5 is nan":
            {"inputs": [[0.0] * 5 + [math.nan] * 59]},
        "inputs\\[0\\]: expected finite numbers \\(float32 range\\); value 0 is 1e\\+39": {"inputs": [[1e39] * 64]},
    }
    for pattern, payload in bad.items():
        with pytest.raises(BadRequest, match=f"^{pattern}") as err:
            adapter.parse(payload)
        assert err.value.status == 422, pattern
    with pytest.raises(BadRequest, match="^inputs: 5 rows; this server takes at most 4") as err:
        adapter.parse({"inputs": [[0.0] * 64] * 5})
    assert err.value.status == 413
    with pytest.raises(ValueError, match="^cascade: not calibrated"):
        ClassificationAdapter(Cascade(MLP((1, 8, 8), 10), MLP((1, 8, 8), 10)))


def test_adapter_run_splits_one_predict_call_per_batch(saved_cascade, digits):
    cascade = saved_cascade[0]
    adapter = ClassificationAdapter(cascade)
    x = digits.splits["test"].x[:10]
    result = adapter.run([x[:3].numpy(), x[3:4].numpy(), x[4:].numpy()])
    want = cascade.predict(x)
    assert [len(r["outputs"]) for r in result.responses] == [3, 1, 6]
    rows = [o for r in result.responses for o in r["outputs"]]
    assert [o["prediction"] for o in rows] == want.predictions.tolist()
    assert result.deferred == want.deferred.tolist() == [o["deferred"] for o in rows]
    assert result.large_calls == int(want.deferred.any())


def test_stats_counters_and_percentiles_by_hand():
    stats = ServingStats(window=4)
    for status, sec in [(200, 0.1), (200, 0.3), (422, 9.0), (200, 0.2), (500, 9.0), (200, 0.4), (200, 0.5)]:
        stats.record_request(status, sec)
    stats.record_batch(3, [True, False, False, True], large_calls=1)
    stats.record_batch(1, [False], large_calls=0)
    snap = stats.snapshot()
    assert (snap["requests"], snap["ok"], snap["client_errors"], snap["server_errors"]) == (7, 5, 1, 1)
    assert (snap["rows"], snap["deferred_rows"], snap["large_model_calls"], snap["batches"]) == (5, 2, 1, 2)
    assert snap["deferral_rate"] == 0.4 and snap["mean_batch_requests"] == 2.0
    # window 4 keeps the last four ok latencies: 0.3, 0.2, 0.4, 0.5 (ms in the snapshot)
    assert snap["latency_ms"]["count"] == 4
    assert snap["latency_ms"]["p50"] == pytest.approx(np.percentile([300, 200, 400, 500], 50))
    assert snap["latency_ms"]["p99"] == pytest.approx(np.percentile([300, 200, 400, 500], 99))
    lo, hi = clopper_pearson_interval(2, 5)  # exact binomial tails at the limits
    assert binom.sf(1, 5, lo) == pytest.approx(0.025) and binom.cdf(2, 5, hi) == pytest.approx(0.025)


# --------------------------------------------------------------------------------------------------------
# the server, as a client sees it
# --------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def server(saved_cascade, tmp_path_factory):
    """``python -m recipes.serve cascade=<dir>`` with 2 inference workers (so 2 API servers) on a free port."""
    import httpx

    port = _free_port()
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "recipes.serve", f"cascade={saved_cascade[1]}",
                                 f"port={port}", "max_batch_size=8", "batch_timeout=0.01", "workers=2",
                                 "accelerator=cpu"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server not healthy after {STARTUP_S} s:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        children = _descendants(proc.pid)
        yield url, proc, children, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _load(url: str, x: torch.Tensor, seed: int = 0) -> tuple[list[tuple[list[int], dict]], list[int]]:
    """``N_REQUESTS`` good requests of 1-4 random test rows (nested or flat) from ``N_CLIENTS`` threads, with 40
    bad requests mixed in (they must not spoil the good ones batched with them); returns (rows, answer) pairs
    and the bad requests' status codes."""
    import httpx

    rng = random.Random(seed)
    jobs: list[tuple[str, list[int] | bytes]] = []
    for i in range(N_REQUESTS):
        jobs.append(("good", [rng.randrange(len(x)) for _ in range(rng.randint(1, 4))]))
        if i % 12 == 5:
            jobs.append(("bad", json.dumps({"inputs": [[0.0] * 10]}).encode() if i % 24 == 5 else b"{oops"))
    answers: list[tuple[list[int], dict]] = []
    bad_status: list[int] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            for kind, job in jobs[k::N_CLIENTS]:
                if kind == "bad":
                    r = c.post("/predict", content=job)
                    with lock:
                        bad_status.append(r.status_code)
                    continue
                rows = x[job]
                body = rows.tolist() if len(job) % 2 else rows.reshape(len(job), -1).tolist()
                r = c.post("/predict", json={"inputs": body})
                assert r.status_code == 200, r.text
                with lock:
                    answers.append((job, r.json()))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(N_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "clients did not finish in 300 s"
    return answers, bad_status


@pytest.mark.slow
def test_served_answers_equal_predict_and_stats_add_up(server, saved_cascade, digits):
    import httpx

    url, _, children, _ = server
    cascade = saved_cascade[0]
    x = digits.splits["test"].x
    want = cascade.predict(x)  # the oracle: the same cascade, in this process, on the same rows
    answers, bad_status = _load(url, x)
    assert len(answers) == N_REQUESTS and len(bad_status) == 42
    assert all(s in (400, 422) for s in bad_status)

    n_rows = n_deferred = near_threshold = 0
    for job, body in answers:
        outs = body["outputs"]
        assert len(outs) == len(job)
        for i, o in zip(job, outs):
            n_rows += 1
            n_deferred += o["deferred"]
            assert o["score"] == pytest.approx(float(want.scores[i]), rel=1e-5, abs=1e-6)
            if abs(float(want.scores[i]) - cascade.threshold) < 1e-6:  # a float-noise tie could go either way
                near_threshold += 1
                continue
            assert o["deferred"] == bool(want.deferred[i])
            assert o["prediction"] == int(want.predictions[i])
            assert o["calls"] == 1 + o["deferred"]
            assert o["seconds"] > 0
    assert near_threshold <= 2

    stats = httpx.get(f"{url}/stats", timeout=10).json()
    assert stats["requests"] == N_REQUESTS + len(bad_status)  # counted by two API server processes
    assert stats["ok"] == N_REQUESTS and stats["client_errors"] == len(bad_status) and stats["server_errors"] == 0
    assert stats["rows"] == n_rows and stats["deferred_rows"] == n_deferred  # counted by two inference workers
    assert stats["deferral_rate"] == pytest.approx(n_deferred / n_rows)
    assert stats["batched_requests"] == N_REQUESTS
    assert 1 <= stats["large_model_calls"] <= stats["batches"] < N_REQUESTS  # dynamic batching happened
    lat = stats["latency_ms"]
    assert lat["count"] == N_REQUESTS and 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    cal = stats["calibration"]
    assert cal["method"] == "clopper_pearson" and cal["target_rate"] == TARGET and cal["bound"] <= TARGET
    assert stats["threshold"] == pytest.approx(cascade.threshold)

    # the calibrated bound on fresh data: the 359 held-out test rows do not reject "true rate <= bound"
    # (one-sided binomial test at level 0.001), and the live rate of the served rows says the same
    k, n = int(want.deferred.sum()), len(x)
    assert binom.sf(k - 1, n, cal["bound"]) > 1e-3, (k, n, cal["bound"])
    assert not stats["above_bound"]
    assert binom.sf(n_deferred - 1, n_rows, cal["bound"]) > 1e-3 or n_deferred / n_rows <= cal["bound"]
    assert all(_alive(pid) for pid in children)


@pytest.mark.slow
def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(server, saved_cascade, digits):
    import httpx

    url = server[0]
    x = digits.splits["test"].x[:2]
    cases = {
        "not JSON": (b"{not json", 400, "request: the body is not valid JSON"),
        "empty body": (b"", 400, "request: the body is not valid JSON"),
        "wrong shape": (json.dumps({"inputs": [[0.0] * 63]}).encode(), 422, "inputs[0]: expected 64 numbers"),
        "wrong type": (json.dumps({"inputs": [["0.5"] * 64]}).encode(), 422, "inputs[0]: expected numbers"),
        "not a list": (json.dumps({"inputs": 3}).encode(), 422, "inputs: expected a list of rows"),
        "wrong key": (json.dumps({"rows": [[0.0] * 64]}).encode(), 422, "request: expected a JSON object"),
        "empty": (json.dumps({"inputs": []}).encode(), 422, "inputs: empty"),
        "NaN": (("{\"inputs\": [[" + ", ".join(["NaN"] * 64) + "]]}").encode(), 422, "inputs[0]: expected finite"),
        "too many rows": (json.dumps({"inputs": [[0.0] * 64] * 257}).encode(), 413, "inputs: 257 rows"),
        "too large": (b"[" + b"0," * (5 << 20) + b"0]", 413, "request: body larger than"),
    }
    with httpx.Client(base_url=url, timeout=60) as c:
        for name, (body, status, message) in cases.items():
            r = c.post("/predict", content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, (name, r.status_code, r.text[:200])
            assert r.json()["detail"].startswith(message), (name, r.text[:200])
        r = c.post("/predict", json={"inputs": x.tolist()})
        assert r.status_code == 200
        assert [o["prediction"] for o in r.json()["outputs"]] == saved_cascade[0].predict(x).predictions.tolist()


@pytest.mark.slow
def test_server_shuts_down_cleanly(server):
    """Runs last in this module: SIGTERM stops the server and every process it started."""
    _, proc, children, log = server
    assert len(children) >= 4  # 2 inference workers, 2 API servers (and multiprocessing helpers)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in children if _alive(pid)]
    assert not left, f"processes left after shutdown: {left}"


# --------------------------------------------------------------------------------------------------------
# recipes.serve
# --------------------------------------------------------------------------------------------------------
def _error_of(argv: list[str], capsys) -> str:
    from recipes.serve import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_recipe_argument_errors(saved_cascade, tmp_path, capsys):
    fake_run = tmp_path / "run"
    fake_run.mkdir()
    (fake_run / "config.yaml").write_text("seed: 0\n")
    casc = saved_cascade[1]
    run = f"run={fake_run}"
    lm_run = tmp_path / "lm_run"
    lm_run.mkdir()
    (lm_run / "config.yaml").write_text("seed: 0\n")
    (lm_run / "run.json").write_text(json.dumps({"recipe": "lm_cascade"}))
    cases = {
        "error: run: give exactly one of run=<run dir>": [],
        "error: run: give exactly one": [run, f"cascade={casc}"],
        f"error: run: no config.yaml in {tmp_path}": [f"run={tmp_path}", "target_rate=0.2"],
        "error: target_rate: required with run=": [run],
        "error: target_rate: expected a deferral rate in [0, 1]; got 1.5": [run, "target_rate=1.5"],
        "error: target_rate: expected a number; got 'lots'": [run, "target_rate=lots"],
        "error: method: expected one of ['quantile', 'conformal', 'clopper_pearson']; got 'magic'":
            [run, "target_rate=0.2", "method=magic"],
        "error: confidence: expected a level in (0, 1)": [run, "target_rate=0.2", "confidence=1.5"],
        "error: confidence: only method=clopper_pearson takes": [run, "target_rate=0.2", "method=conformal",
                                                                 "confidence=0.9"],
        "error: split: the models were fitted on 'train'": [run, "target_rate=0.2", "split=train"],
        "error: run: its config.yaml has no 'data' section": [run, "target_rate=0.2"],
        "error: run: a lm_cascade run: calibrate its GenerationCascade": [f"run={lm_run}", "target_rate=0.2"],
        "error: target_rate: applies to run=<run dir>": [f"cascade={casc}", "target_rate=0.2"],
        f"error: cascade: no cascade.json in {tmp_path}": [f"cascade={tmp_path}"],
        "error: bogus: unknown key; valid keys: run, cascade": [f"cascade={casc}", "bogus=1"],
        "error: port: expected a port in [1024, 65535]; got 80": [f"cascade={casc}", "port=80"],
        "error: port: expected an integer; got 'http'": [f"cascade={casc}", "port=http"],
        "error: host: expected one of": [f"cascade={casc}", "host=10.1.2.3"],
        "error: max_batch_size: expected an integer >= 1; got 0": [f"cascade={casc}", "max_batch_size=0"],
        "error: batch_timeout: expected seconds >= 0": [f"cascade={casc}", "batch_timeout=-1"],
        "error: serve: expected true or false; got 'maybe'": [f"cascade={casc}", "serve=maybe"],
        "error: serve: serve=false does nothing without save=<dir>": [f"cascade={casc}", "serve=false"],
        "error: expected key=value, got 'oops'": [f"cascade={casc}", "oops"],
    }
    for message, argv in cases.items():
        assert _error_of(argv, capsys).startswith(message), (argv, message)


@pytest.mark.slow
def test_recipe_exit_status_from_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "recipes.serve", f"cascade={tmp_path}"], cwd=ROOT, timeout=120,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == f"error: cascade: no cascade.json in {tmp_path}; expected a " \
                                                     "directory written by Cascade.save"


@pytest.mark.slow
def test_recipe_calibrates_a_gatekeeper_run_on_its_val_split(tmp_path, capsys):
    """run= path: the saved cascade equals Cascade.from_run calibrated by hand on the run's val split."""
    from omegaconf import OmegaConf

    from lit_cascades.runner import build, run_recipe
    from recipes.gatekeeper import run as gatekeeper
    from recipes.serve import main

    out = tmp_path / "run"
    run_recipe("gatekeeper", gatekeeper, ["preset=smoke", f"output_dir={out}", "logger.wandb=false",
                                          "baseline.enabled=false"])
    main([f"run={out}", "target_rate=0.3", f"save={tmp_path / 'deploy'}", "serve=false"])
    printed = capsys.readouterr().out
    saved = Cascade.load(tmp_path / "deploy")

    cfg = OmegaConf.load(out / "config.yaml")
    dm = build(cfg.data, "data", seed=cfg.seed)
    dm.setup()
    by_hand = Cascade.from_run(out)
    rep = by_hand.calibrate(dm.predict_dataloader("val"), 0.3, confidence=0.95, method="clopper_pearson")
    assert saved.threshold == rep.threshold and saved.calibration.n == len(dm.splits["val"])
    assert saved.calibration.bound == pytest.approx(rep.bound) and saved.source["calibration_split"] == "val"
    assert f"clopper_pearson on {rep.n} rows" in printed and "guarantee: with probability >= 0.95" in printed
    test = dm.splits["test"].x
    assert torch.equal(saved.predict(test).predictions, by_hand.predict(test).predictions)

    assert _error_of([f"run={out}", "target_rate=0.3", "small_stage=nope", "serve=false",
                      f"save={tmp_path / 'x'}"], capsys).startswith(f"error: small_stage: no weights at {out}/nope")
    assert _error_of([f"run={out}", "target_rate=0.3", "split=holdout", "serve=false", f"save={tmp_path / 'x'}"],
                     capsys).startswith("error: split: the run's data has splits ['test', 'train', 'val']")


# --------------------------------------------------------------------------------------------------------
# a generation cascade behind the same server (lit_cascades.cascade_lm.GenerationAdapter)
# --------------------------------------------------------------------------------------------------------
PROMPTS = ["import os", "def f(x):\n    return x", "class A:", "x = [1, 2, 3]", "for i in range(3):",
           "print('hi')", "with open(path) as fh:", "if __name__ == '__main__':", "return None", "# a comment",
           "try:\n    pass", "y = {}"]


@pytest.mark.slow
def test_a_generation_cascade_is_served_with_the_same_endpoints(tmp_path):
    """Tiny random GPT-2 / Llama pair on a tokenizer trained in a second: served texts and deferrals equal
    ``GenerationCascade.generate`` on the same prompts; /stats counts prompts; a bad request gets a 422."""
    import httpx
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_cascades.cascade_lm import GenerationCascade
    from lit_cascades.data.lm import stdlib_files, train_bpe_tokenizer
    from lit_cascades.models.lm_pair import build_causal_lm, gpt2_config

    tok = train_bpe_tokenizer([p.read_text() for p in stdlib_files()[:4]], vocab_size=300, progress=False)
    torch.manual_seed(0)
    small = build_causal_lm(gpt2_config(len(tok), n_layer=1, n_embd=16, n_head=2, n_positions=96,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    torch.manual_seed(1)
    large = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=96, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id))
    cascade = GenerationCascade(small, large, tok, rule="chow_average", max_new_tokens=5)
    cascade.calibrate(PROMPTS, 0.5, method="conformal")
    saved = cascade.save(tmp_path / "lm")
    cascade = GenerationCascade.load(saved)
    want = cascade.generate(PROMPTS)
    assert 0 < int(want.deferred.sum()) < len(PROMPTS)  # both models answer some prompts

    port = _free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "recipes.serve", f"cascade={saved}", f"port={port}",
                                 "max_batch_size=4", "batch_timeout=0.02", "accelerator=cpu"], cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        children = _descendants(proc.pid)
        rng = random.Random(0)
        jobs = [[rng.randrange(len(PROMPTS)) for _ in range(rng.randint(1, 3))] for _ in range(24)]
        answers: list[tuple[list[int], dict]] = []

        def client(k: int) -> None:
            with httpx.Client(base_url=url, timeout=120) as c:
                for job in jobs[k::4]:
                    r = c.post("/predict", json={"inputs": [PROMPTS[i] for i in job]})
                    assert r.status_code == 200, r.text
                    answers.append((job, r.json()))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert len(answers) == len(jobs)
        for job, body in answers:
            for i, o in zip(job, body["outputs"], strict=True):
                if abs(float(want.scores[i]) - cascade.threshold) < 1e-5:
                    continue  # a float-noise tie with the threshold could go either way
                assert o["deferred"] == bool(want.deferred[i]) and o["text"] == want.texts[i], (i, o)
                assert o["score"] == pytest.approx(float(want.scores[i]), rel=1e-4, abs=1e-5)
        r = httpx.post(f"{url}/predict", json={"inputs": ["ok", 3]}, timeout=30)
        assert r.status_code == 422 and r.json()["detail"].startswith("inputs[1]: expected a string")
        stats = httpx.get(f"{url}/stats", timeout=30).json()
        assert stats["task"] == "generation" and stats["rows"] == sum(map(len, jobs))
        assert stats["deferred_rows"] == sum(o["deferred"] for _, b in answers for o in b["outputs"])
        assert stats["client_errors"] == 1 and stats["calibration"]["method"] == "conformal"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    assert proc.returncode == 0
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if _alive(pid)]


@pytest.mark.slow
def test_importing_the_serving_module_stays_light():
    code = ("import sys, lit_cascades.serving as s; "
            "assert not {'litserve', 'fastapi', 'uvicorn', 'torch', 'lightning'} & set(sys.modules), sys.modules.keys(); "
            "s.CascadeAPI; assert 'litserve' in sys.modules and s.CascadeAPI.__module__ == 'lit_cascades.serving'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=ROOT)


def test_request_inputs_checks_the_envelope_with_the_callers_nouns():
    from lit_cascades.serving import request_inputs

    assert request_inputs({"inputs": ["a", "b"]}, 2, "prompt", "prompts", "prompt strings") == ["a", "b"]
    for payload, limit, status, msg in [
        (["a"], 2, 422, 'expected a JSON object {"inputs": [prompt, ...]}; got list'),
        ({"input": 1}, 2, 422, "got an object with keys ['input']"),
        ({"inputs": "a"}, 2, 422, "inputs: expected a list of prompt strings; got str"),
        ({"inputs": []}, 2, 422, "inputs: empty; expected 1 to 2 prompts"),
        ({"inputs": ["a"] * 3}, 2, 413, "inputs: 3 prompts; this server takes at most 2 per request"),
    ]:
        with pytest.raises(BadRequest, match=re.escape(msg)) as err:
            request_inputs(payload, limit, "prompt", "prompts", "prompt strings")
        assert err.value.status == status, msg
