#!/usr/bin/env python3
"""c3-agent under a real single-node Slurm cluster (slurmctld + slurmd + munge on this machine).

    python3 scripts/slurm_test.py --agent target/debug/c3-agent [--keep] [--no-install]

Needs root (it starts the Slurm daemons and creates a test user; re-runs itself with `sudo -n` if
that works). Installs `slurmctld slurmd slurm-client munge` with apt-get if `slurmd`/`sbatch` are
missing (never with --no-install: then it exits 1 naming what is missing).

Setup. Everything lives in one temp dir under $C3_SLURM_TMP (default /var/tmp), mode 0755, removed at
exit unless --keep: its own slurm.conf (SLURM_CONF, so /etc/slurm is not touched; KillWait=10,
ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, select/cons_tres with CR_CPU, no accounting,
a FirstJobId drawn from the clock so job ids, and with them the agent's job ids `slurm-<id>`, do not
repeat between runs), spool/state/log dirs, a copy of the agent binary every user can execute, and the
file stores. munged is reused if one already answers, else started (`munged -F --force`, with
/etc/munge/munge.key created if missing); slurmctld and slurmd run in the foreground as children of
this script; the node must show `idle` in `sinfo` within 60 s. Every daemon binds 127.0.0.1 only
(CommunicationParameters=NoCtldInAddrAny,NoInAddrAny: they bind what the host name resolves to; where
that is not loopback, or with C3_SLURM_FORCE_UTS=1, they run in a UTS namespace named `localhost`;
free ports; checked in /proc/net/tcp before any job runs), and so does the recorder, a small
control plane (ThreadingHTTPServer) that answers every `POST /api/v1/jobs/{id}/status|artifacts|output`
with 200 and records it. Jobs get the agent's settings as `export` lines in their batch script:
C3_AGENT_CONTROL_PLANE_URL, C3_AGENT_STORE_URL (file://, one store per scenario), C3_AGENT_STATE_DIR
(not for scenario c, which uses the default), C3_AGENT_STOP_DEADLINE_SECS=7 (< KillWait),
C3_AGENT_KILL_GRACE_SECS=2. Each batch script `exec`s `c3-agent run -- CMD` without --job-id.

Scenarios (b runs alongside a and c when the node has 2 CPUs or more):

  a  scancel mid-job (as root). The job writes a 20 MiB file and a few small ones into
     $C3_ARTIFACTS_DIR, then `exec`s sleep (so the script's own process dies of Slurm's SIGTERM, as a
     trainer would). Once the recorder saw RUNNING and the files exist: scancel. Slurm sends SIGTERM
     to the agent and the job at once, so the agent may see the job die before its own SIGTERM:
     the outcome must still be CANCELED.
  b  time limit with the USR1 warning: `sbatch --time=1 --signal=B:USR1@50`; the job traps USR1 and
     writes `last.ckpt`, then loops until Slurm's time limit (SIGTERM to every process, KillWait).
  c  a job of an unprivileged user (`c3slurm`, created if missing), submitted by that user
     (`runuser -u c3slurm -- sbatch`, with the user's own HOME, so the agent's state dir is its
     default ~/.local/state/c3-agent); the job writes files and exits 0.

Checked for every scenario:
  * reports went to `/v1/jobs/slurm-<the id sbatch printed>/...` with attempt 1 (SLURM_RESTART_COUNT+1);
  * the first status is RUNNING; a FINALIZING status with `gpu_released: true` came before the terminal
    status; an artifacts registration (manifest `jobs/<job_id>/manifest.json`) came before it too;
    exactly one terminal status; seqs strictly increasing (a repeated seq is a duplicate); the terminal
    status carries `peak_memory_bytes` and `cpu_seconds`;
  * terminal state: a CANCELED; b CANCELED or TIMED_OUT (printed); c SUCCEEDED;
  * `c3-agent ls <job_id> --json` (same store) says `complete: true` and lists every regular file under the
    job's artifacts/ with the size and sha256 computed here, and nothing that is not there; each blob
    exists in the store with that size;
  * no process of the job outlives it (processes whose environment holds SLURM_JOB_ID=<id>);
  * a: the terminal status arrived before Slurm's SIGKILL (KillWait) would have come;
  * b: `last.ckpt` is in the manifest with the hash of "checkpoint\\n" (the agent forwarded USR1 to the job);
  * c: the job ran as c3slurm (its `id -u` output), and the blobs and manifests in its store and its
    state dir under ~c3slurm/.local/state/c3-agent are owned by that uid.

Prints one PASS/FAIL line per scenario with timings; exit 0 only if all pass (1 otherwise, 2 on a setup
error). On a failure it prints the job's slurm-<id>.out and the tails of the daemons' logs. At exit
(SIGTERM/SIGINT included) it cancels its jobs, stops every daemon it started and kills any process left
whose environment, command line, cwd or open files name its temp dir. Every wait has a time limit;
the whole run takes about 1.5 min (scenario b waits for Slurm's 60 s time limit, checked every ~30 s).
"""
import argparse
import atexit
import hashlib
import http.server
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

KILL_WAIT = 10
STOP_DEADLINE = 7
KILL_GRACE = 2
TEST_USER = "c3slurm"
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELED", "TIMED_OUT"}

T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


class SetupError(Exception):
    pass


