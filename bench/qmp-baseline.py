#!/usr/bin/python3
"""Hand-driven QEMU baselines for cpr-bench --qemu: no cprd, plain QMP from this script.

Boots the probe guest under QEMU exactly as cprd would (same machine options, guest RAM in a
memfd mapped through /proc/self/fd/3, console on a socket pair), then hops it HOPS times with
cpr-transfer (the recipe of QEMU's docs/devel/migration/CPR.rst) and HOPS times with a normal
precopy migration to a new QEMU on this host (unlimited bandwidth, default downtime limit).
Prints one JSON object per hop: mode, QMP downtime and total time, the longest gap around the
hop on the guest's own clock and between console lines as they arrive on the host, and the
wall time of the hop as driven from here.
"""
import argparse, fcntl, json, os, socket, subprocess, sys, tempfile, threading, time

ap = argparse.ArgumentParser()
ap.add_argument("--qemu", default="/usr/bin/qemu-system-x86_64")
ap.add_argument("--kernel", required=True)
ap.add_argument("--initrd", required=True)
ap.add_argument("--memory", default="256M")
ap.add_argument("--hops", type=int, default=5)
ap.add_argument("--accel", default="tcg")
a = ap.parse_args()
mib = {"M": 1, "G": 1024}[a.memory[-1]] * int(a.memory[:-1])
work = tempfile.mkdtemp(prefix="qmp-baseline-")
children = []


def memfd():
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, mib << 20)
    return fd


ser_q, ser_c = socket.socketpair()
lines = []  # (seq, gap_us, host arrival time)


def read_console():
    buf = b""
    while True:
        d = ser_c.recv(65536)
        if not d:
            return
        buf += d
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            f = dict(x.split("=", 1) for x in line.decode(errors="replace").split()[1:] if "=" in x)
            if "seq" in f and "gap_us" in f:
                lines.append((int(f["seq"]), int(f["gap_us"]), time.monotonic()))


threading.Thread(target=read_console, daemon=True).start()


def args(incoming):
    return [a.qemu, "-name", "bench,debug-threads=on",
            "-machine", f"pc-q35-10.0,accel={a.accel},aux-ram-share=on,memory-backend=ram0",
            "-object", f"memory-backend-file,id=ram0,size={mib}M,share=on,mem-path=/proc/self/fd/3",
            "-m", f"{mib}M", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
            "-chardev", "socket,id=serial0,fd=5", "-serial", "chardev:serial0",
            "-kernel", a.kernel, "-initrd", a.initrd,
            "-append", "console=ttyS0 quiet panic=-1 probe_mib=8",
            "-qmp", f"unix:{work}/qmp{len(children)}.sock,server=on,wait=off"] + incoming


def spawn(mem, incoming):
    qmp = f"{work}/qmp{len(children)}.sock"
    def place():
        # Copy both above any target first, so that placing one cannot clobber the other.
        hi_mem, hi_ser = fcntl.fcntl(mem, fcntl.F_DUPFD, 100), fcntl.fcntl(ser_q.fileno(), fcntl.F_DUPFD, 100)
        os.dup2(hi_mem, 3)
        os.dup2(hi_ser, 5)
        os.setsid()
    p = subprocess.Popen(args(incoming), preexec_fn=place, close_fds=False,
                         stdout=subprocess.DEVNULL, stderr=open(f"{work}/qemu{len(children)}.log", "w"))
    children.append(p)
    return p, qmp


class Qmp:
    def __init__(self, path, timeout=30):
        end = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.time() > end:
                    raise
                time.sleep(0.002)
        self.f = self.s.makefile("rwb")
        self.events = []
        while "QMP" not in json.loads(self.f.readline() or '{"QMP": "eof"}'):
            pass
        self.cmd("qmp_capabilities")

    def cmd(self, name, arguments=None):
        msg = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        if name == "migrate":
            self.events.clear()
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error']}")
            if "return" in r:
                return r["return"]
            sys.stderr.write(f"ignored QMP message {r}\n")


