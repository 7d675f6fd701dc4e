#!/bin/sh
# Makes the secret files docker-compose.yml mounts under /run/secrets:
#
#   redis_producer_password  for producers on the Docker host (the library, the CLI)
#   redis_worker_password    the workers' and Flower's Redis password
#   redis_exporter_password  the metrics exporter's (read-only) Redis password
#   redis_admin_password     operators, and the Redis healthcheck
#   flower_basic_auth        Flower's basic-auth credentials, "admin:<password>"
#   redis_users_acl          deploy/redis/users.acl.template with the SHA-256 of
#                            each password: Redis keeps hashes, never passwords
#   redis_replicator_password, redis_sentinel_password
#                            the HA profile's replica and Sentinel users; no
#                            service mounts them, only the two files below
#   redis_ha_conf            deploy/redis/ha.conf.template (masteruser/masterauth)
#   sentinel_conf            deploy/redis/sentinel.conf.template (auth-user/-pass)
#
# Usage: scripts/make-secrets.sh [--no-chown] [DIRECTORY]   (default: ./secrets)
#
# Safe to run again: an existing password is kept (delete its file to rotate it),
# and redis_users_acl is rendered again from the template.  Every file is mode 0600.
#
# Compose (without Swarm) bind-mounts a secret file with its owner and mode as on
# the Docker host; the `uid`/`gid`/`mode` of a service's secret are ignored.  So,
# run as root (sudo), this gives each file to the container user that reads it:
# 999 (the redis image's redis user, as which the Redis services run) for
# redis_users_acl and redis_admin_password (its healthcheck), 10001 (vmtask, see
# the Dockerfile) for the workers', Flower's and the exporter's files, and the
# invoking user for the producer's file and the directory.  --no-chown skips that,
# for setups that map owners themselves (rootless Docker, Docker Desktop).
#
# Passwords never appear on a command line: they are made and hashed by shell
# built-ins and pipes, not passed as arguments.
set -eu

REDIS_UID=999
VMTASK_UID=10001
PLACEHOLDER=change-me

here=$(cd "$(dirname "$0")/.." && pwd)
template="$here/deploy/redis/users.acl.template"
ha_template="$here/deploy/redis/ha.conf.template"
sentinel_template="$here/deploy/redis/sentinel.conf.template"
chown_files=1
directory=""
for argument in "$@"; do
    case "$argument" in
        --no-chown) chown_files=0 ;;
        -h|--help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "make-secrets: unknown option $argument" >&2; exit 2 ;;
        *) [ -z "$directory" ] || { echo "make-secrets: one directory only" >&2; exit 2; }
           directory=$argument ;;
    esac
done
directory=${directory:-$here/secrets}

if [ "$chown_files" = 1 ] && [ "$(id -u)" != 0 ]; then
    cat >&2 <<EOF
make-secrets: run as root (sudo $0), so that each file can be given to the
container user that reads it (uid $REDIS_UID for Redis, $VMTASK_UID for the workers and
Flower): Compose bind-mounts secret files with their host owner and mode 0600.
With rootless Docker or Docker Desktop, pass --no-chown.
EOF
    exit 1
fi

if command -v sha256sum >/dev/null 2>&1; then
    sha256() { sha256sum | cut -d' ' -f1; }
else
    sha256() { shasum -a 256 | cut -d' ' -f1; }
fi

umask 077
mkdir -p "$directory"
chmod 700 "$directory"

# A file's first line; fails on an empty or placeholder secret.
first_line() {
    value=$(head -n 1 "$1" | tr -d '\r')
    case "$value" in
        "") echo "make-secrets: $1 is empty: delete it to make a new one" >&2; exit 1 ;;
        *"$PLACEHOLDER"*) echo "make-secrets: $1 holds a placeholder ($PLACEHOLDER...):" \
                               "delete it to make a real secret" >&2; exit 1 ;;
    esac
    printf '%s' "$value"
}