def which(name):
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def run(cmd, timeout=30, check=True, **kw):
    """subprocess.run with a time limit; returns CompletedProcess (text)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise SetupError(f"{cmd[0]}: no answer within {timeout}s") from e
    if check and p.returncode != 0:
        raise SetupError(f"{' '.join(map(str, cmd))}: exit {p.returncode}: {(p.stderr or p.stdout).strip()[-800:]}")
    return p


def wait_for(pred, timeout, interval=0.25):
    """Calls pred until it returns something truthy (returned) or timeout seconds pass (None)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def loopback_only(name):
    """Whether name resolves (IPv4) to loopback addresses only."""
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET)
    except OSError:
        return False
    return bool(infos) and all(i[4][0].startswith("127.") for i in infos)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tail(path, n=60):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])
    except OSError as e:
        return f"({path}: {e})"


# --------------------------------------------------------------------------------------------
# The recording control plane


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.events = []  # (monotonic time, path, body)
        rec = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"_raw": raw.decode("utf-8", "replace")}
                with rec.lock:
                    rec.events.append((time.monotonic(), self.path, body))
                parts = self.path.split("/")
                # /api/v1/jobs/<id>/<kind>
                ok = len(parts) == 6 and parts[1] == "api" and parts[2] == "v1" and parts[3] == "jobs"
                if ok and parts[5] == "artifacts":
                    reply = {"storage_used_bytes": 0, "storage_quota_bytes": None}
                elif ok and parts[5] in ("status", "output"):
                    reply = {}
                else:
                    reply, ok = {"error": "unknown endpoint"}, False
                data = json.dumps(reply).encode()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def for_job(self, job_id):
        prefix = f"/api/v1/jobs/{job_id}/"
        with self.lock:
            return [(t, p[len(prefix):], b) for t, p, b in self.events if p.startswith(prefix)]

    def job_ids(self):
        with self.lock:
            return sorted({p.split("/")[4] for _, p, _ in self.events if p.count("/") >= 5})

    def statuses(self, job_id):
        return [(t, b) for t, kind, b in self.for_job(job_id) if kind == "status"]

    def terminal(self, job_id):
        for t, b in self.statuses(job_id):
            if b.get("state") in TERMINAL:
                return t, b
        return None

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------------------------
# The cluster


