"""`flashrt chat` through a pseudo-terminal (pexpect), as a user at a terminal drives it.

Ctrl-C during a reply stops the reply and keeps the session; a conversation longer than the
context drops its oldest turns and goes on; readline edits the line (the prompt's token count
in --stats is the oracle: an arrow key that readline did not take would add 3 bytes).
"""
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import CHAT_TEMPLATE, SLOW_CLI, tiny_model

pexpect = pytest.importorskip("pexpect")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.mktemp("chat") / "llama", {"chat_template": CHAT_TEMPLATE})


def spawn(model, *args, code=None):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore", TERM="xterm")
    argv = (["-c", code] if code else ["-m", "flashrt"]) + ["chat", "-m", str(model), *map(str, args)]
    child = pexpect.spawn(sys.executable, argv, env=env, encoding="utf-8", codec_errors="replace", timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect("flashrt chat")
    return child


def test_ctrl_c_stops_the_reply_and_keeps_the_session(chat_model):
    child = spawn(chat_model, "--stats", code=SLOW_CLI)  # 30 ms a token: a full reply takes ~3 s
    child.expect("> ")
    child.sendline("tell me a story")
    child.expect_exact("tell me a story\r\n")  # the echo
    child.expect(".", timeout=30)  # the reply has begun to print
    time.sleep(0.3)
    child.sendintr()
    child.expect("reply stopped \\(Ctrl-C\\); the conversation goes on", timeout=10)
    child.expect("decode: (\\d+) tokens")
    assert int(child.match.group(1)) < 60  # stopped early, far from the ~100 of a full reply
    child.expect("> ")
    child.sendline("and then?")
    child.expect("prompt: (\\d+) tokens", timeout=30)  # --stats, after the second reply
    # the second prompt holds the first turn: the interrupted reply was kept in the history
    assert int(child.match.group(1)) > len("<user>tell me a story\n<assistant>\n<user>and then?\n<assistant>")
    child.expect("> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


def test_a_conversation_longer_than_the_context_drops_old_turns_and_goes_on(chat_model):
    child = spawn(chat_model, "--stats")
    child.expect("> ")
    child.sendline("hi")  # no -n: the reply runs to the end of the context (128 tokens)
    child.expect("reply cut at the end of the context \\(128 tokens\\)")
    child.expect("decode: (\\d+) tokens")
    assert int(child.match.group(1)) == 128 - len("<user>hi\n<assistant>")
    child.expect("> ")
    child.sendline("more")
    child.expect("dropped the oldest 1 turn\\(s\\) to fit the context of 128 tokens")
    child.expect("reply cut at the end of the context")  # and the conversation goes on
    child.expect("prompt: (\\d+) tokens")
    assert int(child.match.group(1)) == len("<user>more\n<assistant>")
    child.expect("> ")
    child.sendline("")  # an empty line quits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_readline_edits_the_line(chat_model):
    child = spawn(chat_model, "-n", "2", "--stats")
    child.expect("> ")
    child.sendline("ab\x1b[Dc")  # left arrow then c: readline makes it "acb", 3 bytes; raw it is 6
    child.expect("prompt: (\\d+) tokens")
    assert int(child.match.group(1)) == len("<user>acb\n<assistant>")
    child.expect("> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
