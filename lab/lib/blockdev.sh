# Block-device storage (roundtrip --storage block): each host's guest disk is a loop device on a
# raw file in the lab's var dir, as an LVM volume or a partition is on a real KVM host, and the
# guest has a <disk type='block'> on it. The same domain XML must name each host's own device, so
# inside every host the disk is /var/lib/libvirt/images/$LAB_GUEST.blk, a root-owned symbolic
# link in the host's private images directory to that host's /dev/loopN (as /dev/VG/LV links to
# ../dm-N). Trips copy it with --copy-storage-all, as for files; libvirt does not create a block
# target, so the destination's device exists before the trip (an empty sparse file behind it).
#
# Files: the backing file $LAB_VAR/blockdev/H.raw, the loop device's name in
# $LAB_VAR/blockdev/H.loop. `lab down` and the scenario's cleanup detach every device.

blockdev_backing() { echo "$LAB_VAR/blockdev/$1.raw"; }
blockdev_record() { echo "$LAB_VAR/blockdev/$1.loop"; }
# The link as seen from the machine (inside host H it is /var/lib/libvirt/images/$LAB_GUEST.blk).
blockdev_link() { echo "$(host_dir "$1")/lib/images/$LAB_GUEST.blk"; }
# Host H's loop device ("" when none).
blockdev_device() { cat "$(blockdev_record "$1")" 2> /dev/null || true; }

# blockdev_attach H GIB [RAW]: host H's disk becomes a loop device on RAW (moved into place and
# made GIB long) or, without RAW, on an empty sparse file of GIB.
blockdev_attach() {
    local h=$1 gib=$2 raw=${3:-} file dev
    blockdev_detach "$h"
    file=$(blockdev_backing "$h")
    mkdir -p "$(dirname "$file")" "$(dirname "$(blockdev_link "$h")")"
    if [[ -n $raw ]]; then mv "$raw" "$file"; else : > "$file"; fi
    truncate -s "${gib}G" "$file"
    dev=$(losetup --find --show "$file") || die "blockdev: losetup on $file failed"
    echo "$dev" > "$(blockdev_record "$h")"
    # What a distribution's udev gives a disk: root's, group disk, no one else.
    chown root:disk "$dev"
    chmod 0660 "$dev"
    ln -sfn "$dev" "$(blockdev_link "$h")"
    log "blockdev: host $h's disk is $dev on $file"
}

blockdev_detach() {
    local h=$1 dev
    dev=$(blockdev_device "$h")
    if [[ -n $dev ]]; then
        # Only the device this lab attached to its own backing file.
        if losetup -nO BACK-FILE "$dev" 2> /dev/null | grep -qF "$(blockdev_backing "$h")"; then
            losetup -d "$dev" || log "blockdev: cannot detach $dev"
        fi
    fi
    rm -f "$(blockdev_record "$h")" "$(blockdev_backing "$h")" "$(blockdev_link "$h")"
}

blockdev_detach_all() {
    local h
    for h in "${LAB_ALL_HOSTS[@]}"; do blockdev_detach "$h"; done
}

blockdev_disk_xml() {
    cat <<EOF
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/var/lib/libvirt/images/$LAB_GUEST.blk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
EOF
}

# blockdev_prepare_disk H GIB DATA_MIB: host H's disk with the guest's data (guest_prepare_disk's
# content, written to a raw file that becomes the loop device's backing file).
blockdev_prepare_disk() {
    local h=$1 disk_gib=$2 data_mib=$3 raw=$LAB_VAR/work/disk.raw
    if [[ $GUEST_CONTENT == os ]]; then
        guest_os_raw "$raw" "$disk_gib" "$data_mib"
    else
        guest_random_raw "$raw" "$disk_gib" "$data_mib"
    fi
    blockdev_attach "$h" "$disk_gib" "$raw"
}
