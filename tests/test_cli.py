"""The command-line interface, run as `python -m tda_engine` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import MODELS, model_dir, ref_for

CLI_MODEL = "llama3" if "llama3" in MODELS else MODELS[0]
CHAT_MODEL = "qwen2" if "qwen2" in MODELS else MODELS[0]

GEN_OPTIONS = [
    "--max-new-tokens",
    "--temperature",
    "--top-k",
    "--top-p",
    "--min-p",
    "--repetition-penalty",
    "--seed",
    "--stop",
    "--dtype",
    "--device",
    "--no-stream",
    "--ignore-eos",
    "--stats",
]


def cli(*args, stdin=None, timeout=120):
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "tda_engine", *map(str, args)],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=timeout,
    )


def test_help():
    r = cli("--help")
    assert r.returncode == 0, r.stderr
    assert "generate" in r.stdout and "chat" in r.stdout
    assert "example" in r.stdout.lower()


@pytest.mark.parametrize("cmd", ["generate", "chat"])
def test_subcommand_help(cmd):
    r = cli(cmd, "--help")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for opt in GEN_OPTIONS:
        assert opt in out, f"{cmd} --help does not mention {opt}"
    assert "MODEL" in out
    assert "default" in out.lower()
    assert "example" in out.lower()
    if cmd == "chat":
        assert "--system" in out and "MESSAGE" in out
    else:
        assert "PROMPT" in out


def test_no_command_is_a_usage_error():
    r = cli()
    assert r.returncode == 2
    assert "usage" in r.stderr.lower()


def _stats_ok(stderr: str, finish: str):
    lines = [ln for ln in stderr.splitlines() if "prompt tokens" in ln]
    assert len(lines) == 1, stderr
    line = lines[0]
    for word in ("generated tokens", "prefill", "tokens/s", finish):
        assert word in line, (word, line)
    assert "Traceback" not in stderr


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_generate_matches_api(engine_for, stream):
    engine = engine_for(CLI_MODEL)
    want = engine.generate("Hello world", max_new_tokens=8, temperature=0)
    args = ["generate", model_dir(CLI_MODEL), "Hello world", "--max-new-tokens", 8, "--temperature", 0]
    if not stream:
        args.append("--no-stream")
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.text + "\n"
    _stats_ok(r.stderr, want.finish_reason)
    assert f"prompt tokens: {want.usage.prompt_tokens}" in r.stderr
    assert f"generated tokens: {want.usage.completion_tokens}" in r.stderr


def test_generate_sampling_options_match_api(engine_for):
    engine = engine_for(CLI_MODEL)
    ref = ref_for(CLI_MODEL)
    kw = dict(
        max_new_tokens=12,
        temperature=0.9,
        top_k=40,
        top_p=0.95,
        min_p=0.01,
        repetition_penalty=1.1,
        seed=4,
        ignore_eos=True,
    )
    want = engine.generate(ref["texts"][0], **kw)
    r = cli(
        "generate",
        model_dir(CLI_MODEL),
        ref["texts"][0],
        "--max-new-tokens",
        12,
        "--temperature",
        0.9,
        "--top-k",
        40,
        "--top-p",
        0.95,
        "--min-p",
        0.01,
        "--repetition-penalty",
        1.1,
        "--seed",
        4,
        "--ignore-eos",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.text + "\n"


def test_generate_stop_strings(engine_for):
    engine = engine_for(CLI_MODEL)
    full = engine.generate("Hello world", max_new_tokens=16, temperature=0, ignore_eos=True)
    text = full.text
    stop = next(
        text[i : i + 3]
        for i in range(len(text) // 2, len(text) - 2)
        if text[i : i + 3].strip() == text[i : i + 3] and "\ufffd" not in text[i : i + 3]
    )
    want = engine.generate("Hello world", max_new_tokens=16, temperature=0, ignore_eos=True, stop=["\u2603", stop])
    assert want.finish_reason == "stop"
    r = cli(
        "generate",
        model_dir(CLI_MODEL),
        "Hello world",
        "--max-new-tokens",
        16,
        "--temperature",
        0,
        "--ignore-eos",
        "--stop",
        "\u2603",
        "--stop",
        stop,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.text + "\n"
    _stats_ok(r.stderr, "stop")


def test_generate_detailed_stats():
    r = cli("generate", model_dir(CLI_MODEL), "Hello world", "--max-new-tokens", 4, "--temperature", 0, "--stats")
    assert r.returncode == 0, r.stderr
    _stats_ok(r.stderr, "length")
    assert "architecture" in r.stderr and ref_for(CLI_MODEL)["architecture"] in r.stderr


def test_generate_dtype(engine_for):
    engine = engine_for(CLI_MODEL, "bfloat16")
    want = engine.generate("Hello world", max_new_tokens=6, temperature=0)
    r = cli(
        "generate",
        model_dir(CLI_MODEL),
        "Hello world",
        "--max-new-tokens",
        6,
        "--temperature",
        0,
        "--dtype",
        "bfloat16",
        "--stats",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.text + "\n"
    assert "bfloat16" in r.stderr


@pytest.mark.parametrize("system", [None, "You are terse."])
def test_chat_matches_api(engine_for, system):
    engine = engine_for(CHAT_MODEL)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi there"}]
    want = engine.chat(messages, max_new_tokens=8, temperature=0)
    args = ["chat", model_dir(CHAT_MODEL), "Hi there", "--max-new-tokens", 8, "--temperature", 0]
    if system:
        args += ["--system", system]
    for extra in ([], ["--no-stream"]):
        r = cli(*args, *extra)
        assert r.returncode == 0, r.stderr
        assert r.stdout == want.text + "\n", extra
        _stats_ok(r.stderr, want.finish_reason)
        assert f"prompt tokens: {want.usage.prompt_tokens}" in r.stderr


def test_chat_message_from_stdin(engine_for):
    engine = engine_for(CHAT_MODEL)
    want = engine.chat([{"role": "user", "content": "Hi there"}], max_new_tokens=8, temperature=0)
    r = cli("chat", model_dir(CHAT_MODEL), "--max-new-tokens", 8, "--temperature", 0, stdin="Hi there\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.text + "\n"


def _one_line_error(r, *needles):
    assert r.returncode != 0
    assert r.returncode == 2
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("tda-engine: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_missing_model_path(tmp_path):
    missing = tmp_path / "no-such-model"
    r = cli("generate", missing, "Hello", "--max-new-tokens", 2)
    _one_line_error(r, "no-such-model")
    assert r.stdout == ""
    r = cli("chat", missing, "Hello")
    _one_line_error(r, "no-such-model")


def test_bad_option_value_is_a_clean_error():
    r = cli("generate", model_dir(CLI_MODEL), "Hello", "--top-p", 1.5)
    _one_line_error(r, "top_p")
    r = cli("generate", model_dir(CLI_MODEL), "Hello", "--max-new-tokens", "many")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--max-new-tokens" in r.stderr
    r = cli("generate", model_dir(CLI_MODEL), "Hello", "--dtype", "float64")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "float64" in r.stderr


def test_main_function_returns_exit_code(capsys, engine_for):
    from tda_engine.cli import main

    assert (
        main(["generate", str(model_dir(CLI_MODEL)), "Hello world", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    )
    out = capsys.readouterr()
    want = engine_for(CLI_MODEL).generate("Hello world", max_new_tokens=3, temperature=0)
    assert out.out == want.text + "\n"
    assert main(["generate", "/nonexistent/model/dir", "Hello"]) == 2
    assert "tda-engine: error:" in capsys.readouterr().err


def test_chat_interactive_keeps_history(engine_for):
    """With no MESSAGE and a terminal on stdin, chat is a conversation; an empty line ends it."""
    import pty

    engine = engine_for(CHAT_MODEL)
    kw = dict(max_new_tokens=6, temperature=0)
    history = [{"role": "user", "content": "Hi there"}]
    first = engine.chat(history, **kw)
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
    second = engine.chat(history, **kw)

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tda_engine",
                "chat",
                str(model_dir(CHAT_MODEL)),
                "--max-new-tokens",
                "6",
                "--temperature",
                "0",
            ],
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONIOENCODING="utf-8"),
        )
        os.write(master, b"Hi there\nAnd then?\n\n")
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode == 0, err.decode()
    assert out.decode("utf-8") == first.text + "\n" + second.text + "\n"
    assert err.decode().count("prompt tokens") == 2
    assert f"prompt tokens: {second.usage.prompt_tokens}" in err.decode()
