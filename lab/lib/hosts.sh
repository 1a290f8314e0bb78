# Hosts A and B (and C with `up --hosts 3`): each a network namespace (<lab name>-a/-b/-c) plus
# a persistent mount namespace (bind-mounted at $LAB_RUN/<h>.mnt) with its own /etc/libvirt,
# /var/lib/libvirt, /run, /var/log/libvirt, /var/cache/libvirt, virtlogd and libvirtd. With two
# hosts the veth pair lab-a <-> lab-b is the WAN; with three, each host's lab-<h> is one end of a
# veth pair whose other end sits on a bridge in the switch namespace <lab name>-sw. Either way
# every host shapes its own lab-<h> with tbf, so each byte crosses one shaped egress.

netns_name() { echo "$LAB_NAME-$1"; }
host_dir() { echo "$LAB_VAR/$1"; }
host_pid() { cat "$LAB_RUN/$1.$2.pid" 2> /dev/null; }

host_exec() {
    local h=$1
    shift
    nsenter --mount="$LAB_RUN/$h.mnt" --net="/run/netns/$(netns_name "$h")" "$@"
}

host_virsh() {
    local h=$1
    shift
    host_exec "$h" virsh -q -c qemu:///system "$@"
}

# Starts a long-running process inside host H (for modes that need daemons there); its pid is
# appended to $LAB_RUN/<h>.spawned and printed. `lab down` kills it with everything else in
# the host's namespaces; a mode's cleanup may kill it earlier by that pid.
host_spawn() {
    local h=$1 logfile=$2
    shift 2
    hostns_spawn "$LAB_RUN/$h.mnt" "$(netns_name "$h")" "$logfile" "$@"
    echo "$HOSTNS_PID" >> "$LAB_RUN/$h.spawned"
    echo "$HOSTNS_PID"
}

pid_alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2> /dev/null; }

lab_is_up() {
    [[ -f $LAB_RUN/state ]] || return 1
    local h
    for h in "${LAB_HOSTS[@]}"; do
        pid_alive "$(host_pid "$h" libvirtd)" || return 1
        pid_alive "$(host_pid "$h" virtlogd)" || return 1
        [[ -e /run/netns/$(netns_name "$h") ]] || return 1
    done
}

state_get() { sed -n "s/^$1=//p" "$LAB_RUN/state" 2> /dev/null; }

# RATE: e.g. 100mbit, 1gbit, or unlimited (no shaping: the veth pair at memory speed).
shape_link() {
    local rate=$1 bps burst h
    if [[ $rate == unlimited ]]; then
        for h in "${LAB_HOSTS[@]}"; do
            ip -n "$(netns_name "$h")" link set "lab-$h" up
            tc -n "$(netns_name "$h")" qdisc del dev "lab-$h" root 2> /dev/null || true
        done
        sed -i "s/^rate=.*/rate=$rate/" "$LAB_RUN/state"
        return 0
    fi
    bps=$(rate_bps "$rate")
    # tbf needs a bucket of at least one timer tick's worth of data at high rates.
    burst=$((bps / 8 / 100))
    ((burst < 262144)) && burst=262144
    for h in "${LAB_HOSTS[@]}"; do
        ip -n "$(netns_name "$h")" link set "lab-$h" up
        tc -n "$(netns_name "$h")" qdisc replace dev "lab-$h" root tbf rate "$rate" burst "$burst" latency 50ms
    done
    sed -i "s/^rate=.*/rate=$rate/" "$LAB_RUN/state"
}

