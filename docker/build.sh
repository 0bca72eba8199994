#!/usr/bin/env bash
# Builds the netmoe images with whichever engine is present (docker with BuildKit, else podman):
#   docker/build.sh [TAG] [sidecar|trainer]     default: latest sidecar
# sidecar: netmoe-sidecar:TAG from docker/Dockerfile (the service, server extra only).
# trainer: netmoe-trainer:TAG from docker/trainer.Dockerfile (the reference trainer, torch CPU),
#          a minimal training job for docker/compose.yaml.
# The host's pip configuration (`pip config list`) and CA bundle, when it has them, reach the
# pip step as build secrets only: never a layer, a build argument or a file in the repository.
# Settings that name host paths (file:// indexes, find-links, constraint files) cannot be seen
# inside the build and are left out; the trainer's torch wheel is fetched on the host instead.
# Without a pullable python:3.11-slim, docker/base.sh builds a local one (cached).
# ENGINE=docker|podman picks the engine; PIP="python3 -m pip" is the host pip that is asked.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-latest}
kind=${2:-sidecar}
base=python:3.11-slim
pip=${PIP:-python3 -m pip}

case "$kind" in
  sidecar) dockerfile=docker/Dockerfile ;;
  trainer) dockerfile=docker/trainer.Dockerfile ;;
  *) echo "build.sh: image must be sidecar or trainer, got '$kind'" >&2; exit 2 ;;
esac
image=netmoe-$kind:$tag

# A docker client that can build with BuildKit (a newer client without buildx cannot).
buildkit_docker() {
  local c
  for c in $(type -ap docker); do
    if DOCKER_BUILDKIT=1 "$c" build --help >/dev/null 2>&1 && "$c" info >/dev/null 2>&1; then
      echo "$c"
      return 0
    fi
  done
  return 1
}
engine=${ENGINE:-}
if [ -z "$engine" ]; then
  if docker_bin=$(buildkit_docker); then engine=docker
  elif command -v podman >/dev/null; then engine=podman
  else echo "build.sh: no engine: neither a running docker with BuildKit nor podman" >&2; exit 2
  fi
fi
case "$engine" in
  docker) run=${docker_bin:-$(buildkit_docker)} || {
            echo "build.sh: docker cannot build with BuildKit here" >&2; exit 2; } ;;
  podman) run=podman ;;
  *) echo "build.sh: ENGINE must be docker or podman, got '$engine'" >&2; exit 2 ;;
esac

if ! "$run" image inspect "$base" >/dev/null 2>&1 \
    && ! timeout 60 "$run" pull -q "$base" >/dev/null 2>&1; then
  ENGINE=$engine docker/base.sh "$base"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The host's pip settings that still mean something inside the build, as a pip.conf secret.
secrets=()
cert=""
conf=$work/pip.conf
echo "[global]" >"$conf"
while IFS= read -r line; do
  key=${line%%=*}
  key=${key#*.}
  value=${line#*=}
  value=${value#\'}
  value=${value%\'}
  case "$key" in
    cert) [ -f "$value" ] && cert=$value ;;
    index-url|extra-index-url)
      urls=$(tr ' ' '\n' <<<"$value" | grep -E '^https?://' | tr '\n' ' ' || true)
      [ -n "$urls" ] && echo "$key = $urls" >>"$conf" ;;
    trusted-host|timeout|default-timeout|retries) echo "$key = $value" >>"$conf" ;;
  esac
done < <($pip config list 2>/dev/null || true)
if [ -n "$cert" ]; then
  echo "cert = /run/secrets/pip_cert" >>"$conf"
  secrets+=(--secret "id=pip_cert,src=$cert")
fi
[ "$(wc -l <"$conf")" -gt 1 ] && secrets+=(--secret "id=pip_conf,src=$conf")

context=.
if [ "$kind" = trainer ]; then
  # The pinned torch from wherever the host's pip finds it (a CPU wheel on these machines).
  context=$work/context
  mkdir -p "$context/wheels"
  cp -r pyproject.toml constraints.txt README.md netmoe solver server client protos app docker \
    .dockerignore "$context"/
  torch=$(grep -E '^torch==' constraints.txt)
  $pip download -q --no-deps --only-binary=:all: -d "$context/wheels" "$torch" >&2
fi

echo "[build] $image with $engine (${#secrets[@]} secret options)" >&2
if [ "$engine" = docker ]; then
  DOCKER_BUILDKIT=1 "$run" build --progress=plain -f "$context/$dockerfile" -t "$image" \
    "${secrets[@]}" "$context"
else
  # --format docker keeps the HEALTHCHECK, which the OCI format drops.
  podman build --format docker -f "$context/$dockerfile" -t "$image" "${secrets[@]}" "$context"
fi
echo "$image"
