"""The `flashrt` command, run as `python -m flashrt` in a subprocess.

Success paths print what the API computes (the API is the oracle); every failure is one
line `flashrt: error: ...` on stderr and a non-zero exit (1 for errors, 2 for usage,
130 for Ctrl-C, 141 for a closed stdout), never a traceback.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import flashrt
from conftest import byte_tokenizer_json, tiny_model  # noqa: F401
from flashrt.format import ModelWriter

REPO = Path(__file__).resolve().parents[1]
HF = REPO / "tests" / "fixtures" / "hf"
PROMPT = "Once upon"




def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                PYTHONWARNINGS="ignore")


def flashrt_cli(*args, code=None, timeout=120):
    """Run `python -m flashrt *args` (or `python -c code *args`); returns CompletedProcess."""
    cmd = [sys.executable] + (["-c", code] if code else ["-m", "flashrt"]) + [str(a) for a in args]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def assert_one_line_error(r, returncode=1, match=None):
    assert r.returncode == returncode, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("flashrt: error: "), r.stderr
    assert "Traceback" not in r.stderr
    if match:
        assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {name: tiny_model(name, root / name) for name in ("llama", "opt")}


def api_text(path, prompt=PROMPT, n=10, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with flashrt.Generator(path, progress=False, **kw) as g:
            return g.generate(prompt, max_new_tokens=n)


# -- success paths -----------------------------------------------------------------------
def test_version():
    r = flashrt_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"flashrt {flashrt.__version__}"


def test_info(tiny):
    r = flashrt_cli("info", "--model", tiny["opt"], "--json", "--verify")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == "opt" and info["verified"] is True
    assert (info["layers"], info["hidden_size"], info["ffn_neurons"]) == (2, 64, 160)
    r = flashrt_cli("info", "--model", tiny["llama"])
    assert r.returncode == 0 and "architecture: llama" in r.stdout and "tokenizer: True" in r.stdout


def test_info_shows_the_ffn_kind(tiny, tmp_path):
    """family, activation and the sparsity class; --measure counts the exactly-zero neurons of a
    dense pass (oracle: the definition -- a SiLU gate is never exactly 0, ReLU's about half on
    these random weights)."""
    relu = tiny_model("llama_relu", tmp_path / "relu")
    got = {}
    for name, path in (("llama", tiny["llama"]), ("llama_relu", relu), ("opt", tiny["opt"])):
        r = flashrt_cli("info", "--model", path, "--json", "--measure", "12")
        assert r.returncode == 0, r.stderr
        got[name] = json.loads(r.stdout)
    assert (got["llama"]["family"], got["llama"]["activation"], got["llama"]["ffn_gated"]) == ("llama", "silu", True)
    assert got["llama"]["ffn_sparsity_class"] == "dense-gated" and got["llama"]["ffn_zero_fraction"] == 0.0
    zero = got["llama_relu"]["ffn_zero_fraction"]
    assert got["llama_relu"]["activation"] == "relu" and 0.3 < zero < 0.8
    assert got["llama_relu"]["ffn_sparsity_class"] == ("relu-sparse" if zero >= 0.5 else "relu, weakly sparse")
    assert got["opt"]["activation"] == "relu" and not got["opt"]["ffn_gated"]
    assert 0.2 < got["opt"]["ffn_zero_fraction"] < 0.8
    assert "measured on 12 tokens" in got["opt"]["ffn_zero_fraction_source"]
    r = flashrt_cli("info", "--model", relu)
    assert "ffn_sparsity_class: relu-sparse" in r.stdout and "ffn_zero_fraction: None" in r.stdout


def test_info_default_model(smollm2_dir):
    r = flashrt_cli("info")
    assert r.returncode == 0, r.stderr
    assert f"path: {smollm2_dir}" in r.stdout and "layers: 30" in r.stdout


@pytest.mark.parametrize("name", ["llama", "opt"])
@pytest.mark.parametrize("mode", ["dense", "flash"])
def test_generate_prints_what_the_api_generates(tiny, name, mode):
    r = flashrt_cli("generate", PROMPT, "--model", tiny[name], "--mode", mode, "--max-tokens", 10, "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout == api_text(tiny[name], mode=mode) + "\n"
    assert "decode:" in r.stderr and "Traceback" not in r.stderr


def test_perplexity_prints_a_final_float_line(tiny, tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 2
    (tmp_path / "t.txt").write_text(text)
    r = flashrt_cli("perplexity", "--text", tmp_path / "t.txt", "--model", tiny["llama"], "--context", 100, "--quiet")
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("perplexity: ")
    got = float(last.split(": ")[1])
    # oracle: the negative log-likelihood of each next token from the API's logits, window by window
    with flashrt.Generator(tiny["llama"], progress=False) as g:
        ids = np.array(g.tokenizer.encode(text))
        nll, n = 0.0, 0
        for w in (ids[i:i + 100] for i in range(0, ids.size, 100)):
            if w.size < 2:
                continue
            z = g.logits(w)[:-1].astype(np.float64)
            logp = z - z.max(1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(1, keepdims=True))
            nll -= logp[np.arange(w.size - 1), w[1:]].sum()
            n += w.size - 1
    assert math.isclose(got, math.exp(nll / n), rel_tol=1e-3), (got, math.exp(nll / n))


def test_convert(tmp_path):
    r = flashrt_cli("convert", HF / "qwen2", tmp_path / "q", "--dtype", "float32", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "converted" in r.stdout and (tmp_path / "q" / "manifest.json").is_file()
    r = flashrt_cli("convert", HF / "qwen2", tmp_path / "q", "--quiet")  # exists, no --overwrite
    assert_one_line_error(r, match="already exists")


# -- one error class at a time -----------------------------------------------------------
def test_model_format_error(tiny, tmp_path):
    assert_one_line_error(flashrt_cli("info", "--model", tmp_path), match="no manifest.json")
    d = tmp_path / "m"
    shutil.copytree(tiny["llama"], d)
    os.truncate(d / "ffn.bin", 100)
    assert_one_line_error(flashrt_cli("generate", "x", "--model", d), match="ffn.bin: file is truncated")
    assert_one_line_error(flashrt_cli("info", "--model", d), match="truncated")


def test_full_verify_finds_what_open_cannot(tmp_path):
    """A model big enough that the middle of ffn.bin is outside the head hash."""
    rng = np.random.default_rng(0)
    cfg = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 4096, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 64,
           "tie_word_embeddings": True, "max_position_embeddings": 64}
    with ModelWriter(tmp_path / "m", "llama", cfg, "float32") as w:
        w.add_resident("model.embed_tokens.weight", rng.standard_normal((64, 128), dtype=np.float32))
        for l in range(2):
            w.add_ffn_layer(l, rng.standard_normal((4096, 384), dtype=np.float32))
    ffn = tmp_path / "m" / "ffn.bin"
    with open(ffn, "r+b") as f:
        f.seek(ffn.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    assert flashrt_cli("info", "--model", tmp_path / "m").returncode == 0
    assert_one_line_error(flashrt_cli("info", "--model", tmp_path / "m", "--verify"), match="full hash differs")


def test_unsupported_model_error(tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(HF / "llama", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (src / "config.json").write_text(json.dumps(cfg))
    r = flashrt_cli("convert", src, tmp_path / "out")
    assert_one_line_error(r, match="rope scaling 'yarn' is not supported")
    assert not (tmp_path / "out").exists()


def test_budget_error(tiny):
    r = flashrt_cli("generate", "x", "--model", tiny["llama"], "--mode", "flash", "--memory-budget", "10KB")
    assert_one_line_error(r, match="too small")
    r = flashrt_cli("generate", "x", "--model", tiny["llama"], "--mode", "flash", "--memory-budget", "lots")
    assert_one_line_error(r, match="memory budget")


def test_generation_errors(tiny):
    m = tiny["llama"]
    assert_one_line_error(flashrt_cli("generate", "", "--model", m), match="prompt is empty")
    assert_one_line_error(flashrt_cli("generate", "x", "--model", m, "--temperature", "-1"), match="temperature")
    assert_one_line_error(flashrt_cli("generate", "x", "--model", m, "--top-p", "2"), match="top_p")
    assert_one_line_error(flashrt_cli("generate", "x" * 200, "--model", m, "--max-context", 16), match="context")
    # argv bytes that are not UTF-8 arrive as lone surrogates
    r = subprocess.run([sys.executable, "-m", "flashrt", "generate", b"ab\xff\xfe", "--model", str(m)],
                       env=env(), capture_output=True, text=True, timeout=60)
    assert_one_line_error(r, match="not valid Unicode")


def test_flash_io_error(tiny):
    """Reads fail under a running `generate` (the loader's fault hook, in the child)."""
    code = """
import errno, sys
import flashrt.ffn.flash as F
from flashrt._core.loader import Loader

class FailingLoader(Loader):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._inject_fault(0, errno.EIO, 1 << 30)

F.Loader = FailingLoader
from flashrt.cli import main
sys.exit(main(sys.argv[1:]))
"""
    r = flashrt_cli("generate", "x", "--model", tiny["opt"], "--mode", "naive", code=code)
    line = assert_one_line_error(r, match="ffn.bin")
    assert "Input/output error" in line


def test_other_flashrt_errors(tiny, tmp_path):
    r = flashrt_cli("generate", "x", "--model", tiny["llama"], "--mode", "flash", "--select", "predictor")
    assert_one_line_error(r, match="no predictors")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    r = flashrt_cli("perplexity", "--text", tmp_path / "bad.txt", "--model", tiny["llama"])
    assert_one_line_error(r, match="not UTF-8")
    assert_one_line_error(flashrt_cli("chat", "--model", tiny["llama"]), match="no chat template")


def test_calibrate_bad_arguments_are_one_line_and_write_nothing(tiny, tmp_path):
    m = tmp_path / "llama"
    shutil.copytree(tiny["llama"], m)
    (tmp_path / "short.txt").write_text("hi")
    for args, match in [(["--rank", "0"], "rank must be an integer from 2"),
                        (["--rank", "100000"], "rank must be an integer from 2"),
                        (["--sparsity", "1.5"], "sparsity must be in"),
                        (["--tokens", "0"], "at least 8 tokens"),
                        (["--text", tmp_path / "short.txt"], "calibration needs at least 8")]:
        assert_one_line_error(flashrt_cli("calibrate", "--model", m, "--quiet", *args), match=match)
    assert not (m / "predictors.npz").exists()
    assert sorted(p.name for p in m.iterdir()) == sorted(p.name for p in tiny["llama"].iterdir())


def test_os_errors_are_one_line(tiny, tmp_path):
    assert_one_line_error(flashrt_cli("perplexity", "--text", tmp_path / "nope.txt", "--model", tiny["llama"]),
                          match="no such file")
    assert_one_line_error(flashrt_cli("perplexity", "--text", tmp_path, "--model", tiny["llama"]),
                          match="Is a directory")


def test_usage_errors_exit_2():
    for args in (["frobnicate"], [], ["generate"], ["generate", "x", "--mode", "warp"], ["generate", "x", "--max-tokens", "many"]):
        r = flashrt_cli(*args)
        assert r.returncode == 2 and "usage:" in r.stderr and "Traceback" not in r.stderr


def test_closed_stdout_is_not_a_traceback(tiny):
    p = subprocess.Popen([sys.executable, "-m", "flashrt", "generate", PROMPT, "--model", str(tiny["llama"]),
                          "--max-tokens", "20"], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # like `| head -c 0`: the reader is gone before the first token
    _, err = p.communicate(timeout=60)
    assert p.returncode == 141 and b"Traceback" not in err, err


def test_ctrl_c_exits_130(chat_model):
    # A shell's background job inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
    # handler: give the child the default disposition, as an interactive terminal would.
    p = subprocess.Popen([sys.executable, "-m", "flashrt", "chat", "--model", str(chat_model)], env=env(),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    banner = p.stderr.readline()  # printed just before it waits for input
    assert b"flashrt chat" in banner
    time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and b"interrupted" in err and b"Traceback" not in err, err


def test_perplexity_on_non_finite_logits_is_an_error_not_nan(tmp_path):
    """Damage the cheap checks at open cannot see (a flipped exponent deep in a large file)
    shows up as non-finite logits: perplexity raises instead of printing nan."""
    from flashrt.errors import ModelFormatError
    from flashrt.perplexity import perplexity

    model = tiny_model("llama", tmp_path / "m")
    with flashrt.Generator(model) as g:
        vocab = int(g.config["vocab_size"])
        g.model.forward = lambda ids, kv, **kw: np.full((len(ids), vocab), np.nan, np.float32)
        with pytest.raises(ModelFormatError, match="non-finite"):
            perplexity(g, "Once upon a time there was a test. " * 4, context=16, progress=False)


# -- llama.cpp / mlx-lm conventions: short flags, prompt sources, chat by default, --json -----------
@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from conftest import CHAT_TEMPLATE

    return tiny_model("llama", tmp_path_factory.mktemp("cli-chat") / "llama", {"chat_template": CHAT_TEMPLATE})


def run_cli(*args, stdin=None, warn=False):
    e = env()
    if warn:
        e.pop("PYTHONWARNINGS")
    return subprocess.run([sys.executable, "-m", "flashrt", *map(str, args)], env=e, input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_short_flags_and_every_prompt_source_give_the_api_text(tiny, tmp_path):
    want = api_text(tiny["llama"], n=10)
    (tmp_path / "p.txt").write_text(PROMPT)
    with flashrt.Generator(tiny["llama"], progress=False) as g:
        tokens = list(g.stream_tokens(g.tokenizer.encode(PROMPT), 10))
    for source, stdin in ((["-p", PROMPT], None), (["-p", "-"], PROMPT), (["-f", tmp_path / "p.txt"], None),
                          ([PROMPT], None)):
        r = run_cli("generate", *source, "-m", tiny["llama"], "-n", 10, "-t", 1, "-c", 64, "--json", stdin=stdin)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["text"] == want and out["tokens"] == tokens, source
        assert (out["finish_reason"], out["chat"], out["prompt_tokens"], out["generated_tokens"]) == \
            ("length", False, len(PROMPT), 10)
        assert out["timings"]["decode_tokens_per_second"] > 0
    r = run_cli("generate", "-m", tiny["llama"], "-n", 10, "--stats", "-p", PROMPT)
    assert r.returncode == 0 and r.stdout == want + "\n" and "finish: length" in r.stderr


def test_prompt_source_mistakes_are_one_line(tiny, tmp_path):
    for args in (["x", "-p", "y"], ["-p", "y", "-f", "z"], []):
        r = run_cli("generate", *args, "-m", tiny["llama"])
        assert r.returncode == 2 and "usage:" in r.stderr and "exactly one prompt" in r.stderr, r.stderr
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    assert_one_line_error(run_cli("generate", "-f", tmp_path / "bad.txt", "-m", tiny["llama"]), match="not UTF-8")
    assert_one_line_error(run_cli("generate", "-f", tmp_path / "nope.txt", "-m", tiny["llama"]),
                          match="no such file")
    assert_one_line_error(run_cli("generate", "x", "--chat", "-m", tiny["llama"]), match="no chat template")


def test_a_model_with_a_chat_template_gets_it_unless_raw(chat_model):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    with flashrt.Generator(chat_model, progress=False) as g:
        chat, chat_sys, raw = g.chat(msgs[1:], 12), g.chat(msgs, 12), g.generate("hi", 12)
    for args, want, is_chat in ((["-p", "hi"], chat, True), (["-p", "hi", "--system", "be brief"], chat_sys, True),
                                (["-p", "hi", "--raw"], raw, False)):
        r = run_cli("generate", *args, "-m", chat_model, "-n", 12, "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert (out["text"], out["chat"]) == (want, is_chat), args
    assert raw != chat


def test_stop_is_repeatable_and_sampling_flags_reach_the_api(tiny):
    kw = dict(temperature=0.9, top_k=40, min_p=0.05, repeat_penalty=1.3, repeat_last_n=16, seed=7)
    with flashrt.Generator(tiny["llama"], progress=False) as g:
        full = g.generate(PROMPT, 30, **kw)
        stops = [full[9:11], full[4:6]]
        want = g.generate(PROMPT, 30, stop=stops, **kw)
    assert len(want) < len(full)
    r = run_cli("generate", "-p", PROMPT, "-m", tiny["llama"], "-n", 30, "--temp", 0.9, "--top-k", 40, "--min-p", 0.05,
                "--repeat-penalty", 1.3, "--repeat-last-n", 16, "--seed", 7, "--stop", stops[0], "--stop", stops[1],
                "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["text"] == want and out["finish_reason"] == "stop"


def test_warnings_are_one_line(tiny):
    r = run_cli("generate", "-p", PROMPT, "-m", tiny["llama"], "-n", 2, "--top-p", 0.9, "--mode", "flash", warn=True)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("flashrt: warning: ") for line in lines), r.stderr
    assert any("--top-p has no effect at temperature 0" in line for line in lines)
    assert any("no sparsity predictors" in line for line in lines)


def test_help_states_every_default():
    r = run_cli("generate", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for flag in ("-m MODEL, --model MODEL", "-n MAX_TOKENS, --max-tokens MAX_TOKENS", "-t THREADS",
                 "-c MAX_CONTEXT", "--temp TEMPERATURE", "--stop TEXT", "--min-p", "--repeat-penalty"):
        assert flag in text
    for default in ("(default: 128)", "(default: 0.0)", "(default: 1.0)", "(default: 64)", "(default: dense)",
                    "(default: SmolLM2-135M-Instruct)", "(default: all cores)"):
        assert default in text, default
    assert "(default: None)" not in text and "(default: False)" not in text
    r = run_cli("chat", "--help")
    assert "(default: up to the end of the context)" in " ".join(r.stdout.split())