class Cluster:
    def __init__(self, root, agent_src):
        self.root = root
        # With NoCtldInAddrAny/NoInAddrAny the daemons bind to what gethostname() resolves to. Where
        # that is not loopback, they run in a UTS namespace of their own named `localhost`.
        self.uts = os.environ.get("C3_SLURM_FORCE_UTS") == "1" or not loopback_only(socket.gethostname())
        self.host = "localhost" if self.uts else socket.gethostname().split(".")[0]
        self.procs = {}  # name -> Popen
        self.conf = os.path.join(root, "slurm.conf")
        self.logdir = os.path.join(root, "log")
        self.ctld_dir = os.path.join(root, "ctld")
        self.slurmd_dir = os.path.join(root, "slurmd")
        self.bin_dir = os.path.join(root, "bin")
        self.agent = os.path.join(self.bin_dir, "c3-agent")
        self.agent_src = agent_src
        self.jobs = []  # slurm job ids submitted
        self.cleanup_dirs = []  # outside root, removed at exit (unless --keep)
        self.started_munged = False
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:
            cpus = os.cpu_count() or 1
        self.cpus = max(1, min(cpus, os.cpu_count() or 1, 4))
        self.env = dict(os.environ, SLURM_CONF=self.conf, PATH=os.environ.get("PATH", "") + ":" + SBIN_PATH)
        for k in list(self.env):
            if k.startswith("SLURM_") and k != "SLURM_CONF" or k.startswith("C3_AGENT_"):
                del self.env[k]

    # -- setup

    def prepare(self):
        os.chmod(self.root, 0o755)
        for d in (self.logdir, self.slurmd_dir, self.bin_dir):
            os.makedirs(d, mode=0o755, exist_ok=True)
        os.makedirs(self.ctld_dir, mode=0o755, exist_ok=True)
        try:
            pw = pwd.getpwnam("slurm")
            self.slurm_user = "slurm"
            os.chown(self.ctld_dir, pw.pw_uid, pw.pw_gid)
        except KeyError:
            self.slurm_user = "root"
        shutil.copyfile(self.agent_src, self.agent)
        os.chmod(self.agent, 0o755)
        with open(os.path.join(self.root, "plugstack.conf"), "w") as f:
            f.write("")
        self.ctld_port = free_port()
        self.slurmd_port = free_port()
        while self.slurmd_port == self.ctld_port:
            self.slurmd_port = free_port()
        # Unique job ids per run (the agent's job id is slurm-<id>; state dirs and stores may persist).
        first_job_id = 1000 + int(time.time() * 10) % 50_000_000
        conf = f"""# written by scripts/slurm_test.py
ClusterName=c3test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
AuthType=auth/munge
CredType=cred/munge
SlurmUser={self.slurm_user}
SlurmdUser=root
StateSaveLocation={self.ctld_dir}
SlurmctldPidFile={self.ctld_dir}/slurmctld.pid
SlurmctldLogFile={self.ctld_dir}/slurmctld.log
SlurmdSpoolDir={self.slurmd_dir}
SlurmdPidFile={self.slurmd_dir}/slurmd.pid
SlurmdLogFile={self.logdir}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={self.root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait={KILL_WAIT}
MinJobAge=600
FirstJobId={first_job_id}
NodeName={self.host} NodeAddr=127.0.0.1 NodeHostname={self.host} CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=c3 Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
        with open(self.conf, "w") as f:
            f.write(conf)
        os.chmod(self.conf, 0o644)

    def munge_works(self):
        try:
            p = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
            if p.returncode != 0:
                return False
            q = subprocess.run(["unmunge"], input=p.stdout, capture_output=True, timeout=5)
            return q.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def start_munge(self):
        if self.munge_works():
            log("munged already running: reusing it")
            return
        key = "/etc/munge/munge.key"
        try:
            mu = pwd.getpwnam("munge")
        except KeyError as e:
            raise SetupError("no `munge` user (is the munge package installed?)") from e
        if not os.path.exists(key):
            log(f"creating {key}")
            os.makedirs("/etc/munge", mode=0o700, exist_ok=True)
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(1024))
            os.chown(key, mu.pw_uid, mu.pw_gid)
        for d in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
            os.makedirs(d, mode=0o755, exist_ok=True)
            os.chown(d, mu.pw_uid, mu.pw_gid)
        os.chmod("/run/munge", 0o755)
        out = open(os.path.join(self.logdir, "munged.out"), "wb")
        self.procs["munged"] = subprocess.Popen(
            [which("munged") or "munged", "-F", "--force"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
            start_new_session=True)
        self.started_munged = True
        if not wait_for(lambda: self.munge_works() or self.procs["munged"].poll() is not None, 15) \
                or not self.munge_works():
            raise SetupError("munged did not come up within 15 s:\n" + tail(out.name))
        log("munged started")

    def start(self):
        if self.uts:
            if not loopback_only("localhost"):
                raise SetupError("`localhost` does not resolve to 127.0.0.1")
            if subprocess.run(["unshare", "--uts", "true"], capture_output=True, timeout=10).returncode != 0:
                raise SetupError(f"{socket.gethostname()} does not resolve to loopback and `unshare --uts` "
                                 "fails: cannot keep the daemons on 127.0.0.1")
            why = ("C3_SLURM_FORCE_UTS=1" if os.environ.get("C3_SLURM_FORCE_UTS") == "1"
                   else f"{socket.gethostname()} does not resolve to loopback only")
            log(f"{why}: the daemons run in a UTS namespace of their own, as host `localhost`")
        self.start_munge()
        for name in ("slurmctld", "slurmd"):
            exe = which(name)
            if not exe:
                raise SetupError(f"{name} not found")
            out = open(os.path.join(self.logdir, f"{name}.out"), "wb")
            cmd = [exe, "-D", "-f", self.conf]
            if self.uts:
                # unshare and sh exec: the pid stays the daemon's.
                cmd = ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', self.host, *cmd]
            self.procs[name] = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
            if name == "slurmctld":
                # slurmd registers with the controller: give it a moment to listen.
                wait_for(lambda: self.slurm_ok(["scontrol", "ping"]), 15)
        state = wait_for(self.node_idle, 60, 0.5)
        if not state:
            raise SetupError(f"node {self.host} not idle within 60 s (sinfo: {self.node_state()!r})")
        log(f"slurm up: node {self.host} idle, {self.cpus} CPUs, "
            f"slurmctld :{self.ctld_port}, slurmd :{self.slurmd_port}")

    def slurm_ok(self, cmd):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10, env=self.env)
            return p.returncode == 0 and "UP" in p.stdout
        except (OSError, subprocess.TimeoutExpired):
            return False

    def node_state(self):
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise SetupError(f"{name} exited with {p.returncode}:\n{tail(os.path.join(self.logdir, name + '.out'))}")
        try:
            p = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                               timeout=10, env=self.env)
            return p.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    def node_idle(self):
        return self.node_state() == "idle"

    def listeners(self):
        """TCP sockets in LISTEN state held by the daemons we started: [(name, 'addr:port')]."""
        inodes = {}
        for name, p in self.procs.items():
            try:
                for fd in os.listdir(f"/proc/{p.pid}/fd"):
                    target = os.readlink(f"/proc/{p.pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes[target[8:-1]] = name
            except OSError:
                continue
        out = []
        for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
            try:
                with open(table) as f:
                    rows = f.read().splitlines()[1:]
            except OSError:
                continue
            for row in rows:
                cols = row.split()
                if len(cols) < 10 or cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                    continue
                addr_hex, port_hex = cols[1].split(":")
                raw = bytes.fromhex(addr_hex)
                if v6:
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    addr = socket.inet_ntop(socket.AF_INET6, words)
                    if addr.startswith("::ffff:"):
                        addr = addr[7:]
                else:
                    addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
                out.append((inodes[cols[9]], f"{addr}:{int(port_hex, 16)}"))
        return out

    # -- jobs

    def sbatch(self, script, workdir, name, extra=(), user=None):
        cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--chdir={workdir}",
               f"--output={workdir}/slurm-%j.out", "--ntasks=1", "--cpus-per-task=1", *extra, script]
        env = self.env
        if user is not None:
            pw = pwd.getpwnam(user)
            env = {"HOME": pw.pw_dir, "USER": user, "LOGNAME": user, "SHELL": pw.pw_shell or "/bin/sh",
                   "PATH": "/usr/local/bin:/usr/bin:/bin", "SLURM_CONF": self.conf, "LANG": "C.UTF-8"}
            cmd = ["runuser", "-u", user, "--", "env", "-i",
                   *[f"{k}={v}" for k, v in env.items()], *cmd]
            env = self.env
        p = run(cmd, timeout=30, env=env, cwd=workdir)
        job = p.stdout.strip().split(";")[0]
        if not job.isdigit():
            raise SetupError(f"sbatch printed {p.stdout!r}")
        self.jobs.append(job)
        return job

    def job_info(self, job):
        """scontrol's fields of the job ({} once Slurm forgot it)."""
        try:
            p = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True,
                               timeout=10, env=self.env)
        except (OSError, subprocess.TimeoutExpired):
            return {}
        if p.returncode != 0:
            return {}
        fields = {}
        for tok in p.stdout.split():
            k, _, v = tok.partition("=")
            fields[k] = v
        return fields

    def job_done(self, job):
        """The job's final JobState once it is over and not COMPLETING any more."""
        info = self.job_info(job)
        state = info.get("JobState", "")
        if not info:
            return "GONE"
        if state in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "REQUEUED", "RESIZING",
                     "SIGNALING", "STAGE_OUT") or "COMPLETING" in info.get("Reason", ""):
            return None
        return f"{state} ExitCode={info.get('ExitCode', '?')}"

    def scancel(self, job):
        run(["scancel", job], timeout=20, env=self.env)

    # -- teardown

    def stop(self):
        active = [j for j in self.jobs if not self.job_done(j)] if "slurmctld" in self.procs else []
        if active:
            log(f"canceling jobs still active: {' '.join(active)}")
            subprocess.run(["scancel", *active], capture_output=True, timeout=20, env=self.env)
            wait_for(lambda: all(self.job_done(j) for j in active), 30, 0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None:
                continue
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        kill_processes_naming(self.root)


def processes_with(needle_env=None, needle=None):
    """pids (not ours) whose environment holds the entry needle_env, or whose environment, command
    line, cwd, executable or open files name needle (slurmstepd overwrites its environment with its
    title, but keeps the slurmd log open)."""
    found = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle_env is not None and needle_env.encode() in env:
            found.append(int(d))
        elif needle is not None:
            hit = needle.encode() in cmdline or any(needle.encode() in e for e in env)
            if not hit:
                links = []
                for name in ("cwd", "exe"):
                    try:
                        links.append(os.readlink(f"/proc/{d}/{name}"))
                    except OSError:
                        pass
                try:
                    for fd in os.listdir(f"/proc/{d}/fd"):
                        try:
                            links.append(os.readlink(f"/proc/{d}/fd/{fd}"))
                        except OSError:
                            pass
                except OSError:
                    pass
                hit = any(link.startswith(needle) for link in links)
            if hit:
                found.append(int(d))
    return found


def kill_processes_naming(root):
    left = processes_with(needle=root)
    for pid in left:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                what = f.read().replace(b"\0", b" ").decode("utf-8", "replace")[:120]
            os.kill(pid, signal.SIGKILL)
            log(f"killed leftover process {pid}: {what}")
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# Checks


class Scenario:
    def __init__(self, name, title):
        self.name = name
        self.title = title
        self.failures = []
        self.notes = []
        self.timings = []
        self.job = None
        self.workdir = None
        self.error = None
        self.start = time.monotonic()
        self.elapsed = 0.0

    def check(self, cond, what):
        if not cond:
            self.failures.append(what)
        return cond

    def timing(self, label, secs):
        self.timings.append(f"{label} {secs:.1f}s")


def wait_terminal(rec, cluster, job, job_id, timeout, interval=0.1, each_poll=None):
    """(time, body) of the job's terminal status; None after timeout s, or 10 s after Slurm ended the job.
    `each_poll` runs at every poll (to time something else meanwhile)."""
    ended = []

    def pred():
        if each_poll:
            each_poll()
        term = rec.terminal(job_id)
        if term:
            return term
        if not ended and cluster.job_done(job):
            ended.append(time.monotonic())
        return ended and time.monotonic() - ended[0] > 10

    got = wait_for(pred, timeout, interval)
    return got if isinstance(got, tuple) else None


def check_reports(sc, rec, job_id, states):
    events = rec.for_job(job_id)
    if not sc.check(events, f"no report posted to /v1/jobs/{job_id}/ (job ids seen: {rec.job_ids()})"):
        return None
    statuses = [(t, b) for t, kind, b in events if kind == "status"]
    arts = [(t, b) for t, kind, b in events if kind == "artifacts"]
    attempts = {b.get("attempt") for _, kind, b in events}
    sc.check(attempts == {1}, f"attempt should be 1 (SLURM_RESTART_COUNT+1) in every report, got {attempts}")
    seen, seqs = set(), []
    for _, b in statuses:
        if b.get("seq") not in seen:
            seen.add(b.get("seq"))
            seqs.append(b.get("seq"))
    sc.check(all(isinstance(s, int) for s in seqs) and seqs == sorted(seqs) and len(seqs) == len(set(seqs)),
             f"status seqs not increasing: {seqs}")
    order = [b.get("state") for _, b in statuses]
    sc.check(order and order[0] == "RUNNING", f"first status should be RUNNING: {order}")
    terms = {(b.get("seq"), b.get("state")) for _, b in statuses if b.get("state") in TERMINAL}
    if not sc.check(len(terms) == 1, f"expected exactly one terminal status, got {sorted(terms, key=str)} (states {order})"):
        return None
    t_term, term = next((t, b) for t, b in statuses if b.get("state") in TERMINAL)
    sc.check(term.get("state") in states,
             f"terminal state {term.get('state')} (reason {term.get('reason')}), expected {' or '.join(sorted(states))}")
    fin = [(t, b) for t, b in statuses if b.get("state") == "FINALIZING"]
    if sc.check(fin, f"no FINALIZING status (states {order})"):
        sc.check(fin[0][0] <= t_term and fin[0][1].get("seq", 0) < term.get("seq", 0),
                 "FINALIZING came after the terminal status")
        sc.check(fin[0][1].get("gpu_released") is True, f"FINALIZING without gpu_released: true: {fin[0][1]}")
    if sc.check(arts, "no artifacts registration posted"):
        sc.check(arts[0][0] <= t_term, "artifacts registration came after the terminal status")
        sc.check(arts[0][1].get("manifest") == f"jobs/{job_id}/manifest.json",
                 f"artifacts registration names manifest {arts[0][1].get('manifest')!r}")
    for key in ("peak_memory_bytes", "cpu_seconds"):
        sc.check(isinstance(term.get(key), (int, float)), f"terminal status has no `{key}`: {term.get(key)!r}")
    sc.notes.append(f"terminal {term.get('state')}/{term.get('reason')} exit_code={term.get('exit_code')} "
                    f"peak_memory_bytes={term.get('peak_memory_bytes')} cpu_seconds={term.get('cpu_seconds')} "
                    f"signal={term.get('signal')} states {'>'.join(order)}")
    return t_term, term


def check_manifest(sc, cluster, job_id, workdir, env, store_dir):
    """`c3-agent ls --json` against the files under workdir/artifacts; returns the manifest (or None)."""
    p = subprocess.run([cluster.agent, "ls", job_id, "--json"], capture_output=True, text=True, timeout=60,
                       env=env)
    if not sc.check(p.returncode == 0, f"c3-agent ls {job_id} --json: exit {p.returncode}: {p.stderr.strip()[-400:]}"):
        return None
    try:
        man = json.loads(p.stdout)
    except ValueError:
        sc.check(False, f"c3-agent ls --json printed no JSON: {p.stdout[:200]!r}")
        return None
    sc.check(man.get("complete") is True, f"manifest complete={man.get('complete')!r}")
    sc.check(man.get("job_id") == job_id, f"manifest job_id {man.get('job_id')!r}")
    listed = {f.get("path"): f for f in man.get("files", []) if str(f.get("path", "")).startswith("artifacts/")}
    local = {}
    art = os.path.join(workdir, "artifacts")
    for dirpath, _, names in os.walk(art):
        for n in names:
            full = os.path.join(dirpath, n)
            if os.path.isfile(full) and not os.path.islink(full):
                rel = "artifacts/" + os.path.relpath(full, art)
                local[rel] = (os.path.getsize(full), sha256_file(full))
    sc.check(local, "the job wrote no files into artifacts/")
    for rel, (size, digest) in sorted(local.items()):
        f = listed.get(rel)
        if not sc.check(f is not None, f"{rel} missing from the manifest"):
            continue
        sc.check(f.get("size") == size and f.get("sha256") == digest,
                 f"{rel}: manifest size/sha256 {f.get('size')}/{str(f.get('sha256'))[:12]} != {size}/{digest[:12]}")
        blob = os.path.join(store_dir, "blobs", "sha256", str(f.get("sha256")))
        sc.check(os.path.isfile(blob) and os.path.getsize(blob) == size, f"{rel}: blob {blob} missing or wrong size")
    for rel in sorted(set(listed) - set(local)):
        sc.check(False, f"manifest lists {rel}, which is not in the workdir")
    return man


def check_no_leftovers(sc, job):
    left = processes_with(needle_env=f"SLURM_JOB_ID={job}")
    descr = []
    for pid in left:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")[:80]
            descr.append(f"{pid}:{cmdline}")
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    sc.check(not left, f"processes of the job left behind (killed now): {descr}")


def agent_env(cluster, rec, store_dir, state_dir):
    lines = {
        "C3_AGENT_CONTROL_PLANE_URL": rec.url,
        "C3_AGENT_STORE_URL": "file://" + store_dir,
        "C3_AGENT_STOP_DEADLINE_SECS": str(STOP_DEADLINE),
        "C3_AGENT_KILL_GRACE_SECS": str(KILL_GRACE),
        "C3_AGENT_GIVE_UP_SECS": "20",
    }
    if state_dir is not None:
        lines["C3_AGENT_STATE_DIR"] = state_dir
    return lines


def write_batch(path, sbatch_lines, env, agent, command):
    text = "#!/bin/bash\n"
    text += "".join(f"#SBATCH {line}\n" for line in sbatch_lines)
    text += "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    text += "echo \"batch shell $$ on $(hostname) as $(id -un): SLURM_JOB_ID=$SLURM_JOB_ID " \
            "SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT-unset}\"\n"
    text += "# exec: the agent becomes the batch shell, so it gets --signal=B:... and Slurm's SIGTERM first-hand.\n"
    text += f"exec {shlex.quote(agent)} run -- bash -c {shlex.quote(command)}\n"
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)


