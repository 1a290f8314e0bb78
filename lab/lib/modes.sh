# Migration modes. A mode is three functions:
#   mode_<name>_unsupported        prints why this stack cannot run it (nothing when it can)
#   mode_<name>_args SRC DST       fills MIG_ARGS with the extra `virsh migrate` arguments
#   mode_<name>_prepare/cleanup    optional: start/stop whatever the mode needs around a trip
# Dashes in mode names become underscores. Add a mode by adding its functions and its name
# to LAB_MODES.

LAB_MODES=(stock stock-xbzrle stock-multifd-zstd)
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

version_ge() { [[ $(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1) == "$2" ]]; }

mode_stock_args() { MIG_ARGS=(); }

mode_stock_xbzrle_args() { MIG_ARGS=(--compressed --comp-methods xbzrle); }

# libvirt learned zlib/zstd compression of multifd channels in 9.4 (VIR_MIGRATE_COMPRESSED
# with "zstd" under VIR_MIGRATE_PARALLEL); earlier versions only know xbzrle and mt.
mode_stock_multifd_zstd_unsupported() {
    local v
    v=$(stack_libvirt_version)
    version_ge "$v" 9.4.0 ||
        echo "libvirt $v has no zstd compression for parallel (multifd) migration (needs libvirt >= 9.4)"
}

mode_stock_multifd_zstd_args() { MIG_ARGS=(--parallel --parallel-connections 2 --compressed --comp-methods zstd); }
