"""Tokenizer and chat template parity with Hugging Face on every fixture model."""

from __future__ import annotations

import pytest
from conftest import ref_for


def test_tokenize_matches_reference(model, engine):
    ref = ref_for(model)
    texts, ids = ref["texts"], ref["text_ids"]
    assert len(texts) == len(ids) and texts
    for text, expected in zip(texts, ids, strict=True):
        got = engine.tokenize(text)
        assert got == expected, f"{model}: tokenize({text!r}) = {got}, HF: {expected}"
        # add_special_tokens=True is the default
        assert engine.tokenize(text, add_special_tokens=True) == expected


def test_tokenize_without_special_tokens(model, engine):
    ref = ref_for(model)
    bos = ref["bos_token_id"]
    for text, expected in zip(ref["texts"], ref["text_ids"], strict=True):
        got = engine.tokenize(text, add_special_tokens=False)
        # Without special tokens the ids are the reference ids less the BOS the tokenizer adds
        # (if any); nothing else differs for these LLaMA-family tokenizers.
        want = expected[1:] if (bos is not None and expected and expected[0] == bos) else expected
        assert got == want, f"{model}: tokenize({text!r}, add_special_tokens=False) = {got}, want {want}"


def test_detokenize_roundtrip(model, engine):
    ref = ref_for(model)
    for text in ref["texts"]:
        ids = engine.tokenize(text)
        back = engine.detokenize(ids, skip_special_tokens=True)
        assert back == text, f"{model}: detokenize(tokenize({text!r})) = {back!r}"


def test_detokenize_keeps_special_tokens_by_default(model, engine):
    ref = ref_for(model)
    bos = ref["bos_token_id"]
    if bos is None:
        pytest.skip(f"{model} has no BOS token")
    text = ref["texts"][0]
    ids = engine.tokenize(text)
    assert ids[0] == bos
    with_special = engine.detokenize(ids)
    without = engine.detokenize(ids, skip_special_tokens=True)
    assert with_special != without and with_special.endswith(without), (with_special, without)


def test_chat_template_text(model, engine):
    ref = ref_for(model)
    text = engine.apply_chat_template(ref["chat_messages"])
    assert text == ref["chat_text"], f"{model}: rendered chat template differs:\n{text!r}\n!=\n{ref['chat_text']!r}"
    assert engine.apply_chat_template(ref["chat_messages"], add_generation_prompt=True) == text


def test_chat_template_without_generation_prompt(model, engine):
    ref = ref_for(model)
    with_gen = engine.apply_chat_template(ref["chat_messages"], add_generation_prompt=True)
    without = engine.apply_chat_template(ref["chat_messages"], add_generation_prompt=False)
    # The generation prompt (e.g. "<|im_start|>assistant\n") is appended at the end only.
    assert with_gen != without and with_gen.startswith(without), (with_gen, without)


def test_chat_template_ids(model, engine):
    ref = ref_for(model)
    text = engine.apply_chat_template(ref["chat_messages"])
    bos = ref["bos_token_id"]
    bos_text = engine.detokenize([bos]) if bos is not None else None
    # The template writes BOS itself when the text starts with the BOS string; then (as HF's
    # apply_chat_template(tokenize=True) does) the text is tokenized without adding special tokens.
    template_writes_bos = bos_text is not None and bos_text != "" and text.startswith(bos_text)
    if template_writes_bos or bos is None or ref["chat_ids"][:1] != [bos]:
        add_special = False
    else:
        add_special = True
    got = engine.tokenize(text, add_special_tokens=add_special)
    assert got == ref["chat_ids"], f"{model}: chat ids {got} != HF {ref['chat_ids']}"
