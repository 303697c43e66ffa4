"""Serving throughput and latency: `airlock serve` on the tiny model under bounded load from another process.

    nice -n 19 .venv/bin/python tests/bench/bench_serve.py [--clients 32] [--seconds 30] [--max-tokens 32]
    .venv/bin/python tests/bench/bench_serve.py --home H --run RUN      # reuse an unlocked appliance and run

Without --home it builds a throw-away appliance the way an operator would (vault, the demo corpus's chat
records, a 2-step LoRA run of tiny-deepseek-r1 exported to FP32 ONNX by `airlock optimize`, a second such run
exported by `airlock optimize --variants genai-int4` (onnxruntime-genai's builder), an API key; the vault uses the
test-only fast KDF).
Then, for each --backends entry (pytorch; auto: the first run's ONNX export on ONNX Runtime or TensorRT, as
`airlock optimize` prepared it; genai: the second run's onnxruntime-genai int4 export, `--backend auto`) and each
--modes entry, it starts the real server on a loopback port
and a second process that keeps `--clients` concurrent clients, all on ONE API key, busy for `--seconds`
with chat completions of exactly `--max-tokens` tokens (`ignore_eos`), half of them streamed:

    one       --max-batch 1 --workers 1: one request decodes at a time (the baseline)
    threads   --max-batch 1 --workers 2: one request per worker thread (the server before batching)
    batched   the default limits: continuous batching, 32 rows, default queue and per-key limits

It prints requests/s, generated tokens/s, p50/p99 latency, p50 time to first token of the streams,
the CPU milliseconds per generated token of the server and of the load process (on a shared machine throughput
follows the cores one gets; CPU per token says where they went), and errors by status (429/503 are the
admission control refusing, never a hung connection; the batched mode runs at the default limits, where 32 users
of one key must get none). Then the
tokens/s ratio of each mode to `one` on the same backend, measured in this one run (goal for
batched: >= 4x). Never fails on time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
QUESTION = "The compressor C2 shows intermittent stop. What should I check first?"


def airlock(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([str(BIN / "airlock"), *args], capture_output=True, text=True, env={**os.environ, **env},
                            cwd=REPO, check=False)
    if result.returncode != 0:
        raise SystemExit(f"`airlock {' '.join(args[:3])}` failed: {result.stderr.strip()}")
    return result.stdout


def build_appliance(root: Path, genai: bool) -> tuple[dict[str, str], dict[str, str]]:
    """A fresh home with a succeeded tiny LoRA run exported to FP32 ONNX, and with `genai` a second one exported by
    onnxruntime-genai. Returns (environment, run id per --backends entry)."""
    env = {"AIRLOCK_HOME": str(root / "home"), "AIRLOCK_KDF_PROFILE": "test"}  # test-only KDF: a throw-away vault
    (root / "pass").write_text("bench passphrase for a throw-away vault\n")
    airlock(env, "vault", "init", "--passphrase-file", str(root / "pass"))
    airlock(env, "vault", "unlock", "--passphrase-file", str(root / "pass"))
    lines = (REPO / "models" / "corpus" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    (root / "qa").mkdir()
    (root / "qa" / "qa.jsonl").write_text("\n".join(line for line in lines if '"messages"' in line) + "\n")
    airlock(env, "data", "import", str(root / "qa"), "--name", "qa", "--near-dup", "off")
    (root / "tiny.toml").write_text("max_steps = 2\neval_every = 2\nbatch_size = 2\nmax_length = 64\nrank = 4\n")
    runs = {}
    for name, variants in (("auto", "fp32"), ("genai", "genai-int4"))[:2 if genai else 1]:
        out = json.loads(airlock(env, "train", "lm", "--base", "tiny-deepseek-r1", "--data", "qa", "--recipe",
                                 str(root / "tiny.toml"), "--wait", "--json"))
        # auto: an FP32 ONNX export, so that `--backend auto` has ONNX Runtime to choose; genai: onnxruntime-genai.
        airlock(env, "optimize", "run", out["run"]["id"], "--variants", variants, "--no-qat", "--wait")
        runs[name] = out["run"]["id"]
    runs["pytorch"] = runs["auto"]
    return env, runs


MODES = {"one": ["--max-batch", "1", "--workers", "1"], "threads": ["--max-batch", "1", "--workers", "2"],
         "batched": []}
"""Server options per mode. The unbatched modes get room for every client (their point is throughput); batched
runs at the defaults."""


def start_server(env: dict[str, str], run: str, backend: str, mode: str, clients: int, log: Path
                 ) -> tuple[subprocess.Popen, str]:
    room = [] if mode == "batched" else ["--queue-depth", str(clients), "--per-key-concurrency", str(clients)]
    backend = "auto" if backend == "genai" else backend  # the genai run's own export, chosen by `auto`
    process = subprocess.Popen([str(BIN / "airlock"), "serve", "--port", "0", "--run", f"qa={run}", "--backend",
                                backend, *MODES[mode], *room],
                               stdout=subprocess.PIPE, stderr=log.open("wb"), text=True, env={**os.environ, **env},
                               cwd=REPO)
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(r"listening on (http://[\d.]+:\d+)", line)
        if match:
            return process, match.group(1)
    raise SystemExit(f"the server did not start; see {log}")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def load(url: str, key: str, clients: int, seconds: float, max_tokens: int) -> dict:
    """The second process: `clients` concurrent clients for `seconds`; returns the measurements."""
    import asyncio

    import httpx

    latencies: list[float] = []
    first_tokens: list[float] = []
    errors: dict[str, int] = {}
    tokens = [0]
    body = {"model": "qa", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens,
            "temperature": 0.7, "ignore_eos": True}

    async def client(number: int, http: httpx.AsyncClient, deadline: float) -> None:
        streamed = number % 2 == 1
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                if streamed:
                    async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
                        if response.status_code != 200:
                            await response.aread()
                            errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
                            await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
                            continue
                        first = None
                        async for line in response.aiter_lines():
                            # The first text, answer or reasoning (an R1 model streams reasoning_content first).
                            if first is None and 'content": "' in line and '"content": ""' not in line:
                                first = time.monotonic() - started
                        if first is not None:
                            first_tokens.append(first)
                    tokens[0] += max_tokens
                else:
                    response = await http.post("/v1/chat/completions", json=body)
                    if response.status_code != 200:
                        errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
                        await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
                        continue
                    tokens[0] += response.json()["usage"]["completion_tokens"]
                latencies.append(time.monotonic() - started)
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    async def main() -> float:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120,
                                     limits=limits) as http:
            started = time.monotonic()
            await asyncio.gather(*(client(i, http, started + seconds) for i in range(clients)))
            return time.monotonic() - started

    cpu = time.process_time()
    elapsed = asyncio.run(main())
    return {"elapsed_s": elapsed, "client_cpu_s": time.process_time() - cpu, "requests": len(latencies),
            "tokens": tokens[0], "errors": errors,
            "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
            "ttft_p50_s": percentile(first_tokens, 0.5)}


def cpu_per_token(result: dict, which: str) -> float:
    """CPU milliseconds the server (or the load process) spent per generated token: where the cores went."""
    return 1000 * result[which] / max(1, result["tokens"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--modes", default="one,threads,batched",
                        help="server modes to compare: one, threads, batched (see the module docstring)")
    parser.add_argument("--backends", default="pytorch,auto,genai",
                        help="what to compare: pytorch, auto (the ONNX export on ONNX Runtime/TensorRT), genai (an "
                             "onnxruntime-genai int4 export)")
    parser.add_argument("--home", type=Path, help="an existing AIRLOCK_HOME with an unlocked vault (admin logged in)")
    parser.add_argument("--run", help="with --home: the succeeded LM run to serve (every --backends entry)")
    parser.add_argument("--load", nargs=2, metavar=("URL", "KEY"), help=argparse.SUPPRESS)  # the client process
    args = parser.parse_args()
    if args.load:
        print(json.dumps(load(args.load[0], args.load[1], args.clients, args.seconds, args.max_tokens)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        backends = args.backends.split(",")
        unknown = [b for b in backends if b not in ("pytorch", "auto", "genai")]
        if unknown:
            raise SystemExit(f"--backends: {', '.join(unknown)} not one of pytorch, auto, genai")
        if args.home:
            if not args.run:
                raise SystemExit("--home needs --run RUN")
            env, runs = {"AIRLOCK_HOME": str(args.home)}, dict.fromkeys(backends, args.run)
        else:
            print("building a throw-away appliance with tiny LoRA runs ...", flush=True)
            env, runs = build_appliance(root, genai="genai" in backends)
        key = json.loads(airlock(env, "keys", "create", f"bench-{int(time.time())}", "--json"))["secret"]
        print(f"runs {', '.join(sorted(set(runs.values())))}; {args.clients} clients x {args.seconds:g} s; "
              f"{args.max_tokens} tokens per request; "
              f"half streamed; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other work on the "
              "machine skews every number)", flush=True)
        print("backend    mode      req/s   tok/s    p50 s   p99 s   ttft p50 s  CPU ms/token server+client  errors")
        measured: dict[tuple[str, str], dict] = {}
        for backend in backends:
            for mode in args.modes.split(","):
                if mode not in MODES:
                    raise SystemExit(f"--modes: {mode!r} is not one of {', '.join(MODES)}")
                log = root / f"server-{backend}-{mode}.log"
                process, url = start_server(env, runs[backend], backend, mode, args.clients, log)
                try:
                    models = subprocess.run([sys.executable, "-c", "import httpx, sys; print(httpx.get(sys.argv[1], "
                                             "headers={'Authorization': 'Bearer ' + sys.argv[2]}).text)",
                                             f"{url}/v1/models", key], capture_output=True, text=True, check=True)
                    kind = json.loads(models.stdout)["data"][0]["airlock"]["backend"]
                    server_cpu = cpu_seconds(process.pid)
                    client = subprocess.run([sys.executable, __file__, "--load", url, key, "--clients",
                                             str(args.clients), "--seconds", str(args.seconds), "--max-tokens",
                                             str(args.max_tokens)], capture_output=True, text=True, check=False)
                    server_cpu = cpu_seconds(process.pid) - server_cpu
                finally:
                    stop_server(process)
                if client.returncode != 0:
                    print(f"{kind:<10} {mode:<8}  load process failed: {client.stderr.strip()[-300:]}")
                    continue
                result = json.loads(client.stdout.strip().splitlines()[-1])
                result["server_cpu_s"] = server_cpu
                measured[(kind, mode)] = result
                print(f"{kind:<10} {mode:<8}  {result['requests'] / result['elapsed_s']:<6.2f}  "
                      f"{result['tokens'] / result['elapsed_s']:<7.1f}  {result['p50_s']:<7.3f} "
                      f"{result['p99_s']:<7.3f} {result['ttft_p50_s']:<11.3f} "
                      f"{cpu_per_token(result, 'server_cpu_s'):<6.3f} + {cpu_per_token(result, 'client_cpu_s'):<18.3f} "
                      f"{result['errors'] or 'none'}", flush=True)
        missing = [k for k in ("pytorch", "ort-cpu", "ort-cuda", "tensorrt", "genai-cpu", "genai-cuda")
                   if k not in {b for b, _ in measured}]
        if missing:
            print(f"not measured here: {', '.join(missing)} (no GPU, no TensorRT, or no ONNX export of the run)")
        for (kind, mode), result in measured.items():
            base = measured.get((kind, "one"))
            if mode == "one" or base is None:
                continue
            ratio = (result["tokens"] / result["elapsed_s"]) / max(1e-9, base["tokens"] / base["elapsed_s"])
            goal = f" (goal >= 4x: {'met' if ratio >= 4 else 'NOT met'})" if mode == "batched" else ""
            print(f"tokens/s ratio {kind} {mode} vs one at a time: {ratio:.2f}x{goal}")
            if mode == "batched":
                refused = {code: n for code, n in result["errors"].items() if code in ("429", "503")}
                print(f"{kind} batched, {args.clients} users on one key at the default limits: "
                      f"{sum(refused.values())} refused {refused or ''}".rstrip())
        if not args.home:
            airlock(env, "vault", "lock")


if __name__ == "__main__":
    main()
