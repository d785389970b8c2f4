"""`flashrt serve` driven by the real `openai` client on a free loopback port.

Oracles: Generator.chat / generate / generate(logprobs=k) on the same model for the same greedy
request; /health's running and waiting counts; /proc for the server's RSS and descriptors.
A "slow" server (every decoded token sleeps 30 ms, patched in before the CLI runs) makes the
queue, disconnect and drain cases deterministic.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import flashrt
from conftest import CHAT_TEMPLATE, SLOW_CLI, tiny_model

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

REPO = Path(__file__).resolve().parents[1]
USER = [{"role": "user", "content": "Hello there"}]


class Served:
    def __init__(self, model, *args, code=None):
        cmd = [sys.executable] + (["-c", code] if code else ["-m", "flashrt"]) + \
              ["serve", "-m", str(model), "--port", "0", *map(str, args)]
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        line = self.proc.stderr.readline()  # "flashrt: serving NAME at http://127.0.0.1:PORT/v1 ..."
        m = re.search(r"serving (\S+) at (http://127\.0\.0\.1:\d+/v1)", line)
        assert m, line + self.proc.stderr.read() if self.proc.poll() is not None else line
        self.name, self.url = m.group(1), m.group(2)

    def client(self, key="none", **kw):
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=60, **kw)

    def health(self):
        with urllib.request.urlopen(self.url[:-3] + "/health", timeout=10) as r:
            return json.loads(r.read())

    def raw(self, path, body: bytes, method="POST", headers=None):
        req = urllib.request.Request(self.url[:-3] + path, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return rc, self.proc.stderr.read()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.mktemp("serve") / "llama", {"chat_template": CHAT_TEMPLATE})


@pytest.fixture(scope="module")
def oracle(chat_model):
    with flashrt.Generator(chat_model, progress=False) as g:
        yield g


@pytest.fixture(scope="module")
def server(chat_model):
    s = Served(chat_model)
    yield s
    rc, err = s.stop()
    assert rc == 0 and "server stopped" in err and "Traceback" not in err, err


def test_chat_completions_equal_generator_chat_streamed_or_not(server, oracle):
    want = oracle.chat(USER, 20)
    client = server.client()
    r = client.chat.completions.create(model=server.name, messages=USER, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.object == "chat.completion" and r.model == server.name
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(oracle.encode_chat(USER)), 20)
    chunks = list(client.chat.completions.create(model=server.name, messages=USER, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens
    stop = want[5:7]
    r = client.chat.completions.create(model=server.name, messages=USER, max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == want[:want.find(stop)]


def test_completions_with_logprobs_equal_generate(server, oracle):
    prompt = "Once upon"
    want = oracle.generate(prompt, 12, logprobs=2)
    client = server.client()
    r = client.completions.create(model=server.name, prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
    c = r.choices[0]
    assert c.text == want.text and c.finish_reason == "length" and r.object == "text_completion"
    assert c.logprobs.token_logprobs == pytest.approx(want.logprobs, abs=1e-5)
    # keyed by token text (OpenAI's format): ids the byte tokenizer cannot spell share the key ""
    assert [max(t.values()) for t in c.logprobs.top_logprobs] == \
        pytest.approx([max(t.values()) for t in want.top_logprobs], abs=1e-5)
    streamed = client.completions.create(model=server.name, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == want.text
    r = client.chat.completions.create(model=server.name, messages=USER, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert [e.logprob for e in lp] == pytest.approx(oracle.generate(
        oracle.encode_chat(USER), 5, logprobs=3).logprobs, abs=1e-5)
    assert all(len(e.top_logprobs) == 3 for e in lp)


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == [server.name]
    assert server.health() == {"status": "ok", "model": server.name, "running": 0, "waiting": 0}


def test_bad_requests_get_openai_errors_and_the_server_lives(server, oracle):
    client = server.client()
    status, body = server.raw("/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"] and body["error"]["type"]
    status, body = server.raw("/v1/chat/completions", b"[1, 2]")
    assert status == 400
    status, body = server.raw("/v1/nope", b"{}")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = server.raw("/v1/models", None, method="DELETE")
    assert status == 405
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=USER)
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    for kwargs, param in ((dict(temperature=-1), "temperature"), (dict(max_tokens=-3), "max_tokens"),
                          (dict(top_p=2), "top_p"), (dict(n=2), "n"), (dict(messages=[]), "messages"),
                          (dict(messages=[{"content": "no role"}]), "messages"),
                          (dict(extra_body={"repeat_penalty": "x"}), "repeat_penalty"),
                          (dict(stop=[""]), "stop"), (dict(messages=[{"role": "user", "content": "x" * 300}]),
                                                      "messages")):
        args = dict(model=server.name, messages=USER, max_tokens=3)
        args.update(kwargs)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**args)
        assert e.value.status_code == 400 and e.value.body["param"] == param, (kwargs, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:  # a stream refused before its first event
        list(client.completions.create(model=server.name, prompt="x" * 300, stream=True))
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="seed"):
        client.completions.create(model=server.name, prompt="x", seed=-1)
    r = client.chat.completions.create(model=server.name, messages=USER, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == oracle.chat(USER, 20)


def test_api_key(chat_model):
    s = Served(chat_model, "--api-key", "sesame")
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            s.client("wrong").models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").chat.completions.create(model=s.name, messages=USER, max_tokens=2)
        assert s.client("sesame").chat.completions.create(model=s.name, messages=USER, max_tokens=2).choices
        assert s.health()["status"] == "ok"  # /health needs no key
    finally:
        assert s.stop()[0] == 0


@pytest.fixture(scope="module")
def slow(chat_model):
    s = Served(chat_model, "--queue", "1", code=SLOW_CLI)
    yield s
    s.stop()


def wait_for(cond, timeout=10.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_a_full_queue_answers_429(slow):
    client = slow.client()
    running = client.chat.completions.create(model=slow.name, messages=USER, max_tokens=60, stream=True)
    next(iter(running))
    waiting = []
    t = threading.Thread(target=lambda: waiting.append(
        client.chat.completions.create(model=slow.name, messages=USER, max_tokens=3)))
    t.start()
    wait_for(lambda: slow.health() == {"status": "ok", "model": slow.name, "running": 1, "waiting": 1})
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model=slow.name, messages=USER, max_tokens=3)
    assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
    assert sum(1 for _ in running) > 0  # the running one still finishes
    t.join(timeout=30)
    assert waiting and waiting[0].choices[0].finish_reason == "length"


def test_a_client_that_disconnects_stops_its_generation(slow):
    client = slow.client()
    stream = client.chat.completions.create(model=slow.name, messages=USER, max_tokens=100, stream=True)
    it = iter(stream)
    next(it), next(it)
    assert slow.health()["running"] == 1
    stream.close()  # 100 tokens take 3 s; the generation must end long before
    assert wait_for(lambda: slow.health()["running"] == 0, timeout=5) < 1.0
    r = client.chat.completions.create(model=slow.name, messages=USER, max_tokens=3)  # still serving
    assert r.choices[0].finish_reason == "length"


def test_sigterm_drains_the_running_request_and_exits_0(chat_model):
    s = Served(chat_model, code=SLOW_CLI)
    stream = s.client().completions.create(model=s.name, prompt="Once upon", max_tokens=30, stream=True)
    it = iter(stream)
    first = next(it)
    s.proc.send_signal(signal.SIGTERM)
    rest = list(it)
    assert rest[-1].choices[0].finish_reason == "length"
    assert len("".join(c.choices[0].text for c in [first] + rest)) > 0
    rc, err = s.stop()
    assert rc == 0 and "server stopped" in err, err


def proc_figures(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def test_load_8_clients_5_requests_each_leave_rss_and_descriptors_flat(server, oracle):
    want = oracle.chat(USER, 16)
    warm = server.client()
    for _ in range(3):
        warm.chat.completions.create(model=server.name, messages=USER, max_tokens=16, temperature=0)
    warm.close()
    time.sleep(0.3)
    rss0, fds0 = proc_figures(server.proc.pid)
    errors, texts = [], []

    def client_run(i):
        c = server.client()
        try:
            for j in range(5):
                if (i + j) % 2:
                    texts.append("".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                        model=server.name, messages=USER, max_tokens=16, temperature=0, stream=True)))
                else:
                    texts.append(c.chat.completions.create(model=server.name, messages=USER, max_tokens=16,
                                                           temperature=0).choices[0].message.content)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=client_run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert texts == [want] * 40
    wait_for(lambda: proc_figures(server.proc.pid)[1] <= fds0, timeout=5)
    rss1, fds1 = proc_figures(server.proc.pid)
    assert fds1 <= fds0 and rss1 - rss0 < 20 << 20, (rss0, rss1, fds0, fds1)


def test_without_the_extra_serve_is_one_line_naming_the_install_and_the_core_never_imports_it(chat_model):
    code = ("import sys; sys.modules['uvicorn'] = None\n"  # as if `pip install flashrt` had no [server]
            "import flashrt.api, flashrt.cli\n"
            "assert 'starlette' not in sys.modules, 'the core imported the server'\n"
            "sys.exit(flashrt.cli.main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "serve", "-m", str(chat_model), "--port", "0"], cwd=REPO,
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("flashrt: error: flashrt serve needs the server extra") and \
        'pip install "flashrt[server]"' in r.stderr


def test_a_port_in_use_is_one_line(chat_model, server):
    port = server.url.rsplit(":", 1)[1].split("/")[0]
    r = subprocess.run([sys.executable, "-m", "flashrt", "serve", "-m", str(chat_model), "--port", port], cwd=REPO,
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"flashrt: error: cannot listen on 127.0.0.1:{port}: [Errno 98]"), r.stderr
