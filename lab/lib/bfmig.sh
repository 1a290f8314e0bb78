# BFMig inside the lab hosts (mode "bfmig"): each host gets a private system bus (dbus-daemon
# on /run/dbus/system_bus_socket in the host's own /run) and a bfmigd that follows the host's
# libvirtd, listens for its peer on the host's lab address and keeps the explicit-mode sockets
# /run/bfmig/<peer>/<guest>.{mig,nbd}. Both daemons share one pre-shared key. The binaries are
# published once per source tree (native AOT) into a cache outside the lab, so `lab down` keeps
# them and a later trip or run reuses them.
#
# Files: $LAB_VAR/bfmig/psk, $LAB_VAR/<h>/bfmig/{bfmig.conf,dbus.conf,bfmigd.log,dbus.log,state/}
# (gone with `lab down`), pids $LAB_RUN/<h>.{bfmig-dbus,bfmigd}.pid. The libvirt hook is not
# installed: it is fail-open, and the daemon learns departures and arrivals from libvirt events.

BFMIG_REPO=$(cd "$LAB_DIR/.." && pwd)
BFMIG_BIN=${BFMIG_LAB_BIN:-$BFMIG_REPO/artifacts/lab-bfmig/bin}
BFMIG_PORT=16600
BFMIG_POLICY=$BFMIG_REPO/packaging/common/org.bfmig.BFMig1.conf

bfmig_dir() { echo "$(host_dir "$1")/bfmig"; }

bfmig_unsupported() {
    command -v dotnet > /dev/null || { echo "the .NET SDK (dotnet) is not on PATH: bfmigd and bfmig-transfer cannot be built"; return; }
    command -v dbus-daemon > /dev/null || { echo "dbus-daemon is missing (package dbus): bfmigd needs a system bus"; return; }
    [[ -f $BFMIG_POLICY ]] || echo "the bus policy $BFMIG_POLICY is missing"
}

# Newest modification time (seconds) of anything the published binaries are built from.
bfmig_source_stamp() {
    find "$BFMIG_REPO/src/Native" "$BFMIG_REPO/src/Transfer" "$BFMIG_REPO/src/Daemon" \
        "$BFMIG_REPO/Directory.Build.props" "$BFMIG_REPO/Directory.Packages.props" \
        \( -name bin -o -name obj \) -prune -o -type f -printf '%T@\n' | sort -n | tail -n 1 | cut -d. -f1
}

# Publishes bfmigd and bfmig-transfer (native AOT) unless the cache is newer than the sources.
bfmig_publish() {
    local stamp p
    stamp=$(bfmig_source_stamp)
    if [[ -x $BFMIG_BIN/bfmigd && -x $BFMIG_BIN/bfmig-transfer && -f $BFMIG_BIN/.stamp &&
          $(cat "$BFMIG_BIN/.stamp") == "$stamp" ]]; then
        return 0
    fi
    mkdir -p "$BFMIG_BIN"
    for p in Transfer Daemon; do
        log "bfmig: publishing src/$p (native AOT) to $BFMIG_BIN"
        dotnet publish "$BFMIG_REPO/src/$p" -c Release -r linux-x64 -o "$BFMIG_BIN" \
            > "$BFMIG_BIN/publish-$p.log" 2>&1 ||
            { tail -n 30 "$BFMIG_BIN/publish-$p.log" >&2; die "bfmig: dotnet publish src/$p failed (log $BFMIG_BIN/publish-$p.log)"; }
    done
    echo "$stamp" > "$BFMIG_BIN/.stamp"
}

bfmig_write_config() {
    local h=$1 peer=$2 dir
    dir=$(bfmig_dir "$h")
    mkdir -p "$dir/state"
    chmod 0700 "$dir/state"
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
    cat > "$dir/bfmig.conf" <<EOF
; bfmigd of lab host $h (written by lab/lib/bfmig.sh)
[daemon]
host_name = $h
state_dir = $dir/state
runtime_dir = /run/bfmig
libvirt_uri = qemu:///system
listen = ${HOST_ADDR[$h]}:$BFMIG_PORT
qemu_user = libvirt-qemu
qemu_group = kvm
log_level = debug

[auth]
mode = psk
psk_file = $LAB_VAR/bfmig/psk

[transfer]
helper = $BFMIG_BIN/bfmig-transfer

[peers:$peer]
address = ${HOST_ADDR[$peer]}:$BFMIG_PORT
libvirt_uri = qemu+tcp://${HOST_ADDR[$peer]}/system
EOF
}

bfmig_running() { pid_alive "$(host_pid "$1" bfmigd)" && pid_alive "$(host_pid "$1" bfmig-dbus)"; }

bfmig_start_host() {
    local h=$1 peer=$2 dir deadline
    dir=$(bfmig_dir "$h")
    bfmig_write_config "$h" "$peer"
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
        host_spawn "$h" "$dir/bfmigd.log" "$BFMIG_BIN/bfmigd" --config "$dir/bfmig.conf" \
            > "$LAB_RUN/$h.bfmigd.pid"
    fi
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
