#!/usr/bin/env python3
"""Captures a real QEMU migration stream into a file (how the fixtures here were made).

capture.py OUT --qemu BIN [--datadir DIR] [--machine pc] [--mem 32] [--run SECS] [--cap NAME ...]
  [--boot boot.bin] [--bandwidth BYTES] [--downtime MS]
The guest (TCG) boots boot.bin (a loop that keeps dirtying memory) when --run > 0; otherwise it stays
paused (-S). The stream goes to OUT through `migrate exec:cat>OUT`.
"""
import argparse, json, os, socket, subprocess, sys, tempfile, time

def qmp(sock_path):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(100):
        try:
            s.connect(sock_path); break
        except OSError:
            time.sleep(0.05)
    f = s.makefile("rw")
    json.loads(f.readline())
    def cmd(name, **args):
        f.write(json.dumps({"execute": name, "arguments": args}) + "\n"); f.flush()
        while True:
            r = json.loads(f.readline())
            if "return" in r or "error" in r:
                if "error" in r: raise RuntimeError(f"{name}: {r['error']}")
                return r["return"]
    cmd("qmp_capabilities")
    return cmd

def main():
    p = argparse.ArgumentParser()
    p.add_argument("out"); p.add_argument("--qemu", default="qemu-system-x86_64")
    p.add_argument("--datadir", action="append", default=[])
    p.add_argument("--machine", default="pc"); p.add_argument("--mem", type=int, default=32)
    p.add_argument("--run", type=float, default=0); p.add_argument("--cap", action="append", default=[])
    p.add_argument("--boot"); p.add_argument("--bandwidth", type=int, default=0)
    p.add_argument("--downtime", type=int, default=0)
    a = p.parse_args()
    tmp = tempfile.mkdtemp()
    qs = os.path.join(tmp, "qmp")
    argv = [a.qemu, "-machine", a.machine, "-accel", "tcg", "-m", str(a.mem), "-nographic",
            "-nodefaults", "-qmp", f"unix:{qs},server=on,wait=off", "-S"]
    for d in a.datadir: argv += ["-L", d]
    if a.boot: argv += ["-drive", f"file={a.boot},format=raw,if=floppy" if a.machine.startswith("pc") else f"file={a.boot},format=raw,if=ide"]
    q = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        cmd = qmp(qs)
        caps = [{"capability": c, "state": True} for c in a.cap]
        if caps: cmd("migrate-set-capabilities", capabilities=caps)
        params = {}
        if a.bandwidth: params["max-bandwidth"] = a.bandwidth
        if a.downtime: params["downtime-limit"] = a.downtime
        if params: cmd("migrate-set-parameters", **params)
        if a.run > 0:
            cmd("cont"); time.sleep(a.run)
        cmd("migrate", uri=f"exec:cat>{a.out}")
        deadline = time.time() + 120
        while time.time() < deadline:
            st = cmd("query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                print(json.dumps(st), file=sys.stderr)
                return 0 if st["status"] == "completed" else 1
            if a.run > 0 and time.time() > deadline - 110 and a.downtime:
                cmd("migrate-set-parameters", **{"downtime-limit": 20000, "max-bandwidth": 1 << 40})
            time.sleep(0.2)
        return 1
    finally:
        q.kill(); q.wait()

sys.exit(main())
