"""torchws.experiments: statistics, verdicts and the Markdown report, on records built here (no training)."""

from __future__ import annotations

import json
import math
import re
import statistics

import pytest
from scipy import stats as scipy_stats

from torchws.cli import main
from torchws.experiments import GRIDS, ExperimentError, read_results
from torchws.experiments.report import write_report
from torchws.experiments.stats import paired
from torchws.experiments.verdicts import claim_verdicts, smoothness_verdict

SEEDS = (0, 1, 2)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)


def cells_from(acc) -> dict:
    """setup -> batch -> seed -> acc from a function acc(setup, batch, seed)."""
    setups = ("bn", "gn", "gn_ws", "bn_ws", "bcn_est_ws", "ln_ws")
    return {s: {b: {seed: acc(s, b, seed) for seed in SEEDS} for b in BATCHES} for s in setups}


NOISE = {0: 0.3, 1: -0.2, 2: 0.1}  # per seed, shared by every setup: paired differences stay clean


def paper_world(setup: str, batch: int, seed: int) -> float:
    """Accuracies in which every claim holds."""
    if setup == "bn":
        return (40.0 if batch <= 2 else 85.0) + NOISE[seed]
    if setup == "bn_ws":
        return (42.0 if batch <= 2 else 87.0) + NOISE[seed] * 1.5
    if setup == "gn":
        return 80.0 + NOISE[seed] + 0.1 * seed
    return 86.0 + NOISE[seed] * 1.2  # gn_ws, bcn_est_ws, ln_ws


def test_paired_matches_scipy_ttest_rel_and_a_hand_interval():
    a, b = {0: 71.0, 1: 74.5, 2: 73.0, 3: 70.0}, {0: 69.0, 1: 73.0, 2: 70.5, 3: 69.5, 9: 1.0}
    result = paired(a, b)
    assert result.seeds == (0, 1, 2, 3)  # seed 9 has no partner
    want = scipy_stats.ttest_rel([a[s] for s in range(4)], [b[s] for s in range(4)])
    assert result.p_value == pytest.approx(want.pvalue, rel=1e-12)
    diffs = [2.0, 1.5, 2.5, 0.5]
    half = scipy_stats.t.ppf(0.975, 3) * statistics.stdev(diffs) / 2.0
    assert (result.mean, result.ci_low, result.ci_high) == pytest.approx((1.625, 1.625 - half, 1.625 + half))
    assert result.outcome == ("beats" if want.pvalue < 0.05 else "inconclusive")


def test_paired_outcomes():
    assert paired({0: 80, 1: 81, 2: 82}, {0: 70, 1: 71.5, 2: 72}).outcome == "beats"
    assert paired({0: 70, 1: 71.5, 2: 72}, {0: 80, 1: 81, 2: 82}).outcome == "worse"
    assert paired({0: 80, 1: 80.5, 2: 79}, {0: 80.2, 1: 80, 2: 79.5}).outcome == "matches"
    assert paired({0: 80, 1: 70, 2: 90}, {0: 75, 1: 75, 2: 75}).outcome == "inconclusive"  # +1.67, noisy
    same = paired({0: 80, 1: 81}, {0: 78, 1: 79})  # identical differences: exact, no interval width
    assert (same.p_value, same.ci_low, same.ci_high, same.outcome) == (0.0, 2.0, 2.0, "beats")
    single = paired({0: 80}, {0: 75})
    assert math.isnan(single.p_value) and single.outcome == "inconclusive"
    assert paired({0: 80}, {1: 75}) is None


def test_every_claim_reproduced_in_a_world_where_it_holds():
    verdicts = {v.claim: v for v in claim_verdicts(cells_from(paper_world))}
    assert {k: v.status for k, v in verdicts.items()} == dict.fromkeys(("i", "ii", "iii", "iv", "v"), "reproduced")
    assert "best large batch (highest mean) is 32" in verdicts["i"].detail  # 32, 64, 128 tie at 85.0: the first max


