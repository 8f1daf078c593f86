#!/usr/bin/env python3
"""Chaos benchmark: c3-agent uploading through a fault-injecting S3 proxy, vs `aws s3 sync`.

    python3 scripts/chaos.py [--jobs 1000] [--parallel 4] [--agent PATH] [--out FILE] [--seed 1]
    python3 scripts/chaos.py --quick --agent target/debug/c3-agent     # = --jobs 50, what scripts/test.sh runs

A fault proxy (asyncio, stdlib only, 127.0.0.1) sits in front of s3s-fs. For a random fraction
`rate` of the requests it injects one fault (a kind that fits only some requests is drawn
among those only):

  503           answers `503 SlowDown` (S3 XML error body), nothing forwarded;
  reset         reads the request head (and part of the body), then resets the connection
                (SO_LINGER 0), nothing forwarded;
  applied500    forwards the request, waits for the answer, drops it and answers
                `500 InternalError`: the write happened, the ack is lost;
  stall         waits 1-3 s, then forwards normally;
  short200      (GETs) forwards, then relays the 200/206 answer's head and part of its body
                (Content-Length unchanged) and closes the connection;
  slowbody      the request's body (an upload) is read, or else the answer is sent, at 4 KB/s
                for 1-3 s, then at full speed;
  nosuchupload  (UploadPart, CompleteMultipartUpload) answers `404 NoSuchUpload`, nothing
                forwarded, and so does every later request naming that upload (it expired, or
                a lifecycle rule aborted it); the next upload of the same key is never expired;
  slowdown      answers `503 SlowDown` with `Retry-After: 1-3`, and so does every request for
                the same key until then (S3 throttling is per key or prefix); after that the
                key is not throttled again for twice as long;
  badetag       (PUTs of a whole object) forwards, and answers the store's 2xx with another
                ETag than the object's;
  mix           one of the kinds above, drawn per fault.

Every agent job (but half the `kill` ones) takes an input dataset (`datasets`: the files of a
job written into each bucket beside s3s-fs before the run: 2 MiB, 64 KiB and 300 bytes), so its
GETs meet the faults too.

The matrix: fault kinds (the ten above, plus `kill` = `mix` faults and a SIGKILL of the agent
at a random point, then `c3-agent recover`) x rates (5%, 20%, 40%) x job shapes:

  small    20 x 4 KiB files, written in two batches (live sync picks up the first);
  big      one 64 MiB file (multipart, 5 MiB parts) and two small files (1 job in 10);
  rewrite  a 9 MiB file (multipart) and a 1 MiB file rewritten in place 3 times, a file
           replaced by rename 3 times and a log appended to, with pauses around the settle
           time, so the agent is often uploading a file when it changes.

Every job gets its own state dir and config (same config for `run` and `recover`); the jobs of
one (kind, rate) pair share one bucket, so concurrent jobs deduplicate blobs against each other.

What is verified
  * A job counts as SUCCEEDED only after its files are checked one by one: every regular file left
    in its workdir's artifacts/ is in the store's manifest (`complete: true`) with its size and
    sha256, the blob exists with that size, every manifest entry (logs too) points at an existing
    blob, and no entry names a file that is not there. A SUCCEEDED job that fails this check is a
    **silent loss**.
  * The input dataset a SUCCEEDED job was given is the dataset's bytes, file by file (else a
    silent loss too: the job ran on wrong input).
  * After the last job of a (kind, rate) pair, every file under the bucket's `blobs/sha256/` is
    hashed: it must hash to its name (**corrupt blobs** must be 0).
  * SIGKILL + recover (kind `kill`): the agent is killed after a random delay (0-3 s after its
    start, so in preparation, while the script runs, during the final sync or not at all if it
    already finished), then `c3-agent recover` runs with the same config. Such a job is OK
    ("recovered") when the final status (the last terminal status in reports.jsonl) is
    SUCCEEDED, or FAILED/AGENT_ERROR with `upload_errors: 0` and a `complete: true` manifest (the
    script was lost with the agent, recover stopped it and stored what it had written); either way
    the files are verified as above, and a failed check is a silent loss. AGENT_ERROR with
    `upload_errors > 0` says itself that output is missing: counted with UPLOAD_ERROR. A kill that
    lands before the script was launched (no terminal status, or AGENT_ERROR without a manifest,
    and no sign that the script ran: no RUNNING report, no file in artifacts/, no end marker, no
    process of the job) leaves nothing to store: counted as OK ("killed before launch").
  * No process of the job may outlive `run` (or, after a kill, `recover`): processes whose
    environment names the job's artifacts dir are looked for in /proc; any found is a failure
    ("other"), and they are killed.
  * UPLOAD_ERROR is expected only when a fault window outlasts `retry_deadline_secs` (60 s); with
    independent per-request faults it should never happen here.

Comparison: `aws s3 sync` (aws-cli defaults: legacy retry mode, 5 attempts) of output of the
same shapes through a proxy listener with the same kind and rate (one sync per --aws-every agent
jobs; none for `kill`). For `rewrite`, a first sync runs while the files are being rewritten and a
second one after (a naive live sync). Counted: syncs whose final run exited non-zero, and objects
whose stored content differs from (or is missing for) the local file afterwards; "silent" = the
sync exited 0 but some object differs or is missing.

Exit status: 0 if there is no silent loss, no corrupt blob, no agent timeout, no process left
behind, and OK jobs (SUCCEEDED, or recovered as defined above) are at least 99.5% of the jobs at
the 5% and 20% fault rates and at least 95% at 40%, and the faults were in fact tried (the
proxy saw at least 5 requests a job, each kind drew a fault where about 10 draws were due, and
with 10+ kill jobs one was killed mid-run and recovered); 1 otherwise; 2 on a setup error. With 50 jobs
(about 17 a rate) this means any job that is not OK fails the run. aws-cli figures are never
gated. Random draws use a fixed seed (--seed), so the fault sequence each listener draws is
fixed; which request gets which draw still depends on timing.

Needs s3s-fs ($C3_TEST_S3S_FS, or on PATH, or ~/.cargo/bin) and a built c3-agent (default
target/release/c3-agent; `cargo build --release -p c3-agent`). aws-cli is optional (without it the
comparison is skipped). Everything runs under one temp dir in $CHAOS_TMP (default /var/tmp),
removed at exit (--keep keeps it); s3s-fs, the proxy and every process started are stopped at exit,
SIGTERM included. Every subprocess has a time limit (run 300 s, recover 300 s, aws 300 s).
"""
import argparse
import asyncio
import base64
import concurrent.futures
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))

FAULT_KINDS = ["503", "reset", "applied500", "stall", "short200", "slowbody", "nosuchupload", "slowdown", "badetag"]
KINDS = FAULT_KINDS + ["mix", "kill"]
TRICKLE_BPS = 4096  # slowbody: bytes a second while it trickles
TRICKLE_S = (1.0, 3.0)  # slowbody: for this long (drawn), then at full speed
RETRY_AFTER_S = (1, 3)  # slowdown: Retry-After (drawn); the key is throttled that long, then calm twice as long
RATES = [5, 20, 40]
SHAPES = ["small", "big", "rewrite"]
MIB = 1 << 20
SEED_JOB = "chaos-input"  # the job whose output every agent job takes as its input dataset
SEED_FILES = [("data.bin", 2 * MIB), ("labels.bin", 64 << 10), ("meta.json", 300)]
HEX64 = re.compile(r"^[0-9a-f]{64}$")

BODY_IDLE_S = 10  # a request body that stops short is answered 400 RequestTimeout (S3: after 20 s)
AGENT_TIMEOUT_S = 300  # one `c3-agent run` (its store retry deadline is 60 s per operation)
RECOVER_TIMEOUT_S = 300
AWS_TIMEOUT_S = 300
MIN_OK = {5: 0.995, 20: 0.995, 40: 0.95}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The fault proxy


class BodyTimeout(Exception):
    """No byte of a request's body came for BODY_IDLE_S."""


def s3_error(status, reason, code, message, close, extra=""):
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>chaos</RequestId></Error>").encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
            f"x-amz-request-id: chaos\r\n{extra}")
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


def parse_head(head):
    """Request or response head (ending in CRLF CRLF) -> (first line, [(lower name, value, raw line)])."""
    lines = head[:-4].split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip(), line))
    return lines[0], headers


