#!/bin/sh
# /init of the vstream lab guest, PID 1 under busybox sh.
# Written into the initramfs by xtask (source: xtask/src/guest/init.sh); edit it there.
# PID 1 must never exit (the kernel would panic), so every failure below is logged and survived.
#
# Kernel command line read here (the agent reads its own `vstream.*` settings itself):
#   vstream.name=NAME              hostname (default "lab")
#   vstream.connect=port:NAME      waits until virtio port NAME shows up before starting the agent
# Files:
#   /etc/vstream-lab/modules       modules to insmod, in load order (written by xtask from modules.dep)
#   /run/vstream-agent.norespawn   while it exists the agent is not (re)started
#   /run/vstream-agent.pid         PID of the running agent

export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=linux

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o mode=0755,nosuid devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr

# From here on our output goes to the kernel log: it reaches every console (ttyS0, which the host
# records, and hvc0) and `dmesg`. `printk.devkmsg=on` on the command line lifts the rate limit.
exec </dev/null >/dev/kmsg 2>&1

log() { echo "<5>vstream-lab: $*"; }

cmdline=$(cat /proc/cmdline)
name=lab
want_ports=""
for arg in $cmdline; do
    case "$arg" in
        vstream.name=*) name=${arg#vstream.name=} ;;
        vstream.connect=port:*)
            port=${arg#vstream.connect=port:}
            want_ports="$want_ports ${port%%,*}"
            ;;
    esac
done
hostname "$name"

# Kernel modules, dependencies first (the order was resolved on the host from modules.dep).
kver=$(uname -r)
loaded=0
failed=0
if [ -r /etc/vstream-lab/modules ]; then
    while read -r module; do
        [ -n "$module" ] || continue
        if insmod "/lib/modules/$kver/$module"; then
            loaded=$((loaded + 1))
        else
            failed=$((failed + 1))
            log "module $module failed to load"
        fi
    done </etc/vstream-lab/modules
fi
log "modules: $loaded loaded, $failed failed"

ip link set lo up || log "could not bring lo up"

# No udev here: wait for the virtio ports the agent will open and make the /dev/virtio-ports/NAME
# links udev would make. Port names arrive asynchronously after virtio_console is loaded.
port_dev() {
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && return 0
    done
    return 1
}
for port in $want_ports; do
    tries=0
    until port_dev "$port"; do
        tries=$((tries + 1))
        if [ "$tries" -ge 100 ]; then
            log "virtio port $port did not appear within 5 s"
            break
        fi
        sleep 0.05
    done
done
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
    [ -r "$p/name" ] || continue
    port=$(cat "$p/name")
    [ -n "$port" ] || continue
    ln -sf "../${p##*/}" "/dev/virtio-ports/$port"
    log "virtio port ${p##*/} name=$port"
done

# Which ttyS the PCI 16550 became (the host puts it on the agent's command line).
for t in /sys/class/tty/ttyS*; do
    dev=$(readlink -f "$t/device" 2>/dev/null) || continue
    case "$dev" in
        */pci0000:*) log "pci serial ${t##*/} at ${dev##*/}" ;;
    esac
done

# The agent, respawned. Its stderr goes straight to ttyS0: the host records that line (vstreamd's
# console log and QEMU's logfile), and it does not scroll through the hvc0 shell like kmsg would.
# NO_COLOR: ttyS0 is a terminal, but its readers are log files.
agent_loop() {
    while :; do
        if [ -e /run/vstream-agent.norespawn ]; then
            log "vstream-agent: not started while /run/vstream-agent.norespawn exists"
            while [ -e /run/vstream-agent.norespawn ]; do sleep 1; done
        fi
        if [ ! -x /usr/bin/vstream-agent ]; then
            log "vstream-agent: /usr/bin/vstream-agent is missing"
            return
        fi
        # Logged before the start: the lab times the agent's first answers from this line.
        log "starting vstream-agent"
        NO_COLOR=1 /usr/bin/vstream-agent </dev/null >/dev/ttyS0 2>&1 &
        pid=$!
        echo "$pid" >/run/vstream-agent.pid
        log "vstream-agent started (pid $pid)"
        wait "$pid"
        log "vstream-agent exited with status $?"
        rm -f /run/vstream-agent.pid
        sleep 1
    done
}

# An interactive shell on hvc0, respawned when it exits. `setsid -c` gives it hvc0 as controlling
# terminal, so job control and ^C work for the host user attached to the hvc0 chardev.
shell_loop() {
    while :; do
        if [ -c /dev/hvc0 ]; then
            setsid -c sh -l <>/dev/hvc0 >&0 2>&1
        else
            log "no /dev/hvc0: no shell (is virtio_console loaded?)"
            sleep 5
        fi
        sleep 1
    done
}

agent_loop &
shell_loop &

log "init done after $(cut -d ' ' -f 1 /proc/uptime) s (hostname $name)"

# PID 1 reaps every orphan; `wait` returns when a child ends.
while :; do
    wait
    sleep 1
done