def test_verdicts_follow_the_data_not_the_claims():
    def world(setup, batch, seed):
        acc = paper_world(setup, batch, seed)
        if setup == "gn_ws" and batch >= 16:
            acc -= 6.0  # WS stops helping GN from 16 up, and then loses to BCN+WS
        if setup == "bn":
            acc = 85.0 + NOISE[seed] if batch != 1 else 80.0 + NOISE[seed]  # only a mild dip at 1: no collapse
        if setup == "bn_ws":
            acc = paper_world("bn", batch, seed) - 5.0 - 0.1 * seed  # WS hurts BN everywhere
        return acc

    verdicts = {v.claim: v for v in claim_verdicts(cells_from(world))}
    assert verdicts["ii"].status == "partly reproduced"
    assert "GN+WS beats GN in 4 of 8 comparisons (gn_ws vs gn at 1, gn_ws vs gn at 2, gn_ws vs gn at 4, gn_ws vs " \
           "gn at 8); 4 against, 0 inconclusive" in verdicts["ii"].detail  # fmt: skip
    assert verdicts["iii"].status == "not reproduced"
    assert verdicts["iv"].status == "not reproduced"
    assert verdicts["v"].status == "reproduced"  # BCN+WS beats the weakened GN+WS
    assert verdicts["i"].status == "reproduced"  # GN+WS at 1-2 (86) beats BN's best (85)


def test_noise_without_a_significant_difference_is_inconclusive():
    spread = {0: 6.0, 1: -2.0, 2: 2.0}  # GN+WS - GN: +6, -2, +2 points: mean +2, p = 0.5

    def world(setup, batch, seed):
        return 80.0 + (spread[seed] if setup == "gn_ws" else 0.0)

    verdicts = {v.claim: v for v in claim_verdicts(cells_from(world))}
    assert verdicts["ii"].status == "inconclusive"
    assert "0 against, 8 inconclusive" in verdicts["ii"].detail


def test_missing_cells_are_not_tested():
    partial = {
        "gn_ws": {2: {0: 80.0, 1: 81.0}},
        "gn": {8: {0: 70.0, 1: 71.0}, 2: {0: 60.0}},  # one common seed
        "bn": {1: {0: 30.0}, 32: {0: 80.0}},
    }
    verdicts = {v.claim: v.status for v in claim_verdicts(partial)}
    assert verdicts == dict.fromkeys(("i", "ii", "iii", "iv", "v"), "not tested")


def probe_runs(ws_lower: dict[str, int]) -> dict:
    """Smoothness JSON: 3 seeds x 5 in-training probes; GN+WS lower than GN at the first ws_lower[m] pairs."""
    runs = []
    for variant in ("gn_b2", "gn_ws_b2"):
        for seed in SEEDS:
            probes = [{"images": 0, "loss_range": 1.0, "gradient_predictiveness": 1.0, "effective_beta": 1.0}]
            for k in range(5):
                index = seed * 5 + k
                probe = {"images": 500 * (k + 1)}
                for metric, lower in ws_lower.items():
                    ws_value = 1.0 if index < lower else 3.0
                    probe[metric] = ws_value if variant == "gn_ws_b2" else 2.0
                probes.append(probe)
            runs.append({"variant": variant, "seed": seed, "probes": probes})
    return {"runs": runs}


def test_smoothness_verdict_from_probe_pairs():
    metrics = ("loss_range", "gradient_predictiveness", "effective_beta")
    assert smoothness_verdict(probe_runs(dict.fromkeys(metrics, 14)), "x").status == "reproduced"  # 14/15: p 0.001
    mixed = smoothness_verdict(probe_runs({"loss_range": 6, "gradient_predictiveness": 10, "effective_beta": 10}), "x")
    assert mixed.status == "partly reproduced"
    assert "gradient_predictiveness: GN+WS lower at 10/15 (sign test p = 0.302)" in mixed.detail  # binom(10, 15)
    assert smoothness_verdict(probe_runs(dict.fromkeys(metrics, 4)), "x").status == "not reproduced"


def test_the_shipped_smoothness_data_gives_partly():
    data = json.loads(open("docs/figures/smoothness.json").read())
    verdict = smoothness_verdict(data, "docs/figures/smoothness.json")
    assert verdict.status == "partly reproduced"  # docs/science.md: 6/15, 10/15, 10/15 paired wins
    assert "loss_range: GN+WS lower at 6/15" in verdict.detail


