"""Mutation fuzzer over model directories and source checkpoints, each case in its own child.

    python tests/fuzz_driver.py WORKDIR --cases 80 --seed 0 [--mem-mb 3072] [--timeout 60] [--jobs 2]

Bases: the tiny llama and opt HF checkpoints (tests/fixtures/hf, byte tokenizer added), their
converted float32 model directories, and a tiny llama GGUF. Every case copies one base,
applies one mutation and runs it in a fork()ed child under RLIMIT_AS (a memory limit) and
a timeout:
  source cases (hf, gguf)  convert, then (if it converted) open dense + flash and generate
  model-directory cases    open dense + flash, generate, chat
Mutations: config fields set to hostile values (0, -1, 3.0, 10**9, strings, lists, None,
NaN, ...), the config replaced by a JSON list, tensor shapes (safetensors headers, GGUF
tensor infos), GGUF metadata values rewritten in place, manifest fields (re-checksummed,
as a buggy writer would), truncation of any file.

A child ends in one of: ok, refused (a FlashrtError; its one line is kept), bug (any
other exception, with its traceback), crash (killed by a signal), hang (timeout).
Prints one JSON summary line: {"cases": N, "ok": .., "refused": .., "bugs": [...],
"crashes": [...], "hangs": [...]}.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import time
import traceback
import warnings
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
HF = TESTS / "fixtures" / "hf"

HOSTILE = [0, -1, 1, 3.0, 2.5, 10 ** 9, 2 ** 63, -(2 ** 31), "a", "", "7", None, [], ["a"], {}, True, False,
           float("nan"), float("inf"), 1e308, -1e-5, [1, 2]]
HF_FIELDS = ["num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size",
             "vocab_size", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings", "sliding_window",
             "use_sliding_window", "eos_token_id", "bos_token_id", "tie_word_embeddings", "rope_scaling",
             "hidden_act", "model_type", "torch_dtype", "ffn_dim", "activation_function", "word_embed_proj_dim",
             "do_layer_norm_before", "attention_bias", "layer_norm_eps"]
GGUF_KEYS = ["llama.block_count", "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
             "llama.attention.head_count_kv", "llama.context_length", "llama.attention.layer_norm_rms_epsilon",
             "llama.rope.freq_base", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id"]
GGUF_VALUES = [0, 1, 2, 3, 7, 255, 2 ** 31 - 1, 2 ** 32 - 1, 10 ** 9]


# ---------------------------------------------------------------------------- bases
def make_bases(work: Path) -> dict:
    sys.path.insert(0, str(TESTS))
    from conftest import byte_tokenizer_json
    from flashrt.convert import convert

    bases = {}
    for name in ("llama", "opt"):
        src = work / f"hf-{name}"
        shutil.copytree(HF / name, src)
        (src / "tokenizer.json").write_text(byte_tokenizer_json())
        (src / "tokenizer_config.json").write_text(json.dumps(
            {"chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"}))
        bases[f"hf-{name}"] = src
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bases[f"dir-{name}"] = convert(src, work / f"dir-{name}", dtype="float32", progress=False)
    sys.path.insert(0, str(TESTS))
    from gguf_writer import tiny_hf_llama, write_llama_gguf

    bases["gguf"] = work / "tiny.gguf"
    write_llama_gguf(bases["gguf"], *tiny_hf_llama())
    return {k: Path(v) for k, v in bases.items()}


# ---------------------------------------------------------------------------- mutations
def draw_case(rng: random.Random, i: int) -> dict:
    base = rng.choice(["hf-llama", "hf-llama", "hf-opt", "gguf", "gguf", "dir-llama", "dir-llama", "dir-opt"])
    if base.startswith("hf-"):
        kind = rng.choice(["config", "config", "config", "config_list", "shape", "truncate"])
        c = dict(base=base, kind=kind)
        if kind == "config":
            c.update(field=rng.choice(HF_FIELDS), value=rng.choice(HOSTILE))
        elif kind == "shape":
            c.update(index=rng.randrange(1 << 30), how=rng.choice(["swap", "grow", "drop", "zero", "huge"]))
        elif kind == "truncate":
            c.update(file=rng.choice(["model.safetensors", "config.json", "tokenizer.json"]), fraction=rng.random())
    elif base == "gguf":
        kind = rng.choice(["meta", "meta", "meta", "shape", "truncate"])
        c = dict(base=base, kind=kind)
        if kind == "meta":
            c.update(key=rng.choice(GGUF_KEYS), value=rng.choice(GGUF_VALUES + [0.0, -1.0, float("nan")]))
        elif kind == "shape":
            c.update(index=rng.randrange(1 << 30), value=rng.choice([0, 1, 3, 31, 33, 64, 2 ** 20, 2 ** 40]))
        else:
            c.update(fraction=rng.random())
    else:
        kind = rng.choice(["config", "config", "config", "ffn_field", "tok", "truncate"])
        c = dict(base=base, kind=kind)
        if kind == "config":
            c.update(field=rng.choice(HF_FIELDS), value=rng.choice(HOSTILE))
        elif kind == "ffn_field":
            c.update(field=rng.choice(["n_neurons", "dim", "row_bytes", "alignment", "file_bytes", "layer_offsets"]),
                     value=rng.choice(HOSTILE + [[0, 0, 0], [0, 1 << 40]]))
        elif kind == "tok":
            c.update(field=rng.choice(["eos_token_ids", "bos_token_id", "chat_template", "add_bos_token"]),
                     value=rng.choice(HOSTILE + ["{% for", "{{ raise_exception('no') }}",
                                                 "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}"]))
        else:
            c.update(file=rng.choice(["manifest.json", "ffn.bin", "resident.safetensors", "tokenizer.json",
                                      "tokenizer_config.json"]), fraction=rng.random())
    c["id"] = i
    return c


def _json_value(v):
    return v if not (isinstance(v, float) and v != v) else "NaN"


def _set_config(cfg: dict, field, value):
    cfg[field] = value


def _rewrite_safetensors(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])


def _edit_shape(header: dict, index: int, how: str) -> None:
    names = sorted(k for k in header if k != "__metadata__")
    info = header[names[index % len(names)]]
    shape = list(info["shape"])
    if how == "swap" and len(shape) == 2:
        shape = shape[::-1]
    elif how == "grow":
        shape[0] += 1
    elif how == "drop":
        shape = shape[1:]
    elif how == "zero":
        shape[-1] = 0
    else:
        shape[0] = 2 ** 40
    info["shape"] = shape


def apply(c: dict, bases: dict, d: Path) -> Path:
    """Copy c's base to d (a fresh path) and damage it; returns the path to run."""
    src = bases[c["base"]]
    if src.is_dir():
        shutil.copytree(src, d)
    else:
        d.mkdir()
        d = d / src.name
        shutil.copy(src, d)
    kind = c["kind"]
    if c["base"].startswith("hf-"):
        if kind == "config":
            cfg = json.loads((d / "config.json").read_text())
            _set_config(cfg, c["field"], c["value"])
            (d / "config.json").write_text(json.dumps(cfg))
        elif kind == "config_list":
            (d / "config.json").write_text(json.dumps([json.loads((d / "config.json").read_text())]))
        elif kind == "shape":
            _rewrite_safetensors(d / "model.safetensors", lambda h: _edit_shape(h, c["index"], c["how"]))
        else:
            p = d / c["file"]
            os.truncate(p, int(c["fraction"] * p.stat().st_size))
    elif c["base"] == "gguf":
        if kind == "truncate":
            os.truncate(d, int(c["fraction"] * d.stat().st_size))
        else:
            import gguf
            import numpy as np

            r = gguf.GGUFReader(str(d), "r+")
            if kind == "meta":
                f = r.fields[c["key"]]
                part = f.parts[f.data[0]]
                part[0] = np.asarray(c["value"]).astype(part.dtype) if part.dtype.kind in "fiu" else part[0]
            else:
                t = r.tensors[c["index"] % len(r.tensors)]
                dims = t.field.parts[3]  # name length, name, n_dims, dims, type, offset
                dims[c["index"] % dims.size] = c["value"]
            del r
    else:
        from flashrt.format import manifest as manifest_mod

        if kind == "truncate":
            p = d / c["file"]
            os.truncate(p, int(c["fraction"] * p.stat().st_size))
        elif kind == "tok":
            p = d / "tokenizer_config.json"
            cfg = json.loads(p.read_text())
            cfg[c["field"]] = c["value"]
            p.write_text(json.dumps(cfg))
            from flashrt.format.writer import register_file

            register_file(d, "tokenizer_config.json")
        else:
            man = json.loads((d / "manifest.json").read_text())
            target = man["config"] if kind == "config" else man["ffn"]
            _set_config(target, c["field"], c["value"])
            man["checksum"] = manifest_mod.manifest_checksum(man)  # a writer that got it wrong
            (d / "manifest.json").write_text(json.dumps(man))
    return d


