"""What `flashrt serve` costs over calling the Generator: the same greedy chat request, run
alternately in-process (Generator.stream_generate) and through the server with the openai
client (streamed), on one model. Prints medians of decode tokens/s and time to first token,
and the ratio server / in-process.

    python bench/bench_server.py [--model PATH] [--tokens 64] [--runs 5] [--threads N]

Needs the server extra and the openai client (`pip install "flashrt[server]" openai`).
"""
import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import flashrt

REPO = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def in_process(g, n):
    ids = g.encode_chat(MESSAGES)
    t0 = time.perf_counter()
    first = None
    count = 0
    for r in g.stream_generate(ids, n):
        if first is None:
            first = time.perf_counter()
        count += 1
    end = time.perf_counter()
    return first - t0, (count - 1) / (end - first), count


def through_server(client, name, n):
    t0 = time.perf_counter()
    first = None
    stream = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=n, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    return first - t0, (usage.completion_tokens - 1) / (end - first), usage.completion_tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    import openai

    g = flashrt.Generator(args.model, threads=args.threads, progress=False)
    cmd = [sys.executable, "-m", "flashrt", "serve", "--port", "0", "-m", str(g.path)]
    if args.threads:
        cmd += ["-t", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        m = re.search(r"serving (\S+) at (\S+/v1)", proc.stderr.readline())
        name, url = m.group(1), m.group(2)
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        in_process(g, 4), through_server(client, name, 4)  # warm up both
        rows = {"in-process": [], "server": []}
        for _ in range(args.runs):
            rows["in-process"].append(in_process(g, args.tokens))
            rows["server"].append(through_server(client, name, args.tokens))
        print(f"model {g.path.name}, {args.tokens} tokens, {args.runs} runs alternating, medians:")
        med = {}
        for k, v in rows.items():
            ttft = statistics.median(r[0] for r in v)
            tps = statistics.median(r[1] for r in v)
            med[k] = (ttft, tps)
            print(f"  {k:10s}  first token {ttft * 1000:7.1f} ms   decode {tps:6.1f} tok/s   tokens {v[0][2]}")
        print(f"  server / in-process: decode {med['server'][1] / med['in-process'][1]:.3f}x, "
              f"first token {med['server'][0] / med['in-process'][0]:.3f}x")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        g.close()


if __name__ == "__main__":
    main()