cmd_up() {
    local stack="" rate="" storage=local hosts=""
    while (($#)); do
        case $1 in
            --stack) stack=$2; shift 2 ;;
            --rate) rate=$2; shift 2 ;;
            --hosts) [[ $2 =~ ^[23]$ ]] || die "up: --hosts 2 or 3"; hosts=$2; shift 2 ;;
            --storage) [[ $2 =~ ^(local|shared)$ ]] || die "up: --storage local or shared"; storage=$2; shift 2 ;;
            *) die "up: unknown option $1" ;;
        esac
    done
    need_root
    mkdir -p "$(dirname "$LAB_VAR")"
    if [[ -n $stack ]]; then
        if lab_is_up && [[ $(state_get stack) != "$stack:$(stack_libvirt_version)" ]]; then
            log "changing the stack: taking the lab down first"
            cmd_down
        fi
        stack_ensure "$stack"
    fi
    ensure_lab_tools
    if [[ -n $hosts ]] && lab_is_up && ((hosts != ${#LAB_HOSTS[@]})); then
        log "changing the lab to $hosts hosts: taking it down first"
        cmd_down
    fi
    if [[ -n $hosts ]] && ! lab_is_up; then
        LAB_HOSTS=("${LAB_ALL_HOSTS[@]:0:hosts}")
    fi
    # The storage namespace's links use addresses inside the three hosts' /29.
    [[ $storage == shared && ${#LAB_HOSTS[@]} == 3 ]] && die "up: --storage shared needs the two-host lab"

    if lab_is_up; then
        [[ -n $rate ]] && shape_link "$rate"
        [[ $storage == shared ]] && storage_up
        log "lab is up (libvirt $(stack_libvirt_version), QEMU $(stack_qemu_version), rate $(state_get rate))"
        return 0
    fi
    [[ -e $LAB_RUN || -e $LAB_VAR ]] && { log "cleaning a partial lab"; cmd_down; }
    host_setup_all "${stack:-$(stack_guess)}" "${rate:-$LAB_DEFAULT_RATE}"
    [[ $storage == shared ]] && storage_up
    return 0
}

stack_guess() {
    case $(stack_libvirt_version) in 9.0.*) echo debian12 ;; *) echo backports ;; esac
}

host_setup_all() {
    local stack=$1 rate=$2 h
    mkdir -p "$LAB_VAR"
    hostns_private_dir "$LAB_RUN"
    cat > "$LAB_RUN/state" <<EOF
stack=$stack:$(stack_libvirt_version)
rate=$rate
hosts=${#LAB_HOSTS[@]}
EOF
    for h in "${LAB_HOSTS[@]}"; do ip netns add "$(netns_name "$h")"; done
    if ((${#LAB_HOSTS[@]} == 2)); then
        ip -n "$(netns_name a)" link add lab-a type veth peer name lab-b netns "$(netns_name b)"
    else
        lab_switch_up
    fi
    for h in "${LAB_HOSTS[@]}"; do
        ip -n "$(netns_name "$h")" link set lo up
        ip -n "$(netns_name "$h")" addr add "${HOST_ADDR[$h]}/$(lab_prefix)" dev "lab-$h"
    done
    shape_link "$rate"
    guest_build "$LAB_VAR/guest"
    for h in "${LAB_HOSTS[@]}"; do host_setup "$h"; done
    for h in "${LAB_HOSTS[@]}"; do host_wait_ready "$h"; done
    log "lab is up: $(for h in "${LAB_HOSTS[@]}"; do printf '%s=%s ' "${h^^}" "${HOST_ADDR[$h]}"; done)rate $rate, libvirt $(stack_libvirt_version), QEMU $(stack_qemu_version)"
}

# The hosts' prefix: a /30 for the two-host veth pair, a /29 for three hosts on the switch.
lab_prefix() { ((${#LAB_HOSTS[@]} == 3)) && echo 29 || echo 30; }

# Three hosts: a bridge in the switch namespace, one veth pair per host (lab-<h> in the host,
# sw-<h> on the bridge). Nothing else runs in the switch namespace.
lab_switch_up() {
    local sw h
    sw=$(netns_name sw)
    ip netns add "$sw"
    ip -n "$sw" link add br0 type bridge
    ip -n "$sw" link set br0 up
    for h in "${LAB_HOSTS[@]}"; do
        ip -n "$sw" link add "sw-$h" type veth peer name "lab-$h" netns "$(netns_name "$h")"
        ip -n "$sw" link set "sw-$h" master br0
        ip -n "$sw" link set "sw-$h" up
    done
}

# A CA and one server/client certificate pair for QEMU's native migration TLS (virsh migrate
# --tls), in the file names QEMU's x509 credentials expect, readable by the QEMU user.
lab_migration_pki() {
    local pki=$LAB_VAR/pki
    [[ -s $pki/server-cert.pem ]] && return 0
    mkdir -p "$pki"
    (
        cd "$pki"
        openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=BFMig lab CA" -keyout ca-key.pem -out ca-cert.pem
        for role in server client; do
            openssl req -newkey rsa:2048 -nodes -subj "/CN=bfmig-lab-$role" -keyout "$role-key.pem" -out "$role.csr"
            printf 'subjectAltName = IP:%s, IP:%s, IP:%s\nextendedKeyUsage = %sAuth\n' "${HOST_ADDR[a]}" "${HOST_ADDR[b]}" "${HOST_ADDR[c]}" "$role" > "$role.ext"
            openssl x509 -req -in "$role.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
                -extfile "$role.ext" -out "$role-cert.pem"
        done
    ) > "$LAB_VAR/pki.log" 2>&1 || die "making the lab's migration TLS certificates failed (see $LAB_VAR/pki.log)"
    chown -R libvirt-qemu:libvirt-qemu "$pki" 2> /dev/null || true
    chmod 0750 "$pki"
    chmod 0640 "$pki"/*-key.pem
}

host_write_config() {
    local h=$1 dir etc
    dir=$(host_dir "$h")
    etc=$dir/etc
    mkdir -p "$etc/qemu" "$etc/hooks" "$etc/storage" "$dir/lib/images" "$dir/lib/boot" \
        "$dir/lib/qemu" "$dir/log" "$dir/cache"
    find /etc/libvirt -maxdepth 1 -type f -exec cp -p {} "$etc/" \;
    chmod 0755 "$dir" "$dir/lib" "$dir/lib/images" "$dir/lib/boot"
    chown libvirt-qemu:libvirt-qemu "$dir/lib/qemu" 2> /dev/null || true
    chmod 0751 "$dir/lib/qemu"
    cat >> "$etc/libvirtd.conf" <<EOF

# --- BFMig lab host $h ---
host_uuid = "$(cat /proc/sys/kernel/random/uuid)"
listen_tls = 0
listen_tcp = 1
listen_addr = "${HOST_ADDR[$h]}"
auth_tcp = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
    # Both hosts run a guest of the same name at the same moment during a migration: keep
    # libvirt out of the shared cgroup tree so they cannot collide there.
    lab_migration_pki
    cat >> "$etc/qemu.conf" <<EOF

# --- BFMig lab host $h ---
cgroup_controllers = [ ]
# QEMU native TLS for --tls migrations (one lab CA; the server certificate names both hosts).
migrate_tls_x509_cert_dir = "$LAB_VAR/pki"
migrate_tls_x509_verify = 1
# What this host offers as the migration address when a call names none (virt-manager without
# an address, a plain virsh migrate): its lab address, not the machine's host name.
migration_host = "${HOST_ADDR[$h]}"
EOF
    cp "$LAB_VAR/guest/vmlinuz" "$LAB_VAR/guest/initrd.img" "$dir/lib/boot/"
}

host_setup() {
    local h=$1 dir
    dir=$(host_dir "$h")
    host_write_config "$h"
    hostns_create "$LAB_RUN/$h.mnt" "$LAB_NAME-run" "lock libvirt" \
        "$dir/etc:/etc/libvirt" "$dir/lib:/var/lib/libvirt" "$dir/log:/var/log/libvirt" "$dir/cache:/var/cache/libvirt"
    local netns
    netns=$(netns_name "$h")
    hostns_spawn "$LAB_RUN/$h.mnt" "$netns" "$dir/virtlogd.out" virtlogd
    echo "$HOSTNS_PID" > "$LAB_RUN/$h.virtlogd.pid"
    hostns_spawn "$LAB_RUN/$h.mnt" "$netns" "$dir/libvirtd.out" libvirtd --listen
    echo "$HOSTNS_PID" > "$LAB_RUN/$h.libvirtd.pid"
}

# libvirtd needs seconds to start, far more on a loaded machine: wait up to two minutes.
host_wait_ready() {
    local h=$1 deadline=$((SECONDS + 120)) alive=yes
    while ((SECONDS < deadline)); do
        if host_virsh "$h" version > /dev/null 2>&1; then return 0; fi
        pid_alive "$(host_pid "$h" libvirtd)" || { alive=no; break; }
        sleep 0.5
    done
    cat "$(host_dir "$h")/libvirtd.out" >&2 || true
    tail -n 20 "$(host_dir "$h")/log/libvirtd.log" >&2 2> /dev/null || true
    die "libvirtd of host $h did not come up (process alive: $alive)"
}

# Every process whose mount or network namespace is one of the lab's, by pid.
lab_pids() {
    local ids=() h f p ns
    for h in "${LAB_ALL_HOSTS[@]}"; do
        f=$(hostns_id "$LAB_RUN/$h.mnt")
        [[ -n $f ]] && ids+=("$f")
        f=/run/netns/$(netns_name "$h")
        [[ -e $f ]] && ids+=("net:[$(stat -L -c %i "$f")]")
    done
    # The shared storage's namespace (qemu-nbd), when --storage shared made it.
    f=/run/netns/$(netns_name s)
    [[ -e $f ]] && ids+=("net:[$(stat -L -c %i "$f")]")
    for h in "${LAB_HOSTS[@]}"; do
        for f in libvirtd virtlogd; do p=$(host_pid "$h" "$f"); [[ -n $p ]] && echo "$p"; done
    done
    ((${#ids[@]} == 0)) && return 0
    for p in /proc/[0-9]*; do
        for ns in mnt net; do
            local link
            link=$(readlink "$p/ns/$ns" 2> /dev/null) || continue
            for f in "${ids[@]}"; do [[ $link == "$f" ]] && echo "${p#/proc/}"; done
        done
    done
}

lab_kill_all() {
    local pids i
    mapfile -t pids < <(lab_pids | sort -un)
    ((${#pids[@]} == 0)) && return 0
    kill -TERM "${pids[@]}" 2> /dev/null || true
    for ((i = 0; i < 50; i++)); do
        mapfile -t pids < <(for p in "${pids[@]}"; do pid_alive "$p" && echo "$p"; done)
        ((${#pids[@]} == 0)) && return 0
        sleep 0.2
    done
    kill -KILL "${pids[@]}" 2> /dev/null || true
    sleep 0.5
}

cmd_down() {
    need_root
    local h
    for h in "${LAB_HOSTS[@]}"; do
        if pid_alive "$(host_pid "$h" libvirtd)"; then
            host_virsh "$h" destroy "$LAB_GUEST" > /dev/null 2>&1 || true
        fi
    done
    lab_kill_all
    for h in "${LAB_ALL_HOSTS[@]}"; do
        hostns_remove "$LAB_RUN/$h.mnt"
        if [[ -e /run/netns/$(netns_name "$h") ]]; then ip netns del "$(netns_name "$h")"; fi
    done
    if [[ -e /run/netns/$(netns_name sw) ]]; then ip netns del "$(netns_name sw)"; fi
    storage_down
    blockdev_detach_all
    # A post-copy trip that died before its cleanup leaves the machine-wide setting it changed.
    if [[ -f $LAB_RUN/postcopy.uffd-restore ]]; then
        cat "$LAB_RUN/postcopy.uffd-restore" > /proc/sys/vm/unprivileged_userfaultfd || true
    fi
    if mountpoint -q "$LAB_RUN" 2> /dev/null; then umount "$LAB_RUN"; fi
    rm -rf "$LAB_RUN" "$LAB_VAR" "$LAB_VAR.apt.log"
    log "lab is down"
}

# `lab status --jobs`: one line per host on the guest's migration job and the last line of its
# QEMU log, bounded in time (a lab test calls it on a trip that outlived its limit, before the
# kill: where the migration stands, not only which process waits).
status_jobs() {
    local h job qlog
    for h in "${LAB_HOSTS[@]}"; do
        job=$(host_exec "$h" timeout 10 virsh -q -c qemu:///system domjobinfo "$LAB_GUEST" 2>&1 |
            awk -F': *' 'NF > 1 && $1 ~ /^(Job type|Operation|Time elapsed|Data processed|Data remaining|Memory remaining|File remaining|Dirty rate|Iteration|Postcopy requests)$/ {v = $2; gsub(/ +/, " ", v); sub(/ $/, "", v); printf "%s%s=%s", sep, $1, v; sep="; "}')
        qlog=$(tail -n 1 "$(host_dir "$h")/log/qemu/$LAB_GUEST.log" 2> /dev/null | cut -c 1-200)
        echo "host $h job: ${job:-none or no answer in 10 s} | qemu log: ${qlog:-empty}"
    done
}

cmd_status() {
    if [[ ${1:-} == --jobs ]]; then
        lab_is_up && status_jobs || echo "down"
        return 0
    fi
    if lab_is_up; then
        echo "up: stack $(state_get stack), rate $(state_get rate)"
        local h
        for h in "${LAB_HOSTS[@]}"; do
            echo "host $h (${HOST_ADDR[$h]}): libvirtd pid $(host_pid "$h" libvirtd), guests: $(host_virsh "$h" list --all --name | xargs)"
        done
        if storage_is_up; then
            local nbd
            nbd=$(cat "$LAB_RUN/s.qemu-nbd.pid" 2> /dev/null || true)
            echo "shared storage $(storage_netns) ($STORAGE_ADDR:$STORAGE_PORT): $(pid_alive "$nbd" && echo "qemu-nbd pid $nbd serving $(storage_image)" || echo "no export (a --storage shared scenario starts one)")"
        fi
    else
        echo "down"
        [[ -e $LAB_RUN || -e $LAB_VAR ]] && echo "(partial state present: run lab down)"
    fi
    return 0
}
