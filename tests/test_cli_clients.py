"""`sarathi chat` under a pseudo-terminal, and what `sarathi generate` says to a person: help for
every option, one-line errors with what to do."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

from sarathi.cli import build_parser
from sarathi_common.net import free_port

pexpect = pytest.importorskip("pexpect")


def test_chat_keeps_the_conversation_and_shows_tokens_per_second(default_server):
    prefill = lambda: default_server.metrics()["sarathi_prefill_tokens_total"]  # noqa: E731
    chat = pexpect.spawn(sys.executable, ["-m", "sarathi.cli", "chat", "--address", default_server.address,
                                          "--temperature", "0", "--max-tokens", "12"],
                         cwd=str(ROOT), timeout=60, encoding="utf-8", dimensions=(40, 200))
    try:
        chat.expect("sarathi chat with SmolLM2-135M-Instruct")
        chat.expect("> ")
        before = prefill()
        chat.sendline("What is the capital of France?")
        chat.expect(r"\[(stop|length); (\d+) tokens; ([\d.]+) tokens/s; first token (\d+) ms\]")
        assert float(chat.match.group(3)) > 0
        first_prompt = prefill() - before
        chat.expect("> ")
        before = prefill()
        chat.sendline("And of Italy?")
        chat.expect(r"tokens/s")
        chat.expect("> ")
        # The second turn sent the first question and answer again: a longer prompt.
        assert prefill() - before > first_prompt + 5
        chat.sendline("/reset")
        chat.expect("a new conversation")
        chat.sendcontrol("d")
        chat.expect(pexpect.EOF)
    finally:
        chat.close(force=True)
    assert chat.exitstatus == 0


def test_generate_without_a_server_says_what_to_do_in_one_line():
    address = f"127.0.0.1:{free_port()}"
    out = subprocess.run([sys.executable, "-m", "sarathi.cli", "generate", "hi", "--address", address],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip() == (f"error: no server answers at {address}: start one with `sarathi serve` "
                                  "(or pass --address HOST:PORT of a running one)")


def test_generate_streams_and_reports_a_bad_request_in_one_line(default_server):
    out = subprocess.run([sys.executable, "-m", "sarathi.cli", "generate", "The capital of France is",
                          "--address", default_server.address, "--max-tokens", "4", "--ignore-eos"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip()
    assert out.stderr.strip().endswith("[length; 5 prompt + 4 completion tokens]")
    out = subprocess.run([sys.executable, "-m", "sarathi.cli", "generate", "hi", "--top-p", "2",
                          "--address", default_server.address], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == ["error: the server refused the request: top_p must be in "
                                               "(0, 1], got 2.0"]


@pytest.mark.parametrize("command", ["generate", "chat", "gateway"])
def test_every_option_of_the_client_commands_has_help(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    missing = [a.option_strings or a.dest for a in sub._actions if not a.help]
    assert missing == []
