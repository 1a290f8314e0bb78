# Migration modes. Every trip runs, inside the source host,
#   virsh migrate --live --persistent --copy-storage-all lab-guest qemu+tcp://DST/system MIG_ARGS
# and a mode is a few functions (dashes in its name become underscores):
#   mode_<name>_args SRC DST       required: fills MIG_ARGS (transport URIs + mode flags)
#   mode_<name>_unsupported        optional: prints why this stack cannot run it
#   mode_<name>_prepare SRC DST    optional: start what the mode needs before a trip
#   mode_<name>_cleanup SRC DST    optional: stop it after the trip (also after a failure)
# Add a mode by adding its functions and its name to LAB_MODES. A mode that routes the
# streams itself (e.g. bfmig: --migrateuri unix:///run/bfmig/<peer>/<guest>.mig
# --disks-uri unix:///run/bfmig/<peer>/<guest>.nbd) leaves out mode_tcp_transport.

LAB_MODES=(stock stock-xbzrle stock-multifd-zstd bfmig bfmig-transparent)
MIG_ARGS=()

mode_fn() { echo "mode_${1//-/_}_$2"; }

mode_known() { declare -F "$(mode_fn "$1" args)" > /dev/null; }

mode_unsupported() {
    local fn
    fn=$(mode_fn "$1" unsupported)
    declare -F "$fn" > /dev/null && "$fn"
    return 0
}

mode_call_optional() {
    local fn
    fn=$(mode_fn "$1" "$2")
    shift 2
    if declare -F "$fn" > /dev/null; then "$fn" "$@"; fi
}

# Migration stream and NBD disk copy straight over the veth to the destination's address.
mode_tcp_transport() {
    local dst=$1
    MIG_ARGS+=(--migrateuri "tcp://${HOST_ADDR[$dst]}" --listen-address "${HOST_ADDR[$dst]}")
}

version_ge() { [[ $(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1) == "$2" ]]; }

mode_stock_args() {
    MIG_ARGS=()
    mode_tcp_transport "$2"
}

mode_stock_xbzrle_args() {
    MIG_ARGS=(--compressed --comp-methods xbzrle)
    mode_tcp_transport "$2"
}

# libvirt learned zlib/zstd compression of multifd channels in 9.4 (VIR_MIGRATE_COMPRESSED
# with "zstd" under VIR_MIGRATE_PARALLEL); earlier versions only know xbzrle and mt.
mode_stock_multifd_zstd_unsupported() {
    local v
    v=$(stack_libvirt_version)
    version_ge "$v" 9.4.0 ||
        echo "libvirt $v rejects --comp-methods zstd (\"Unsupported compression method 'zstd'\"): zstd for parallel (multifd) migration needs libvirt >= 9.4"
}

# Plain multifd (--parallel): the main stream and two channels, uncompressed.
mode_stock_multifd_args() {
    MIG_ARGS=(--parallel --parallel-connections 2)
    mode_tcp_transport "$2"
}

mode_stock_multifd_zstd_args() {
    MIG_ARGS=(--parallel --parallel-connections 2 --compressed --comp-methods zstd)
    mode_tcp_transport "$2"
}

# BFMig in explicit mode: both streams through unix sockets that bfmigd keeps on the source and
# the destination QEMU listens on (same path, each host its own /run); helpers in lib/bfmig.sh.
# shellcheck source=bfmig.sh
source "$LAB_DIR/lib/bfmig.sh"
# shellcheck source=kill.sh
source "$LAB_DIR/lib/kill.sh"
# shellcheck source=faults.sh
source "$LAB_DIR/lib/faults.sh"
# shellcheck source=abort.sh
source "$LAB_DIR/lib/abort.sh"

mode_bfmig_unsupported() { bfmig_unsupported; }

mode_bfmig_args() {
    local dst=$2
    MIG_ARGS=(--migrateuri "unix:///run/bfmig/$dst/$LAB_GUEST.mig" --disks-uri "unix:///run/bfmig/$dst/$LAB_GUEST.nbd")
}

