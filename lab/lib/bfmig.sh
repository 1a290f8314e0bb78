# BFMig inside the lab hosts (mode "bfmig"): each host gets a private system bus (dbus-daemon
# on /run/dbus/system_bus_socket in the host's own /run) and a bfmigd that follows the host's
# libvirtd, listens for its peer on the host's lab address and keeps the explicit-mode sockets
# /run/bfmig/<peer>/<guest>.{mig,nbd}. Both daemons share one pre-shared key. The binaries are
# published once per source tree (native AOT) into a cache outside the lab, so `lab down` keeps
# them and a later trip or run reuses them.
#
# Files: $LAB_VAR/bfmig/psk, $LAB_VAR/<h>/bfmig/{bfmig.conf,dbus.conf,bfmigd.log,dbus.log,state/}
# (gone with `lab down`), pids $LAB_RUN/<h>.{bfmig-dbus,bfmigd}.pid.
#
# Binaries (roundtrip --binaries): "build" publishes this tree's bfmigd, bfmig-transfer and
# bfmig-hook into $BFMIG_BIN; "installed" uses the bfmig package's /usr/sbin/bfmigd,
# /usr/libexec/bfmig/{bfmig-transfer,bfmig-hook}, and runs bfmigd as its unit does (no
# arguments: /etc/bfmig/bfmig.conf and /var/lib/bfmig, which are bind mounts of the host's own
# $LAB_VAR/<h>/bfmig/{etc,state} inside its mount namespace). Either way bfmig-hook is libvirt's
# qemu hook in both hosts (/etc/libvirt/hooks/qemu.d/50-bfmig as each libvirtd sees it, a link
# to the binary), installed before the first trip and followed by a SIGHUP to libvirtd.

BFMIG_REPO=$(cd "$LAB_DIR/.." && pwd)
BFMIG_BIN=${BFMIG_LAB_BIN:-$BFMIG_REPO/artifacts/lab-bfmig/bin}
BFMIG_PORT=16600
BFMIG_POLICY=$BFMIG_REPO/packaging/common/org.bfmig.BFMig1.conf
# build | installed (roundtrip --binaries); bfmig_select_binaries sets the three paths.
BFMIG_BINARIES=${BFMIG_BINARIES:-build}
BFMIGD_EXE=$BFMIG_BIN/bfmigd
BFMIG_HELPER_EXE=$BFMIG_BIN/bfmig-transfer
BFMIG_HOOK_EXE=$BFMIG_BIN/bfmig-hook

bfmig_dir() { echo "$(host_dir "$1")/bfmig"; }

# roundtrip --host-binaries H=DIR: host H runs bfmigd and bfmig-transfer from DIR (another
# build, e.g. lab/tools/other-version's: a host upgraded before the other), the rest this tree's.
declare -A BFMIG_HOST_BIN=()
bfmig_daemon_exe() { if [[ -n ${BFMIG_HOST_BIN[$1]:-} ]]; then echo "${BFMIG_HOST_BIN[$1]}/bfmigd"; else echo "$BFMIGD_EXE"; fi; }
bfmig_helper_exe() { if [[ -n ${BFMIG_HOST_BIN[$1]:-} ]]; then echo "${BFMIG_HOST_BIN[$1]}/bfmig-transfer"; else echo "$BFMIG_HELPER_EXE"; fi; }

bfmig_unsupported() {
    if [[ $BFMIG_BINARIES == installed ]]; then
        bfmig_installed_missing
    else
        command -v dotnet > /dev/null || { echo "the .NET SDK (dotnet) is not on PATH: bfmigd and bfmig-transfer cannot be built"; return; }
    fi
    command -v dbus-daemon > /dev/null || { echo "dbus-daemon is missing (package dbus): bfmigd needs a system bus"; return; }
    [[ -f $BFMIG_POLICY ]] || echo "the bus policy $BFMIG_POLICY is missing"
}