# ---------------------------------------------------------------------------- one case
def run_case(c: dict, bases: dict, work: Path) -> dict:
    import numpy as np

    import flashrt
    from flashrt.convert import convert
    from flashrt.errors import FlashrtError

    warnings.simplefilter("ignore")
    case_dir = work / f"case-{c['id']}"
    try:
        target = apply(c, bases, case_dir)
    except Exception as e:  # the mutation itself did not apply (e.g. a field absent): nothing to test
        return {"outcome": "skip", "why": f"{type(e).__name__}: {e}"}
    try:
        if c["base"].startswith("hf-") or c["base"] == "gguf":
            model = convert(target, work / f"out-{c['id']}", dtype="float32", progress=False)
        else:
            model = target
        for mode in ("dense", "flash"):
            with flashrt.Generator(model, mode=mode, progress=False) as g:
                g.logits(np.array([1, 2, 3], np.int64))
                if g.tokenizer is not None:
                    g.generate("hi", max_new_tokens=3)
                if g.tokenizer is not None and g.tokenizer.chat_template:
                    g.chat([{"role": "user", "content": "hi"}], max_new_tokens=2)
        return {"outcome": "ok"}
    except FlashrtError as e:
        msg = str(e)
        return {"outcome": "refused", "error": type(e).__name__, "message": msg[:300],
                "multiline": "\n" in msg.strip()}
    except BaseException as e:  # noqa: BLE001 -- exactly what the fuzz is looking for
        return {"outcome": "bug", "error": f"{type(e).__name__}: {str(e)[:300]}",
                "traceback": traceback.format_exc()[-2500:]}


