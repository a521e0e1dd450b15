"""The sparse-decoding side of the CLI: --sparsity, `calibrate` and `eval`."""

from __future__ import annotations

import json

from conftest import model_dir
from test_cli import CLI_MODEL, cli
from test_sparsity import CORPUS


def test_generate_with_sparsity():
    m = model_dir(CLI_MODEL)
    dense = cli("generate", m, "The river", "--max-new-tokens", "8", "--ignore-eos", "--no-stream")
    assert dense.returncode == 0, dense.stderr
    for spec in ("griffin:0.5", "tda:0.5", "dense"):
        r = cli("generate", m, "The river", "--max-new-tokens", "8", "--ignore-eos", "--sparsity", spec, "--stats")
        assert r.returncode == 0, r.stderr
        assert "FFN kept" in r.stderr and "sparsity" in r.stderr
        if spec == "dense":
            assert r.stdout == dense.stdout


def test_bad_sparsity_is_a_clean_error():
    r = cli("generate", model_dir(CLI_MODEL), "The river", "--sparsity", "foo:0.5")
    assert r.returncode == 2
    assert "unknown sparsity" in r.stderr and "Traceback" not in r.stderr
    r = cli("generate", model_dir(CLI_MODEL), "The river", "--sparsity", "tda:1.5")
    assert r.returncode == 2 and "density must be in (0, 1]" in r.stderr


def test_calibrate_then_generate(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(CORPUS * 4)
    out = tmp_path / "th.json"
    m = model_dir(CLI_MODEL)
    r = cli("calibrate", m, "--text", text, "--density", "0.5", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "calibrate: 100%" in r.stderr, r.stderr  # the progress bar, finished
    doc = json.loads(out.read_text())
    assert doc["format"] == "tda-engine-thresholds" and doc["meta"]["density"] == 0.5
    r = cli("generate", m, "The river", "--max-new-tokens", "4", "--sparsity", f"tda:{out}", "--stats")
    assert r.returncode == 0, r.stderr
    r = cli("calibrate", m, "--text", tmp_path / "missing.txt", "--density", "0.5", "-o", out)
    assert r.returncode == 2 and "missing.txt" in r.stderr
    r = cli("calibrate", m, "--density", "0.5")
    assert r.returncode == 2  # -o is required


def test_eval_prints_a_table_and_json(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text((CORPUS + "\n") * 30)
    js = tmp_path / "r.json"
    r = cli(
        "eval",
        model_dir(CLI_MODEL),
        "--text",
        text,
        "--window",
        "64",
        "--prefix",
        "32",
        "--windows",
        "3",
        "--densities",
        "0.5",
        "--budgets",
        "0.5",
        "--json",
        js,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    for name in ("dense", "tda:0.5", "griffin:0.5", "tda-budget:0.5", "perplexity"):
        assert name in r.stdout, r.stdout
    # A progress bar per phase on stderr, each finished.
    for phase in ("calibrate densities", "calibrate budget 0.5", "score"):
        assert f"{phase}: 100%" in r.stderr, r.stderr
    res = json.loads(js.read_text())
    rows = {row["name"]: row for row in res["rows"]}
    assert rows["dense"]["ppl_ratio"] == 1.0 and rows["dense"]["density"] == 1.0
    assert abs(rows["griffin:0.5"]["density"] - 0.5) < 0.01
    assert rows["tda-budget:0.5"]["budget"]["ppl"] <= rows["tda-budget:0.5"]["budget"]["ppl_dense"] * 1.5 + 1e-9
    assert res["windows"] == 3 and res["scored_tokens"] == 3 * 32
