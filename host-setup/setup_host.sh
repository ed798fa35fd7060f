#!/bin/bash
# Prepares a machine to run the whist host service. Idempotent: a second run changes nothing
# and restarts nothing.
#
#   setup_host.sh --deployment --binary PATH [--pull IMAGE]...   an AMI build (Packer runs this
#                                                                on Ubuntu 22.04)
#   setup_host.sh [--binary PATH] [--env-file PATH]              a developer's machine
#
# Both modes: the mandelbox AppArmor profile (loaded when the kernel has AppArmor), the udev rule
# for the virtual input devices, the uinput and fuse modules, sysctls, /whist, the Docker daemon
# configuration with the NVIDIA runtime as default and the custom seccomp profile (on a machine
# without the NVIDIA container runtime, local mode leaves Docker's configuration alone), the
# binary (with --binary) and the systemd unit, installed but not enabled.
#
# --deployment only: packages (Docker CE, the NVIDIA GRID driver and container toolkit, AWS CLI,
# fio, jq, AppArmor tools), unattended upgrades off, the IMDS firewall (a unit that runs before
# Docker at every boot), the NVIDIA persistence daemon, and the mandelbox images pre-pulled and
# tagged :current-build (GHCR_USER and GHCR_TOKEN in the environment log in to ghcr.io; the
# credentials are removed afterwards so the AMI does not carry them). No env file: the EC2 user
# data writes it at launch, and enables the unit.
#
# Local mode: --env-file installs the given file as /etc/whist/host-service.env (0600); without it
# the example is installed beside it. Nothing is enabled; start it with
# `systemctl enable --now whist-host-service`.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly HERE
readonly BIN=/usr/local/bin/whist-host-service
readonly UNIT_DIR=/etc/systemd/system
readonly ETC_WHIST=/etc/whist
readonly WHIST_ROOT=/whist
readonly APPARMOR_PROFILE=mandelbox-apparmor-profile
# The moby tag of Docker's default seccomp profile follows the installed engine's version.
readonly MOBY_SECCOMP_URL=https://raw.githubusercontent.com/moby/moby/v%s/profiles/seccomp/default.json
# AWS's bucket of NVIDIA GRID drivers for G4dn/G5 (the mandelbox captures the display with
# NvFBC, which only the GRID driver enables).
readonly NVIDIA_GRID_BUCKET=s3://ec2-linux-nvidia-drivers/latest/

DEPLOYMENT=false
BINARY=
ENV_FILE=
PULL=()
CHANGED_DOCKER=false

usage() {
  sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  echo
  echo "options: --deployment  --binary PATH  --env-file PATH  --pull IMAGE:TAG (repeatable)  --help"
}

log() { echo "setup_host: $*"; }
die() {
  echo "setup_host: error: $*" >&2
  exit 1
}

