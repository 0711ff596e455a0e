"""torchws sweep: the grid, the results file, and tiny sweeps end to end (trainer processes, resume, a kill, an image
folder the project does not ship), with report and analyze on their output."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures_data import write_image

from torchws.cli import main
from torchws.experiments import (
    ExperimentError,
    append_record,
    choose_base_lrs,
    grid_runs,
    read_results,
    repair_torn_tail,
    resolve_grid,
    search_runs,
)
from torchws.experiments.selection import search_decision, search_ladder
from torchws.experiments.sweep import available_cpus, threads_per_job

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--dataset", "digits", "--epochs", "1", "--train-images", "48", "--eval-images", "32", "--search-batch", "4",
        "--jobs", "1", "--threads", "1", "--search-extend", "0"]  # fmt: skip


JOBS = min(2, available_cpus())  # two trainer processes of one thread each where two CPUs allow


# --- the grid --------------------------------------------------------------------------------------------------
def test_default_grid_covers_the_issue_and_orders_seed_by_seed():
    spec = resolve_grid("default")
    assert spec.setups == ("bn", "gn", "gn_ws", "bn_ws", "bcn_est_ws", "ln_ws")
    assert spec.batches == (1, 2, 4, 8, 16, 32, 64, 128) and len(spec.seeds) >= 3 and spec.size() == 144
    runs = grid_runs(spec)
    assert len(runs) == 144 and [r.seed for r in runs[:48]] == [0] * 48  # every cell of seed 0 comes first
    assert len({r.run_id for r in runs}) == 144
    search = search_runs(spec)
    assert {(r.batch, r.seed) for r in search} == {(8, 100)} and len(search) == 6 * len(spec.search_lrs)


def test_fingerprint_is_the_protocol_only():
    base = resolve_grid("default")
    assert resolve_grid("default", seeds=[0, 1, 2, 3], setups=["gn"], data_dir="/x").fingerprint() == \
        base.fingerprint()  # fmt: skip
    assert resolve_grid("default", epochs=5).fingerprint() != base.fingerprint()
    assert resolve_grid("default", search_lrs=[0.1, 0.2]).fingerprint() != base.fingerprint()


@pytest.mark.parametrize("overrides,message", [
    ({"setups": ["gn", "group_norm"]}, "unknown setup 'group_norm'; valid setups: bn, gn, gn_ws"),
    ({"batches": [2, 2]}, "--batches: give one or more distinct values"),
    ({"seeds": [0, 100]}, "--search-seed 100 is also one of --seeds"),
    ({"search_lrs": [0.1, -1.0]}, "--search-lrs > 0"),
])  # fmt: skip
def test_bad_grid_values(overrides, message):
    with pytest.raises(ExperimentError, match=message):
        resolve_grid("default", **overrides)
    with pytest.raises(ExperimentError, match="unknown grid 'huge'"):
        resolve_grid("huge")


def search_record(setup: str, lr: float, acc: float) -> dict:
    return {"grid": "g", "kind": "search", "run_id": f"{setup}{lr}", "setup": setup, "batch": 8, "seed": 100,
            "base_lr": lr, "final_test_acc": acc, "history": []}  # fmt: skip


def test_lr_choice_best_accuracy_ties_to_smaller_missing_waits():
    spec = resolve_grid("default", setups=["gn", "gn_ws", "bn"], search_lrs=[0.1, 0.4, 1.6], search_extend=0)
    records = [
        search_record("gn", 0.1, 70.0),
        search_record("gn", 0.4, 75.0),
        search_record("gn", 1.6, 75.0),
        search_record("gn_ws", 0.1, 60.0),
        search_record("gn_ws", 0.4, math.nan),
        search_record("gn_ws", 1.6, 59.0),
        search_record("bn", 0.1, 80.0),
        search_record("bn", 0.4, 90.0),
    ]
    assert choose_base_lrs(records, spec) == {"gn": 0.4, "gn_ws": 0.1}  # bn still lacks 1.6


def test_lr_search_extends_while_the_best_is_at_an_edge():
    spec = resolve_grid("default", search_lrs=[0.2, 0.4, 0.8], search_extend=2)
    assert search_ladder(spec) == (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
    rising = lambda lr: 80.0 + lr  # noqa: E731  (always better with a larger lr)
    assert search_decision({}, spec) == (None, [0.2, 0.4, 0.8])
    assert search_decision({lr: rising(lr) for lr in (0.2, 0.4, 0.8)}, spec) == (None, [1.6])
    assert search_decision({lr: rising(lr) for lr in (0.2, 0.4, 0.8, 1.6)}, spec) == (None, [3.2])
    assert search_decision({lr: rising(lr) for lr in (0.2, 0.4, 0.8, 1.6, 3.2)}, spec) == (3.2, [])  # range end
    peaked = {0.2: 70.0, 0.4: 71.0, 0.8: 75.0, 1.6: 74.0}
    assert search_decision(peaked, spec) == (0.8, [])  # 1.6 was tried and lost: the best is inside
    falling = {0.2: 80.0, 0.4: 70.0, 0.8: 60.0}
    assert search_decision(falling, spec) == (None, [0.1])
    assert search_decision({**falling, 0.1: 80.0}, spec) == (None, [0.05])  # a tie goes to the smaller lr, an edge
    assert search_decision({**falling, 0.1: 80.0, 0.05: 70.0}, spec) == (0.1, [])
    assert search_decision({**falling, 0.1: 79.0}, spec) == (0.2, [])  # a worse extension stops the search
    assert search_decision({0.2: 80.0, 0.4: 80.0, 0.8: 80.0, 0.1: 80.0, 0.05: 80.0}, spec) == (0.05, [])


# --- the results file ------------------------------------------------------------------------------------------
def test_append_read_and_repair_a_torn_tail(tmp_path):
    path = tmp_path / "r.jsonl"
    first, second = search_record("gn", 0.1, 70.0), search_record("gn", 0.4, 71.0)
    append_record(path, first)
    append_record(path, second)
    assert read_results(path) == [first, second]
    complete = path.read_bytes()
    with open(path, "a") as f:
        f.write('{"grid": "g", "kind": "se')  # a kill in the middle of a write
    with pytest.raises(ExperimentError, match=r"r\.jsonl:3: the last line is truncated"):
        read_results(path)
    assert repair_torn_tail(path) and path.read_bytes() == complete
    assert not repair_torn_tail(path)
    path.write_bytes(complete.rstrip(b"\n"))  # a complete record without its newline is kept
    assert read_results(path) == [first, second]


# --- sweeps end to end -----------------------------------------------------------------------------------------
def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def git_head() -> str | None:
    try:
        return subprocess.run(["git", "-C", SRC, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def test_sweep_report_analyze_end_to_end(tmp_path, capsys):
    out, results = tmp_path / "sweep", tmp_path / "sweep/results.jsonl"
    argv = ["sweep", *TINY, "--setups", "bn", "gn_ws", "--batches", "2", "4", "--seeds", "0", "1", "--search-lrs",
            "0.2", "0.8", "--max-steps", "3", "--out-dir", str(out), "--jobs", str(JOBS)]  # fmt: skip
    assert main(argv) == 0
    records = records_of(results)
    assert [r["kind"] for r in records] == ["search"] * 4 + ["grid"] * 8
    search = {(r["setup"], r["base_lr"]): r["final_test_acc"] for r in records if r["kind"] == "search"}
    for r in records:
        assert r["steps"] == 3 and r["config"]["batch_size"] == r["batch"] and r["config"]["seed"] == r["seed"]
        assert r["threads"] == 1 and r["jobs"] == JOBS and r["command"].startswith("torchws sweep --dataset digits")
        assert len(r["history"]) == 1 and r["final_test_acc"] == r["history"][-1]["test_acc"]
        assert r["wall_s"] > 0 and r["images_per_s"] > 0 and r["commit"] == git_head()
        if r["kind"] == "grid":  # the searched lr (best accuracy, ties to the smaller), scaled by images per step
            want = max([0.2, 0.8], key=lambda lr: search[(r["setup"], lr)])
            assert r["base_lr"] == want and r["peak_lr"] == pytest.approx(want * r["batch"] / 256)
    before = results.read_bytes()
    capsys.readouterr()
    assert main(argv) == 0  # everything is done: nothing runs, nothing is appended
    assert "0 grid runs to do" in capsys.readouterr().out and results.read_bytes() == before

    report = tmp_path / "docs/results.md"
    assert main(["report", str(results), "--out", str(report), "--figures", str(tmp_path / "docs/figures"),
                 "--runs-dir", str(out / "runs")]) == 0  # fmt: skip
    text = report.read_text()
    trained = text.split("## Smoothness of the trained models at 2 images per step", 1)[1]
    assert re.search(r"\| GN\+WS \| 2 \| [0-9.e+-]+ ± ", trained)
    assert re.search(r"\| BN \| 2 \| .* \| - \| - \|", trained)  # no WS layers: no kept fraction, no ratio
    assert "Complete: 8 of 8 grid runs" in text and (tmp_path / "docs/figures/sweep_accuracy.png").exists()
    accs = [r["final_test_acc"] for r in records if r["kind"] == "grid" and r["setup"] == "gn_ws" and r["batch"] == 2]
    mean, std = sum(accs) / 2, abs(accs[0] - accs[1]) / math.sqrt(2)
    assert f"| GN+WS | {mean:.2f} ± {std:.2f} (2) |" in text

    checkpoint = next(out.glob("runs/*/gn_ws_b2_s0/last.pt"))
    assert main(["analyze", str(checkpoint), "--batch", "8", "--json", str(tmp_path / "a.json")]) == 0
    analysis = json.loads((tmp_path / "a.json").read_text())
    assert analysis["micro_batch"] == 2 and len(analysis["layers"]) == 9  # the 9 WS convs of ResNet-8
    assert all(0 < row["kept_fraction"] <= 1 and row["grad_norm_ratio"] > 0 for row in analysis["layers"])
    assert "layer3.0.downsample.0" in capsys.readouterr().out


def wait_for(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def test_killed_sweep_continues_where_it_stopped(tmp_path):
    out = tmp_path / "sweep"
    argv = [
        sys.executable,
        "-m",
        "torchws",
        "sweep",
        *TINY,
        "--train-images",
        "1024",
        "--epochs",
        "3",
        "--setups",
        "gn",
        "--batches",
        "2",
        "--seeds",
        "0",
        "1",
        "--search-lrs",
        "0.4",
        "--out-dir",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": SRC}
    sweep = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = out / "results.jsonl"
    wait_for(lambda: results.exists() and len(results.read_text().splitlines()) == 1)  # the search run is recorded
    logs = lambda: [p for p in out.glob("runs/*/gn_b2_s0/train.log") if "training" in p.read_text()]  # noqa: E731
    wait_for(lambda: bool(logs()))  # the first grid run is training
    sweep.send_signal(signal.SIGTERM)
    assert sweep.wait(timeout=60) == 143
    killed = logs()[0].parent
    assert (killed / "last.pt").exists() and not (killed / "summary.json").exists()
    assert len(results.read_text().splitlines()) == 1
    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    records = records_of(results)
    assert [r["run_id"] for r in records] == ["search_gn_b4_lr0.4_s100", "gn_b2_s0", "gn_b2_s1"]
    assert all(r["steps"] == 3 * 512 for r in records[1:])  # 1024 images / 2 per step x 3 epochs, resumed or not
    assert (killed / "train.log").read_text().count("training cifar_resnet8_gn") == 2  # started, then resumed


def test_image_folder_the_project_does_not_ship(tmp_path, capsys):
    root = tmp_path / "shapes"
    for split, count in (("train", 6), ("val", 3)):
        for label, color in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            for i in range(count):
                write_image(root / split / label / f"{i}.png", 12 + i, 10 + i, color)
    out = tmp_path / "sweep"
    argv = ["sweep", "--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "8", "--setups", "gn_ws",
            "--batches", "2", "--seeds", "0", "--search-lrs", "0.4", "--search-batch", "2", "--search-extend", "0",
            "--epochs", "1", "--out-dir", str(out), "--jobs", "1", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    records = records_of(out / "results.jsonl")
    assert [r["steps"] for r in records] == [6, 6] and records[0]["protocol"]["train_images"] is None
    assert main(["report", str(out / "results.jsonl"), "--out", str(tmp_path / "r.md"), "--figures",
                 str(tmp_path / "f"), "--smoothness", "none"]) == 0  # fmt: skip
    assert "every image of train/" in (tmp_path / "r.md").read_text()
    checkpoint = next(out.glob("runs/*/gn_ws_b2_s0/last.pt"))
    assert main(["analyze", str(checkpoint), "--batch", "4", "--json", str(tmp_path / "a.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["dataset"] == "imagefolder"


# --- bad input: one line, exit 2, nothing lost -----------------------------------------------------------------
@pytest.mark.parametrize("extra,message", [
    (["--setups", "gn", "gn-ws"], "unknown setup 'gn-ws'"),
    (["--arch", "resnet18", "--setups", "gn_ws"], "--model resnet18_gn_ws needs images of at least 112 px, but "
                                                  "--dataset digits has 8 px images"),
    (["--arch", "vgg11", "--setups", "gn_ws"], "no registered model 'vgg11_gn_ws'"),
    (["--setups", "gn", "--batches", "64", "--train-images", "32"], "64 images per step need at least that many"),
    (["--setups", "gn", "--jobs", "2", "--threads", "64"], "would oversubscribe"),
])  # fmt: skip
def test_bad_sweep_input_exits_2_and_keeps_results(tmp_path, capsys, extra, message):
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(search_record("gn", 0.1, 70.0) | {"grid": resolve_grid("default").fingerprint()})
                       + "\n")  # fmt: skip
    before = results.read_bytes()
    code = main(["sweep", *TINY, "--results", str(results), "--out-dir", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert results.read_bytes() == before and not (tmp_path / "o").exists()


def test_results_of_another_protocol_are_refused_and_a_torn_tail_repaired(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    other = json.dumps(search_record("gn", 0.1, 70.0) | {"grid": "0123456789ab"}) + "\n"
    results.write_text(other + '{"grid": "01')
    argv = ["sweep", *TINY, "--setups", "gn", "--batches", "2", "--seeds", "0", "--search-lrs", "0.4",
            "--max-steps", "1", "--results", str(results), "--out-dir", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 2
    assert "holds results of another protocol (grid 0123456789ab" in capsys.readouterr().err
    assert results.read_text() == other  # the torn tail is dropped, the complete record kept
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_text("")  # an empty results file is a new sweep
    assert main([*argv[:-4], "--results", str(fresh), "--out-dir", str(tmp_path / "o")]) == 0
    assert [r["kind"] for r in records_of(fresh)] == ["search", "grid"]


def test_parallelism_defaults_to_all_cpus_split_across_jobs():
    cpus = available_cpus()
    assert threads_per_job(1, None) == cpus and threads_per_job(cpus, None) == 1
    with pytest.raises(ExperimentError, match=f"oversubscribe the {cpus} CPU"):
        threads_per_job(cpus + 1, None)


def test_a_run_dir_holding_another_lr_is_not_continued(tmp_path, capsys):
    from torchws.train import TrainConfig, save_config

    argv = ["sweep", *TINY, "--setups", "gn", "--batches", "2", "--seeds", "0", "--search-lrs", "0.4", "--max-steps",
            "1", "--out-dir", str(tmp_path / "o")]  # fmt: skip
    spec = resolve_grid(
        "default",
        dataset="digits",
        epochs=1,
        train_images=48,
        eval_images=32,
        search_batch=4,
        search_extend=0,
        setups=["gn"],
        batches=[2],
        seeds=[0],
        search_lrs=[0.4],
        max_steps=1,
    )
    stale = tmp_path / "o" / "runs" / spec.fingerprint() / "gn_b2_s0"
    stale.mkdir(parents=True)
    save_config(TrainConfig(lr=9.9), stale / "sweep_run.yaml")
    assert main(argv) == 2
    assert f"{stale} holds a run with base lr 9.9, but the search now gives 0.4" in capsys.readouterr().err
    assert [r["kind"] for r in records_of(tmp_path / "o" / "results.jsonl")] == ["search"]  # the search run is kept


def test_a_second_sweep_on_the_same_results_file_is_refused(tmp_path, capsys):
    import fcntl

    results = tmp_path / "results.jsonl"
    with open(tmp_path / ".results.jsonl.lock", "w") as held:  # what a running sweep holds
        fcntl.flock(held, fcntl.LOCK_EX)
        code = main(["sweep", *TINY, "--setups", "gn", "--batches", "2", "--seeds", "0", "--search-lrs", "0.4",
                     "--max-steps", "1", "--results", str(results), "--out-dir", str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and "another sweep is writing" in capsys.readouterr().err
    assert not results.exists() and not (tmp_path / "o").exists()
