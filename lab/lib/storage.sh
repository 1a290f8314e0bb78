# Shared storage (roundtrip/up --storage shared): the guest's disk is a network disk that both
# hosts reach and that libvirt itself counts as shared (a <disk type='network'> needs no
# --unsafe), standing in for Ceph RBD or an iSCSI target. A third network namespace
# <lab name>-s ("storage") runs `qemu-nbd --shared=8 --persistent` on the lab's qcow2 and answers
# on STORAGE_ADDR (on its loopback), reached from A and from B over a veth pair each (st-a, st-b),
# so the storage traffic never crosses the rate-limited WAN lab-a <-> lab-b and the link counters
# keep measuring the memory stream alone.
#
# --storage shared-file instead puts the same qcow2 as a plain file at one path both hosts see
# (the set-up of issue 17's report): libvirt cannot know it is shared, so trips need --unsafe.
#
# Files: the image $LAB_VAR/storage/lab-guest.qcow2 (root mount namespace; with shared only
# qemu-nbd opens it), qemu-nbd's output $LAB_VAR/storage/qemu-nbd.log, its pid
# $LAB_RUN/s.qemu-nbd.pid; the bfmigd traces of --trace-shared in $LAB_VAR/storage/strace-<h>.<pid>.

STORAGE_NS_HOST=s
STORAGE_ADDR=198.18.0.9
STORAGE_PORT=10809
STORAGE_EXPORT=$LAB_GUEST
# Per host: the storage namespace's end and the host's end of their veth pair (a /30 each).
declare -A STORAGE_LINK_S=([a]=198.18.0.5 [b]=198.18.0.13) STORAGE_LINK_H=([a]=198.18.0.6 [b]=198.18.0.14)
# The persistent bitmap put into the shared image before the trips: BFMig must leave it there.
STORAGE_BITMAP=lab-shared-backup

storage_image() { echo "$LAB_VAR/storage/$LAB_GUEST.qcow2"; }
storage_netns() { netns_name "$STORAGE_NS_HOST"; }
storage_is_up() { [[ -e /run/netns/$(storage_netns) ]]; }

# The storage namespace and its two links (idempotent); needs hosts A and B up.
storage_up() {
    storage_is_up && return 0
    local ns h
    ns=$(storage_netns)
    log "storage: namespace $ns, NBD address $STORAGE_ADDR (links to A and B outside the WAN)"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$STORAGE_ADDR/32" dev lo
    for h in "${LAB_HOSTS[@]}"; do
        ip -n "$ns" link add "st-$h" type veth peer name st-s netns "$(netns_name "$h")"
        ip -n "$ns" addr add "${STORAGE_LINK_S[$h]}/30" dev "st-$h"
        ip -n "$ns" link set "st-$h" up
        ip -n "$(netns_name "$h")" addr add "${STORAGE_LINK_H[$h]}/30" dev st-s
        ip -n "$(netns_name "$h")" link set st-s up
        ip -n "$(netns_name "$h")" route add "$STORAGE_ADDR/32" via "${STORAGE_LINK_S[$h]}" dev st-s
    done
}

storage_down() {
    storage_is_up || return 0
    ip netns del "$(storage_netns)"
}

# Serves IMAGE from the storage namespace: the guest's QEMU, and during a migration also the
# destination's QEMU on the same export (--shared); --persistent keeps serving when the source's
# QEMU disconnects (without it qemu-nbd exits with its last client).
storage_serve() {
    local image=$1 log=$LAB_VAR/storage/qemu-nbd.log pid i
    storage_stop
    setsid nsenter --net="/run/netns/$(storage_netns)" \
        qemu-nbd --format=qcow2 --export-name="$STORAGE_EXPORT" --bind="$STORAGE_ADDR" --port="$STORAGE_PORT" \
        --shared=8 --persistent --cache=none --aio=threads "$image" > "$log" 2>&1 < /dev/null 9>&- &
    pid=$!
    echo "$pid" > "$LAB_RUN/s.qemu-nbd.pid"
    for ((i = 0; i < 100; i++)); do
        [[ -n $(ip netns exec "$(storage_netns)" ss -Hltn "sport = :$STORAGE_PORT") ]] && return 0
        pid_alive "$pid" || break
        sleep 0.2
    done
    cat "$log" >&2
    die "storage: qemu-nbd did not come up on $STORAGE_ADDR:$STORAGE_PORT"
}