def listening(path):
    with open("/proc/net/unix") as t:
        return any(l.split()[-1] == path and int(l.split()[3], 16) & 0x10000 for l in list(t)[1:] if len(l.split()) >= 8)


def gaps(before, after):
    """Longest gap from the last line before a hop to 3 lines after it: on the guest's clock,
    and between console lines' arrivals here."""
    end = time.time() + 10
    while time.time() < end and (not lines or lines[-1][0] < after + 3):
        time.sleep(0.005)
    near = [l for l in lines if before <= l[0] <= after + 3]
    host = max((b[2] - a[2] for a, b in zip(near, near[1:])), default=0)
    return max((l[1] for l in near[1:]), default=0), round(host * 1e6)


def wait_done(q):
    while True:
        info = q.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        time.sleep(0.0005)


try:
    mem = memfd()
    cur, qmp_path = spawn(mem, [])
    q = Qmp(qmp_path)
    end = time.time() + 120
    while len(lines) < 5:
        if time.time() > end:
            sys.exit("the guest did not print")
        time.sleep(0.05)
    for mode in ("cpr-transfer", "precopy"):
        for hop in range(a.hops):
            n = len(children)
            main = f"{work}/main{n}.sock"
            before = lines[-1][0]
            t0 = time.monotonic()
            if mode == "cpr-transfer":
                cpr = f"{work}/cpr{n}.sock"
                ch = lambda kind, p: {"channel-type": kind, "addr": {"transport": "socket", "type": "unix", "path": p}}
                new, new_qmp = spawn(mem, ["-incoming", json.dumps(ch("main", main)), "-incoming", json.dumps(ch("cpr", cpr))])
                while not listening(cpr):
                    time.sleep(0.0005)
                q.cmd("migrate-set-parameters", {"mode": "cpr-transfer"})
                q.cmd("migrate", {"channels": [ch("main", main), ch("cpr", cpr)]})
            else:
                old_mem, mem = mem, memfd()
                new, new_qmp = spawn(mem, ["-incoming", f"unix:{main}"])
                while not listening(main):
                    time.sleep(0.0005)
                q.cmd("migrate-set-parameters", {"mode": "normal", "max-bandwidth": 68719476736})
                q.cmd("migrate", {"uri": f"unix:{main}"})
            nq = Qmp(new_qmp)  # negotiated while migrating, so that its RESUME event arrives here
            info = wait_done(q)
            if info.get("status") != "completed":
                sys.exit(f"{mode} hop {hop} failed: {info}")
            while nq.cmd("query-status")["status"] != "running":
                time.sleep(0.0005)
            wall_ms = (time.monotonic() - t0) * 1000
            after = lines[-1][0]
            ts = lambda ev, conn: next((e["timestamp"]["seconds"] * 1000000 + e["timestamp"]["microseconds"]
                                        for e in conn.events if e["event"] == ev), None)
            stop, resume = ts("STOP", q), ts("RESUME", nq)
            stop_resume_us = resume - stop if stop is not None and resume is not None else None
            q.cmd("quit")
            cur.wait()
            if mode == "precopy":
                os.close(old_mem)  # the old guest RAM, now copied; keeping it would pile up
            cur, q = new, nq
            print(json.dumps({"mode": mode, "downtime_ms": info.get("downtime", 0), "total_ms": info.get("total-time", 0),
                              "stop_resume_us": stop_resume_us,
                              "gap_us": gaps(before, after)[0], "host_gap_us": gaps(before, after)[1],
                              "wall_ms": round(wall_ms, 1)}), flush=True)
finally:
    for p in children:
        if p.poll() is None:
            p.kill()
            p.wait()
    if sys.exc_info()[0] is not None:
        for f in sorted(os.listdir(work)):
            if f.endswith(".log"):
                sys.stderr.write(f + ": " + open(os.path.join(work, f)).read())
    subprocess.run(["rm", "-rf", work])
