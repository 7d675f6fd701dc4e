#!/bin/sh
blank=$' \t\r'

load_modules() {
    for m in @MODULES@; do
        insmod "/lib/modules/$m.ko" || echo "vmtask-guest: cannot load $m"
    done
}

# udhcpc runs this script again as its event hook (`udhcpc -s /init`), with the
# lease in its environment.
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
        udhcpc -i "$i" -s /init -t 30 -T 1 -A 1 -q -n >/dev/null 2>&1 &
    done
    # What a port-forward test reaches: a marker page on port 80.
    mkdir -p /www
    echo "vmtask-guest http" > /www/index.html
    httpd -p 80 -h /www
}

arm_power_button() {
    armed=
    for d in /sys/class/input/event*; do
        [ -r "$d/device/name" ] || continue
        IFS= read -r name < "$d/device/name"
        [ "$name" = "Power Button" ] || continue
        # Open in this shell, not in the background child: the evdev client must
        # exist before the marker is printed, or an early press is dropped.
        exec 4< "/dev/input/${d##*/}"
        (dd of=/dev/null bs=24 count=1 2>/dev/null && poweroff -f) <&4 &
        exec 4<&-
        armed=1
    done
    [ -n "$armed" ] || echo "vmtask-guest: no ACPI power button found"
}

# The port's name arrives in a control message some time after the driver loads,
# and ports can be hot-plugged, so keep looking, quickly at first.
find_agent_port() {
    tries=0
    while :; do
        for p in /sys/class/virtio-ports/*; do
            [ -r "$p/name" ] || continue
            IFS= read -r n < "$p/name" || continue
            if [ "$n" = "@PORT@" ]; then
                port="/dev/${p##*/}"
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

# qemu-ga's interface list: name, MAC and IPv4 addresses with their prefixes.
interfaces_json() {
    sep=
    for n in /sys/class/net/*; do
        i=${n##*/}
        IFS= read -r mac < "$n/address" || mac=
        addresses=
        asep=
        for a in $(ip -o -4 addr show dev "$i" | awk '{print $4}'); do
            addresses="$addresses$asep{\"ip-address-type\": \"ipv4\", \"ip-address\": \"${a%/*}\", \"prefix\": ${a#*/}}"
            asep=", "
        done
        printf '%s{"name": "%s", "hardware-address": "%s", "ip-addresses": [%s]}' \
            "$sep" "$i" "$mac" "$addresses"
        sep=", "
    done
}

reply() {
    printf '%s\n' "$1" >&3
}

error_reply() {
    reply "{\"error\": {\"class\": \"$1\", \"desc\": \"$2\"}}"
}

strip_blanks() {
    val=${val#"${val%%[!$blank]*}"}
    val=${val%"${val##*[!$blank]}"}
}

# Sets $val to the integer value of key $1 in $line, or to "".
int_arg() {
    val=
    case $line in *"\"$1\""*) ;; *) return ;; esac
    val=${line#*"\"$1\""}
    val=${val#*:}
    val=${val%%[,\}]*}
    strip_blanks
    case $val in ''|-|*[!0-9-]*|?*-*) val= ;; esac
}

# Sets $val to the string value of key $1 in $line, or to "".
str_arg() {
    val=
    case $line in *"\"$1\""*) ;; *) return ;; esac
    val=${line#*"\"$1\""}
    val=${val#*:}
    strip_blanks
    case $val in
        \"*) val=${val#\"}; val=${val%%\"*} ;;
        *) val= ;;
    esac
}

