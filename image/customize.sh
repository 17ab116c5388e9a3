#!/bin/sh
# Runs inside the image's root file system (chroot, private mount namespace)
# after the overlay (image/rootfs/) and the generated files are in place.
# Called by `cargo xtask image`; not part of the image.
set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

step() { echo "    customize: $*"; }

step "mount points and directories"
mkdir -p /etc/airlock/provision /var/lib/airlock /sys/fs/bpf /efi

step "services: agent, state, factory policy, boot report"
systemctl enable airlock-state.service airlock-agent.service \
	airlock-factory-policy.service airlock-boot-report.service \
	airlock-boot-check.service airlock-update-media.service airlock-provision.service

step "A/B updates: systemd-bless-boot present, no boot loader updates from the root"
test -x /lib/systemd/systemd-bless-boot
systemctl mask systemd-boot-update.service >/dev/null

step "no login anywhere: gettys masked, root locked, no ssh"
systemctl mask getty.target console-getty.service getty@.service serial-getty@.service \
	systemd-firstboot.service
passwd -l root >/dev/null
if [ -e /usr/sbin/sshd ]; then echo "sshd must not be in the image" >&2; exit 1; fi

step "no timers that write to a read-only root"
systemctl mask apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
	e2scrub_all.timer e2scrub_reap.service fstrim.timer man-db.timer \
	systemd-tmpfiles-clean.timer >/dev/null 2>&1 || true

step "kernel modules the appliance never needs (graphics, sound, radio, media)"
K=$(ls /usr/lib/modules)
for d in drivers/gpu sound drivers/media drivers/net/wireless net/wireless net/mac80211 \
	drivers/bluetooth net/bluetooth drivers/infiniband drivers/staging drivers/isdn \
	drivers/iio drivers/input/joystick drivers/input/touchscreen fs/ocfs2 fs/gfs2 fs/xfs \
	fs/btrfs fs/nfs fs/nfsd fs/ceph fs/smb net/ceph drivers/scsi/qla2xxx drivers/scsi/lpfc \
	drivers/net/ethernet/mellanox drivers/net/ethernet/qlogic drivers/net/ethernet/chelsio; do
	rm -rf "/usr/lib/modules/$K/kernel/$d"
done
depmod "$K"

step "initramfs (dm-verity root, erofs)"
update-initramfs -c -k "$K" >/dev/null 2>&1 || update-initramfs -u -k "$K"

step "machine-id empty (transient per boot), no caches"
: >/etc/machine-id
rm -f /var/lib/dbus/machine-id
rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/lib/dpkg/*-old \
	/var/log/* /tmp/* /var/tmp/* /root/.bash_history /etc/ssh
find / -xdev -name '__pycache__' -prune -exec rm -rf {} + 2>/dev/null || true
rm -f /var/cache/ldconfig/aux-cache /etc/ld.so.cache.new
