#!/bin/sh
# The tiny guest's boot script, run by busybox init (PID 1, /etc/inittab):
#   boot.sh sysinit    once at boot: modules, network, the power button, the marker
#   boot.sh agent      respawned by init: the real qemu-ga on the agent's port
#   boot.sh shutdown   init's shutdown action, before it signals every process
#   boot.sh EVENT      udhcpc's event hook (deconfig, bound, ...), with the lease in
#                      its environment
# @MODULES@, @PORT@, @MARKER@, @GOING_DOWN_S@ and @AGENT_ARGS@ are filled in by
# `render_init_script`.

load_modules() {
    for m in @MODULES@; do
        insmod "/lib/modules/$m.ko" || echo "vmtask-guest: cannot load $m"
    done
}

dhcp_event() {
    case $1 in
        deconfig)
            ip addr flush dev "$interface"
            ip link set "$interface" up
            ;;
        bound|renew)
            ip addr flush dev "$interface"
            ip addr add "$ip/${mask:-24}" dev "$interface"
            for gw in $router; do
                ip route add default via "$gw" dev "$interface" && break
            done
            echo "vmtask-guest: $interface has $ip/${mask:-24}" > /dev/console
            ;;
    esac
}

start_network() {
    ip link set lo up
    for n in /sys/class/net/*; do
        i=${n##*/}
        [ "$i" = lo ] && continue
        ip link set "$i" up
        # In the background: boot (and the agent) never wait for a DHCP server.
        udhcpc -i "$i" -s /etc/vmtask/boot.sh -t 30 -T 1 -A 1 -q -n >/dev/null 2>&1 &
    done
    # What a port-forward test reaches: a marker page on port 80.
    mkdir -p /www
    echo "vmtask-guest http" > /www/index.html
    httpd -p 80 -h /www
}

# The ACPI power button is a kernel input device; a press is one evdev event on it.
# The watcher then asks init for an orderly power-off (`poweroff` signals PID 1),
# as a desktop's power-button handler does.
arm_power_button() {
    armed=
    for d in /sys/class/input/event*; do
        [ -r "$d/device/name" ] || continue
        IFS= read -r name < "$d/device/name"
        [ "$name" = "Power Button" ] || continue
        # Open in this shell, not in the background child: the evdev client must
        # exist before the marker is printed, or an early press is dropped.
        exec 4< "/dev/input/${d##*/}"
        (dd of=/dev/null bs=24 count=1 2>/dev/null && echo "vmtask-guest: power button" &&
            poweroff) <&4 &
        exec 4<&-
        armed=1
    done
    [ -n "$armed" ] || echo "vmtask-guest: no ACPI power button found"
}

# The port's name arrives in a control message some time after the driver loads,
# and ports can be hot-plugged, so keep looking, quickly at first.  udev would make
# the /dev/virtio-ports/<name> link; this guest has no udev, so it makes it here.
find_agent_port() {
    tries=0
    while :; do
        for p in /sys/class/virtio-ports/*; do
            [ -r "$p/name" ] || continue
            IFS= read -r n < "$p/name" || continue
            if [ "$n" = "@PORT@" ]; then
                mkdir -p /dev/virtio-ports
                ln -sf "/dev/${p##*/}" "/dev/virtio-ports/@PORT@"
                return 0
            fi
        done
        if [ "$tries" -lt 50 ]; then
            tries=$((tries + 1))
            sleep 0.1
        else
            sleep 1
        fi
    done
}

sysinit() {
    # The applets' links are made only after /proc is there (busybox finds itself
    # through /proc/self/exe).
    bb=/bin/busybox
    $bb mount -t proc proc /proc
    $bb mount -t sysfs sysfs /sys
    $bb mount -t devtmpfs devtmpfs /dev
    $bb mount -t tmpfs -o mode=0755 tmpfs /run
    $bb --install -s
    load_modules
    echo "vmtask-guest: cpus $(nproc)"
    start_network
    arm_power_button
    echo "@MARKER@"
}

agent() {
    find_agent_port
    echo "vmtask-guest: starting qemu-ga"
    /usr/sbin/qemu-ga -m virtio-serial -p "/dev/virtio-ports/@PORT@" @AGENT_ARGS@
    echo "vmtask-guest: qemu-ga exited with $?"
    # init respawns this at once: don't spin if the agent cannot start.
    sleep 1
}

# A real OS takes seconds to go down (services stop one by one) while its agent
# still answers; this guest spends @GOING_DOWN_S@ s stopping "services" so that
# window is there on every shutdown, not only on a slow machine.
going_down() {
    echo "vmtask-guest: going down"
    killall udhcpc httpd 2>/dev/null
    sleep @GOING_DOWN_S@
    sync
}

export PATH=/sbin:/bin:/usr/sbin:/usr/bin
case ${1-} in
    sysinit) sysinit ;;
    agent) agent ;;
    shutdown) going_down ;;
    deconfig|bound|renew|leasefail|nak) dhcp_event "$1" ;;
    *) echo "usage: $0 sysinit|agent|shutdown|<udhcpc event>" >&2; exit 2 ;;
esac