# Started once per lab (the daemons and their stores stay up from trip to trip, as on real
# hosts); every trip checks that both still run and that SRC has the guest's sockets towards DST.
# No cleanup: `lab down` kills the daemons with everything else in the hosts; their logs (one line
# per stream with wire and stream bytes) stay in $LAB_VAR/<h>/bfmig/ until then.
mode_bfmig_prepare() {
    BFMIG_TRANSPARENT=no bfmig_prepare_hosts "$@"
}

# Transparent mode: stock's exact command line (mode_tcp_transport), both daemons and hooks
# installed; the source's bfmigd intercepts QEMU's tcp:// connections to the peer (nftables).
mode_bfmig_transparent_unsupported() {
    bfmig_unsupported
    command -v nft > /dev/null || echo "nft is missing (package nftables)"
}

mode_bfmig_transparent_args() {
    MIG_ARGS=()
    mode_tcp_transport "$2"
}

mode_bfmig_transparent_prepare() {
    BFMIG_TRANSPARENT=yes bfmig_prepare_hosts "$@"
    [[ -n $(bfmig_nft_table "$1") ]] ||
        die "bfmig-transparent: host $1 has no inet bfmig table (see $(bfmig_dir "$1")/bfmigd.log)"
}

# Not in LAB_MODES (the demo), for the multifd lab tests: BFMig's explicit sockets and
# transparent mode with --parallel (QEMU connects the main stream and each channel to the same
# socket or port; each channel runs through its own helper pair).
mode_bfmig_multifd_unsupported() { bfmig_unsupported; }
mode_bfmig_multifd_args() { mode_bfmig_args "$@"; MIG_ARGS+=(--parallel --parallel-connections 2); }
mode_bfmig_multifd_prepare() { mode_bfmig_prepare "$@"; }
mode_bfmig_transparent_multifd_unsupported() { mode_bfmig_transparent_unsupported; }
mode_bfmig_transparent_multifd_args() { MIG_ARGS=(--parallel --parallel-connections 2); mode_tcp_transport "$2"; }
mode_bfmig_transparent_multifd_prepare() { mode_bfmig_transparent_prepare "$@"; }

# Not in LAB_MODES (the demo), for the lab tests of what transparent mode must leave alone:
# tunnelled migration (through libvirtd's own connection: never redirected) and QEMU native TLS
# (carried byte for byte), both with the daemons intercepting.
mode_stock_tunnelled_args() { MIG_ARGS=(--p2p --tunnelled); }
# No migration URI at all: the destination's libvirt offers its migration_host (qemu.conf).
mode_stock_nouri_args() { MIG_ARGS=(); }
mode_bfmig_transparent_nouri_unsupported() { mode_bfmig_transparent_unsupported; }
mode_bfmig_transparent_nouri_args() { MIG_ARGS=(); }
mode_bfmig_transparent_nouri_prepare() { mode_bfmig_transparent_prepare "$@"; }
mode_stock_tls_args() { MIG_ARGS=(--tls); mode_tcp_transport "$2"; }
mode_bfmig_transparent_tls_unsupported() { mode_bfmig_transparent_unsupported; }
mode_bfmig_transparent_tls_args() { MIG_ARGS=(--tls); mode_tcp_transport "$2"; }
mode_bfmig_transparent_tls_prepare() { mode_bfmig_transparent_prepare "$@"; }
mode_bfmig_transparent_tunnelled_unsupported() { mode_bfmig_transparent_unsupported; }
mode_bfmig_transparent_tunnelled_args() { MIG_ARGS=(--p2p --tunnelled); }
mode_bfmig_transparent_tunnelled_prepare() { mode_bfmig_transparent_prepare "$@"; }

bfmig_prepare_hosts() {
    local src=$1 dst=$2
    bfmig_publish
    if [[ ! -s $LAB_VAR/bfmig/psk ]]; then
        mkdir -p "$LAB_VAR/bfmig"
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$LAB_VAR/bfmig/psk")
    fi
    bfmig_daemon_matches "$src"
    bfmig_daemon_matches "$dst"
    bfmig_running "$src" || bfmig_start_host "$src"
    bfmig_running "$dst" || bfmig_start_host "$dst"
    bfmig_wait_ready "$dst"
    bfmig_wait_ready "$src" "/run/bfmig/$dst/$LAB_GUEST.mig" "/run/bfmig/$dst/$LAB_GUEST.nbd"
}

