"""The CLI's client commands against a running swarm (real processes)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _cli(swarm, home, *args, stdin=None):
    cmd = [sys.executable, "-m", "swarmshard.cli", *args, "--home", home]
    for addr in swarm.initial_peers:
        cmd += ["--initial-peers", addr]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300)


def test_generate_streams_a_reply_and_prints_the_route(smol_swarm, store_home, smol_client, smol_local):
    from swarmshard.demo import chat_input_ids, local_generate

    prompt = "What is the capital of France?"
    result = _cli(smol_swarm, store_home, "generate", "--prompt", prompt, "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    expected, _ = local_generate(smol_local, chat_input_ids(smol_client.tokenizer, prompt), 12)
    text = smol_client.tokenizer.decode(expected)
    assert result.stdout.strip() == text.strip()
    assert "route:" in result.stderr and "[0:10]" in result.stderr and "tok/s" in result.stderr


def test_chat_keeps_the_conversation(smol_swarm, store_home, smol_client, smol_local):
    """Two turns through the swarm (one session, cache kept) equal local generation on the whole chat."""
    tok = smol_client.tokenizer
    result = _cli(smol_swarm, store_home, "chat", "--max-new-tokens", "16",
                  stdin="My name is Ada.\nWhat is my name?\n")
    assert result.returncode == 0, result.stderr
    replies = [r.split("\nyou> ")[0].strip() for r in result.stdout.split("bot> ")[1:]]
    messages, expected = [], []
    for user in ["My name is Ada.", "What is my name?"]:
        messages.append({"role": "user", "content": user})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
        reply = smol_local.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
        expected.append(tok.decode(reply).strip())
        messages.append({"role": "assistant", "content": tok.decode(reply, skip_special_tokens=True)})
    assert replies == expected


def test_generate_without_peers_is_a_clear_error(store_home):
    result = subprocess.run([sys.executable, "-m", "swarmshard.cli", "generate", "--prompt", "hi"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--initial-peers" in result.stderr