def grid_record(setup: str, batch: int, seed: int, acc: float, kind: str = "grid", grid: str = "abc",
                base_lr: float = 0.4) -> dict:  # fmt: skip
    history = [{"epoch": e, "train_loss": 2.0 / e, "test_acc": acc - 5 + 5 * e / 2} for e in (1, 2)]
    protocol = GRIDS["default"].protocol()
    return {"grid": grid, "kind": kind, "run_id": f"{kind}_{setup}_b{batch}_s{seed}_lr{base_lr}", "setup": setup,
            "batch": batch, "seed": seed, "base_lr": base_lr, "final_test_acc": acc, "history": history,
            "images_per_s": 100.0 * batch, "wall_s": 10.0, "plan": {"setups": ["gn", "gn_ws"],
            "batches": [2, 8], "seeds": [0, 1, 2]}, "protocol": protocol, "command": "torchws sweep --x",
            "commit": "f" * 40, "parameters": 78042}  # fmt: skip


def write_records(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def sample_records() -> list[dict]:
    records = []
    for lr in GRIDS["default"].search_lrs:  # GN peaks at 0.4; GN+WS gets better up to the largest lr tried
        records.append(grid_record("gn", 8, 100, 70.0 - math.log2(lr / 0.4) ** 2, "search", base_lr=lr))
        records.append(grid_record("gn_ws", 8, 100, 70.0 + lr, "search", base_lr=lr))
    for seed in (0, 1):  # a partial sweep: seed 2 is missing
        for batch in (2, 8):
            records.append(grid_record("gn", batch, seed, 70.0 + seed))
            records.append(grid_record("gn_ws", batch, seed, 73.0 + 2 * seed))
    return records


def test_report_tables_protocol_first_and_partial(tmp_path):
    results = tmp_path / "r.jsonl"
    write_records(results, sample_records())
    out = write_report(results, tmp_path / "docs/results.md", tmp_path / "docs/figures", smoothness=None)
    text = (tmp_path / "docs/results.md").read_text()
    assert out["complete"] is False and "PARTIAL RESULTS" in text
    assert out["verdicts"]["vi"] == "not tested" and "no probe data given (--smoothness)" in text
    assert "8 of 12 grid runs and 10 lr-search runs are done (1 of 2 setups have their lr)" in text
    assert text.index("## Protocol") < text.index("## Final test accuracy")
    # GN+WS at 2: seeds 0, 1 give 73 and 75 -> mean 74.00, sample std 1.41
    assert "| GN+WS | 74.00 ± 1.41 (2) | 74.00 ± 1.41 (2) |" in text
    assert re.search(r"\| GN \| .* \| \*\*0\.4\*\* \|", text)
    assert re.search(r"\| GN\+WS \| .* \| search not finished \(next: 3\.2\) \|", text)
    assert "(ii) GN+WS beats GN at every batch size" in text
    for name in ("sweep_accuracy.png", "sweep_curves_b2.png"):
        data = (tmp_path / "docs/figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](figures/{name})" in text  # linked relative to the report


def test_report_cli_bad_results_files_exit_2_and_keep_the_file(tmp_path, capsys):
    good = "".join(json.dumps(r) + "\n" for r in sample_records())
    cases = {
        "empty": ("", "holds no records"),
        "torn": (good + good.splitlines()[0][:40], r"r\.jsonl:19: the last line is truncated"),
        "mixed": (good + json.dumps(grid_record("gn", 2, 2, 70.0, grid="zzz")) + "\n", "mixes grids abc, zzz"),
        "garbage": (good.replace("\n", "\nnot json\n", 1), r"r\.jsonl:2: not a JSON record"),
        "foreign": ('{"a": 1}\n', "not a sweep record"),
    }
    for name, (content, message) in cases.items():
        results = tmp_path / name / "r.jsonl"
        results.parent.mkdir()
        results.write_text(content)
        code = main(["report", str(results), "--out", str(tmp_path / name / "out.md"), "--figures",
                     str(tmp_path / name / "fig")])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and re.search(message, err), (name, err)
        assert err.count("\n") == 1 and err.startswith("torchws: error: ")
        assert results.read_text() == content and not (tmp_path / name / "out.md").exists()
    with pytest.raises(ExperimentError, match="does not exist"):
        read_results(tmp_path / "nope.jsonl")