# Post-copy (issue 15): the mode's own transport plus `--postcopy`, and a watcher on the source
# that runs `virsh migrate-postcopy` as soon as the memory stream moves: during the first precopy
# pass, so QEMU really switches (an idle guest's precopy would converge before a later switch).
# QEMU 7.2 runs as libvirt-qemu and uses the userfaultfd syscall, which the kernel grants such a
# user only with vm.unprivileged_userfaultfd = 1 (QEMU 8.1+ can use /dev/userfaultfd instead):
# set for the trip when it is 0 (QEMU refuses postcopy at the start otherwise), restored after.
LAB_POSTCOPY_ARGS=(--postcopy)

postcopy_prepare() {
    local src=$1 uffd=/proc/sys/vm/unprivileged_userfaultfd
    if [[ -w $uffd && $(cat "$uffd") == 0 ]]; then
        echo 1 > "$uffd"
        echo 0 > "$LAB_RUN/postcopy.uffd-restore"
        log "post-copy: vm.unprivileged_userfaultfd set to 1 for the trip (QEMU 7.2 as libvirt-qemu needs it)"
    fi
    rm -f "$LAB_RUN/postcopy.switched"
    (
        for _ in $(seq 1 1500); do
            if host_exec "$src" virsh -q -c qemu:///system domjobinfo "$LAB_GUEST" 2> /dev/null |
                grep -Eq '^Memory processed: +[0-9]*[1-9]'; then
                host_exec "$src" virsh -q -c qemu:///system migrate-postcopy "$LAB_GUEST" > "$LAB_RUN/postcopy.switched" 2>&1 &&
                    echo "migrate-postcopy at $(date +%T.%N)" >> "$LAB_RUN/postcopy.switched"
                exit 0
            fi
            sleep 0.2
        done
    ) > /dev/null 2>&1 &
    echo $! > "$LAB_RUN/postcopy.watcher"
}

postcopy_cleanup() {
    local pid
    pid=$(cat "$LAB_RUN/postcopy.watcher" 2> /dev/null) && kill "$pid" 2> /dev/null || true
    rm -f "$LAB_RUN/postcopy.watcher"
    if [[ -f $LAB_RUN/postcopy.uffd-restore ]]; then
        cat "$LAB_RUN/postcopy.uffd-restore" > /proc/sys/vm/unprivileged_userfaultfd
        rm -f "$LAB_RUN/postcopy.uffd-restore"
    fi
    if [[ -s $LAB_RUN/postcopy.switched ]]; then log "post-copy: $(tail -n 1 "$LAB_RUN/postcopy.switched")"; else log "post-copy: the trip ended before the switch"; fi
}

mode_stock_postcopy_args() { mode_stock_args "$@"; MIG_ARGS+=("${LAB_POSTCOPY_ARGS[@]}"); }
mode_stock_postcopy_prepare() { postcopy_prepare "$@"; }
mode_stock_postcopy_cleanup() { postcopy_cleanup "$@"; }
mode_bfmig_postcopy_unsupported() { mode_bfmig_unsupported; }
mode_bfmig_postcopy_args() { mode_bfmig_args "$@"; MIG_ARGS+=("${LAB_POSTCOPY_ARGS[@]}"); }
mode_bfmig_postcopy_prepare() { mode_bfmig_prepare "$@"; postcopy_prepare "$@"; }
mode_bfmig_postcopy_cleanup() { postcopy_cleanup "$@"; }
mode_bfmig_transparent_postcopy_unsupported() { mode_bfmig_transparent_unsupported; }
mode_bfmig_transparent_postcopy_args() { mode_bfmig_transparent_args "$@"; MIG_ARGS+=("${LAB_POSTCOPY_ARGS[@]}"); }
mode_bfmig_transparent_postcopy_prepare() { mode_bfmig_transparent_prepare "$@"; postcopy_prepare "$@"; }
mode_bfmig_transparent_postcopy_cleanup() { postcopy_cleanup "$@"; }