def scenario_dirs(cluster, name, owner=None):
    workdir = os.path.join(cluster.root, name, "work")
    store = os.path.join(cluster.root, name, "store")
    state = os.path.join(cluster.root, name, "state")
    for d in (os.path.dirname(workdir), workdir, store, state):
        os.makedirs(d, mode=0o755, exist_ok=True)
        os.chmod(d, 0o755)
        if owner is not None and d != os.path.dirname(workdir):
            os.chown(d, owner.pw_uid, owner.pw_gid)
    return workdir, store, state


def ls_env(cluster, store, state):
    env = dict(cluster.env, C3_AGENT_STORE_URL="file://" + store)
    if state is not None:
        env["C3_AGENT_STATE_DIR"] = state
    return env


def scenario_a(sc, cluster, rec):
    workdir, store, state = scenario_dirs(cluster, "a")
    sc.workdir = workdir
    command = (
        'set -e; cd "$C3_ARTIFACTS_DIR"; '
        'head -c 20971520 /dev/urandom > big.bin; '
        'echo "epoch=1 loss=0.5" > metrics.txt; '
        'mkdir -p ckpt; printf "step=100\\n" > ckpt/step-100.txt; '
        'echo ready > ready.txt; echo "job ready, sleeping"; '
        'sleep 600 & exec sleep 601')  # the script itself dies of SIGTERM, like a real trainer
    script = os.path.join(workdir, "job.sbatch")
    write_batch(script, [], agent_env(cluster, rec, store, state), cluster.agent, command)
    job = sc.job = cluster.sbatch(script, workdir, "c3-a-scancel")
    job_id = f"slurm-{job}"
    t_sub = time.monotonic()
    ready = os.path.join(workdir, "artifacts", "ready.txt")
    running = wait_for(lambda: any(b.get("state") == "RUNNING" for _, b in rec.statuses(job_id))
                       and os.path.exists(ready), 90, 0.2)
    if not sc.check(running, f"no RUNNING report for {job_id} with the files written within 90 s "
                             f"(job ids seen: {rec.job_ids()}, slurm: {cluster.job_info(job).get('JobState')})"):
        return
    sc.timing("submit->running", time.monotonic() - t_sub)
    time.sleep(1.5)  # let live sync see the closed files (not required: the final sync must get them anyway)
    t_cancel = time.monotonic()
    cluster.scancel(job)
    term = wait_terminal(rec, cluster, job, job_id, 40)
    done = wait_for(lambda: cluster.job_done(job), 40, 0.5)
    sc.check(done, "Slurm still shows the job after 40 s")
    sc.notes.append(f"slurm: {done}")
    if not sc.check(term, f"no terminal status within 40 s of scancel"):
        return
    sc.timing("scancel->terminal", term[0] - t_cancel)
    sc.check(term[0] - t_cancel < KILL_WAIT,
             f"terminal status {term[0] - t_cancel:.1f}s after scancel: not before KillWait={KILL_WAIT}s (SIGKILL)")
    fin = [t for t, b in rec.statuses(job_id) if b.get("state") == "FINALIZING"]
    if fin:
        sc.timing("scancel->finalizing", fin[0] - t_cancel)
    check_reports(sc, rec, job_id, {"CANCELED"})
    check_manifest(sc, cluster, job_id, workdir, ls_env(cluster, store, state), store)
    check_no_leftovers(sc, job)