parse_args() {
  while (($#)); do
    case $1 in
      --deployment) DEPLOYMENT=true ;;
      --binary)
        BINARY=${2:?--binary needs a path}
        shift
        ;;
      --env-file)
        ENV_FILE=${2:?--env-file needs a path}
        shift
        ;;
      --pull)
        PULL+=("${2:?--pull needs an image reference}")
        shift
        ;;
      -h | --help)
        usage
        exit 0
        ;;
      *)
        echo "setup_host: unknown argument: $1" >&2
        usage >&2
        exit 2
        ;;
    esac
    shift
  done
  if $DEPLOYMENT && [[ -n $ENV_FILE ]]; then
    echo "setup_host: --env-file is refused with --deployment: an AMI must not carry secrets" >&2
    exit 2
  fi
  if ! $DEPLOYMENT && ((${#PULL[@]})); then
    echo "setup_host: --pull needs --deployment" >&2
    exit 2
  fi
  local image
  for image in "${PULL[@]}"; do
    [[ $image =~ ^[^:]+(:[0-9]+)?/[^:]+:[A-Za-z0-9_.-]+$ ]] ||
      { echo "setup_host: --pull $image: expected REGISTRY/REPO:TAG" >&2 && exit 2; }
  done
  if [[ -n $BINARY && ! -x $BINARY ]]; then
    echo "setup_host: --binary $BINARY is not an executable file" >&2
    exit 2
  fi
  if [[ -n $ENV_FILE && ! -f $ENV_FILE ]]; then
    echo "setup_host: --env-file $ENV_FILE does not exist" >&2
    exit 2
  fi
}

# install_file MODE SOURCE DESTINATION: copies when the content or mode differs, atomically.
# Returns 0 when it changed something, 1 when the destination was already right.
install_file() {
  local mode=$1 source=$2 destination=$3 tmp
  if [[ -f $destination ]] && cmp -s "$source" "$destination" &&
    [[ $(stat -c %a "$destination") == "${mode#0}" ]]; then
    return 1
  fi
  install -d -m 0755 "$(dirname "$destination")"
  tmp=$(mktemp "$destination.XXXXXX")
  cp "$source" "$tmp"
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$destination"
  log "installed $destination"
}

# apt waits for a lock held by cloud-init or apt-daily on a fresh instance instead of failing.
apt_get() {
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@"
}

apt_install() {
  apt_get install -y -q --no-install-recommends "$@"
}

# --- deployment: packages ---------------------------------------------------------------------

disable_unattended_upgrades() {
  # An upgrade of Docker or the NVIDIA driver under running mandelboxes breaks them; hosts are
  # replaced by new AMIs instead.
  systemctl disable --now unattended-upgrades.service apt-daily.timer apt-daily-upgrade.timer \
    2>/dev/null || true
  if dpkg -s unattended-upgrades >/dev/null 2>&1; then
    apt_get purge -y -q unattended-upgrades
  fi
}

install_packages() {
  # A fresh instance is still running cloud-init (which runs apt) when Packer connects.
  if command -v cloud-init >/dev/null; then cloud-init status --wait >/dev/null || true; fi
  apt_get update -q
  apt_install ca-certificates curl gnupg jq fio lz4 tar unzip iptables apparmor apparmor-utils \
    udev kmod build-essential "linux-headers-$(uname -r)" "linux-modules-extra-$(uname -r)"
}

install_aws_cli() {
  command -v aws >/dev/null && return 0
  local tmp
  tmp=$(mktemp -d)
  curl -fsSL https://awscli.amazonaws.com/awscli-exe-linux-x86_64.zip -o "$tmp/awscliv2.zip"
  unzip -q "$tmp/awscliv2.zip" -d "$tmp"
  "$tmp/aws/install"
  rm -rf "$tmp"
}

install_docker() {
  if ! command -v dockerd >/dev/null; then
    install -d -m 0755 /etc/apt/keyrings
    curl -fsSL https://download.docker.com/linux/ubuntu/gpg -o /etc/apt/keyrings/docker.asc
    # shellcheck disable=SC1091
    . /etc/os-release
    echo "deb [arch=amd64 signed-by=/etc/apt/keyrings/docker.asc] https://download.docker.com/linux/ubuntu ${VERSION_CODENAME} stable" \
      >/etc/apt/sources.list.d/docker.list
    apt_get update -q
    apt_install docker-ce docker-ce-cli containerd.io
  fi
  systemctl enable docker.service
}

install_nvidia_driver() {
  if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
    log "NVIDIA driver present: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n1)"
    return 0
  fi
  local tmp
  tmp=$(mktemp -d)
  # nouveau would hold the GPU: keep it out now and at every boot.
  printf 'blacklist nouveau\noptions nouveau modeset=0\n' >/etc/modprobe.d/blacklist-nouveau.conf
  rmmod nouveau 2>/dev/null || true
  aws s3 cp --recursive --no-progress "$NVIDIA_GRID_BUCKET" "$tmp"
  sh "$tmp"/NVIDIA-Linux-x86_64*.run --silent --dkms
  rm -rf "$tmp"
  nvidia-smi >/dev/null || die "the NVIDIA driver does not answer after its installation"
}

install_nvidia_container_toolkit() {
  if ! command -v nvidia-container-runtime >/dev/null; then
    curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey |
      gpg --batch --yes --dearmor -o /etc/apt/keyrings/nvidia-container-toolkit.gpg
    curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list |
      sed 's#deb https://#deb [signed-by=/etc/apt/keyrings/nvidia-container-toolkit.gpg] https://#' \
        >/etc/apt/sources.list.d/nvidia-container-toolkit.list
    apt_get update -q
    apt_install nvidia-container-toolkit
  fi
}

install_nvidia_persistenced_unit() {
  # Keeps the driver initialised between mandelboxes (and before the host service's NVML call).
  command -v nvidia-persistenced >/dev/null || return 0
  local unit
  unit=$(mktemp)
  cat >"$unit" <<'UNIT'
[Unit]
Description=NVIDIA persistence daemon
After=local-fs.target

[Service]
Type=forking
ExecStart=/usr/bin/nvidia-persistenced --user root
ExecStopPost=/bin/rm -rf /var/run/nvidia-persistenced

[Install]
WantedBy=multi-user.target
UNIT
  if install_file 0644 "$unit" "$UNIT_DIR/nvidia-persistenced.service"; then
    systemctl daemon-reload
  fi
  rm -f "$unit"
  systemctl enable nvidia-persistenced.service
}

# --- both modes -------------------------------------------------------------------------------

setup_kernel() {
  install_file 0644 "$HERE/whist-modules.conf" /etc/modules-load.d/whist.conf || true
  local module
  for module in uinput fuse; do
    modprobe "$module" 2>/dev/null || {
      if $DEPLOYMENT; then die "cannot load the $module module"; fi
      log "warning: cannot load the $module module (mandelboxes will run without it)"
    }
  done
  if install_file 0644 "$HERE/90-whist-sysctl.conf" /etc/sysctl.d/90-whist.conf; then
    sysctl -q -p /etc/sysctl.d/90-whist.conf
  fi
  if install_file 0644 "$HERE/90-whist-input.rules" /etc/udev/rules.d/90-whist-input.rules &&
    udevadm control --reload-rules 2>/dev/null; then
    udevadm trigger --subsystem-match=input --subsystem-match=misc || true
  fi
}

setup_apparmor() {
  install_file 0644 "$HERE/$APPARMOR_PROFILE" "/etc/apparmor.d/$APPARMOR_PROFILE" || true
  if [[ -d /sys/kernel/security/apparmor ]]; then
    # -r replaces a loaded profile, -W writes the cache that apparmor.service loads at boot.
    apparmor_parser -r -W "/etc/apparmor.d/$APPARMOR_PROFILE"
    grep -q "^$APPARMOR_PROFILE " /sys/kernel/security/apparmor/profiles ||
      die "the AppArmor profile did not load"
    log "AppArmor profile $APPARMOR_PROFILE loaded"
  elif $DEPLOYMENT; then
    die "the kernel has no AppArmor: mandelboxes would run unconfined"
  else
    log "no AppArmor in this kernel: profile installed, not loaded"
  fi
}

# Docker's default seccomp profile for the installed engine, made stricter by seccomp-patch.json
# (seccomp-mandelbox.jq) and checked by seccomp-verify.jq: no user namespaces, no mounts.
generate_seccomp() {
  local version tmp
  version=$(dockerd --version | sed -E 's/^Docker version ([0-9]+\.[0-9]+\.[0-9]+).*/\1/')
  [[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "cannot read Docker's version"
  tmp=$(mktemp -d)
  # shellcheck disable=SC2059
  curl -fsSL "$(printf "$MOBY_SECCOMP_URL" "$version")" -o "$tmp/default.json"
  jq --slurpfile patch "$HERE/docker-daemon-config/seccomp-patch.json" \
    -f "$HERE/docker-daemon-config/seccomp-mandelbox.jq" "$tmp/default.json" >"$tmp/seccomp.json"
  if ! jq -e '(.syscalls | length) > 100' "$tmp/seccomp.json" >/dev/null ||
    ! jq -e -f "$HERE/docker-daemon-config/seccomp-verify.jq" "$tmp/seccomp.json" >/dev/null; then
    die "the generated seccomp profile looks wrong ($tmp/seccomp.json)"
  fi
  if install_file 0644 "$tmp/seccomp.json" /etc/docker/seccomp.json; then CHANGED_DOCKER=true; fi
  rm -rf "$tmp"
}

setup_docker() {
  if ! command -v nvidia-container-runtime >/dev/null; then
    $DEPLOYMENT && die "nvidia-container-runtime is missing"
    log "no NVIDIA container runtime here: Docker's configuration left alone"
    return 0
  fi
  generate_seccomp
  if [[ -f /etc/docker/daemon.json ]] &&
    ! cmp -s /etc/docker/daemon.json "$HERE/docker-daemon-config/daemon.json"; then
    cp /etc/docker/daemon.json "/etc/docker/daemon.json.bak-$(date +%Y%m%d%H%M%S)"
  fi
  if install_file 0644 "$HERE/docker-daemon-config/daemon.json" /etc/docker/daemon.json; then
    CHANGED_DOCKER=true
  fi
  if $CHANGED_DOCKER && systemctl is-active --quiet docker.service; then
    log "restarting Docker for its new configuration"
    systemctl restart docker.service
  fi
  [[ $(docker info --format '{{.DefaultRuntime}}') == nvidia ]] ||
    die "Docker's default runtime is not nvidia"
}

setup_imds_firewall() {
  install_file 0755 "$HERE/whist-imds-firewall.sh" /usr/local/sbin/whist-imds-firewall.sh || true
  if install_file 0644 "$HERE/whist-imds-firewall.service" "$UNIT_DIR/whist-imds-firewall.service"; then
    systemctl daemon-reload
  fi
  systemctl enable whist-imds-firewall.service
  /usr/local/sbin/whist-imds-firewall.sh
  /usr/local/sbin/whist-imds-firewall.sh --check
}

install_service() {
  install -d -m 0755 "$WHIST_ROOT"
  install -d -m 0700 "$ETC_WHIST"
  if [[ -n $BINARY ]]; then
    install_file 0755 "$BINARY" "$BIN" || true
    "$BIN" --version
  elif [[ ! -x $BIN ]]; then
    log "warning: no binary at $BIN (pass --binary PATH)"
  fi
  if install_file 0644 "$HERE/whist-host-service.service" "$UNIT_DIR/whist-host-service.service"; then
    systemctl daemon-reload
  fi
  if [[ -n $ENV_FILE ]]; then
    install_file 0600 "$ENV_FILE" "$ETC_WHIST/host-service.env" || true
  elif ! $DEPLOYMENT; then
    install_file 0644 "$HERE/host-service.env.example" "$ETC_WHIST/host-service.env.example" || true
  fi
  if $DEPLOYMENT && [[ -e $ETC_WHIST/host-service.env ]]; then
    die "$ETC_WHIST/host-service.env exists in an AMI build: remove it (the user data writes it)"
  fi
}

pull_images() {
  ((${#PULL[@]})) || return 0
  local image logged_in=false
  if [[ -n ${GHCR_TOKEN:-} ]]; then
    docker login ghcr.io --username "${GHCR_USER:?GHCR_USER must accompany GHCR_TOKEN}" \
      --password-stdin <<<"$GHCR_TOKEN"
    logged_in=true
  fi
  for image in "${PULL[@]}"; do
    docker pull --quiet "$image"
    docker tag "$image" "${image%:*}:current-build"
    log "pulled $image as ${image%:*}:current-build"
  done
  if $logged_in; then docker logout ghcr.io; fi
  rm -f /root/.docker/config.json
}

main() {
  parse_args "$@"
  [[ $(id -u) == 0 ]] || die "run as root"
  if $DEPLOYMENT; then
    disable_unattended_upgrades
    install_packages
    install_aws_cli
    install_docker
    install_nvidia_driver
    install_nvidia_container_toolkit
    install_nvidia_persistenced_unit
  fi
  setup_kernel
  setup_apparmor
  setup_docker
  if $DEPLOYMENT; then setup_imds_firewall; fi
  install_service
  if $DEPLOYMENT; then
    pull_images
    apt_get clean
  fi
  log "done ($($DEPLOYMENT && echo deployment || echo local) mode)"
}

main "$@"
