#!/bin/sh
# What the official redis image's entrypoint does, as far as vmtask's compose
# file meets it: an argument list starting with an option or a .conf file runs
# redis-server; started as root for redis-server, it gives every file of /data
# to the redis user (find -exec chown, under set -e) and drops to that user with
# gosu; otherwise it runs the command as it is, with umask 0077.
set -e
case "$1" in
    -*|*.conf) set -- redis-server "$@" ;;
esac
if [ "$1" = redis-server ] && [ "$(id -u)" = 0 ]; then
    find . \! -user redis -exec chown redis '{}' +
    exec gosu redis "$0" "$@"
fi
[ "$(umask)" != 0022 ] || umask 0077
exec "$@"
