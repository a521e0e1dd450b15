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


def test_calibrate_gates_and_budgets_then_generate(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(CORPUS * 12)
    m = model_dir(CLI_MODEL)
    for args, method in ((["--keep", "0.5"], "cats"), (["--density", "0.8", "--keep", "0.5"], "hybrid")):
        out = tmp_path / f"{method}.json"
        r = cli("calibrate", m, "--text", text, *args, "-o", out)
        assert r.returncode == 0, r.stderr
        doc = json.loads(out.read_text())
        assert doc["meta"]["method"] == method and len(doc["gate"]) == doc["num_layers"]
        r = cli("generate", m, "The river", "--max-new-tokens", "4", "--sparsity", f"tda:{out}", "--stats")
        assert r.returncode == 0, r.stderr
        assert "FFN bytes" in r.stderr
    out = tmp_path / "bytes.json"
    r = cli("calibrate", m, "--text", text, "--ffn-bytes", "0.8", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "calibrate: 100%" in r.stderr and "of the FFN bytes per token" in r.stderr
    for spec in ("cats:0.5", "hybrid:0.9,0.5"):
        r = cli("generate", m, "The river", "--max-new-tokens", "4", "--sparsity", spec, "--stats")
        assert r.returncode == 0, r.stderr
    r = cli("generate", m, "The river", "--sparsity", "cats:1.5")
    assert r.returncode == 2 and "keep must be in (0, 1]" in r.stderr
    r = cli("calibrate", m, "--text", text, "--ffn-bytes", "0.8", "--method", "bogus", "-o", out)
    assert r.returncode == 2


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
        "--keeps",
        "0.5",
        "--hybrids",
        "0.8/0.5",
        "--byte-budgets",
        "0.8",
        "--json",
        js,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    for name in ("dense", "tda:0.5", "griffin:0.5", "cats:0.5", "hybrid:0.8,0.5", "budget:0.5", "bytes:0.8"):
        assert name in r.stdout, r.stdout
    assert "perplexity" in r.stdout and "FFN bytes" in r.stdout
    # A progress bar per phase on stderr, each finished.
    for phase in ("calibrate densities", "calibrate gates", "calibrate budget 0.5", "calibrate bytes 0.8", "score"):
        assert f"{phase}: 100%" in r.stderr, r.stderr
    res = json.loads(js.read_text())
    rows = {row["name"]: row for row in res["rows"]}
    assert rows["dense"]["ppl_ratio"] == 1.0 and rows["dense"]["density"] == 1.0
    assert abs(rows["griffin:0.5"]["density"] - 0.5) < 0.01
    assert rows["budget:0.5"]["budget"]["ppl"] <= rows["budget:0.5"]["budget"]["ppl_dense"] * 1.5 + 1e-9
    assert rows["bytes:0.8"]["budget"]["ffn_bytes"] <= 0.8
    assert rows["dense"]["ffn_bytes"] == 1.0 and rows["tda:0.5"]["ffn_bytes"] < 0.7
    # CATS at 0.5 reads every gate row and about half of the up and down rows
    assert 0.5 < rows["cats:0.5"]["ffn_bytes"] < 0.85, rows["cats:0.5"]
    assert rows["hybrid:0.8,0.5"]["ffn_bytes"] < rows["cats:0.5"]["ffn_bytes"]
    assert res["windows"] == 3 and res["scored_tokens"] == 3 * 32
