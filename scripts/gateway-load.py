#!/usr/bin/env python3
"""Load figures for key-fallback-gateway against the crate's fake provider (issue 13).

    python3 scripts/gateway-load.py [--no-build] [--rounds N] [--requests N] ...

It builds the gateway and the fake provider example in release mode, runs each as a
process of its own on 127.0.0.1 (ports from port 0), and measures:

1. Throughput: the same Python client (stdlib asyncio, raw HTTP/1.1 keep-alive
   connections, 16 in flight, its own process; or with --client-lib aiohttp or httpx, that
   library, httpx being what OpenAI's Python SDK uses) sends 2,000 chat completions after a warm-up,
   straight to the fake provider and through the gateway, alternately, for a few rounds.
   Gateway throughput as a ratio of direct (target >= 0.95), and CPU time per request of the
   gateway process against the fake provider process in the same run, from
   /proc/PID/stat utime+stime read around the measured phase (target <= 2x).
   With --bare-proxy, each round also goes through `examples/bare_proxy.rs` (no pool, no
   routes, no limits, no logs: the least a proxy that reads the body whole can be), as a
   yardstick for what any proxy in between costs on this machine.
2. 1,000 concurrent SSE streams through one fresh gateway process: how many end with
   `data: [DONE]`, and the gateway's peak memory per open stream ((VmHWM - idle VmRSS)
   / 1,000).
3. Startup: from spawning the gateway to the first 200 answer of a request retried in a
   tight, bounded loop.

It prints a table and PASS/FAIL against the targets, and exits 0 either way; 1 only if
something broke (a build, a process that would not start, a protocol error). Linux only
(/proc). Every loop is bounded in count and time. Not part of CI.
"""

import argparse
import asyncio
import json
import os
import random
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The client always sends the direct key; the gateway replaces it with one of its own. The
# fake provider's keys report a daily allowance of 14,400 requests, which the gateway's pool
# honours (Budgets in the README): its keys are several, so that a run stays within them.
KEY = "gsk_fake_direct"
# The gateway's keys: at least 4, and enough for the run (see `gateway_keys`).
GATEWAY_KEYS = [f"gsk_fake_gateway_{i}" for i in range(1, 5)]


