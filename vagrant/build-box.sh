#!/usr/bin/env bash
# `make vagrant-box`: a Debian 12 (bookworm) vagrant-libvirt box built on this host, with no box download.
#
#   mmdebstrap (from the Debian mirror this host's apt already uses) -> a root directory
#   -> mkfs.ext4 -d (no loop device, no mount) -> qcow2 -> a vagrant-libvirt box -> `vagrant box add`.
#
# The box boots its own kernel and initrd directly (libvirt <kernel>/<initrd>, set by the Vagrantfile shipped
# inside the box), so the disk needs no partition table and no boot loader. It carries every package
# scripts/setup.sh installs (VMs of the lab have no internet access: provisioning must not need apt), plus
# openssh-server, sudo, qemu-guest-agent (vagrant-libvirt asks it for the VM's address in session mode),
# rsync (the synced folder) and the kernel's headers (bcc). User `vagrant`, vagrant's insecure key,
# passwordless sudo: the usual vagrant box conventions.
#
# Run as root. Output: vagrant/.box/ (kept: the box, its kernel and initrd); the root directory and raw
# image are temporary and removed. Settings: BOX_NAME (flannel-ebpf/debian12), BOX_DISK_GB (8),
# BOX_DIR (vagrant/.box), BOX_SOURCES (the host's Debian deb822 sources file).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
BOX_NAME=${BOX_NAME:-flannel-ebpf/debian12}
BOX_DISK_GB=${BOX_DISK_GB:-8}
BOX_DIR=${BOX_DIR:-$here/.box}
[ "$(id -u)" = 0 ] || { echo "build-box: run as root (mmdebstrap in root mode, files owned by root)" >&2; exit 1; }
# What the box build and the lab need on this host. No recommends, and no libvirt-daemon-system: that one would
# enable the system libvirtd and its `default` network (virbr0, dnsmasq, NAT rules); the lab runs a per-user
# session daemon instead (vagrant/lab-ns.sh).
LAB_PACKAGES=(mmdebstrap qemu-utils qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
              vagrant vagrant-libvirt e2fsprogs)
missing=()
for p in "${LAB_PACKAGES[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "build-box: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -c /dev/kvm ] || echo "build-box: warning: no /dev/kvm here; the VMs would run without KVM (very slow)" >&2

# The mirror: the host's own Debian sources (deb822 or one-line), bookworm only; nothing else is contacted.
if [ -z "${BOX_SOURCES:-}" ]; then
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [ -s "$f" ] && grep -Eq '^(URIs:|deb ).*debian' "$f"; then BOX_SOURCES=$f; break; fi
  done
fi
[ -n "${BOX_SOURCES:-}" ] || { echo "build-box: no Debian apt source found on this host; set BOX_SOURCES" >&2; exit 1; }
case "$BOX_SOURCES" in *.sources|*.list) ;; *) echo "build-box: BOX_SOURCES must end in .sources or .list" >&2; exit 1;; esac

read -r -a setup_pkgs <<<"$(bash "$repo/scripts/setup.sh" --print-packages)"
extra=(linux-image-amd64 linux-headers-amd64 systemd-sysv udev dbus openssh-server sudo qemu-guest-agent rsync
       make kmod ca-certificates procps less iproute2)
pkgs=$(printf '%s,' "${setup_pkgs[@]}" "${extra[@]}"); pkgs=${pkgs%,}