# Newest modification time (seconds) of anything the published binaries are built from.
bfmig_source_stamp() {
    # All of src/: the binaries also compile in src/Contracts (and whatever library comes next).
    find "$BFMIG_REPO/src" \
        "$BFMIG_REPO/Directory.Build.props" "$BFMIG_REPO/Directory.Packages.props" \
        \( -name bin -o -name obj \) -prune -o -type f -printf '%T@\n' | sort -n | tail -n 1 | cut -d. -f1
}

# Publishes bfmigd, bfmig-transfer and bfmig-hook (native AOT) unless the cache is newer than
# the sources. Nothing to do for installed binaries.
bfmig_publish() {
    local stamp p
    [[ $BFMIG_BINARIES == installed ]] && return 0
    stamp=$(bfmig_source_stamp)
    if [[ -x $BFMIG_BIN/bfmigd && -x $BFMIG_BIN/bfmig-transfer && -x $BFMIG_BIN/bfmig-hook && -f $BFMIG_BIN/.stamp &&
          $(cat "$BFMIG_BIN/.stamp") == "$stamp" ]]; then
        return 0
    fi
    mkdir -p "$BFMIG_BIN"
    for p in Transfer/Helper Daemon Hooks; do
        log "bfmig: publishing src/$p (native AOT) to $BFMIG_BIN"
        dotnet publish "$BFMIG_REPO/src/$p" -c Release -r linux-x64 -o "$BFMIG_BIN" \
            > "$BFMIG_BIN/publish-${p//\//-}.log" 2>&1 ||
            { tail -n 30 "$BFMIG_BIN/publish-${p//\//-}.log" >&2; die "bfmig: dotnet publish src/$p failed (log $BFMIG_BIN/publish-${p//\//-}.log)"; }
    done
    echo "$stamp" > "$BFMIG_BIN/.stamp"
}

# yes|no: the daemons' daemon:transparent. Explicit mode (bfmig) runs with it off so that it
# measures the socket-URI path alone; bfmig-transparent runs stock's own command line with it on.
BFMIG_TRANSPARENT=no

# BFMIG_AUTH=psk (default) or tls: how the lab's daemons authenticate the data path. tls uses the
# lab's own CA (lab_migration_pki): the server certificate for receiving, the client certificate
# for sending, both naming both hosts' addresses.
BFMIG_AUTH=${BFMIG_AUTH:-psk}
bfmig_auth_section() {
    local psk=$1 pki=$LAB_VAR/pki
    if [[ $BFMIG_AUTH == tls ]]; then
        lab_migration_pki
        printf '[auth]\nmode = tls\ntls_cert = %s\ntls_key = %s\ntls_client_cert = %s\ntls_client_key = %s\ntls_ca = %s\n' \
            "$pki/server-cert.pem" "$pki/server-key.pem" "$pki/client-cert.pem" "$pki/client-key.pem" "$pki/ca-cert.pem"
    else
        printf '[auth]\nmode = psk\npsk_file = %s\n' "$psk"
    fi
}

bfmig_write_config() {
    local h=$1 dir state psk conf helper_line
    dir=$(bfmig_dir "$h")
    mkdir -p "$dir/state"
    chmod 0700 "$dir/state"
    if [[ $BFMIG_BINARIES == installed ]]; then
        # The package's own paths, seen through the host's bind mounts (bfmig_mount_installed).
        state=/var/lib/bfmig psk=/etc/bfmig/psk conf=$dir/etc/bfmig.conf helper_line=""
        mkdir -p "$dir/etc"
        install -m 0600 "$LAB_VAR/bfmig/psk" "$dir/etc/psk"
    else
        state=$dir/state psk=$LAB_VAR/bfmig/psk conf=$dir/bfmig.conf helper_line="helper = $(bfmig_helper_exe "$h")"
    fi
    cat > "$dir/dbus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- The lab host's own system bus (its /run is private), with the packaged bfmigd policy. -->
<busconfig>
  <type>system</type>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <include>$BFMIG_POLICY</include>
</busconfig>
EOF
    cat > "$conf" <<EOF
; bfmigd of lab host $h (written by lab/lib/bfmig.sh, binaries: $BFMIG_BINARIES)
[daemon]
host_name = $h
state_dir = $state
runtime_dir = /run/bfmig
libvirt_uri = qemu:///system
listen = ${HOST_ADDR[$h]}:$BFMIG_PORT
qemu_user = libvirt-qemu
qemu_group = kvm
log_level = debug
transparent = $BFMIG_TRANSPARENT

$(bfmig_auth_section "$psk")

[transfer]
$helper_line

$(bfmig_peer_sections "$h")
EOF
}