def gateway_keys(requests):
    """Keys enough that none is sent 10,000 of the run's `requests`: past 14,399 the fake
    provider reports 1 request left of its day (and serves on), and the pool rations a key
    that says so, one request in flight at a time."""
    n = max(4, -(-requests // 10_000))
    return [f"gsk_fake_gateway_{i}" for i in range(1, n + 1)]
BODY = b'{"model":"llama-3.1-8b-instant","messages":[{"role":"user","content":"Hi"}]}'
STREAM_BODY = (
    b'{"model":"llama-3.1-8b-instant","stream":true,'
    b'"messages":[{"role":"user","content":"Hi"}]}'
)
PATH = "/openai/v1/chat/completions"


class Broke(Exception):
    """Something the measurement needs did not work."""


# ---------------------------------------------------------------- HTTP/1.1 client (asyncio)


def request_bytes(host, body):
    return (
        f"POST {PATH} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        f"Authorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    ).encode() + body


async def read_response(reader, on_chunk=None):
    """Reads one response (content-length or chunked); returns (status, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise Broke(f"not an HTTP answer: {lines[0]!r}")
    status = int(parts[1])
    length = None
    chunked = False
    close = False
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        name = name.strip().lower()
        value = value.strip()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
        elif name == "connection" and value.lower() == "close":
            close = True
    body = bytearray()
    if chunked:
        for _ in range(1_000_000):
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                # Trailers, then the empty line.
                for _ in range(100):
                    if await reader.readuntil(b"\r\n") == b"\r\n":
                        break
                break
            chunk = await reader.readexactly(size + 2)
            body += chunk[:-2]
            if on_chunk is not None:
                on_chunk(chunk[:-2])
    elif length is not None:
        body += await reader.readexactly(length)
        if on_chunk is not None and length:
            on_chunk(bytes(body))
    else:
        body += await reader.read()
        close = True
    return status, bytes(body), close


async def warm_then_measure(phase, statuses, requests, warmup):
    """Runs `phase(n, limit_s)` for the warm-up, tells the parent, waits for its go, then
    runs and times the measured phase: what each throughput client prints."""
    await phase(warmup, 300)
    warm = dict(statuses)
    statuses.clear()
    # Tell the parent the warm-up is over; it reads the CPU counters, then says go.
    print("warm", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        raise Broke(f"expected go, got {line!r}")
    cpu = os.times()
    start = time.perf_counter()
    await phase(requests, 600)
    elapsed = time.perf_counter() - start
    after = os.times()
    cpu_s = after.user + after.system - cpu.user - cpu.system
    return {"elapsed": elapsed, "cpu_s": cpu_s, "statuses": statuses, "warmup": warm}


async def throughput_client(addr, requests, concurrency, warmup):
    host, port = addr.rsplit(":", 1)
    req = request_bytes(addr, BODY)
    statuses = {}

    async def worker(conn, counter):
        reader, writer = conn
        while counter[0] > 0:
            counter[0] -= 1
            writer.write(req)
            status, _, close = await read_response(reader)
            statuses[status] = statuses.get(status, 0) + 1
            if close:
                raise Broke("the server closed a keep-alive connection")

    conns = [await asyncio.open_connection(host, int(port)) for _ in range(concurrency)]
    for _, writer in conns:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    async def phase(n, limit_s):
        counter = [n]
        await asyncio.wait_for(asyncio.gather(*(worker(c, counter) for c in conns)), limit_s)

    try:
        return await warm_then_measure(phase, statuses, requests, warmup)
    finally:
        for _, writer in conns:
            writer.close()


async def library_throughput_client(lib, addr, requests, concurrency, warmup):
    """The same measurement with a Python HTTP library: httpx (what OpenAI's Python SDK
    sends with) or aiohttp. What a Python service calling the gateway spends per request."""
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    statuses = {}
    try:
        if lib == "httpx":
            import httpx

            limits = httpx.Limits(
                max_connections=concurrency, max_keepalive_connections=concurrency
            )
            client = httpx.AsyncClient(
                base_url=f"http://{addr}", limits=limits, headers=headers, timeout=60
            )

            async def post():
                res = await client.post(PATH, content=BODY)
                return res.status_code
        else:
            import aiohttp

            client = aiohttp.ClientSession(
                base_url=f"http://{addr}",
                headers=headers,
                connector=aiohttp.TCPConnector(limit=concurrency),
            )

            async def post():
                async with client.post(PATH, data=BODY) as res:
                    await res.read()
                    return res.status
    except ImportError:
        raise Broke(f"--client-lib {lib} needs {lib}: pip install {lib}") from None

    async def worker(counter):
        while counter[0] > 0:
            counter[0] -= 1
            status = await post()
            statuses[status] = statuses.get(status, 0) + 1

    async def phase(n, limit_s):
        counter = [n]
        await asyncio.wait_for(
            asyncio.gather(*(worker(counter) for _ in range(concurrency))), limit_s
        )

    try:
        return await warm_then_measure(phase, statuses, requests, warmup)
    finally:
        if lib == "httpx":
            await client.aclose()
        else:
            await client.close()


async def sse_client(addr, streams, timeout):
    host, port = addr.rsplit(":", 1)
    req = request_bytes(addr, STREAM_BODY)
    state = {"open": 0, "live": 0, "max_live": 0, "done": 0, "errors": [], "signalled": False}

    def opened():
        state["open"] += 1
        state["live"] += 1
        state["max_live"] = max(state["max_live"], state["live"])
        if state["open"] == streams and not state["signalled"]:
            state["signalled"] = True
            print("open", flush=True)

    async def one():
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError as err:
            state["errors"].append(f"connect: {err}")
            return
        first = [True]

        def on_chunk(_chunk):
            if first[0]:
                first[0] = False
                opened()

        try:
            writer.write(req)
            status, body, _ = await read_response(reader, on_chunk)
            if status != 200:
                state["errors"].append(f"status {status}")
            elif body.rstrip().endswith(b"data: [DONE]"):
                state["done"] += 1
            else:
                state["errors"].append("stream ended without data: [DONE]")
        except (OSError, asyncio.IncompleteReadError, Broke, ValueError) as err:
            state["errors"].append(f"{type(err).__name__}: {err}")
        finally:
            if not first[0]:
                state["live"] -= 1
            writer.close()

    start = time.perf_counter()
    tasks = [asyncio.ensure_future(one()) for _ in range(streams)]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    elapsed = time.perf_counter() - start
    if not state["signalled"]:
        # Not all opened: the parent still waits for this line.
        print("open", flush=True)
    errors = state["errors"]
    if pending:
        errors.append(f"{len(pending)} streams still open after {timeout} s")
    return {
        "done": state["done"],
        "max_live": state["max_live"],
        "elapsed": elapsed,
        "errors": errors[:5],
        "error_count": len(errors),
    }


def client_main(args):
    if args.client == "throughput":
        sizes = (args.addr, args.requests, args.concurrency, args.warmup)
        if args.client_lib == "raw":
            result = asyncio.run(throughput_client(*sizes))
        else:
            result = asyncio.run(library_throughput_client(args.client_lib, *sizes))
    else:
        result = asyncio.run(sse_client(args.addr, args.streams, args.timeout))
    print("result " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- processes and /proc


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command: state is field 3, utime 14, stime 15 (1-based, man 5 proc).
    return int(fields[11]) + int(fields[12])


def cpu_ns(pid):
    """The same CPU time to the nanosecond: the sum of every thread's run time in
    /proc/PID/task/*/schedstat (threads that end in between are missed; tokio's workers do
    not end). A cross-check of the clock ticks, which are 10 ms each."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def status_kib(pid, name):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise Broke(f"no {name} in /proc/{pid}/status")


_BUFFERS = {}


def read_line_with(proc, needle, deadline_s):
    """Reads proc's stdout until a line containing needle, within deadline_s. Lines read
    past it are kept for the next call."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + deadline_s
    buf = _BUFFERS.get(proc.pid, b"")
    seen = []
    try:
        for _ in range(1_000_000):
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                seen.append(text)
                if needle in text:
                    _BUFFERS[proc.pid] = buf
                    return text
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not sel.select(timeout=left):
                continue
            data = os.read(proc.stdout.fileno(), 65536)
            if not data:
                break
            buf += data
    finally:
        sel.close()
    _BUFFERS[proc.pid] = buf
    raise Broke(f"no line with {needle!r} within {deadline_s} s; saw {seen[-5:]!r}")


def addr_of(line):
    rest = line.split("http://", 1)[1]
    return rest.split()[0].rstrip("/")


class Procs:
    def __init__(self, logdir):
        self.logdir = logdir
        self.procs = []

    def spawn(self, name, argv, env=None):
        log = open(os.path.join(self.logdir, f"{name}.log"), "ab")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc, grace=5.0):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self):
        for proc in list(self.procs):
            self.stop(proc)


def clean_env():
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GROQ_API_KEY", "GATEWAY_", "UPSTREAM_", "REDIS_URL"))
    }
    return env


def start_provider(procs, bins, stream_interval_ms=None):
    argv = [bins["provider"]]
    if stream_interval_ms is not None:
        argv += ["--stream-interval-ms", str(stream_interval_ms)]
    argv += [KEY] + GATEWAY_KEYS
    proc = procs.spawn("fake_provider", argv, clean_env())
    return proc, addr_of(read_line_with(proc, "listening on http://", 30))


def gateway_env(provider_addr):
    env = clean_env()
    for i, key in enumerate(GATEWAY_KEYS):
        env["GROQ_API_KEY" if i == 0 else f"GROQ_API_KEY_{i + 1}"] = key
    env["UPSTREAM_URL"] = f"http://{provider_addr}"
    return env


def gateway_argv(bins):
    return [bins["gateway"], "--listen", "127.0.0.1:0"]


def start_bare_proxy(procs, bins, provider_addr):
    proc = procs.spawn("bare_proxy", [bins["bare"], f"http://{provider_addr}"], clean_env())
    return proc, addr_of(read_line_with(proc, "listening on http://", 30))


def start_gateway(procs, bins, provider_addr):
    proc = procs.spawn("gateway", gateway_argv(bins), gateway_env(provider_addr))
    return proc, addr_of(read_line_with(proc, "listening on http://", 30))


def client_argv(mode, addr, args):
    argv = [sys.executable, os.path.abspath(__file__), "--client", mode, "--addr", addr]
    if mode == "throughput":
        argv += [
            "--requests", str(args.requests),
            "--concurrency", str(args.concurrency),
            "--warmup", str(args.warmup),
            "--client-lib", args.client_lib,
        ]
    else:
        argv += ["--streams", str(args.streams), "--timeout", str(args.sse_timeout)]
    return argv


def run_client(argv, on_signal, expect, timeout):
    """Runs a client process; calls on_signal(proc) when it prints `expect`."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        read_line_with(proc, expect, timeout)
        on_signal(proc)
        line = read_line_with(proc, "result ", timeout)
        proc.wait(30)
    except Broke:
        proc.kill()
        proc.wait(5)
        err = proc.stderr.read().decode(errors="replace")[-2000:]
        raise Broke(f"client {argv[3]} failed:\n{err}")
    return json.loads(line.split(" ", 1)[1])


# ---------------------------------------------------------------- the three measurements


def throughput(procs, bins, args):
    provider, provider_addr = start_provider(procs, bins)
    gateway, gateway_addr = start_gateway(procs, bins, provider_addr)
    # The process between client and provider whose CPU is read: the gateway, or the bare
    # proxy in its rounds (in direct rounds, the idle gateway).
    targets = [("direct", provider_addr, gateway), ("gateway", gateway_addr, gateway)]
    bare = None
    if args.bare_proxy:
        bare, bare_addr = start_bare_proxy(procs, bins, provider_addr)
        targets.append(("bare", bare_addr, bare))
    tick = os.sysconf("SC_CLK_TCK")
    rounds = []
    for i in range(args.rounds):
        row = {}
        # Direct first; the gateway and the bare proxy take turns at second place, so that
        # neither always runs last.
        order = targets if i % 2 == 0 else [targets[0]] + targets[:0:-1]
        for target, addr, middle in order:
            before = {}

            def go(client, before=before, middle=middle):
                before["gw"] = cpu_ticks(middle.pid)
                before["fp"] = cpu_ticks(provider.pid)
                before["gw_ns"] = cpu_ns(middle.pid)
                before["fp_ns"] = cpu_ns(provider.pid)
                client.stdin.write(b"go\n")
                client.stdin.flush()

            result = run_client(client_argv("throughput", addr, args), go, "warm", 180)
            gw = cpu_ticks(middle.pid) - before["gw"]
            fp = cpu_ticks(provider.pid) - before["fp"]
            gw_ns = cpu_ns(middle.pid) - before["gw_ns"]
            fp_ns = cpu_ns(provider.pid) - before["fp_ns"]
            ok = result["statuses"].get("200", 0)
            if ok != args.requests:
                raise Broke(f"{target}: {result['statuses']} for {args.requests} requests")
            row[target] = {
                "rps": args.requests / result["elapsed"],
                "gw_ticks": gw,
                "fp_ticks": fp,
                "gw_ns_ms": gw_ns / 1e6 / args.requests,
                "fp_ns_ms": fp_ns / 1e6 / args.requests,
                "gw_ms": gw * 1000 / tick / args.requests,
                "fp_ms": fp * 1000 / tick / args.requests,
                "client_ms": result["cpu_s"] * 1000 / args.requests,
            }
        rounds.append(row)
    procs.stop(gateway)
    if bare is not None:
        procs.stop(bare)
    procs.stop(provider)
    return rounds


def sse(procs, bins, args):
    provider, provider_addr = start_provider(procs, bins, args.stream_interval_ms)
    gateway, gateway_addr = start_gateway(procs, bins, provider_addr)
    # Idle: after a few requests, so that lazily made state is counted as idle.
    for _ in range(20):
        first_request(gateway_addr, 50, 10)
    time.sleep(0.5)
    idle = status_kib(gateway.pid, "VmRSS")
    at_open = {}

    def sample(_client):
        at_open["rss"] = status_kib(gateway.pid, "VmRSS")

    result = run_client(
        client_argv("sse", gateway_addr, args), sample, "open", args.sse_timeout + 30
    )
    hwm = status_kib(gateway.pid, "VmHWM")
    procs.stop(gateway, 35)
    procs.stop(provider)
    result.update(idle_kib=idle, open_kib=at_open.get("rss"), hwm_kib=hwm)
    return result


def first_request(addr, attempts, deadline_s):
    """Sends one non-streamed request at a time until a 200 or the bounds; returns tries."""
    host, port = addr.rsplit(":", 1)
    req = request_bytes(addr, BODY)
    # A request with Connection: close, so reading to EOF ends the answer.
    req = req.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    deadline = time.monotonic() + deadline_s
    last = None
    for tries in range(1, attempts + 1):
        if time.monotonic() > deadline:
            break
        try:
            with socket.create_connection((host, int(port)), timeout=2) as sock:
                sock.sendall(req)
                data = b""
                while len(data) < 12:
                    more = sock.recv(4096)
                    if not more:
                        break
                    data += more
            if data.startswith(b"HTTP/1.1 200"):
                return tries
            last = data[:40]
        except OSError as err:
            last = err
        time.sleep(0.0005)
    raise Broke(f"no 200 from {addr} within {attempts} tries / {deadline_s} s: {last!r}")


def startup(procs, bins, args):
    provider, provider_addr = start_provider(procs, bins)
    figures = []
    for _ in range(args.startup_runs):
        start = time.perf_counter()
        gateway = procs.spawn("gateway", gateway_argv(bins), gateway_env(provider_addr))
        # The port is not known until the gateway prints it: reading that line is part of
        # the loop's first iterations (it comes before the first request can be served).
        addr = addr_of(read_line_with(gateway, "listening on http://", 10))
        first_request(addr, 10_000, 10)
        figures.append((time.perf_counter() - start) * 1000)
        procs.stop(gateway)
    procs.stop(provider)
    return figures


# ---------------------------------------------------------------- main


def build(args):
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
    if not os.path.isabs(target):
        target = os.path.join(REPO, target)
    bins = {
        "gateway": os.path.join(target, "release", "key-fallback-gateway"),
        "provider": os.path.join(target, "release", "examples", "fake_provider"),
        "bare": os.path.join(target, "release", "examples", "bare_proxy"),
    }
    if not args.no_build:
        cmd = [
            "cargo", "build", "--release", "--features", "gateway",
            "--bin", "key-fallback-gateway", "--example", "fake_provider",
            "--example", "bare_proxy",
        ]
        print("building:", " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=REPO).returncode != 0:
            raise Broke("cargo build failed")
    for path in bins.values():
        if not os.access(path, os.X_OK):
            raise Broke(f"{path} is missing (run without --no-build)")
    return bins


def raise_nofile(streams):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The gateway holds two sockets per stream, the provider and the client one each.
    need = 2 * streams + 512
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    if soft != resource.RLIM_INFINITY and soft < need:
        print(f"warning: RLIMIT_NOFILE is {soft}, {need} wanted", flush=True)


def median_interval(values, resamples=2000, seed=13):
    """The 95% interval of the median of `values`, by bootstrap (a fixed seed: the same
    figures give the same interval)."""
    rng = random.Random(seed)
    n = len(values)
    medians = sorted(
        statistics.median(rng.choices(values, k=n)) for _ in range(resamples)
    )
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def report(args, rounds, streams, starts):
    tick = os.sysconf("SC_CLK_TCK")
    ratios = [r["gateway"]["rps"] / r["direct"]["rps"] for r in rounds]
    ratio = statistics.median(ratios)
    # CPU over every gateway round together: the ticks are 10 ms each, one round is a
    # few of them.
    total = args.requests * len(rounds)
    gw_ms = sum(r["gateway"]["gw_ticks"] for r in rounds) * 1000 / tick / total
    fp_ms = sum(r["gateway"]["fp_ticks"] for r in rounds) * 1000 / tick / total
    gw_ns = sum(r["gateway"]["gw_ns_ms"] for r in rounds) / len(rounds)
    fp_ns = sum(r["gateway"]["fp_ns_ms"] for r in rounds) / len(rounds)
    cpu_ratio = gw_ms / fp_ms if fp_ms else float("inf")
    bare = args.bare_proxy
    print()
    print(f"throughput: {args.requests} requests, {args.concurrency} in flight, "
          f"after {args.warmup} of warm-up, {args.rounds} rounds, client {args.client_lib}")
    print("CPU ms per request, from utime+stime (schedstat in brackets), in the gateway"
          " runs; client: the Python client's own, direct / through the gateway")
    print(f"{'round':>5} {'direct req/s':>12} {'gateway req/s':>13} {'ratio':>6} "
          f"{'gateway':>15} {'provider':>15} {'client':>13}")
    for i, r in enumerate(rounds):
        g, d = r["gateway"], r["direct"]
        gw = f"{g['gw_ms']:.3f} ({g['gw_ns_ms']:.3f})"
        fp = f"{g['fp_ms']:.3f} ({g['fp_ns_ms']:.3f})"
        client = f"{d['client_ms']:.3f} / {g['client_ms']:.3f}"
        line = (f"{i + 1:>5} {d['rps']:>12.0f} {g['rps']:>13.0f} {ratios[i]:>6.3f} "
                f"{gw:>15} {fp:>15} {client:>13}")
        if bare:
            b = r["bare"]
            line += (f"   bare proxy {b['rps']:>6.0f} req/s, {b['rps'] / d['rps']:.3f}, "
                     f"CPU {b['gw_ms']:.3f} ({b['gw_ns_ms']:.3f}) ms")
        print(line)
    low, high = median_interval(ratios)
    rows = [
        ("throughput gateway / direct (median)", f"{ratio:.3f}", ">= 0.95", ratio >= 0.95),
        ("  95% interval of the median (bootstrap)", f"{low:.3f}-{high:.3f}", "", None),
        ("CPU ms/request gateway", f"{gw_ms:.3f}", "", None),
        ("CPU ms/request fake provider", f"{fp_ms:.3f}", "", None),
        ("CPU gateway / provider", f"{cpu_ratio:.2f}", "<= 2", cpu_ratio <= 2),
        ("  the same from schedstat", f"{gw_ns / fp_ns:.2f}", "<= 2", gw_ns / fp_ns <= 2),
    ]
    if bare:
        bare_ratios = [r["bare"]["rps"] / r["direct"]["rps"] for r in rounds]
        bare_ratio = statistics.median(bare_ratios)
        bare_low, bare_high = median_interval(bare_ratios)
        # Round by round: the gateway's phase against the bare proxy's in the same round.
        versus = [r["gateway"]["rps"] / r["bare"]["rps"] for r in rounds]
        versus_low, versus_high = median_interval(versus)
        bare_ms = sum(r["bare"]["gw_ticks"] for r in rounds) * 1000 / tick / total
        bare_fp_ms = sum(r["bare"]["fp_ticks"] for r in rounds) * 1000 / tick / total
        rows += [
            ("yardstick: bare proxy / direct (median)", f"{bare_ratio:.3f}", "", None),
            ("  95% interval of the median (bootstrap)", f"{bare_low:.3f}-{bare_high:.3f}", "",
             None),
            ("  CPU ms/request bare proxy", f"{bare_ms:.3f}", "", None),
            ("  CPU bare proxy / provider",
             f"{bare_ms / bare_fp_ms:.2f}" if bare_fp_ms else "inf", "", None),
            ("gateway / bare proxy, round by round (median)",
             f"{statistics.median(versus):.3f}", "", None),
            ("  95% interval of the median (bootstrap)", f"{versus_low:.3f}-{versus_high:.3f}",
             "", None),
        ]
    if streams is not None:
        # VmHWM can lag VmRSS a little (the kernel folds per-thread counts in now and then).
        peak = max(streams["hwm_kib"], streams["open_kib"] or 0)
        per_stream = (peak - streams["idle_kib"]) / args.streams
        print(f"SSE: {args.streams} streams, {args.stream_interval_ms} ms between events: "
              f"{streams['done']} ended with data: [DONE], at most {streams['max_live']} open "
              f"at once, in {streams['elapsed']:.1f} s; gateway VmRSS idle "
              f"{streams['idle_kib']} KiB, with all open {streams['open_kib']} KiB, VmHWM "
              f"{streams['hwm_kib']} KiB")
        if streams["error_count"]:
            print(f"SSE errors ({streams['error_count']}): {streams['errors']}")
        rows += [
            ("SSE streams completed", f"{streams['done']}/{args.streams}",
             f"{args.streams}/{args.streams}", streams["done"] == args.streams),
            ("SSE streams open at once (max)", f"{streams['max_live']}",
             f"{args.streams}", streams["max_live"] == args.streams),
            ("gateway memory per open stream", f"{per_stream:.1f} KiB", "", None),
            ("  peak - idle, all streams", f"{peak - streams['idle_kib']} KiB", "", None),
        ]
    if starts:
        print("startup ms: " + ", ".join(f"{s:.1f}" for s in starts))
        rows.append(("startup to first 200 (median)", f"{statistics.median(starts):.1f} ms",
                     "", None))
    print()
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'measured':>12}  {'target':>9}  result")
    for name, value, target, ok in rows:
        verdict = "" if ok is None else ("PASS" if ok else "FAIL")
        print(f"{name:<{width}}  {value:>12}  {target:>9}  {verdict}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-build", action="store_true", help="use the binaries as built")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--client-lib", choices=["raw", "aiohttp", "httpx"], default="raw",
                        help="the throughput client: raw asyncio sockets (the cheapest a "
                        "Python client can be), aiohttp, or httpx (what OpenAI's Python SDK "
                        "sends with); the last two need pip install")
    parser.add_argument("--rounds", type=int, default=5,
                        help="direct and gateway measured alternately, this many times each")
    parser.add_argument("--bare-proxy", action="store_true",
                        help="each round also through examples/bare_proxy.rs, as a yardstick")
    parser.add_argument("--streams", type=int, default=1000, help="0: no stream figures")
    parser.add_argument("--stream-interval-ms", type=int, default=1000,
                        help="pause between the fake provider's events (9 per stream)")
    parser.add_argument("--sse-timeout", type=float, default=60.0)
    parser.add_argument("--startup-runs", type=int, default=5, help="0: no startup figure")
    # Internal: the client process.
    parser.add_argument("--client", choices=["throughput", "sse"], help=argparse.SUPPRESS)
    parser.add_argument("--addr", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return 0
    if not sys.platform.startswith("linux"):
        print("gateway-load.py reads /proc: Linux only", file=sys.stderr)
        return 1
    global GATEWAY_KEYS
    GATEWAY_KEYS = gateway_keys(args.rounds * (args.warmup + args.requests))
    raise_nofile(args.streams)
    logdir = tempfile.mkdtemp(prefix="gateway-load-")
    procs = Procs(logdir)
    try:
        bins = build(args)
        print(f"process logs in {logdir}", flush=True)
        print("throughput ...", flush=True)
        rounds = throughput(procs, bins, args)
        streams = None
        if args.streams > 0:
            print("SSE streams ...", flush=True)
            streams = sse(procs, bins, args)
        starts = []
        if args.startup_runs > 0:
            print("startup ...", flush=True)
            starts = startup(procs, bins, args)
        report(args, rounds, streams, starts)
    except Broke as err:
        print(f"gateway-load: broke: {err}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
