# A minimal training job for docker/compose.yaml: the reference MoE trainer (netmoe[client],
# torch CPU) that asks its sidecar for placements. Built by `docker/build.sh TAG trainer`, whose
# build context holds the sources and wheels/ (the pinned torch, fetched by the host's pip).
FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/netmoe
WORKDIR /src
# Requirements first, in their own layer, and netmoe after them, as in docker/Dockerfile (whose
# secrets these are too); wheels/ is bind-mounted, so the wheel is in no layer either.
COPY pyproject.toml constraints.txt docker/requirements.py ./
RUN --mount=type=secret,id=pip_conf --mount=type=secret,id=pip_cert \
    --mount=type=bind,source=wheels,target=/wheels \
    if [ -f /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi \
    && /opt/netmoe/bin/python requirements.py pyproject.toml client >requirements.txt \
    && /opt/netmoe/bin/pip install --no-cache-dir --find-links /wheels -c constraints.txt \
       -r requirements.txt
COPY README.md ./
COPY netmoe netmoe
COPY solver solver
COPY server server
COPY client client
COPY protos protos
COPY app app
RUN --mount=type=secret,id=pip_conf --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi \
    && /opt/netmoe/bin/pip install --no-cache-dir --no-deps -c constraints.txt . \
    && /opt/netmoe/bin/python -m pip uninstall -y -q pip
WORKDIR /
# Any uid, with or without a passwd entry, gets a writable HOME (the corpus cache lives there).
ENV PATH=/opt/netmoe/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1
USER 10001:10001
CMD ["python", "-m", "netmoe.app.reference.train", "--help"]