# A [peers:X] section for every other host of the lab: a guest may come from or go to any of them.
bfmig_peer_sections() {
    local h=$1 peer
    for peer in "${LAB_HOSTS[@]}"; do
        [[ $peer == "$h" ]] && continue
        printf '[peers:%s]\naddress = %s:%s\nlibvirt_uri = qemu+tcp://%s/system\n\n' \
            "$peer" "${HOST_ADDR[$peer]}" "$BFMIG_PORT" "${HOST_ADDR[$peer]}"
    done
}

bfmig_running() { pid_alive "$(host_pid "$1" bfmigd)" && pid_alive "$(host_pid "$1" bfmig-dbus)"; }

bfmig_start_host() {
    local h=$1 dir deadline
    dir=$(bfmig_dir "$h")
    bfmig_write_config "$h"
    if ! pid_alive "$(host_pid "$h" bfmig-dbus)"; then
        host_exec "$h" sh -c 'rm -f /run/dbus/system_bus_socket; mkdir -p /run/dbus'
        host_spawn "$h" "$dir/dbus.log" dbus-daemon --config-file="$dir/dbus.conf" --nofork --nopidfile \
            > "$LAB_RUN/$h.bfmig-dbus.pid"
        deadline=$((SECONDS + 20))
        until host_exec "$h" test -S /run/dbus/system_bus_socket; do
            pid_alive "$(host_pid "$h" bfmig-dbus)" && ((SECONDS < deadline)) ||
                { cat "$dir/dbus.log" >&2; die "bfmig: the system bus of host $h did not come up"; }
            sleep 0.2
        done
    fi
    if ! pid_alive "$(host_pid "$h" bfmigd)"; then
        [[ -f $dir/bfmigd.log ]] && mv "$dir/bfmigd.log" "$dir/bfmigd.log.$(date +%s)"
        local args=(--config "$dir/bfmig.conf")
        if [[ $BFMIG_BINARIES == installed ]]; then
            bfmig_mount_installed "$h"
            args=()
        fi
        host_spawn "$h" "$dir/bfmigd.log" "$(bfmig_daemon_exe "$h")" "${args[@]}" > "$LAB_RUN/$h.bfmigd.pid"
        bfmig_daemon_exe "$h" > "$LAB_RUN/$h.bfmigd.exe"
        echo "$BFMIG_TRANSPARENT $BFMIG_AUTH" > "$LAB_RUN/$h.bfmigd.transparent"
    fi
}

# After a failed trip: the last warnings and errors of each host's bfmigd (at most 12 lines
# each, 240 characters a line), so that a test's failure message says what BFMig saw.
bfmig_log_excerpt() {
    local h
    for h; do
        log "bfmig: bfmigd of ${h^^}, last warnings and errors:"
        grep -E '^[0-9:.]+ (WRN|ERR|FTL) ' "$(bfmig_dir "$h")/bfmigd.log" 2> /dev/null | tail -n 12 | cut -c 1-240 | sed 's/^/    /' >&2
    done
}