def scenario_b(sc, cluster, rec):
    workdir, store, state = scenario_dirs(cluster, "b")
    sc.workdir = workdir
    command = ('trap "echo checkpoint > \\$C3_ARTIFACTS_DIR/last.ckpt; echo got USR1" USR1; '
               'echo "looping until the time limit"; while :; do sleep 1; done')
    script = os.path.join(workdir, "job.sbatch")
    write_batch(script, [], agent_env(cluster, rec, store, state), cluster.agent, command)
    job = sc.job = cluster.sbatch(script, workdir, "c3-b-timelimit", extra=["--time=1", "--signal=B:USR1@50"])
    job_id = f"slurm-{job}"
    t_sub = time.monotonic()
    running = wait_for(lambda: any(b.get("state") == "RUNNING" for _, b in rec.statuses(job_id)), 90, 0.2)
    if not sc.check(running, f"no RUNNING report for {job_id} within 90 s (job ids seen: {rec.job_ids()}, "
                             f"slurm: {cluster.job_info(job).get('JobState')})"):
        return
    t_run = time.monotonic()
    sc.timing("submit->running", t_run - t_sub)
    ckpt = os.path.join(workdir, "artifacts", "last.ckpt")
    t_ckpt = {}

    def see_ckpt():
        if "t" not in t_ckpt and os.path.exists(ckpt):
            t_ckpt["t"] = time.monotonic()

    term = wait_terminal(rec, cluster, job, job_id, 150, 0.2, see_ckpt)
    if "t" in t_ckpt:
        sc.timing("running->USR1 checkpoint", t_ckpt["t"] - t_run)
    done = wait_for(lambda: cluster.job_done(job), 40, 0.5)
    sc.check(done, "Slurm still shows the job 40 s after the terminal status")
    sc.notes.append(f"slurm: {done}")
    if not sc.check(term, "no terminal status within 150 s of RUNNING (time limit 60 s)"):
        return
    sc.timing("running->terminal", term[0] - t_run)
    # Slurm says TIMEOUT; so must the agent (it asks squeue why it was stopped).
    check_reports(sc, rec, job_id, {"TIMED_OUT"})
    man = check_manifest(sc, cluster, job_id, workdir, ls_env(cluster, store, state), store)
    want = hashlib.sha256(b"checkpoint\n").hexdigest()
    if man is not None:
        got = [f for f in man.get("files", []) if f.get("path") == "artifacts/last.ckpt"]
        sc.check(got and got[0].get("sha256") == want,
                 f"artifacts/last.ckpt with sha256 of 'checkpoint\\n' not in the manifest (USR1 not forwarded?): {got}")
    check_no_leftovers(sc, job)


