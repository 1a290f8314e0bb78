# A host's services in a private mount namespace: the one implementation behind the lab's hosts
# A and B (lib/hosts.sh) and the package check's stand-in for a booted system
# (scripts/package-check, when systemd is not PID 1). A namespace is a file that bind-mounts it
# (so it outlives the command that made it); inside it /run is a fresh tmpfs and libvirt's
# directories are bind mounts of the caller's own, so nothing the services write reaches the
# machine's. Needs root. Sourced; defines only hostns_* functions.

# DIR as a private mount of its own: the namespace files (nsfs bind mounts) must live on one,
# as `ip netns` does for /run/netns.
hostns_private_dir() {
    local dir=$1
    mkdir -p "$dir"
    if ! mountpoint -q "$dir"; then
        mount --bind "$dir" "$dir"
        mount --make-private "$dir"
    fi
}

# hostns_create NSFILE TMPFS_NAME RUN_DIRS SOURCE:TARGET...
# Makes the mount namespace NSFILE: /run a tmpfs named TMPFS_NAME holding the directories
# RUN_DIRS (space-separated, relative to /run), then each SOURCE bind-mounted on TARGET.
hostns_create() {
    local ns=$1 tmpfs_name=$2 run_dirs=$3 pair script d
    shift 3
    script="mount -t tmpfs -o mode=0755 '$tmpfs_name' /run"
    for d in $run_dirs; do script+=" && mkdir -p '/run/$d'"; done
    for pair in "$@"; do script+=" && mount --bind '${pair%%:*}' '${pair#*:}'"; done
    touch "$ns"
    unshare --mount="$ns" --propagation private true
    nsenter --mount="$ns" sh -ec "$script"
}

# hostns_spawn NSFILE NETNS LOG CMD...: starts CMD detached (own session) inside the mount
# namespace NSFILE and, unless NETNS is "", the network namespace /run/netns/NETNS, its output
# in LOG; its pid in HOSTNS_PID. Services outlive the caller and must not inherit a caller's
# lock (fd 9).
HOSTNS_PID=""
hostns_spawn() {
    local ns=$1 netns=$2 logfile=$3
    shift 3
    local enter=(nsenter --mount="$ns")
    [[ -z $netns ]] || enter+=(--net="/run/netns/$netns")
    setsid "${enter[@]}" "$@" > "$logfile" 2>&1 < /dev/null 9>&- &
    HOSTNS_PID=$!
}

# The ns links ("mnt:[INODE]") of the mount namespace NSFILE, nothing if it is not one (any more).
hostns_id() {
    [[ -e $1 ]] && mountpoint -q "$1" 2> /dev/null && echo "mnt:[$(stat -L -c %i "$1")]"
    return 0
}

# Pids of every process whose mount namespace is NSFILE (QEMU outlives a killed libvirtd).
hostns_pids() {
    local id p
    id=$(hostns_id "$1")
    [[ -n $id ]] || return 0
    for p in /proc/[0-9]*; do
        [[ $(readlink "$p/ns/mnt" 2> /dev/null) == "$id" ]] && echo "${p#/proc/}"
    done
    return 0
}

# Removes the namespace NSFILE (its processes must be gone first).
hostns_remove() {
    if [[ -e $1 ]]; then umount "$1" 2> /dev/null || true; fi
}