# bfmigd is ready when it listens for its peer and has the sockets of the running guests.
bfmig_wait_ready() {
    local h=$1 deadline=$((SECONDS + 60)) dir
    dir=$(bfmig_dir "$h")
    while ((SECONDS < deadline)); do
        pid_alive "$(host_pid "$h" bfmigd)" || break
        if [[ -n $(host_exec "$h" ss -Hltn "sport = :$BFMIG_PORT") ]] &&
           host_exec "$h" sh -c 'for g; do test -S "$g" || exit 1; done' sh "${@:2}"; then
            return 0
        fi
        sleep 0.3
    done
    tail -n 30 "$dir/bfmigd.log" >&2
    die "bfmig: bfmigd of host $h is not ready (see $dir/bfmigd.log)"
}

# --- Which binaries, and the libvirt hook ------------------------------------------------

BFMIG_INSTALLED_DAEMON=/usr/sbin/bfmigd
BFMIG_INSTALLED_HELPER=/usr/libexec/bfmig/bfmig-transfer
BFMIG_INSTALLED_HOOK=/usr/libexec/bfmig/bfmig-hook
BFMIG_HOOK_NAME=50-bfmig

# build | installed: sets BFMIG_BINARIES and the three executables the hosts use.
bfmig_select_binaries() {
    case $1 in
        build)
            BFMIGD_EXE=$BFMIG_BIN/bfmigd BFMIG_HELPER_EXE=$BFMIG_BIN/bfmig-transfer BFMIG_HOOK_EXE=$BFMIG_BIN/bfmig-hook ;;
        installed)
            BFMIGD_EXE=$BFMIG_INSTALLED_DAEMON BFMIG_HELPER_EXE=$BFMIG_INSTALLED_HELPER BFMIG_HOOK_EXE=$BFMIG_INSTALLED_HOOK ;;
        *) die "--binaries: build or installed, not '$1'" ;;
    esac
    BFMIG_BINARIES=$1
}

bfmig_installed_missing() {
    local f
    for f in "$BFMIG_INSTALLED_DAEMON" "$BFMIG_INSTALLED_HELPER" "$BFMIG_INSTALLED_HOOK"; do
        [[ -x $f ]] || { echo "$f is missing: install the bfmig package (apt install ./bfmig_VERSION_amd64.deb) for --binaries installed"; return; }
    done
    [[ -d /etc/bfmig && -d /var/lib/bfmig ]] ||
        echo "/etc/bfmig or /var/lib/bfmig is missing: the bfmig package is not (fully) installed"
}

# The package's configuration and state directories, private to host H: its bfmigd runs with
# the packaged defaults and the hook's local split-brain guard reads the same state.
bfmig_mount_installed() {
    local h=$1 dir
    dir=$(bfmig_dir "$h")
    host_exec "$h" sh -ec "
        mountpoint -q /etc/bfmig || mount --bind '$dir/etc' /etc/bfmig
        mountpoint -q /var/lib/bfmig || mount --bind '$dir/state' /var/lib/bfmig
    "
}

# A host's daemon runs the binaries asked for; one started from the other kind is stopped
# (by its pid) so that bfmig_start_host starts the right one.
bfmig_daemon_matches() {
    local h=$1
    local pid
    pid=$(host_pid "$h" bfmigd || true)
    pid_alive "$pid" || return 0
    # Same path is not enough: a republished binary replaces the file, and the running daemon is
    # then the old build (its /proc exe link says "(deleted)").
    if [[ $(cat "$LAB_RUN/$h.bfmigd.exe" 2> /dev/null) == "$(bfmig_daemon_exe "$h")" && $(readlink "/proc/$pid/exe") != *" (deleted)" &&
          $(cat "$LAB_RUN/$h.bfmigd.transparent" 2> /dev/null) == "$BFMIG_TRANSPARENT $BFMIG_AUTH" ]]; then
        return 0
    fi
    log "bfmig: host $h runs $(cat "$LAB_RUN/$h.bfmigd.exe" 2> /dev/null || echo 'another bfmigd') ($(readlink "/proc/$pid/exe")); restarting it with $(bfmig_daemon_exe "$h")"
    kill -TERM "$pid" 2> /dev/null || true
    for _ in $(seq 1 150); do pid_alive "$pid" || break; sleep 0.2; done
    pid_alive "$pid" && kill -KILL "$pid" 2> /dev/null
    rm -f "$LAB_RUN/$h.bfmigd.pid"
}

