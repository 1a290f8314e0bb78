import socket, json, subprocess, time, os
p = subprocess.Popen(["qemu-system-x86_64","-machine","pc","-m","64","-nodefaults","-display","none","-S",
  "-blockdev","driver=qcow2,node-name=d0,file.driver=file,file.filename=d.qcow2",
  "-device","virtio-blk-pci,drive=d0,id=vd0","-qmp","unix:qmp.sock,server=on,wait=off"])
time.sleep(1.5)
s = socket.socket(socket.AF_UNIX); s.connect("qmp.sock"); f = s.makefile("rw")
def cmd(c, a=None):
    f.write(json.dumps({"execute": c, **({"arguments": a} if a else {})})+"\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r: return r
f.readline(); print(cmd("qmp_capabilities"))
print(cmd("block-dirty-bitmap-add", {"node":"d0","name":"c2","persistent":True}))
print(cmd("migrate-set-capabilities", {"capabilities":[{"capability":"dirty-bitmaps","state":True}]}))
print(cmd("migrate", {"uri":"exec:cat > stream.bin"}))
for i in range(60):
    r = cmd("query-migrate"); st = r["return"].get("status")
    if st in ("completed","failed"): print(st); break
    time.sleep(0.5)
p.kill()
