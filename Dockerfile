# vmtask worker image: one vmtask host per container (see docker-compose.yml).
#
#   docker build -t vmtask .
#   docker run -e VMTASK_REDIS_URL=redis://worker@BROKER:6379/0 \
#     -e VMTASK_REDIS_PASSWORD_FILE=/run/secrets/redis_worker_password \
#     -v "$PWD/secrets/redis_worker_password:/run/secrets/redis_worker_password:ro" \
#     -e VMTASK_HOST=host-a vmtask
#
# The same image runs Flower:
#   celery -A workers flower --conf=/etc/vmtask/flowerconfig.py
#
# No secret is baked in: the Redis password and Flower's credentials are files
# mounted at run time (compose secrets), never a build argument or a variable.
# The base image is a build argument (compose passes PYTHON_IMAGE): a site
# without Docker Hub, or tests/deployment, builds from its own copy of it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Debian's QEMU: qemu-img for the disk engine, qemu-system-x86_64 (with its
# firmware, which are hard dependencies) for the VM engine.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        qemu-utils \
        qemu-system-x86 \
    && rm -rf /var/lib/apt/lists/*

# Runs as an unprivileged user.  QEMU under TCG needs nothing more.  For KVM,
# /dev/kvm is passed in by docker-compose.kvm.yml, and the user gets the device's
# group through `group_add: [<host kvm gid>]` there: the gid of the host's "kvm"
# group differs between distributions, so it cannot be fixed in the image.
RUN groupadd --system --gid 10001 vmtask \
    && useradd --system --uid 10001 --gid vmtask --create-home --home-dir /home/vmtask \
        --shell /usr/sbin/nologin vmtask \
    && mkdir -p /var/lib/vmtask \
    && chown vmtask:vmtask /var/lib/vmtask

# The project (the packages only: see .dockerignore), installed as a regular
# distribution; the source tree is not needed at run time.
# The dependencies first, exactly as deploy/requirements.lock pins them (versions
# and file hashes: pip refuses anything else); scripts/lock-image-requirements.sh
# makes that file.  Then the project itself, with no dependency of its own left
# to resolve, and pip check that the two agree.
WORKDIR /opt/vmtask/src
COPY deploy/requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY api/ api/
COPY workers/ workers/
RUN pip install --no-deps ".[worker,flower,exporter]" \
    && pip check \
    && rm -rf /opt/vmtask/src

# Flower's configuration: basic auth from a secret file (see the file).  Outside
# the working directory, which Celery puts on sys.path.
COPY deploy/flower/flowerconfig.py /etc/vmtask/flowerconfig.py

# The storage root: mount a volume here (docker-compose.yml uses a named volume
# per host, which starts out owned by vmtask, as Docker copies the ownership of
# the image's directory into an empty volume).
ENV VMTASK_STORAGE_ROOT=/var/lib/vmtask

# Celery puts the working directory on sys.path: make it one nobody can write,
# not the storage root, whose file names producers choose.
WORKDIR /opt/vmtask

USER vmtask

# Consumes host.<VMTASK_HOST>; VMTASK_REDIS_URL must point at the broker.
CMD ["celery", "-A", "workers", "worker", "--loglevel", "INFO"]