def header(headers, name):
    for n, v, _ in headers:
        if n == name:
            return v
    return None


class Request:
    """What the proxy needs to know of a request: the S3 operation, the path, the upload it names."""

    def __init__(self, method, target):
        path, _, query = target.partition(b"?")
        q = urllib.parse.parse_qs(query.decode(errors="replace"), keep_blank_values=True)
        self.path = path
        self.upload_id = q.get("uploadId", [None])[0]
        if method == b"PUT" and self.upload_id is not None and "partNumber" in q:
            self.op = "part"
        elif method == b"POST" and self.upload_id is not None:
            self.op = "complete"
        elif method == b"POST" and "uploads" in q:
            self.op = "create"
        elif method == b"DELETE" and self.upload_id is not None:
            self.op = "abort"
        else:
            self.op = method.decode(errors="replace").lower()  # put (a whole object), get, head, ...


class Listener:
    """One port of the proxy: a fault kind, a rate, its own random stream, counters, and what
    earlier faults left behind (uploads it expired, keys it throttles)."""

    def __init__(self, name, kind, rate, seed):
        self.name, self.kind, self.rate = name, kind, rate / 100.0
        self.rng = random.Random(f"{seed}/{name}")
        self.port = None
        self.requests = 0
        self.faults = {k: 0 for k in FAULT_KINDS}
        self.expected = {k: 0.0 for k in FAULT_KINDS}  # draws each kind should have had (see draw)
        # Draws, counting those not_applied takes back from `faults` (short200 on a 404): what
        # `expected` bounds, as it counts every request a kind fits, whatever the answer.
        self.drawn = {k: 0 for k in FAULT_KINDS}
        self.echoes = 0  # requests answered as an earlier fault left things: an expired upload, a throttled key
        self.upstream_errors = 0
        self.expired = set()  # upload ids answered NoSuchUpload: every later request naming one is too
        self.expired_keys = set()  # paths whose upload was expired once: the next upload of it never is
        # path -> (monotonic time its SlowDown ends, time until which it is not throttled again).
        # Without the calm after a window, a key every job writes (the empty log's blob) was
        # throttled again at once by the retries of the others: throttled for a minute on end,
        # 74% of the listener's requests answered SlowDown at a 20% rate.
        self.throttled = {}

    def fits(self, kind, req):
        """Whether fault `kind` can be injected into this request."""
        if kind == "short200":
            return req.op == "get"
        if kind == "nosuchupload":
            return req.op in ("part", "complete") and req.path not in self.expired_keys
        if kind == "badetag":
            return req.op == "put"
        if kind == "slowdown":
            return req.path not in self.throttled
        return True

    def draw(self, req):
        """The fault for the next request, or None. An upload expired earlier stays expired, and a
        throttled key stays throttled until its Retry-After has passed (not drawn: an echo)."""
        self.requests += 1
        if req.upload_id is not None and req.upload_id in self.expired:
            self.echoes += 1
            return "nosuchupload"
        window = self.throttled.get(req.path)
        if window is not None:
            now = time.monotonic()
            if now < window[0]:
                self.echoes += 1
                return "slowdown"
            if now >= window[1]:
                del self.throttled[req.path]
        kinds = [k for k in (FAULT_KINDS if self.kind not in FAULT_KINDS else [self.kind]) if self.fits(k, req)]
        # What each kind should have drawn: the gate fails a kind that drew none where this says
        # it could not plausibly miss (the injection silently broken makes every job pass).
        for k in kinds:
            self.expected[k] += self.rate / len(kinds)
        if not kinds or self.rng.random() >= self.rate:
            return None
        kind = self.rng.choice(kinds)
        self.drawn[kind] += 1
        self.faults[kind] += 1
        if kind == "nosuchupload":
            self.expired.add(req.upload_id)
            self.expired_keys.add(req.path)
        return kind

    def not_applied(self, kind):
        """A drawn fault the answer did not allow (short200 on a 404, badetag on a 412): not a
        fault injected, still a draw (`drawn`)."""
        self.faults[kind] -= 1