handle_line() {
    # 0xFF resets the parser, as in qemu-ga: whatever precedes it is discarded.
    line=${line##*$'\377'}
    val=$line
    strip_blanks
    [ -n "$val" ] || return 0
    case $line in
        *'"execute"'*) ;;
        *) error_reply GenericError "Invalid JSON syntax"; return 0 ;;
    esac
    cmd=${line#*\"execute\"}
    cmd=${cmd#*\"}
    cmd=${cmd%%\"*}
    case $cmd in
    guest-sync|guest-sync-delimited)
        int_arg id
        if [ -z "$val" ]; then
            error_reply GenericError "Parameter 'id' is missing"
        elif [ "$cmd" = guest-sync-delimited ]; then
            printf '\377{"return": %s}\n' "$val" >&3
        else
            reply "{\"return\": $val}"
        fi
        ;;
    guest-ping)
        reply '{"return": {}}'
        ;;
    guest-get-osinfo)
        reply "{\"return\": {\"id\": \"vmtask-tinyguest\", \"name\": \"vmtask tiny guest\", \"pretty-name\": \"vmtask tiny guest (busybox)\", \"kernel-release\": \"$(uname -r)\", \"machine\": \"$(uname -m)\"}}"
        ;;
    guest-network-get-interfaces)
        reply "{\"return\": [$(interfaces_json)]}"
        ;;
    guest-info)
        reply '{"return": {"version": "vmtask-tinyguest", "supported_commands": [@COMMANDS@]}}'
        ;;
    guest-file-open)
        # Whole files: "r" reads one (the boot id); "r+" lets each write replace the
        # file's first bytes in place, synced (a pattern on the guest's disk).
        str_arg path
        file=$val
        str_arg mode
        case ${val:-r} in
            r) ok=$([ -r "$file" ] && echo 1) ;;
            r+) ok=$([ -r "$file" ] && [ -w "$file" ] && echo 1) ;;
            *) ok= ;;
        esac
        if [ -n "$file" ] && [ -n "$ok" ]; then
            handle=$((${handle:-0} + 1))
            eval "file_$handle=\$file"
            reply "{\"return\": $handle}"
        else
            error_reply GenericError "Cannot open the file"
        fi
        ;;
    guest-file-write)
        int_arg handle
        case $val in ''|*[!0-9]*) val=0 ;; esac
        eval "f=\${file_$val-}"
        str_arg buf-b64
        if [ -z "$f" ]; then
            error_reply GenericError "Invalid file handle"
        elif printf '%s' "$val" | base64 -d > /tmp/agent-write &&
                dd if=/tmp/agent-write of="$f" conv=notrunc,fsync 2>/dev/null; then
            reply "{\"return\": {\"count\": $(wc -c < /tmp/agent-write), \"eof\": false}}"
        else
            error_reply GenericError "The write failed"
        fi
        ;;
    guest-file-read)
        int_arg handle
        case $val in ''|*[!0-9]*) val=0 ;; esac
        eval "f=\${file_$val-}"
        if [ -z "$f" ]; then
            error_reply GenericError "Invalid file handle"
        else
            reply "{\"return\": {\"count\": $(wc -c < "$f"), \"buf-b64\": \"$(base64 -w 0 < "$f")\", \"eof\": true}}"
        fi
        ;;
    guest-file-close)
        int_arg handle
        case $val in ''|*[!0-9]*) val=0 ;; esac
        eval "unset file_$val"
        reply '{"return": {}}'
        ;;
    guest-shutdown)
        str_arg mode
        # Like qemu-ga, success has no reply: the guest is gone before it could matter.
        case ${val:-powerdown} in
            powerdown) poweroff -f ;;
            halt) halt -f ;;
            reboot) reboot -f ;;
            *) error_reply GenericError "Parameter 'mode' expects halt|powerdown|reboot" ;;
        esac
        ;;
    *)
        case $cmd in
            ''|*[!a-z0-9-]*) cmd=unknown ;;
        esac
        error_reply CommandNotFound "The command $cmd has not been found"
        ;;
    esac
}

# Serves the agent on fd 3, which must be open for reading and writing.
serve_agent() {
    while :; do
        if IFS= read -r line <&3; then
            handle_line
        else
            # virtio-serial reads return end-of-file while no host client is
            # connected; a partial line at that point is a dead client's garbage.
            sleep 0.1
        fi
    done
}

main() {
    /bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
    /bin/busybox mount -t proc proc /proc
    /bin/busybox mount -t sysfs sysfs /sys
    /bin/busybox mount -t devtmpfs devtmpfs /dev
    /bin/busybox --install -s
    export PATH=/sbin:/bin:/usr/sbin:/usr/bin
    exec < /dev/console > /dev/console 2>&1
    load_modules
    echo "vmtask-guest: cpus $(nproc)"
    start_network
    arm_power_button
    echo "@MARKER@"
    # PID 1 must never exit (the kernel would panic), and a failed redirection
    # ends a shell, so the agent runs in a child that is restarted if it dies.
    while :; do
        (find_agent_port && exec 3<> "$port" && serve_agent)
        sleep 1
    done
}

if [ "$$" = 1 ]; then
    main
elif [ -n "${interface-}" ]; then
    dhcp_event "${1-}"
fi