def ensure_user():
    try:
        return pwd.getpwnam(TEST_USER), False
    except KeyError:
        pass
    run(["useradd", "--create-home", "--shell", "/bin/bash", "--user-group", TEST_USER], timeout=30)
    return pwd.getpwnam(TEST_USER), True


def scenario_c(sc, cluster, rec, user):
    workdir, store, _ = scenario_dirs(cluster, "c", owner=user)
    sc.workdir = workdir
    command = ('set -e; cd "$C3_ARTIFACTS_DIR"; id -u > uid.txt; '
               'for i in 1 2 3; do echo "part $i" > "f$i.txt"; done; '
               'mkdir -p eval; head -c 100000 /dev/urandom > eval/sample.bin; echo done')
    script = os.path.join(workdir, "job.sbatch")
    # No C3_AGENT_STATE_DIR: the agent's default for a non-root user, ~/.local/state/c3-agent.
    write_batch(script, [], agent_env(cluster, rec, store, None), cluster.agent, command)
    os.chown(script, user.pw_uid, user.pw_gid)
    job = sc.job = cluster.sbatch(script, workdir, "c3-c-user", user=TEST_USER)
    job_id = f"slurm-{job}"
    cluster.cleanup_dirs.append(os.path.join(user.pw_dir, ".local", "state", "c3-agent", "jobs", job_id))
    t_sub = time.monotonic()
    term = wait_terminal(rec, cluster, job, job_id, 90)
    done = wait_for(lambda: cluster.job_done(job), 40, 0.5)
    sc.notes.append(f"slurm: {done}")
    if not sc.check(term, f"no terminal status for {job_id} within 90 s (job ids seen: {rec.job_ids()})"):
        return
    sc.timing("submit->terminal", term[0] - t_sub)
    check_reports(sc, rec, job_id, {"SUCCEEDED"})
    state = os.path.join(user.pw_dir, ".local", "state", "c3-agent")
    try:
        with open(os.path.join(workdir, "artifacts", "uid.txt")) as f:
            ran_as = f.read().strip()
        sc.check(ran_as == str(user.pw_uid), f"job ran as uid {ran_as!r}, not {user.pw_uid}")
    except OSError as e:
        sc.check(False, f"uid.txt: {e}")
    wrong = []
    for top in (os.path.join(store, "blobs"), os.path.join(store, "jobs", job_id)):
        sc.check(os.path.isdir(top), f"{top} missing")
        for dirpath, dirs, names in os.walk(top):
            for n in dirs + names:
                full = os.path.join(dirpath, n)
                if os.lstat(full).st_uid != user.pw_uid:
                    wrong.append(full)
    job_state = os.path.join(state, "jobs", job_id)
    if sc.check(os.path.isdir(job_state), f"no state dir {job_state} (the agent's default for {TEST_USER})"):
        for dirpath, dirs, names in os.walk(job_state):
            for n in [""] + dirs + names:
                full = os.path.join(dirpath, n)
                if os.lstat(full).st_uid != user.pw_uid:
                    wrong.append(full)
    sc.check(not wrong, f"not owned by {TEST_USER}: {wrong[:5]}")
    # After the ownership checks: `ls` runs as root here.
    check_manifest(sc, cluster, job_id, workdir, ls_env(cluster, store, state), store)
    check_no_leftovers(sc, job)