# Host H's hook as its libvirtd sees it (/etc/libvirt is the host's own $LAB_VAR/<h>/etc).
bfmig_hook_path() { echo "$(host_dir "$1")/etc/hooks/qemu.d/$BFMIG_HOOK_NAME"; }

# yes: bfmig-hook ($BFMIG_HOOK_EXE) is the qemu hook of both hosts; no: no BFMig hook. libvirt
# looks for hooks at start and on SIGHUP only, so each change is followed by a SIGHUP to the
# host's libvirtd (which re-reads the hook directories first thing in its reload thread).
bfmig_hook_sync() {
    local want=$1 h link changed any=false
    for h in "${LAB_HOSTS[@]}"; do
        link=$(bfmig_hook_path "$h")
        changed=false
        if [[ $want == yes ]]; then
            [[ -x $BFMIG_HOOK_EXE ]] || die "bfmig: the hook $BFMIG_HOOK_EXE is missing"
            if [[ $(readlink "$link" 2> /dev/null) != "$BFMIG_HOOK_EXE" ]]; then
                mkdir -p "$(dirname "$link")"
                ln -sfn "$BFMIG_HOOK_EXE" "$link"
                changed=true
            fi
        elif [[ -e $link || -L $link ]]; then
            rm -f "$link"
            changed=true
        fi
        if $changed; then
            log "bfmig: host $h hook $([[ $want == yes ]] && echo "-> $BFMIG_HOOK_EXE" || echo removed); SIGHUP to its libvirtd"
            kill -HUP "$(host_pid "$h" libvirtd)"
            any=true
        fi
    done
    $any || return 0
    # The reload thread re-reads the hooks within milliseconds; give it a moment and make sure
    # both daemons came through it.
    sleep 1
    for h in "${LAB_HOSTS[@]}"; do host_wait_ready "$h"; done
}

# Evidence that the hook ran in host H, as "DAEMON_CALLS MARKERS": the hook calls bfmigd logged
# (event 70, "hook: <guest> <op> <subop> <extra>", log_level debug) and the hook's own
# incoming-migration markers in /run/bfmig/incoming (its local split-brain rule, which decides
# when bfmigd does not answer). A finished migration uses its markers up ("started" ends the
# announcement), so the directory's own change time counts too: only the hook writes there.
bfmig_hook_evidence() {
    local h=$1 dir calls markers
    dir=$(bfmig_dir "$h")
    calls=$(cat "$dir"/bfmigd.log* 2> /dev/null | grep -c "hook: $LAB_GUEST " || true)
    markers=$(host_exec "$h" sh -c 'find /run/bfmig/incoming -newermt "@$1" 2>/dev/null | wc -l' sh "$BFMIG_HOOK_SINCE")
    echo "${calls:-0} ${markers:-0}"
}

# JSON for the result file: which binaries, where the hook points, and per host how often the
# hook reached bfmigd and how many fail-open markers it left, counted over this scenario.
bfmig_hook_report() {
    local want=$1 h c0 m0 c1 m1 parts=()
    for h in "${LAB_HOSTS[@]}"; do
        read -r c0 _ <<< "${BFMIG_HOOK_BEFORE[$h]:-0 0}"
        m0=0
        read -r c1 m1 < <(bfmig_hook_evidence "$h")
        parts+=("$(jq -n --arg h "$h" --argjson c $((c1 - c0)) --argjson m $((m1 - m0)) \
            '{($h): {daemon_calls: $c, failopen_markers: $m}}')")
    done
    jq -n --arg bin "$BFMIG_BINARIES" --arg hook "$([[ $want == yes ]] && echo "$BFMIG_HOOK_EXE" || echo none)" \
        '{binaries: $bin, hook: $hook, hook_runs: (reduce $ARGS.positional[] as $p ({}; . + $p))}' --jsonargs "${parts[@]}"
}