class FaultProxy:
    """Listeners on 127.0.0.1 in an asyncio loop of their own thread, all in front of one upstream."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fault-proxy", daemon=True)
        self.thread.start()
        self.servers = []

    def add(self, listener):
        async def start():
            server = await asyncio.start_server(lambda r, w: self.handle(listener, r, w), "127.0.0.1", 0,
                                                limit=1 << 20)
            self.servers.append(server)
            return server.sockets[0].getsockname()[1]

        listener.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return listener

    def stop(self):
        async def shutdown():
            for s in self.servers:
                s.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @staticmethod
    async def read_body(reader, length, chunked, trickle_until=None):
        """The request body as sent. Until `trickle_until` (monotonic) it is read at TRICKLE_BPS
        (what the client sees: a link that stalls once its buffers are full). `BodyTimeout` when
        no byte comes for BODY_IDLE_S: a client that sends less than its Content-Length (aws-cli
        reading a file truncated under it) would otherwise wait for its own read timeout, 60 s."""

        async def idle(read):
            try:
                return await asyncio.wait_for(read, BODY_IDLE_S)
            except asyncio.TimeoutError:
                raise BodyTimeout from None

        async def exactly(n):
            out = bytearray()
            while len(out) < n:
                trickling = trickle_until is not None and time.monotonic() < trickle_until
                b = await idle(reader.read(min(n - len(out), TRICKLE_BPS // 16 if trickling else 1 << 20)))
                if not b:
                    raise asyncio.IncompleteReadError(bytes(out), n)
                out += b
                if trickling:
                    await asyncio.sleep(len(b) / TRICKLE_BPS)
            return bytes(out)

        if chunked:
            out = bytearray()
            while True:
                line = await idle(reader.readuntil(b"\r\n"))
                out += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, then the empty line
                        t = await idle(reader.readuntil(b"\r\n"))
                        out += t
                        if t == b"\r\n":
                            return bytes(out)
                out += await exactly(size + 2)
        return await exactly(length) if length else b""

    @staticmethod
    async def write_trickled(writer, data, until):
        """Writes `data` at TRICKLE_BPS until `until` (monotonic), the rest at once."""
        at = 0
        while at < len(data) and time.monotonic() < until:
            piece = data[at:at + TRICKLE_BPS // 16]
            writer.write(piece)
            await writer.drain()
            at += len(piece)
            await asyncio.sleep(len(piece) / TRICKLE_BPS)
        writer.write(data[at:])

    async def forward(self, data):
        """One upstream connection per request (`Connection: close`): the whole answer, read to EOF.

        The answer is read while the request is still being sent: a server may answer early (a
        412 for `If-None-Match: *`, a 403) and close without reading the body, which resets our
        send; the answer it sent is still relayed, as a client talking to it directly would see it."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        chunks = []

        async def send():
            try:
                await loop.sock_sendall(sock, data)
            except OSError:
                pass  # answered early and closed: what it answered is read below

        async def recv():
            while True:
                try:
                    b = await loop.sock_recv(sock, 1 << 20)
                except OSError:
                    return
                if not b:
                    return
                chunks.append(b)

        async def go():
            await loop.sock_connect(sock, ("127.0.0.1", self.upstream_port))
            sender = asyncio.ensure_future(send())
            try:
                await recv()
            finally:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(go(), 120)
        finally:
            sock.close()

    @staticmethod
    def relay_response(resp, method, client_close):
        """The upstream answer as the client gets it (connection header ours) and whether to close after."""
        end = resp.find(b"\r\n\r\n")
        if end < 0:
            return None, True
        status_line, headers = parse_head(resp[:end + 4])
        body = resp[end + 4:]
        parts = status_line.split(b" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if 100 <= status < 200:  # an interim answer (not expected: Expect is not forwarded); skip it
            return FaultProxy.relay_response(body, method, client_close)
        kept = [raw for n, _, raw in headers if n not in (b"connection", b"keep-alive")]
        length = header(headers, b"content-length")
        chunked = b"chunked" in (header(headers, b"transfer-encoding") or b"").lower()
        framed = method == b"HEAD" or status in (204, 304) or length is not None or chunked
        if length is not None and method != b"HEAD" and status not in (204, 304):
            body = body[:int(length)]
        close = client_close or not framed
        if close:
            kept.append(b"Connection: close")
        return status_line + b"\r\n" + b"".join(k + b"\r\n" for k in kept) + b"\r\n" + body, close

    async def handle(self, lst, reader, writer):
        rng = lst.rng
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                request_line, headers = parse_head(head)
                method, _, rest = request_line.partition(b" ")
                req = Request(method, rest.rpartition(b" ")[0] or rest)
                expect = (header(headers, b"expect") or b"").lower() == b"100-continue"
                chunked = b"chunked" in (header(headers, b"transfer-encoding") or b"").lower()
                length = 0 if chunked else int(header(headers, b"content-length") or b"0")
                client_close = (header(headers, b"connection") or b"").lower() == b"close"
                fault = lst.draw(req)

                if fault == "reset":
                    if expect:
                        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                        await writer.drain()
                    want = rng.randint(0, length // 2) if length else (rng.randint(0, 4096) if chunked else 0)
                    if want:
                        try:
                            await asyncio.wait_for(reader.read(want), 5)
                        except (asyncio.TimeoutError, ConnectionError):
                            pass
                    sock = writer.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return

                if expect:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                # slowbody: the request's body trickles (an upload), or else the answer.
                trickle = (time.monotonic() + rng.uniform(*TRICKLE_S)) if fault == "slowbody" else None
                has_body = bool(length or chunked)
                try:
                    body = await self.read_body(reader, length, chunked, trickle if has_body else None)
                except BodyTimeout:
                    writer.write(s3_error(400, "Bad Request", "RequestTimeout",
                                          "Your socket connection to the server was not read from or written to "
                                          "within the timeout period.", True))
                    await writer.drain()
                    return

                answer = None
                if fault == "503":
                    answer = s3_error(503, "Slow Down", "SlowDown", "Please reduce your request rate.", client_close)
                elif fault == "slowdown":
                    # S3 throttling: the key stays throttled for as long as Retry-After says.
                    window = lst.throttled.get(req.path)
                    if window is None:
                        now, secs = time.monotonic(), rng.randint(*RETRY_AFTER_S)
                        window = lst.throttled[req.path] = (now + secs, now + 3 * secs)
                    wait = max(1, int(window[0] - time.monotonic() + 0.999))
                    answer = s3_error(503, "Slow Down", "SlowDown", "Please reduce your request rate.", client_close,
                                      extra=f"Retry-After: {wait}\r\n")
                elif fault == "nosuchupload":
                    # The upload is gone (a lifecycle rule, an expiry): nothing forwarded.
                    answer = s3_error(404, "Not Found", "NoSuchUpload",
                                      "The specified upload does not exist. The upload ID may be invalid, or the "
                                      "upload may have been aborted or completed.", client_close)
                if answer is not None:
                    writer.write(answer)
                    await writer.drain()
                    if client_close:
                        return
                    continue

                if fault == "stall":
                    await asyncio.sleep(rng.uniform(1.0, 3.0))
                # Raw head, minus Expect (not signed; we answered it) and the hop-by-hop connection
                # headers; Host and everything signed stay as they are.
                up = [request_line] + [raw for n, _, raw in headers
                                       if n not in (b"expect", b"connection", b"keep-alive", b"proxy-connection")]
                up.append(b"Connection: close")
                try:
                    resp = await self.forward(b"\r\n".join(up) + b"\r\n\r\n" + body)
                except (OSError, asyncio.TimeoutError):
                    resp = b""
                if fault == "applied500":
                    close = client_close
                    out = s3_error(500, "Internal Server Error", "InternalError",
                                   "We encountered an internal error. Please try again.", close)
                else:
                    out, close = self.relay_response(resp, method, client_close) if resp else (None, True)
                if out is None:
                    lst.upstream_errors += 1  # not a planned fault: reported as "proxy 502s"
                    close = True
                    out = s3_error(502, "Bad Gateway", "BadGateway", "chaos proxy: upstream failed", close)
                    if fault in ("short200", "badetag"):
                        lst.not_applied(fault)
                elif fault == "short200":
                    # The answer's head and part of its body, then the connection closes.
                    end = out.find(b"\r\n\r\n") + 4
                    if status_of(out) in (200, 206) and len(out) > end:
                        writer.write(out[:rng.randint(end, len(out) - 1)])
                        await writer.drain()
                        return
                    lst.not_applied(fault)
                elif fault == "badetag":
                    # A write acknowledged with an ETag that is not the object's.
                    end = out.find(b"\r\n\r\n")
                    if 200 <= status_of(out) < 300 and re.search(rb"(?im)^etag:", out[:end]):
                        bogus = b'ETag: "%032x"' % rng.getrandbits(128)
                        out = re.sub(rb"(?im)^etag:[^\r\n]*", bogus, out[:end], count=1) + out[end:]
                    else:
                        lst.not_applied(fault)
                if fault == "slowbody" and not has_body:
                    await self.write_trickled(writer, out, trickle)
                else:
                    writer.write(out)
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            return
        except asyncio.CancelledError:
            return  # shutdown; re-raising makes asyncio's stream callback print a traceback (3.11)
        finally:
            if not writer.transport.is_closing():
                writer.close()


def status_of(answer):
    """The status code of an HTTP answer (0 if it has none)."""
    parts = answer[:answer.find(b"\r\n")].split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


# --------------------------------------------------------------------------------------------
# Helpers


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"s3s-fs exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"s3s-fs: nothing listens on {port} after 20 s")


def find_s3s_fs():
    for c in (os.environ.get("C3_TEST_S3S_FS"), shutil.which("s3s-fs"), os.path.expanduser("~/.cargo/bin/s3s-fs")):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith(("C3_AGENT", "AWS_"))}


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(MIB)
            if not b:
                return h.hexdigest()
            h.update(b)


def tail(path, n=15):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().decode(errors="replace").splitlines()
        return "\n".join(lines[-n:])
    except OSError:
        return ""


def log_excerpt(path, n=12):
    """The last n WARN/ERROR (and job start/end) lines of an agent log, each cut to 700 characters."""
    keep = (" WARN ", " ERROR ", "job finished", "recovering", "resuming", "storing what")
    try:
        with open(path, errors="replace") as f:
            lines = [l.rstrip("\n")[:700] for l in f if any(k in l for k in keep)]
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def first_error(path):
    """The first ERROR line of an agent log, without its timestamp (or None)."""
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if " ERROR " in line:
                    return line.split(" ERROR ", 1)[1].strip()[:600]
    except OSError:
        pass
    return None


def cause_class(text):
    """A failure cause with the job-specific parts (ids, digests, paths, numbers) blanked out."""
    t = text.split(": Error performing", 1)[0]
    t = re.sub(r"job\{[^}]*\}: ", "", t)
    t = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<uuid>", t)
    t = re.sub(r"[0-9a-f]{64}", "<sha256>", t)
    t = re.sub(r"(/[^\s:`'\"]+)+", "<path>", t)
    t = re.sub(r"\d+(\.\d+)?", "N", t)
    return t[:300]


def regular_files(top):
    """Relative paths of the regular files under top (symlinks not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames:
            p = os.path.join(dirpath, name)
            try:
                if stat.S_ISREG(os.lstat(p).st_mode):
                    out.append(os.path.relpath(p, top))
            except OSError:
                pass
    return sorted(out)


def job_processes(workdir, under=False):
    """(pid, command line) of the processes whose environment names this workdir's artifacts dir
    (under=True: the artifacts dir of any workdir below `workdir`)."""
    marker = b"\0C3_ARTIFACTS_DIR=" + (workdir.rstrip("/") + "/" if under else
                                         os.path.join(workdir, "artifacts") + "\0").encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = b"\0" + f.read() + b"\0"
            if marker in env:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    found.append((int(pid), f.read().replace(b"\0", b" ").decode(errors="replace").strip()))
        except OSError:
            pass
    return found


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------------------------
# Job shapes


def job_script(shape, rng):
    """The shell script of an agent job of this shape; it touches `$C3_ARTIFACTS_DIR/../script.done` last."""
    a = '"$C3_ARTIFACTS_DIR"'
    if shape == "small":
        first = "; ".join(f"head -c 4096 /dev/urandom > {a}/f{i:02d}.bin" for i in range(10))
        second = "; ".join(f"head -c 4096 /dev/urandom > {a}/sub/f{i:02d}.bin" for i in range(10, 20))
        s = f"{first}; sleep {rng.uniform(0.2, 0.5):.2f}; mkdir -p {a}/sub; {second}"
    elif shape == "big":
        s = (f"echo start > {a}/meta.txt; head -c {64 * MIB} /dev/urandom > {a}/big.bin; "
             f"head -c 4096 /dev/urandom > {a}/small.bin")
    else:
        rounds = []
        for r in range(3):
            rounds.append(f"head -c {9 * MIB} /dev/urandom > {a}/ckpt.bin; "
                          f"head -c {MIB} /dev/urandom > {a}/weights.bin; "
                          f"head -c 4096 /dev/urandom > {a}/state.tmp && mv {a}/state.tmp {a}/state.json; "
                          f"echo round {r} >> {a}/log.txt; sleep {rng.uniform(0.15, 0.45):.2f}")
        s = "; ".join(rounds)
    return f"set -e; {s}; : > \"$C3_ARTIFACTS_DIR/../script.done\""


def write_shape(shape, d, rng, rewrite_round=None):
    """The same shapes, written from Python (for aws s3 sync). rewrite_round: one round of `rewrite`."""
    if shape == "small":
        os.makedirs(os.path.join(d, "sub"), exist_ok=True)
        for i in range(20):
            with open(os.path.join(d, "sub" if i >= 10 else "", f"f{i:02d}.bin"), "wb") as f:
                f.write(os.urandom(4096))
    elif shape == "big":
        with open(os.path.join(d, "meta.txt"), "w") as f:
            f.write("start\n")
        with open(os.path.join(d, "big.bin"), "wb") as f:
            for _ in range(64):
                f.write(os.urandom(MIB))
        with open(os.path.join(d, "small.bin"), "wb") as f:
            f.write(os.urandom(4096))
    else:
        r = rewrite_round or 0
        with open(os.path.join(d, "ckpt.bin"), "wb") as f:  # in place, like `head -c > file`
            for _ in range(9):
                f.write(os.urandom(MIB))
        with open(os.path.join(d, "weights.bin"), "wb") as f:
            f.write(os.urandom(MIB))
        with open(os.path.join(d, "state.tmp"), "wb") as f:
            f.write(os.urandom(4096))
        os.replace(os.path.join(d, "state.tmp"), os.path.join(d, "state.json"))
        with open(os.path.join(d, "log.txt"), "a") as f:
            f.write(f"round {r}\n")


# --------------------------------------------------------------------------------------------
# The benchmark


class Bench:
    def __init__(self, args, tmp, s3root, proxy):
        self.args, self.tmp, self.s3root, self.proxy = args, tmp, s3root, proxy
        self.lock = threading.Lock()
        self.procs = set()  # running subprocesses, killed on abort
        self.aborting = False  # set on abort: no new subprocess starts
        self.listeners = {}  # (kind, rate, "agent"|"aws") -> Listener
        self.groups = {}  # (kind, rate) -> {"left": n, "blobs": n, "corrupt": [...], "stray": n}
        self.results = []
        self.aws_results = []
        self.done = 0
        self.total = 0
        self.seed_files = None  # the input dataset's files: path -> bytes
        self.started = time.monotonic()

    # ---- setup

    def bucket(self, kind, rate):
        return f"chaos-{kind}-{rate:02d}"

    def plan(self):
        """Agent jobs spread over (kind, rate) round-robin; within each pair the shapes rotate
        (offset by the pair's index) so 1 job in 10 is `big`, 5 `small`, 4 `rewrite`."""
        combos = [(k, r) for k in self.args.kinds for r in self.args.rates]
        jobs = []
        for i in range(self.args.jobs):
            c = i % len(combos)
            kind, rate = combos[c]
            s = (i // len(combos) + c) % 10
            shape = "big" if s == 0 else ("small" if s % 2 else "rewrite")
            jobs.append({"i": i, "kind": kind, "rate": rate, "shape": shape})
        tasks = []
        counted = 0  # agent jobs of the pairs with aws syncs, so far
        for kind, rate in combos:
            mine = [j for j in jobs if (j["kind"], j["rate"]) == (kind, rate)]
            if not mine:
                continue
            # One aws sync per --aws-every agent jobs of the run, spread over the pairs (one per
            # pair, at least, made a sync for every pair of one or two jobs).
            aws = []
            if self.args.aws and kind != "kill":
                n = (counted + len(mine)) // self.args.aws_every - counted // self.args.aws_every
                counted += len(mine)
                aws = [{"i": j["i"], "kind": kind, "rate": rate, "shape": j["shape"], "aws": True}
                       for j in (mine[k * len(mine) // n] for k in range(n))]
            for kind_ in ("agent", "aws") if aws else ("agent",):
                self.listeners[(kind, rate, kind_)] = self.proxy.add(
                    Listener(f"{kind}-{rate}-{kind_}", "mix" if kind == "kill" else kind, rate, self.args.seed))
            os.makedirs(os.path.join(self.s3root, self.bucket(kind, rate)))
            self.seed_dataset(self.bucket(kind, rate))
            self.groups[(kind, rate)] = {"left": len(mine) + len(aws), "blobs": 0, "corrupt": [], "stray": 0}
            # Interleave: aws syncs run among the agent jobs of the same pair.
            step = max(1, len(mine) // max(1, len(aws))) if aws else 0
            for n, j in enumerate(mine):
                tasks.append(j)
                if aws and n % step == 0:
                    tasks.append(aws.pop(0))
            tasks.extend(aws)
        self.total = len(tasks)
        return tasks

    def seed_dataset(self, bucket):
        """The input every agent job materializes (`datasets`: /jobs/SEED_JOB at `input/`), written
        into the bucket's directory behind s3s-fs: a manifest and its blobs, as a finished job
        leaves them. So each job GETs a manifest and three blobs through the proxy."""
        if self.seed_files is None:
            rng = random.Random(f"{self.args.seed}/seed")
            self.seed_files = {f"artifacts/{name}": rng.randbytes(size) for name, size in SEED_FILES}
        top = os.path.join(self.s3root, bucket, "c3")
        os.makedirs(os.path.join(top, "blobs", "sha256"), exist_ok=True)
        entries = []
        for path, data in sorted(self.seed_files.items()):
            digest = hashlib.sha256(data).hexdigest()
            with open(os.path.join(top, "blobs", "sha256", digest), "wb") as f:
                f.write(data)
            # blake3 left empty: nothing that reads a dataset checks it (pull checks sha256).
            entries.append({"path": path, "size": len(data), "sha256": digest, "blake3": "", "mode": 0o644,
                            "mtime_ns": 0})
        manifest = {"version": 1, "job_id": SEED_JOB, "project": None, "attempt": 1, "complete": True,
                    "files": entries, "logs": None, "result": None}
        os.makedirs(os.path.join(top, "jobs", SEED_JOB), exist_ok=True)
        with open(os.path.join(top, "jobs", SEED_JOB, "manifest.json"), "w") as f:
            json.dump(manifest, f)

    def config(self, jid, kind, rate):
        state = os.path.join(self.tmp, "state", jid)
        port = self.listeners[(kind, rate, "agent")].port
        cfg = os.path.join(self.tmp, "cfg", f"{jid}.toml")
        with open(cfg, "w") as f:
            f.write(f'''state_dir = "{state}"
jobs_root = "{os.path.join(self.tmp, 'jobs')}"
kill_grace_secs = 1
[sync]
settle_ms = 200
[store]
url = "s3://{self.bucket(kind, rate)}/c3"
retry_deadline_secs = 60
max_retries = 3
retry_timeout_secs = 30
[store.options]
aws_endpoint = "http://127.0.0.1:{port}"
aws_allow_http = "true"
aws_access_key_id = "AK"
aws_secret_access_key = "SK"
aws_region = "us-east-1"
[upload]
min_part_size_bytes = {5 * MIB}
multipart_threshold_bytes = {8 * MIB}
''')
        return cfg, state

    # ---- running

    def spawn(self, cmd, env, stderr, **kw):
        with self.lock:  # so that kill_all() sees every process started before it
            if self.aborting:
                raise RuntimeError("aborting")
            p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=stderr, start_new_session=True, **kw)
            self.procs.add(p)
        return p

    def reap(self, p, timeout):
        """Waits for p; on timeout SIGKILLs its process group. True if it timed out."""
        try:
            p.wait(timeout)
            return False
        except subprocess.TimeoutExpired:
            kill_group(p)
            p.wait()
            return True
        finally:
            with self.lock:
                self.procs.discard(p)

    def kill_all(self):
        with self.lock:
            self.aborting = True
            procs = list(self.procs)
        for p in procs:
            kill_group(p)
        # The jobs run in sessions of their own and outlive a killed agent: stop them too, or a
        # script's `mkdir -p` recreates the temp dir after it was removed.
        for pid, _ in job_processes(os.path.join(self.tmp, "jobs"), under=True):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def run_task(self, task):
        t0 = time.monotonic()
        r = None
        try:
            if task.get("aws"):
                r = self.run_aws(task)
                with self.lock:
                    self.aws_results.append(r)
            else:
                r = self.run_agent(task)
                with self.lock:
                    self.results.append(r)
        finally:
            took = time.monotonic() - t0
            if took > 30:
                log(f"  slow task: {r['id'] if r else task} took {took:.0f} s")
            with self.lock:
                g = self.groups[(task["kind"], task["rate"])]
                g["left"] -= 1
                last = g["left"] == 0
                self.done += 1
                done = self.done
                aborting = self.aborting
            if last and not aborting:
                self.check_blobs(task["kind"], task["rate"])
            if not aborting and (done % max(1, self.total // 20) == 0 or done == self.total):
                with self.lock:
                    bad = sum(1 for r in self.results if not r["ok"])
                log(f"  [{time.monotonic() - self.started:6.0f} s] {done}/{self.total} tasks done, "
                    f"{len(self.results)} agent jobs, {bad} not OK")

    def run_agent(self, job):
        kind, rate, shape = job["kind"], job["rate"], job["shape"]
        jid = f"j{job['i']:04d}-{kind}-{rate:02d}-{shape}"
        rng = random.Random(f"{self.args.seed}/job/{job['i']}")
        workdir = os.path.join(self.tmp, "jobs", jid)
        cfg, state = self.config(jid, kind, rate)
        spec = os.path.join(self.tmp, "cfg", f"{jid}.json")
        # Half the `kill` jobs take no input: its download (slowed by the faults) would hold most
        # kills in the preparation, before the script is launched.
        with_input = kind != "kill" or job["i"] % 2 == 0
        with open(spec, "w") as f:
            json.dump({"job_id": jid, "command": ["sh", "-c", job_script(shape, rng)], "workdir": workdir,
                       "datasets": [{"ref": f"/jobs/{SEED_JOB}", "mount": "input"}] if with_input else []}, f)
        env = clean_env()
        env.update(C3_AGENT_CONFIG=cfg, C3_AGENT_LOG="info")
        errlog = os.path.join(self.tmp, "logs", f"{jid}.run.stderr")
        rec = {"id": jid, "kind": kind, "rate": rate, "shape": shape, "kill": kind == "kill", "killed": False,
               "hung": False, "rc": None, "recover_rc": None, "state": None, "reason": None, "message": None,
               "problems": [], "verdict": None, "ok": False, "excerpt": "", "input": with_input}
        kill_at = rng.uniform(0.0, 3.0) if kind == "kill" else None
        t0 = time.monotonic()
        with open(errlog, "wb") as err:
            p = self.spawn([self.args.agent, "run", "--job", spec], env, err)
            if kill_at is not None:
                try:
                    p.wait(kill_at)
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGKILL)  # the agent only: its job runs on, as after a real crash
                    rec["killed"] = True
            rec["hung"] = self.reap(p, AGENT_TIMEOUT_S)
            rec["rc"] = p.returncode
        rec_log = os.path.join(self.tmp, "logs", f"{jid}.recover.stderr")
        if rec["killed"] or rec["hung"]:
            with open(rec_log, "wb") as err:
                r = self.spawn([self.args.agent, "recover"], env, err)
                if self.reap(r, RECOVER_TIMEOUT_S):
                    rec["problems"].append(f"recover ran past {RECOVER_TIMEOUT_S} s")
                rec["recover_rc"] = r.returncode
        rec["wall"] = time.monotonic() - t0
        # Every process of the job must be gone once `run` (or, after a kill, `recover`) has exited.
        orphans = job_processes(workdir)
        if orphans:
            rec["orphans"] = len(orphans)
            rec["problems"].append(f"{len(orphans)} process(es) of the job still running after "
                                   f"`{'recover' if rec['killed'] or rec['hung'] else 'run'}` exited: "
                                   + ", ".join(f"{pid} {cmd[:60]!r}" for pid, cmd in orphans[:3]))
            for pid, _ in orphans:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.judge(rec, workdir, state)
        if not rec["ok"]:
            if rec["verdict"] in ("loss", "other") and rec["problems"]:
                rec["cause"] = rec["problems"][0]  # the check that failed
            else:
                rec["cause"] = first_error(errlog) or first_error(rec_log) or "?"
            reports = os.path.join(state, "jobs", jid, "attempts", "1", "reports.jsonl")
            rec["excerpt"] = "\n".join(x for x in (
                "--- reports.jsonl (last 3)\n" + tail(reports, 3),
                "--- c3-agent run stderr (WARN/ERROR lines)\n" + log_excerpt(errlog),
                ("--- c3-agent recover stderr (WARN/ERROR lines)\n" + log_excerpt(rec_log))
                if os.path.exists(rec_log) else "",
            ) if x)
        elif not self.args.keep:
            for d in (workdir, state):
                shutil.rmtree(d, ignore_errors=True)
        return rec

    def final_status(self, state, jid):
        path = os.path.join(state, "jobs", jid, "attempts", "1", "reports.jsonl")
        last = None
        try:
            with open(path) as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except ValueError:
                        continue
                    b = r.get("body", {})
                    if r.get("endpoint", "").endswith("/status") and b.get("state") not in (None, "RUNNING", "FINALIZING"):
                        if last is None or b.get("seq", 0) >= last.get("seq", 0):
                            last = b
        except OSError:
            pass
        return last

    def manifest(self, kind, rate, jid):
        path = os.path.join(self.s3root, self.bucket(kind, rate), "c3", "jobs", jid, "manifest.json")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def verify(self, kind, rate, workdir, m, with_input):
        """Problems with a job's stored output (empty list: every file is stored exactly)."""
        blobs = os.path.join(self.s3root, self.bucket(kind, rate), "c3", "blobs", "sha256")
        problems = []
        if m is None:
            return ["no manifest in the store"]
        if m.get("complete") is not True:
            problems.append("manifest is not complete")
        entries = {e.get("path"): e for e in m.get("files", [])}
        art = os.path.join(workdir, "artifacts")
        local = {"artifacts/" + rel.replace(os.sep, "/") for rel in regular_files(art)}
        for path in sorted(local):
            full = os.path.join(workdir, path)
            size, digest = os.path.getsize(full), sha256_file(full)
            e = entries.get(path)
            if e is None:
                problems.append(f"LOSS {path}: not in the manifest")
            elif e.get("size") != size or e.get("sha256") != digest:
                problems.append(f"LOSS {path}: manifest has size {e.get('size')} sha256 {str(e.get('sha256'))[:12]}, "
                                f"the file has size {size} sha256 {digest[:12]}")
        for path, data in sorted(self.seed_files.items() if with_input else []):
            full = os.path.join(workdir, "input", path)
            try:
                with open(full, "rb") as f:
                    if f.read() != data:
                        problems.append(f"INPUT input/{path}: not the dataset's bytes")
            except OSError as e:
                problems.append(f"INPUT input/{path}: {e.strerror}")
        for path, e in sorted(entries.items()):
            if path not in local:
                problems.append(f"STALE {path}: in the manifest, not in the workdir")
        listed = list(entries.values()) + [v for v in (m.get("logs") or {}).values() if v]
        for e in listed:
            b = os.path.join(blobs, str(e.get("sha256")))
            try:
                if os.path.getsize(b) != e.get("size"):
                    problems.append(f"LOSS blob {str(e.get('sha256'))[:12]} of {e.get('path', 'log')}: size "
                                    f"{os.path.getsize(b)} in the store, {e.get('size')} in the manifest")
            except OSError:
                problems.append(f"LOSS blob {str(e.get('sha256'))[:12]} of {e.get('path', 'log')}: not in the store")
        return problems

    def judge(self, rec, workdir, state):
        kind, rate, jid = rec["kind"], rec["rate"], rec["id"]
        st = self.final_status(state, jid)
        if st:
            rec["state"], rec["reason"], rec["message"] = st.get("state"), st.get("reason"), st.get("message")
        m = self.manifest(kind, rate, jid)
        if rec["hung"]:
            rec["verdict"] = "other"
            rec["problems"].insert(0, f"c3-agent run ran past {AGENT_TIMEOUT_S} s (killed)")
        elif st is None:
            if rec["killed"] and not self.script_ran(rec, workdir, state):
                rec["verdict"], rec["ok"] = "prelaunch", True
            else:
                rec["verdict"] = "other"
                rec["problems"].append("no terminal status in reports.jsonl")
        elif (rec["killed"] and st.get("reason") == "AGENT_ERROR" and m is None
              and not self.script_ran(rec, workdir, state)):
            # Killed while preparing: recover finished the attempt as never launched (no manifest).
            rec["verdict"], rec["ok"] = "prelaunch", True
        else:
            upload_errors = st.get("upload_errors") or 0
            rec["upload_errors"] = upload_errors
            lost_script = rec["killed"] and st.get("reason") == "AGENT_ERROR"
            if st.get("state") == "SUCCEEDED" or (lost_script and upload_errors == 0 and m is not None
                                                  and m.get("complete") is True):
                # The status claims every file is stored: check that it is.
                problems = self.verify(kind, rate, workdir, m, rec["input"])
                rec["problems"] += problems
                if not rec["killed"] and rec["rc"] != 0:
                    rec["problems"].append(f"SUCCEEDED but `run` exited {rec['rc']}")
                if problems:
                    rec["verdict"] = "loss"
                elif rec["problems"]:
                    rec["verdict"] = "other"
                else:
                    rec["verdict"] = "recovered" if rec["killed"] else "succeeded"
                    rec["ok"] = True
            elif st.get("reason") == "UPLOAD_ERROR" or (lost_script and upload_errors > 0):
                # Not silent: the status says some output could not be stored.
                rec["verdict"] = "upload_error"
                if lost_script:
                    rec["problems"].append(f"AGENT_ERROR with upload_errors={upload_errors}")
            else:
                rec["verdict"] = "other"
                if lost_script:
                    ran = self.script_ran(rec, workdir, state)
                    rec["problems"].append("AGENT_ERROR after recover, manifest " + (
                        "missing" if m is None else f"complete={m.get('complete')}")
                        + (f", yet the script ran ({ran}): its output was never stored" if ran and m is None else ""))
        if rec.get("orphans") and rec["verdict"] != "loss":
            rec["verdict"], rec["ok"] = "other", False

    def script_ran(self, rec, workdir, state):
        """What shows that the job's script was launched ('' if nothing does): a RUNNING report,
        files in artifacts/, the script's end marker, or processes of the job."""
        signs = []
        try:
            with open(os.path.join(state, "jobs", rec["id"], "attempts", "1", "reports.jsonl")) as f:
                if '"RUNNING"' in f.read():
                    signs.append("RUNNING reported")
        except OSError:
            pass
        n = len(regular_files(os.path.join(workdir, "artifacts")))
        if n:
            signs.append(f"{n} file(s) in artifacts/")
        if os.path.exists(os.path.join(workdir, "script.done")):
            signs.append("script.done written")
        if rec.get("orphans"):
            signs.append(f"{rec['orphans']} job process(es) left running")
        return ", ".join(signs)

    def run_aws(self, task):
        kind, rate, shape = task["kind"], task["rate"], task["shape"]
        aid = f"a{task['i']:04d}-{kind}-{rate:02d}-{shape}"
        rng = random.Random(f"{self.args.seed}/aws/{task['i']}")
        src = os.path.join(self.tmp, "aws", aid)
        os.makedirs(src)
        port = self.listeners[(kind, rate, "aws")].port
        env = clean_env()
        env.pop("AWS_CA_BUNDLE", None)
        env.update(AWS_ACCESS_KEY_ID="AK", AWS_SECRET_ACCESS_KEY="SK", AWS_DEFAULT_REGION="us-east-1",
                   AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE="/dev/null",
                   AWS_SHARED_CREDENTIALS_FILE="/dev/null")
        dest = f"s3://{self.bucket(kind, rate)}/aws/{aid}/"
        cmd = ["aws", "--endpoint-url", f"http://127.0.0.1:{port}", "s3", "sync", src, dest, "--only-show-errors"]
        errlog = os.path.join(self.tmp, "logs", f"{aid}.aws.stderr")
        rec = {"id": aid, "kind": kind, "rate": rate, "shape": shape, "rc": None, "timeout": False,
               "differ": 0, "missing": 0, "objects": 0}
        t0 = time.monotonic()
        with open(errlog, "ab") as err:
            if shape == "rewrite":
                # A naive live sync: one run while the files are rewritten, one after.
                write_shape(shape, src, rng, 0)
                p = self.spawn(cmd, env, err)
                for r in (1, 2):
                    time.sleep(rng.uniform(0.15, 0.45))
                    write_shape(shape, src, rng, r)
                self.reap(p, AWS_TIMEOUT_S)
            else:
                write_shape(shape, src, rng)
            p = self.spawn(cmd, env, err)
            rec["timeout"] = self.reap(p, AWS_TIMEOUT_S)
            rec["rc"] = p.returncode
        rec["wall"] = time.monotonic() - t0
        stored = os.path.join(self.s3root, self.bucket(kind, rate), "aws", aid)
        for rel in regular_files(src):
            rec["objects"] += 1
            s = os.path.join(stored, rel)
            if not os.path.isfile(s):
                rec["missing"] += 1
            elif sha256_file(s) != sha256_file(os.path.join(src, rel)):
                rec["differ"] += 1
        rec["failed"] = rec["rc"] != 0
        rec["silent"] = rec["rc"] == 0 and (rec["missing"] + rec["differ"]) > 0
        if rec["failed"] or rec["silent"]:
            rec["excerpt"] = tail(errlog, 5)
        if not self.args.keep:
            shutil.rmtree(src, ignore_errors=True)
        return rec

    def check_blobs(self, kind, rate):
        """Every blob of the pair's bucket hashes to its name; then the bucket is removed."""
        bucket = self.bucket(kind, rate)
        blobs = os.path.join(self.s3root, bucket, "c3", "blobs", "sha256")
        g = self.groups[(kind, rate)]
        names = os.listdir(blobs) if os.path.isdir(blobs) else []
        for name in names:
            p = os.path.join(blobs, name)
            if not os.path.isfile(p):
                continue
            if not HEX64.match(name):
                g["stray"] += 1
                continue
            g["blobs"] += 1
            digest = sha256_file(p)
            if digest != name:
                g["corrupt"].append(f"{bucket}/c3/blobs/sha256/{name} hashes to {digest}")
        if not self.args.keep:
            shutil.rmtree(os.path.join(self.s3root, bucket), ignore_errors=True)
            os.makedirs(os.path.join(self.s3root, bucket), exist_ok=True)
            # s3s-fs keeps per-object metadata beside the buckets, named after the bucket in base64.
            tag = ".bucket-" + base64.urlsafe_b64encode(bucket.encode()).decode().rstrip("=") + "."
            for f in os.listdir(self.s3root):
                if f.startswith(tag):
                    try:
                        os.remove(os.path.join(self.s3root, f))
                    except OSError:
                        pass


# --------------------------------------------------------------------------------------------
# Report


def pct(n, d):
    return f"{100.0 * n / d:.1f}%" if d else "-"


def report(bench, wall, args):
    res, aws, groups, lst = bench.results, bench.aws_results, bench.groups, bench.listeners
    out = []
    w = out.append
    w("# c3-agent chaos benchmark\n")
    w(f"{len(res)} agent jobs, {len(aws)} aws s3 sync runs, --parallel {args.parallel}, seed {args.seed}, "
      f"{os.cpu_count()} CPUs; agent `{args.agent}`; wall time **{wall:.0f} s**.\n")
    w("Verdicts: `ok` = SUCCEEDED and every file verified, plus (`kill` rows) jobs recovered after SIGKILL "
      "(final SUCCEEDED, or AGENT_ERROR with upload_errors 0 and a complete manifest, files verified; or killed "
      "before the script was launched). `loss` = claimed stored but a file is missing or wrong (silent loss). "
      "`other` = any other end (AGENT_ERROR without a manifest after the script ran, processes of the job left "
      "running, no terminal status, a timeout). aws: `failed` = final sync exited "
      "non-zero; `differ` = objects missing or not equal to the local file afterwards; `silent` = exit 0 yet "
      "some object differs.\n")

    def agg(rs):
        d = {"jobs": len(rs), "ok": sum(r["ok"] for r in rs),
             "succeeded": sum(r["verdict"] == "succeeded" for r in rs),
             "recovered": sum(r["verdict"] in ("recovered", "prelaunch") for r in rs),
             "upload_error": sum(r["verdict"] == "upload_error" for r in rs),
             "other": sum(r["verdict"] == "other" for r in rs),
             "loss": sum(r["verdict"] == "loss" for r in rs),
             "killed": sum(r["killed"] for r in rs)}
        return d

    def aagg(rs):
        return {"syncs": len(rs), "failed": sum(r["failed"] for r in rs),
                "differ": sum(r["missing"] + r["differ"] for r in rs), "objects": sum(r["objects"] for r in rs),
                "silent": sum(r["silent"] for r in rs)}

    w("## Per cell\n")
    w("| fault | rate | shape | jobs | ok | SUCCEEDED | recovered (killed) | UPLOAD_ERROR | other | silent loss "
      "| mean s | max s | aws syncs | aws failed | aws differ/objects | aws silent |")
    w("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind in KINDS:
        for rate in RATES:
            for shape in SHAPES:
                rs = [r for r in res if (r["kind"], r["rate"], r["shape"]) == (kind, rate, shape)]
                ars = [r for r in aws if (r["kind"], r["rate"], r["shape"]) == (kind, rate, shape)]
                if not rs and not ars:
                    continue
                a, b = agg(rs), aagg(ars)
                walls = [r["wall"] for r in rs]
                rec = f"{a['recovered']} ({a['killed']})" if kind == "kill" else "-"
                aws_cols = (f"{b['syncs']} | {b['failed']} | {b['differ']}/{b['objects']} | {b['silent']}"
                            if ars else "- | - | - | -")
                w(f"| {kind} | {rate}% | {shape} | {a['jobs']} | {a['ok']} | {a['succeeded']} | {rec} | "
                  f"{a['upload_error']} | {a['other']} | {a['loss']} | "
                  f"{(sum(walls) / len(walls)) if walls else 0:.1f} | {max(walls) if walls else 0:.1f} | {aws_cols} |")

    w("\n## Per fault kind and rate (store checks and proxy counts)\n")
    w("| fault | rate | jobs | ok | ok % | silent loss | blobs checked | corrupt blobs | agent requests | faults injected "
      "(by kind; + echoes: later requests to an expired upload or a throttled key) | proxy 502s | aws syncs | aws ok % | aws requests | aws faults |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for kind in KINDS:
        for rate in RATES:
            if (kind, rate) not in groups:
                continue
            rs = [r for r in res if (r["kind"], r["rate"]) == (kind, rate)]
            ars = [r for r in aws if (r["kind"], r["rate"]) == (kind, rate)]
            a, b, g = agg(rs), aagg(ars), groups[(kind, rate)]
            la = lst[(kind, rate, "agent")]
            fa = ", ".join(f"{k} {n}" for k, n in la.faults.items() if n) or "none"
            if la.echoes:
                fa += f"; + {la.echoes} echoes"
            lw = lst.get((kind, rate, "aws"))
            aws_ok = b["syncs"] - b["failed"] - b["silent"]
            w(f"| {kind} | {rate}% | {a['jobs']} | {a['ok']} | {pct(a['ok'], a['jobs'])} | {a['loss']} | {g['blobs']} | "
              f"{len(g['corrupt'])} | {la.requests} | {sum(la.faults.values())} ({fa}) | "
              f"{la.upstream_errors + (lw.upstream_errors if lw else 0)} | {b['syncs'] if ars else '-'} | "
              f"{pct(aws_ok, b['syncs']) if ars else '-'} | {lw.requests if lw else '-'} | "
              f"{sum(lw.faults.values()) if lw else '-'} |")

    w("\n## Totals by rate, side by side\n")
    w("| rate | c3-agent jobs | ok | ok % | UPLOAD_ERROR | other | silent loss | corrupt blobs "
      "| aws syncs | aws failed | aws silent | aws ok % | aws differing objects |")
    w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = [(f"{rate}%", [r for r in res if r["rate"] == rate], [r for r in aws if r["rate"] == rate],
             [g for (k, r_), g in groups.items() if r_ == rate]) for rate in RATES]
    rows.append(("**all**", res, aws, list(groups.values())))
    for name, rs, ars, gs in rows:
        a, b = agg(rs), aagg(ars)
        aws_ok = b["syncs"] - b["failed"] - b["silent"]
        w(f"| {name} | {a['jobs']} | {a['ok']} | {pct(a['ok'], a['jobs'])} | {a['upload_error']} | {a['other']} | "
          f"{a['loss']} | {sum(len(g['corrupt']) for g in gs)} | {b['syncs']} | {b['failed']} | {b['silent']} | "
          f"{pct(aws_ok, b['syncs'])} | {b['differ']}/{b['objects']} |")
    kills = [r for r in res if r["kind"] == "kill"]
    if kills:
        by = {}
        for r in kills:
            key = ("not killed (finished first)" if not r["killed"] else
                   "killed before launch" if r["verdict"] == "prelaunch" else
                   f"killed -> {r['state']}{'/' + r['reason'] if r['reason'] else ''}")
            by[key] = by.get(key, 0) + 1
        w("\nSIGKILL + recover outcomes: " + ", ".join(f"{k}: {v}" for k, v in sorted(by.items())) + ".")
    strays = sum(g["stray"] for g in groups.values())
    if strays:
        w(f"\nNon-blob files under blobs/sha256/ (not hashed): {strays}.")
    w(f"\nWall time: {wall:.0f} s for {len(res)} agent jobs and {len(aws)} aws syncs ({args.parallel} at once).")

    order = {"loss": 0, "other": 1, "upload_error": 2}
    bad = sorted((r for r in res if not r["ok"]), key=lambda r: (order.get(r["verdict"], 3), r["id"]))
    corrupt = [c for g in groups.values() for c in g["corrupt"]]
    if bad or corrupt:
        w("\n## Failures\n")
        causes = {}
        for r in bad:
            key = (r["verdict"], cause_class(r.get("cause") or "?"))
            causes.setdefault(key, []).append(r["id"])
        w("| verdict | jobs | cause (first ERROR line of the agent, or the check that failed) | e.g. |")
        w("|---|---:|---|---|")
        for (verdict, cause), ids in sorted(causes.items(), key=lambda kv: (order.get(kv[0][0], 3), -len(kv[1]))):
            w(f"| {verdict} | {len(ids)} | {cause.replace('|', '/')} | {', '.join(ids[:3])} |")
        w("")
        for c in corrupt[:20]:
            w(f"- CORRUPT {c}")
        shown = 0
        for r in bad:
            if r["verdict"] != "loss" and shown >= 12:
                continue
            shown += 1
            w(f"- `{r['id']}`: verdict {r['verdict']}, state {r['state']}/{r['reason']}, run exit {r['rc']}, "
              f"recover exit {r['recover_rc']}, killed {r['killed']}; message: {(r['message'] or '')[:300]}")
            for p in r["problems"][:10]:
                w(f"  - {p}")
            if r["excerpt"]:
                w("\n```\n" + r["excerpt"][-4000:] + "\n```\n")
        if len(bad) > shown:
            w(f"- ... and {len(bad) - shown} more (same causes as in the table above)")
    awsbad = [r for r in aws if r["failed"] or r["silent"]]
    if awsbad:
        w("\n## aws s3 sync failures (not gated)\n")
        for r in awsbad[:10]:
            w(f"- `{r['id']}`: exit {r['rc']}, {r['missing']} missing, {r['differ']} differ of {r['objects']}; "
              f"stderr: {(r.get('excerpt') or '').strip()[-300:]!r}")
        if len(awsbad) > 10:
            w(f"- ... and {len(awsbad) - 10} more")
    return "\n".join(out) + "\n"


def gate(bench):
    """Reasons the run fails (empty: it passes)."""
    res = bench.results
    why = []
    losses = [r for r in res if r["verdict"] == "loss"]
    if losses:
        why.append(f"{len(losses)} silent loss(es): " + ", ".join(r["id"] for r in losses[:10]))
    corrupt = sum(len(g["corrupt"]) for g in bench.groups.values())
    if corrupt:
        why.append(f"{corrupt} corrupt blob(s)")
    hung = [r for r in res if r["hung"]]
    if hung:
        why.append(f"{len(hung)} agent run(s) past {AGENT_TIMEOUT_S} s")
    orphaned = [r for r in res if r.get("orphans")]
    if orphaned:
        why.append(f"{len(orphaned)} job(s) left processes running: " + ", ".join(r["id"] for r in orphaned[:10]))
    for rate, floor in MIN_OK.items():
        rs = [r for r in res if r["rate"] == rate]
        ok = sum(r["ok"] for r in rs)
        if rs and ok < floor * len(rs):
            why.append(f"at {rate}%: {ok}/{len(rs)} jobs OK ({100.0 * ok / len(rs):.1f}%, needs {100 * floor:.1f}%)")
    if len(res) < bench.args.jobs:
        why.append(f"only {len(res)} of {bench.args.jobs} jobs ran")
    why += injection_gaps(bench.listeners, res)
    return why


# Expected draws under which a kind that drew none fails the gate (Poisson: P(0) = e^-10 < 5e-5).
PLAUSIBLE_FAULTS = 10
# Kill jobs under which none killed after launch and recovered fails the gate.
PLAUSIBLE_KILLS = 10
# Proxy requests per agent job under which the run fails: every job pulls its input and uploads
# its outputs and manifest through the proxy, so an agent that went around it (another endpoint,
# a config the proxy's port did not reach) made jobs pass that no fault could touch.
MIN_REQUESTS_PER_JOB = 5


def injection_gaps(listeners, res):
    """Reasons the faults the run was to test were not injected: agents whose requests mostly
    went around the proxy, a run that drew no fault, or a kind that drew none where that is
    implausible, or kill jobs none of which was killed after launch and recovered, passes every
    other check while testing nothing. Draws, not faults applied, are held to `expected`: a
    fault the answer did not allow is a draw `expected` counted."""
    why = []
    agent = [l for (_, _, side), l in listeners.items() if side == "agent"]
    seen = sum(l.requests for l in agent)
    if res and seen < MIN_REQUESTS_PER_JOB * len(res):
        why.append(f"the proxy saw {seen} request(s) from {len(res)} agent job(s), "
                   f"fewer than {MIN_REQUESTS_PER_JOB} a job: the agents went around it")
    expected = sum(sum(l.expected.values()) for l in agent)
    if expected >= PLAUSIBLE_FAULTS and sum(sum(l.drawn.values()) for l in agent) == 0:
        why.append(f"no fault was drawn (about {expected:.0f} expected)")
    for (kind, rate, side), l in sorted(listeners.items()):
        if side != "agent":
            continue
        for k, e in sorted(l.expected.items()):
            if e >= PLAUSIBLE_FAULTS and l.drawn[k] == 0:
                why.append(f"{kind} at {rate}%: no {k} fault drawn (about {e:.0f} expected)")
    # A kill job may finish before its kill or be killed before launch: with few of them (3 in the
    # quick run) none killed mid-run is plausible, so only a run with enough of them is gated.
    kills = [r for r in res if r["kind"] == "kill"]
    if len(kills) >= PLAUSIBLE_KILLS and not any(r["killed"] and r["verdict"] == "recovered" for r in kills):
        why.append(f"none of the {len(kills)} kill job(s) was killed after launch and recovered")
    return why


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000, help="agent jobs in all (default 1000)")
    ap.add_argument("--parallel", type=int, default=4, help="jobs at once (default 4)")
    ap.add_argument("--quick", action="store_true", help="= --jobs 50 (what scripts/test.sh runs)")
    ap.add_argument("--agent", default=os.path.join(TARGET, "release", "c3-agent"),
                    help="c3-agent binary (default target/release/c3-agent)")
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--aws-every", type=int, default=4, help="one aws s3 sync per this many agent jobs (default 4)")
    ap.add_argument("--no-aws", dest="aws", action="store_false", help="skip the aws s3 sync comparison")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (workdirs, state, store)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"only these fault kinds (default {','.join(KINDS)})")
    ap.add_argument("--rates", default=",".join(map(str, RATES)), help="only these rates, in %% (default 5,20,40)")
    args = ap.parse_args()
    args.kinds = [k for k in args.kinds.split(",") if k]
    try:
        args.rates = [int(r) for r in args.rates.split(",") if r]
    except ValueError:
        ap.error("--rates: integers, e.g. 5,20,40")
    if not args.kinds or any(k not in KINDS for k in args.kinds):
        ap.error(f"--kinds: a comma-separated subset of {','.join(KINDS)}")
    if not args.rates or any(r not in MIN_OK for r in args.rates):
        ap.error("--rates: a comma-separated subset of 5,20,40")
    if args.quick:
        args.jobs = 50
    if args.jobs < 1 or args.parallel < 1 or args.aws_every < 1:
        ap.error("--jobs, --parallel and --aws-every must be at least 1")
    args.agent = os.path.abspath(args.agent)
    if not os.access(args.agent, os.X_OK):
        log(f"chaos.py: no c3-agent at {args.agent} (cargo build --release -p c3-agent, or --agent PATH)")
        return 2
    s3s = find_s3s_fs()
    if not s3s:
        log("chaos.py: s3s-fs not found ($C3_TEST_S3S_FS, PATH, ~/.cargo/bin); scripts/test.sh installs it")
        return 2
    if args.aws and not shutil.which("aws"):
        log("chaos.py: aws-cli not found: the aws s3 sync comparison is skipped")
        args.aws = False

    # SIGTERM/SIGHUP end the run through the finally blocks below (servers stopped, temp dir removed).
    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    tmp = tempfile.mkdtemp(prefix="c3-chaos-", dir=os.environ.get("CHAOS_TMP", "/var/tmp"))
    s3s_proc = proxy = bench = pool = None
    t0 = time.monotonic()
    try:
        for d in ("jobs", "state", "cfg", "logs", "aws", "s3"):
            os.makedirs(os.path.join(tmp, d))
        s3root = os.path.join(tmp, "s3")
        port = free_port()
        s3s_proc = subprocess.Popen([s3s, "--host", "127.0.0.1", "--port", str(port), "--access-key", "AK",
                                     "--secret-key", "SK", s3root], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "s3s-fs.log"), "wb"))
        wait_port(port, s3s_proc)
        proxy = FaultProxy(port)
        bench = Bench(args, tmp, s3root, proxy)
        tasks = bench.plan()
        n_aws = sum(1 for t in tasks if t.get("aws"))
        log(f"chaos: {args.jobs} agent jobs + {n_aws} aws syncs, {args.parallel} at once, agent {args.agent}, "
            f"temp {tmp}")
        pool = concurrent.futures.ThreadPoolExecutor(args.parallel)
        futures = [pool.submit(bench.run_task, t) for t in tasks]
        for f in concurrent.futures.as_completed(futures):
            f.result()
        pool.shutdown()
        pool = None
        wall = time.monotonic() - t0
        text = report(bench, wall, args)
        why = gate(bench)
        text += "\n**Result: " + ("PASS" if not why else "FAIL: " + "; ".join(why)) + "**\n"
        print(text, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return 1 if why else 0
    finally:
        if bench:
            bench.kill_all()  # and no new process starts: the running tasks end at once
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
        if proxy:
            proxy.stop()
        if s3s_proc:
            s3s_proc.terminate()
            try:
                s3s_proc.wait(10)
            except subprocess.TimeoutExpired:
                s3s_proc.kill()
                s3s_proc.wait()
        if args.keep:
            log(f"chaos: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