# 32 random bytes as 64 hex digits: safe in URLs, ACL files and basic auth.
random_password() {
    od -An -N32 -tx1 /dev/urandom | tr -d ' \n'
}

# Writes stdin to $1 through a temporary file, so a reader never sees half a file.
write_secret() {
    temporary=$(mktemp "$1.XXXXXX")
    cat >"$temporary"
    chmod 600 "$temporary"
    mv -f "$temporary" "$1"
}

for user in producer worker exporter admin replicator sentinel; do
    file="$directory/redis_${user}_password"
    if [ -e "$file" ]; then
        first_line "$file" >/dev/null
    else
        { random_password; echo; } | write_secret "$file"
        echo "make-secrets: made $file"
    fi
done
file="$directory/flower_basic_auth"
if [ -e "$file" ]; then
    credentials=$(first_line "$file")
    case "$credentials" in
        ?*:?*) ;;
        *) echo "make-secrets: $file must hold user:password" >&2; exit 1 ;;
    esac
else
    printf 'admin:%s\n' "$(random_password)" | write_secret "$file"
    echo "make-secrets: made $file"
fi

# The template without its comment lines (an ACL file has none), each
# @USER_SHA256@ replaced by the hash of that user's password.
producer=$(first_line "$directory/redis_producer_password" | sha256)
worker=$(first_line "$directory/redis_worker_password" | sha256)
exporter=$(first_line "$directory/redis_exporter_password" | sha256)
admin=$(first_line "$directory/redis_admin_password" | sha256)
replicator=$(first_line "$directory/redis_replicator_password" | sha256)
sentinel=$(first_line "$directory/redis_sentinel_password" | sha256)
grep -v -e '^#' -e '^[[:space:]]*$' "$template" \
    | sed -e "s/@PRODUCER_SHA256@/$producer/" -e "s/@WORKER_SHA256@/$worker/" \
          -e "s/@EXPORTER_SHA256@/$exporter/" \
          -e "s/@ADMIN_SHA256@/$admin/" -e "s/@REPLICATOR_SHA256@/$replicator/" \
          -e "s/@SENTINEL_SHA256@/$sentinel/" \
    | write_secret "$directory/redis_users_acl"
if grep -q '@[A-Z_]*_SHA256@' "$directory/redis_users_acl"; then
    echo "make-secrets: $template has a user this script makes no password for" >&2
    rm -f "$directory/redis_users_acl"
    exit 1
fi
echo "make-secrets: rendered $directory/redis_users_acl"

# The HA profile's configuration files carry two passwords in clear (Redis and
# Sentinel must send them).  sed reads its script from a here-document, never
# from its argv; the passwords are hex digits, safe in a sed replacement.
render_with_password() {  # template, marker, password file, output
    password=$(first_line "$3")
    grep -v -e '^#' -e '^[[:space:]]*$' "$1" | sed -f /dev/stdin /dev/fd/3 3<&0 <<SCRIPT \
        | write_secret "$4"
s/$2/$password/
SCRIPT
    echo "make-secrets: rendered $4"
}
render_with_password "$ha_template" @REPLICATOR_PASSWORD@ \
    "$directory/redis_replicator_password" "$directory/redis_ha_conf"
render_with_password "$sentinel_template" @SENTINEL_PASSWORD@ \
    "$directory/redis_sentinel_password" "$directory/sentinel_conf"

if [ "$chown_files" = 1 ]; then
    operator=${SUDO_UID:-0}
    chown "$REDIS_UID:$REDIS_UID" "$directory/redis_users_acl" \
        "$directory/redis_ha_conf" "$directory/sentinel_conf" "$directory/redis_admin_password"
    chown "$VMTASK_UID:$VMTASK_UID" "$directory/redis_worker_password" \
        "$directory/redis_exporter_password" "$directory/flower_basic_auth"
    chown "$operator" "$directory" "$directory/redis_producer_password" \
        "$directory/redis_replicator_password" "$directory/redis_sentinel_password"
fi