# --------------------------------------------------------------------------------------------


def install(no_install):
    needed = {"slurmd": "slurmd", "slurmctld": "slurmctld", "sbatch": "slurm-client", "munged": "munge"}
    missing = [b for b in needed if not which(b)]
    if not missing:
        return
    if no_install:
        print(f"slurm_test: missing: {', '.join(missing)} (packages "
              f"{' '.join(sorted({needed[b] for b in missing}))}; run without --no-install to install)",
              file=sys.stderr)
        sys.exit(1)
    log(f"installing slurmctld slurmd slurm-client munge (missing: {', '.join(missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd, limit in ((["apt-get", "update"], 300),
                       (["apt-get", "install", "-y",
                         "slurmctld", "slurmd", "slurm-client", "munge"], 600)):
        p = subprocess.run(cmd, env=env, timeout=limit)
        if p.returncode != 0:
            raise SetupError(f"{' '.join(cmd)}: exit {p.returncode}")
    still = [b for b in needed if not which(b)]
    if still:
        raise SetupError(f"still missing after apt-get install: {', '.join(still)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agent", default="target/debug/c3-agent", help="the c3-agent binary (default %(default)s)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, stores, workdirs)")
    ap.add_argument("--no-install", action="store_true", help="never install packages")
    ap.add_argument("--only", default="abc", help="scenarios to run (default %(default)s)")
    args = ap.parse_args()

    if os.geteuid() != 0:
        if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True,
                                                   timeout=10).returncode == 0:
            os.execvp("sudo", ["sudo", "-n", "--preserve-env=PATH,C3_SLURM_TMP", sys.executable,
                               os.path.abspath(__file__), *sys.argv[1:]])
        print("slurm_test: needs root (starts slurmd/slurmctld, creates a user); no passwordless sudo",
              file=sys.stderr)
        return 2
    agent_src = os.path.abspath(args.agent)
    if not os.access(agent_src, os.X_OK):
        print(f"slurm_test: no executable agent at {agent_src} (cargo build -p c3-agent)", file=sys.stderr)
        return 2

    try:
        install(args.no_install)
    except (SetupError, subprocess.TimeoutExpired) as e:
        print(f"slurm_test: setup failed: {e}", file=sys.stderr)
        return 2

    tmp_base = os.environ.get("C3_SLURM_TMP", "/var/tmp")
    root = tempfile.mkdtemp(prefix="c3-slurm-", dir=tmp_base)
    cluster = Cluster(root, agent_src)
    rec = None
    cleaned = []

    def cleanup():
        if cleaned:
            return
        cleaned.append(True)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        try:
            cluster.stop()
        except Exception as e:  # keep going: daemons must not outlive us
            log(f"cleanup: {e}")
            kill_processes_naming(root)
        if rec is not None:
            rec.stop()
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
            for d in cluster.cleanup_dirs:
                shutil.rmtree(d, ignore_errors=True)

    atexit.register(cleanup)

    def on_signal(signum, _frame):
        if cleaned:
            return
        log(f"got signal {signum}: cleaning up")
        sys.exit(128 + signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)

    scenarios = []
    try:
        try:
            log(f"temp dir {root}; agent {agent_src}")
            cluster.prepare()
            rec = Recorder()
            log(f"control-plane recorder on {rec.url}")
            cluster.start()
            binds = cluster.listeners()
            bad = [f"{n} {a}" for n, a in binds if not a.startswith("127.0.0.1:")]
            log(f"daemon listeners: {', '.join(f'{n} {a}' for n, a in binds) or 'none seen'}")
            if bad:
                raise SetupError(f"daemons listen beyond 127.0.0.1: {bad}")
            user = None
            if "c" in args.only:
                user, created = ensure_user()
                log(f"test user {TEST_USER} uid {user.pw_uid} ({'created' if created else 'existing'})")
        except SetupError as e:
            print(f"slurm_test: setup failed: {e}", file=sys.stderr)
            for name in ("slurmctld.out", "slurmd.out", "slurmd.log", "munged.out"):
                print(f"--- {name} (tail)\n{tail(os.path.join(cluster.logdir, name), 30)}")
            print(f"--- slurmctld.log (tail)\n{tail(os.path.join(cluster.ctld_dir, 'slurmctld.log'), 30)}")
            return 2

        defs = [("b", "time limit + USR1 warning", lambda sc: scenario_b(sc, cluster, rec)),
                ("a", "scancel mid-job", lambda sc: scenario_a(sc, cluster, rec)),
                ("c", f"job of user {TEST_USER}", lambda sc: scenario_c(sc, cluster, rec, user))]
        defs = [d for d in defs if d[0] in args.only]

        def runner(sc, fn):
            sc.start = time.monotonic()
            try:
                fn(sc)
            except Exception as e:
                sc.error = f"{type(e).__name__}: {e}"
                sc.failures.append(sc.error)
                traceback.print_exc()
            sc.elapsed = time.monotonic() - sc.start
            log(f"scenario {sc.name} ({sc.title}) finished: {'PASS' if not sc.failures else 'FAIL'}")

        parallel = cluster.cpus >= 2
        threads = []
        for name, title, fn in defs:
            sc = Scenario(name, title)
            scenarios.append(sc)
            if parallel and name == "b":
                th = threading.Thread(target=runner, args=(sc, fn), daemon=True)
                th.start()
                threads.append(th)
                time.sleep(1)
            else:
                runner(sc, fn)
        for th in threads:
            th.join(timeout=300)
            if th.is_alive():
                log("a scenario thread is still running after 300 s")

        other = [j for j in rec.job_ids() if not any(sc.job and j == f"slurm-{sc.job}" for sc in scenarios)]
        print()
        ok = True
        for sc in sorted(scenarios, key=lambda s: s.name):
            verdict = "PASS" if not sc.failures else "FAIL"
            ok = ok and not sc.failures
            print(f"{verdict} {sc.name}: {sc.title} (slurm job {sc.job}, {sc.elapsed:.1f}s"
                  f"{'; ' + ', '.join(sc.timings) if sc.timings else ''})")
            for n in sc.notes:
                print(f"      {n}")
            for f in sc.failures:
                print(f"      - {f}")
        if other:
            ok = False
            print(f"FAIL reports for unexpected job ids: {other}")
        if not ok:
            for sc in scenarios:
                if sc.failures and sc.job and sc.workdir:
                    print(f"\n--- scenario {sc.name}: slurm-{sc.job}.out (tail)")
                    print(tail(os.path.join(sc.workdir, f"slurm-{sc.job}.out"), 150))
            print(f"\n--- slurmctld.log (tail)\n{tail(os.path.join(cluster.ctld_dir, 'slurmctld.log'), 40)}")
            print(f"\n--- slurmd.log (tail)\n{tail(os.path.join(cluster.logdir, 'slurmd.log'), 40)}")
        print(f"\nslurm_test: {'PASS' if ok else 'FAIL'} in {time.monotonic() - T0:.0f}s")
        return 0 if ok else 1
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