def fork_case(c: dict, bases: dict, work: Path, mem_bytes: int):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a memory limit, one case, the verdict down the pipe
        os.close(r)
        try:
            resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
            out = run_case(c, bases, work)
        except BaseException as e:  # noqa: BLE001
            out = {"outcome": "bug", "error": f"driver: {type(e).__name__}: {e}"}
        data = json.dumps(out, default=str).encode()
        os.write(w, data)
        os._exit(0)
    os.close(w)
    return pid, r


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--cases", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mem-mb", type=int, default=3072)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("FLASHRT_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bases = make_bases(work)
    import flashrt  # noqa: F401 -- imported once, shared by every fork
    import flashrt.api  # noqa: F401
    import jinja2  # noqa: F401

    rng = random.Random(args.seed)
    cases = [draw_case(rng, i) for i in range(args.cases)]
    results, running, queue = {}, {}, list(cases)
    while queue or running:
        while queue and len(running) < args.jobs:
            c = queue.pop(0)
            pid, fd = fork_case(c, bases, work, args.mem_mb << 20)
            running[pid] = (c, fd, time.monotonic())
        time.sleep(0.02)
        for pid, (c, fd, t0) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0 and time.monotonic() - t0 > args.timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                results[c["id"]] = (c, {"outcome": "hang"})
            elif done == 0:
                continue
            else:
                chunks = []
                while chunk := os.read(fd, 1 << 16):
                    chunks.append(chunk)
                if os.WIFSIGNALED(status):
                    results[c["id"]] = (c, {"outcome": "crash", "signal": os.WTERMSIG(status)})
                else:
                    try:
                        results[c["id"]] = (c, json.loads(b"".join(chunks)))
                    except ValueError:
                        results[c["id"]] = (c, {"outcome": "crash", "exit": os.WEXITSTATUS(status)})
            os.close(fd)
            shutil.rmtree(work / f"case-{c['id']}", ignore_errors=True)
            shutil.rmtree(work / f"out-{c['id']}", ignore_errors=True)
            del running[pid]
    summary = {"cases": len(cases), "ok": 0, "refused": 0, "skip": 0, "bugs": [], "crashes": [], "hangs": [],
               "multiline": [], "refused_by": {}}
    for c, out in results.values():
        o = out["outcome"]
        if o in ("ok", "refused", "skip"):
            summary[o] += 1
        if o == "refused":
            summary["refused_by"][out["error"]] = summary["refused_by"].get(out["error"], 0) + 1
            summary.setdefault("messages", []).append(f"{c['base']}/{c['kind']}/{c.get('field', c.get('key', ''))}="
                                                      f"{c.get('value', '')!r}: {out['error']}: {out['message'][:160]}")
            if out.get("multiline"):
                summary["multiline"].append({"case": c, "message": out["message"]})
        elif o == "bug":
            summary["bugs"].append({"case": c, **out})
        elif o == "crash":
            summary["crashes"].append({"case": c, **out})
        elif o == "hang":
            summary["hangs"].append({"case": c})
    print("FUZZ " + json.dumps(summary, default=_json_value))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