storage_stop() {
    local pid
    pid=$(cat "$LAB_RUN/s.qemu-nbd.pid" 2> /dev/null || true)
    pid_alive "$pid" || return 0
    kill -TERM "$pid"
    for _ in $(seq 1 50); do pid_alive "$pid" || break; sleep 0.1; done
    pid_alive "$pid" && kill -KILL "$pid"
    rm -f "$LAB_RUN/s.qemu-nbd.pid"
}

# The shared image's persistent bitmaps, as a JSON array of names, read with -U (force-share)
# past qemu-nbd's write lock: what the image itself holds, not what a client was told.
storage_bitmaps() {
    qemu-img info -U --output=json "$(storage_image)" 2> /dev/null |
        jq -c '[.["format-specific"].data.bitmaps // [] | .[].name]'
}

# --- Who opens the shared image: bfmigd (and everything it starts) under strace -----------

# Attaches strace to bfmigd of host H (all its threads and every child it starts from now on:
# bfmig-transfer, qemu-img) for the calls that could reach the shared image: opening a file
# and connecting a socket. The trace is read by storage_bfmig_writes.
storage_trace_bfmig() {
    local h=$1 pid out
    pid=$(host_pid "$h" bfmigd)
    out=$LAB_VAR/storage/strace-$h
    pid_alive "$pid" || die "storage: bfmigd of host $h is not running, nothing to trace"
    [[ $(cat "$LAB_RUN/$h.strace.for" 2> /dev/null) == "$pid" ]] && pid_alive "$(cat "$LAB_RUN/$h.strace.pid" 2> /dev/null)" && return 0
    setsid strace -f -qq -e trace=open,openat,openat2,creat,connect -o "$out.$pid" -p "$pid" < /dev/null > /dev/null 2>&1 9>&- &
    echo $! > "$LAB_RUN/$h.strace.pid"
    echo "$pid" > "$LAB_RUN/$h.strace.for"
    sleep 1
}

# Lines of the bfmigd traces in which a BFMig process opened the shared image for writing or
# connected to the storage's NBD server (the only ways to write a network disk). strace prints
# an IPv4 peer as sin_port=htons(P), sin_addr=inet_addr("A") and a mapped one as
# sin6_port=htons(P), ..., "::ffff:A".
storage_bfmig_writes() {
    local addr=${STORAGE_ADDR//./\\.}
    cat "$LAB_VAR"/storage/strace-*.* 2> /dev/null |
        grep -E "$LAB_GUEST\\.qcow2\".*O_(RDWR|WRONLY)|creat\\(\"[^\"]*$LAB_GUEST\\.qcow2\"|_port=htons\\($STORAGE_PORT\\).*\"(::ffff:)?$addr\"" || true
}

# How many files the traced BFMig processes opened for writing at all (their own state, logs):
# evidence that the trace saw them work, so that no write access to the image means something.
storage_traced_writes() {
    cat "$LAB_VAR"/storage/strace-*.* 2> /dev/null | grep -cE 'open(at)?\(.*O_(RDWR|WRONLY)' || true
}

storage_untrace() {
    local h pid
    for h in "${LAB_HOSTS[@]}"; do
        pid=$(cat "$LAB_RUN/$h.strace.pid" 2> /dev/null || true)
        pid_alive "$pid" && kill -TERM "$pid" 2> /dev/null
        rm -f "$LAB_RUN/$h.strace.pid" "$LAB_RUN/$h.strace.for"
    done
    return 0
}

# shared-file: the same image as a file both hosts' mount namespaces see (/var/tmp is not
# private to a host). cache='none' as on a cluster file system; libvirt still needs --unsafe.
storage_file_disk_xml() {
    cat <<EOF
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' discard='unmap'/>
      <source file='$(storage_image)'/>
      <target dev='vda' bus='virtio'/>
    </disk>
EOF
}

# The guest's disk on the storage: a network disk, same text in both hosts' definitions.
storage_disk_xml() {
    cat <<EOF
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none' discard='unmap'/>
      <source protocol='nbd' name='$STORAGE_EXPORT'>
        <host name='$STORAGE_ADDR' port='$STORAGE_PORT'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
EOF
}
