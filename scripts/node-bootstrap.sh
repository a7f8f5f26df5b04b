#!/usr/bin/env bash
#
# node-bootstrap.sh — first provisioning step on a minitwit-ha droplet (run as root, via
# `sudo bash -s` with this file on stdin). Idempotent: safe to run again.
#
# Installs keepalived, HAProxy, nftables, curl and Docker Engine with the compose plugin (from Docker's
# apt repository: Debian's own docker-compose is the old v1), creates the unprivileged user
# keepalived runs its checks as, and leaves keepalived stopped until its configuration arrives.

set -Eeuo pipefail

readonly DOCKER_APT_URL="${DOCKER_APT_URL:-https://download.docker.com/linux}"
# Docker's published release-key fingerprint (docs.docker.com, "Install Docker Engine"): the key
# downloaded from DOCKER_APT_URL is trusted only when it is exactly this one key. A stand-in
# repository (the twins) names its own key in a root-owned file, since `sudo bash -s` passes no
# environment; whoever can write under /etc is root already.
readonly DOCKER_KEY_FPR_FILE="${DOCKER_KEY_FPR_FILE:-/etc/minitwit-ha/docker-apt-key.fpr}"
DOCKER_KEY_FPR="${DOCKER_KEY_FPR:-9DC858229FC7DD38854AE2D88D81803C0EBFCD88}"
if [ -f "${DOCKER_KEY_FPR_FILE}" ]; then
  DOCKER_KEY_FPR="$(tr -d ' \n' < "${DOCKER_KEY_FPR_FILE}")"
fi
readonly DOCKER_KEY_FPR
readonly SCRIPT_USER="${SCRIPT_USER:-keepalived_script}"
readonly LOG_TAG="minitwit-ha"
# unattended-upgrades runs on a droplet's first boot and holds the dpkg lock for minutes: wait for it.
readonly APT_LOCK_TIMEOUT_S="${APT_LOCK_TIMEOUT_S:-300}"
readonly DOCKER_DAEMON_JSON="${DOCKER_DAEMON_JSON:-/etc/docker/daemon.json}"

log() {
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) ${LOG_TAG} bootstrap: $*" >&2
  logger -t "${LOG_TAG}" "bootstrap: $*" 2>/dev/null || true
}

apt_get() {
  DEBIAN_FRONTEND=noninteractive apt-get -o "DPkg::Lock::Timeout=${APT_LOCK_TIMEOUT_S}" "$@"
}

apt_install() {
  apt_get install -y -q --no-install-recommends "$@"
}

# Docker's json-file logs grow without bound by default: at most 3 files of 10 MB per container.
# Written before Docker is installed, so dockerd starts with it. On a node that already runs Docker
# the file applies to containers created afterwards (the next rollout or compose change recreates
# them); dockerd is not restarted here, which would restart the app.
configure_docker_logs() {
  local wanted='{"log-driver": "json-file", "log-opts": {"max-size": "10m", "max-file": "3"}}'
  if [[ -f "${DOCKER_DAEMON_JSON}" ]] && [[ "$(cat "${DOCKER_DAEMON_JSON}")" == "${wanted}" ]]; then
    return
  fi
  log "docker log rotation: ${DOCKER_DAEMON_JSON} (json-file, 3 x 10m)"
  install -d -m 0755 "$(dirname "${DOCKER_DAEMON_JSON}")"
  printf '%s\n' "${wanted}" > "${DOCKER_DAEMON_JSON}.new"
  chmod 0644 "${DOCKER_DAEMON_JSON}.new"
  mv "${DOCKER_DAEMON_JSON}.new" "${DOCKER_DAEMON_JSON}"
}

install_base() {
  log "installing keepalived, haproxy, nftables, curl, python3"
  apt_get update -q
  apt_install keepalived haproxy nftables curl ca-certificates python3 gnupg
}

# Refuse a key file that is not exactly Docker's release key: a swapped key (a compromised
# mirror, a proxy) would let its holder sign packages apt then installs as root.
check_docker_key() {
  local file="$1" fprs home
  home="$(mktemp -d)"  # gpg wants a home even to only read a file; never root's own keyring
  fprs="$(gpg --homedir "${home}" --batch --quiet --with-colons --show-keys "${file}" 2>/dev/null \
    | awk -F: '$1 == "pub" { want = 1 } want && $1 == "fpr" { print $10; want = 0 }')" || fprs=""
  rm -rf "${home}"
  if [ "${fprs}" != "${DOCKER_KEY_FPR}" ]; then
    log "refusing Docker's apt key from ${DOCKER_APT_URL}: primary key fingerprint(s) '${fprs//$'\n'/ }', expected ${DOCKER_KEY_FPR}"
    return 1
  fi
  log "Docker's apt key has the published fingerprint ${DOCKER_KEY_FPR}"
}

install_docker() {
  if docker compose version >/dev/null 2>&1; then
    log "docker and the compose plugin are already installed"
    return
  fi
  local distro codename arch
  # shellcheck disable=SC1091 # os-release exists on every Debian/Ubuntu droplet
  distro="$(. /etc/os-release && echo "${ID}")"
  # shellcheck disable=SC1091
  codename="$(. /etc/os-release && echo "${VERSION_CODENAME}")"
  arch="$(dpkg --print-architecture)"
  log "adding Docker's apt repository for ${distro} ${codename}"
  install -m 0755 -d /etc/apt/keyrings
  local key
  key="$(mktemp)"
  # shellcheck disable=SC2064 # expand now: the path is local to this function
  trap "rm -f '${key}'" RETURN
  curl --fail --silent --show-error --max-time 60 "${DOCKER_APT_URL}/${distro}/gpg" -o "${key}"
  check_docker_key "${key}"
  install -m 0644 -o root -g root "${key}" /etc/apt/keyrings/docker.asc
  echo "deb [arch=${arch} signed-by=/etc/apt/keyrings/docker.asc] ${DOCKER_APT_URL}/${distro} ${codename} stable" \
    > /etc/apt/sources.list.d/docker.list
  apt_get update -q
  apt_install docker-ce docker-ce-cli containerd.io docker-compose-plugin
  systemctl enable --now docker
}

create_script_user() {
  if id -u "${SCRIPT_USER}" >/dev/null 2>&1; then
    return
  fi
  log "creating system user ${SCRIPT_USER} for keepalived's unprivileged checks"
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "${SCRIPT_USER}"
}

main() {
  install_base
  configure_docker_logs
  install_docker
  create_script_user
  # deploy runs the rollout's compose commands through sudo; the docker group would be root anyway.
  install -d -m 0755 -o root -g root /usr/libexec/minitwit-ha /etc/minitwit-ha /srv/minitwit /var/lib/minitwit-ha
  if ! [ -s /etc/keepalived/keepalived.conf ]; then
    # Debian starts keepalived on install; without our config it has nothing to do.
    systemctl stop keepalived 2>/dev/null || true
  fi
  if ! grep -qs minitwit-ha /etc/haproxy/haproxy.cfg; then
    # Debian starts haproxy with its sample config; ours arrives with the haproxy step.
    systemctl stop haproxy 2>/dev/null || true
  fi
  log "done"
}

main "$@"