work=$(mktemp -d /var/tmp/flannel-ebpf-box.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$BOX_DIR"
# vagrant's insecure public key (the one `vagrant ssh` uses first, replaced by a fresh key at first boot).
pubkey=$(cat /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n1)
[ -n "$pubkey" ] || pubkey=$(ruby -e 'puts File.read(File.join(Gem::Specification.find_by_name("vagrant").gem_dir, "keys", "vagrant.pub"))' | head -n1)

t0=$(date +%s)
echo "build-box: mmdebstrap bookworm from $BOX_SOURCES (${#setup_pkgs[@]} setup packages + base) into $root"
# The customize hook runs on the host with the new root as $1: the vagrant user, key, sudo, network, services.
mmdebstrap --variant=minbase --include="$pkgs" --aptopt='Acquire::Languages "none"' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --customize-hook='chroot "$1" useradd -m -s /bin/bash -G sudo vagrant' \
  --customize-hook='echo "vagrant:vagrant" | chroot "$1" chpasswd' \
  --customize-hook='echo "vagrant ALL=(ALL) NOPASSWD:ALL" > "$1/etc/sudoers.d/vagrant"; chmod 440 "$1/etc/sudoers.d/vagrant"' \
  --customize-hook="mkdir -p \"\$1/home/vagrant/.ssh\"; echo '$pubkey' > \"\$1/home/vagrant/.ssh/authorized_keys\"" \
  --customize-hook='chroot "$1" chown -R vagrant:vagrant /home/vagrant/.ssh; chmod 700 "$1/home/vagrant/.ssh"; chmod 600 "$1/home/vagrant/.ssh/authorized_keys"' \
  --customize-hook='echo "LABEL=root / ext4 defaults,noatime 0 1" > "$1/etc/fstab"; echo debian12 > "$1/etc/hostname"; printf "127.0.0.1 localhost\n127.0.1.1 debian12\n" > "$1/etc/hosts"' \
  --customize-hook='printf "[Match]\nName=e*\n\n[Network]\nDHCP=ipv4\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n" > "$1/etc/systemd/network/99-dhcp.network"' \
  --customize-hook='chroot "$1" systemctl enable systemd-networkd ssh serial-getty@ttyS0; chroot "$1" systemctl disable etcd || true' \
  --customize-hook='echo "UseDNS no" > "$1/etc/ssh/sshd_config.d/vagrant.conf"; rm -f "$1"/etc/ssh/ssh_host_*; mkdir -p "$1/etc/systemd/system/ssh.service.d"; printf "[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n" > "$1/etc/systemd/system/ssh.service.d/hostkeys.conf"' \
  --customize-hook=': > "$1/etc/machine-id"; rm -f "$1/var/lib/dbus/machine-id"' \
  --customize-hook="cp \"\$1\"/boot/vmlinuz-* '$work/vmlinuz'; cp \"\$1\"/boot/initrd.img-* '$work/initrd.img'" \
  bookworm "$root" "$BOX_SOURCES"
t1=$(date +%s); echo "build-box: root file system in $((t1 - t0)) s ($(du -sh "$root" | cut -f1))"

mkfs.ext4 -q -L root -d "$root" -E root_owner=0:0 "$work/disk.raw" "${BOX_DISK_GB}G"
rm -rf "$root"
qemu-img convert -f raw -O qcow2 "$work/disk.raw" "$work/box.img"
rm -f "$work/disk.raw"
t2=$(date +%s); echo "build-box: ext4 + qcow2 in $((t2 - t1)) s ($(du -h "$work/box.img" | cut -f1))"

cat > "$work/metadata.json" <<JSON
{"provider": "libvirt", "format": "qcow2", "virtual_size": $BOX_DISK_GB}
JSON
# The box's own Vagrantfile: its kernel and initrd live next to it (vagrant unpacks the box into one directory).
cat > "$work/Vagrantfile" <<'RUBY'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.kernel = File.join(File.dirname(__FILE__), "vmlinuz")
    lv.initrd = File.join(File.dirname(__FILE__), "initrd.img")
    lv.cmd_line = "root=LABEL=root rw console=ttyS0 net.ifnames=0 quiet"
  end
end
RUBY
tar -C "$work" -cf "$BOX_DIR/debian12.box" metadata.json Vagrantfile box.img vmlinuz initrd.img
rm -f "$work/box.img"
vagrant box add --force --name "$BOX_NAME" "$BOX_DIR/debian12.box"
t3=$(date +%s)
echo "build-box: box $BOX_NAME added ($(du -h "$BOX_DIR/debian12.box" | cut -f1)) in $((t3 - t0)) s total"