declare -A BFMIG_HOOK_BEFORE=()
BFMIG_HOOK_SINCE=0
bfmig_hook_mark() {
    local h
    BFMIG_HOOK_SINCE=$(date +%s)
    for h in "${LAB_HOSTS[@]}"; do BFMIG_HOOK_BEFORE[$h]=$(bfmig_hook_evidence "$h"); done
}

# Stops the daemons of both hosts (stock modes must not run through a transparent redirect an
# earlier bfmig mode left running). The kernel removes each daemon's nftables table with it.
bfmig_stop_daemons() {
    local h pid
    for h in "${LAB_HOSTS[@]}"; do
        pid=$(host_pid "$h" bfmigd || true)
        pid_alive "$pid" || continue
        log "bfmig: stopping bfmigd of host $h (mode without BFMig)"
        kill -TERM "$pid" 2> /dev/null || true
        for _ in $(seq 1 150); do pid_alive "$pid" || break; sleep 0.2; done
        pid_alive "$pid" && kill -KILL "$pid" 2> /dev/null
        rm -f "$LAB_RUN/$h.bfmigd.pid"
    done
}

# Host H's BFMig nftables table as the kernel has it ("" when there is none).
bfmig_nft_table() { host_exec "$1" nft list table inet bfmig 2> /dev/null || true; }

# --daemon-down WHICH@TRIP: bfmigd of the trip's source or destination is SIGKILLed before the
# trip (after the mode's prepare), as a crash would; the trip then runs the same command and must
# still succeed. The killed daemon's nftables table must be gone with it (fail-open). DOWN_JSON.
bfmig_daemon_down() {
    local mode=$1 which=$2 src=$3 dst=$4 h pid
    [[ $mode == bfmig* ]] || die "--daemon-down needs a bfmig mode"
    [[ $which == src ]] && h=$src || h=$dst
    pid=$(host_pid "$h" bfmigd || true)
    pid_alive "$pid" || die "--daemon-down: bfmigd of host $h is not running"
    kill -KILL "$pid"
    for _ in $(seq 1 50); do pid_alive "$pid" || break; sleep 0.1; done
    rm -f "$LAB_RUN/$h.bfmigd.pid"
    local table
    table=$(bfmig_nft_table "$h")
    [[ -z $table ]] || die "--daemon-down: host $h still has the inet bfmig table after its bfmigd died: $table"
    log "$mode: bfmigd of ${h^^} ($which) killed before the trip; no BFMig table left in its ruleset"
    DOWN_JSON=$(jq -n --arg host "${h^^}" --arg which "$which" '{host: $host, which: $which, nft_table_left: false}')
}

# Host H's record of the lab guest's last trip as bfmigd keeps it (ListTrips on its bus, what
# `bfmig list` shows): {direction, path, memory_only, peer, reason}, or null when H has none
# from SINCE (unix seconds) on. The source records its departure when it has joined libvirt's
# stop with the trip's streams, which may be a moment after `virsh migrate` returned: retry.
bfmig_trip_record() {
    local h=$1 uuid=$2 since=$3 out rec i
    for ((i = 0; i < 20; i++)); do
        out=$(host_exec "$h" busctl --system --json=short call org.bfmig.BFMig1 /org/bfmig/BFMig1 \
            org.bfmig.BFMig1.Manager ListTrips 2> /dev/null || true)
        rec=$(jq -c --arg u "$uuid" --argjson since "$since" \
            '[.data[0][] | select(.[0] == $u and .[6] >= $since)
              | {direction: .[1], path: .[2], memory_only: .[3], peer: .[4], reason: .[5]}] | .[0] // null' \
            <<< "${out:-{\}}" 2> /dev/null || echo null)
        [[ $rec != null && -n $rec ]] && { echo "$rec"; return 0; }
        sleep 0.5
    done
    echo null
}
