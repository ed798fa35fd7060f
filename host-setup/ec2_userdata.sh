#!/bin/bash
# EC2 user data for a whist host, sent by the scaling service with every RunInstances
# (`include_str!("../../host-setup/ec2_userdata.sh")`). cloud-init runs it once, as root, on the
# instance's first boot. The AMI (host-setup/setup_host.sh, via Packer) already holds the binary,
# the systemd unit, Docker with the NVIDIA runtime, the AppArmor profile and the IMDS firewall;
# this script only adds what differs per environment:
#
#   1. writes /etc/whist/host-service.env (0600: it holds Hasura's admin secret);
#   2. warms the EBS root volume: the Docker image store now (the first spin-up reads it), the
#      rest of the disk in the background at idle I/O priority;
#   3. enables and starts whist-host-service.service (enabled: a reboot starts it again, and the
#      service's reconcile-at-start makes that safe).
#
# Template contract. A placeholder is a NAME below between two pairs of curly braces (they
# appear only in the assignments after `set -euo pipefail`, so no other "{" "{" pair is in this
# file: after substitution the scaling service may assert that none remains). It replaces every
# placeholder with a value, an optional one with the empty string. A value must not contain a
# single quote or a newline: the scaling service should refuse such a value when it loads its
# configuration; this script refuses to run with one, or with a placeholder left in.
#
#   APP_ENV                            required: dev, staging or prod
#   HASURA_GRAPHQL_URL                 required: Hasura's https://…/v1/graphql URL
#   HASURA_ADMIN_SECRET_SSM_PARAMETER  name of an SSM SecureString holding Hasura's admin secret,
#                                      read with the instance profile (ssm:GetParameter and
#                                      kms:Decrypt on it). Preferred: the secret then never
#                                      appears in user data.
#   HASURA_ADMIN_SECRET                the secret itself, used only when the SSM parameter is
#                                      empty. User data is readable by anyone allowed
#                                      ec2:DescribeInstanceAttribute and by root on the host.
#   SENTRY_DSN                         optional
#   WHIST_IMAGE_REGISTRY               optional (the service's default: ghcr.io/whisthq)
#   WHIST_LOG                          optional (the service's default: info)
#   WHIST_OPS_ADDR                     optional: address of /metrics, /healthz, /readyz (the
#                                      service's default: 127.0.0.1:4679). PRIVATE_IP:4679 binds
#                                      the instance's private IPv4 so Prometheus can scrape it;
#                                      the security group must then admit 4679 only from the
#                                      monitoring network (the mandelboxes' client ports are a
#                                      wide range that may include it).
#   WHIST_OPS_ALLOW                    optional: CIDRs, comma-separated, allowed to reach that
#                                      endpoint besides loopback (the monitoring network); with
#                                      PRIVATE_IP it is what lets Prometheus in.
#
# RunInstances must also set: the IAM instance profile, MetadataOptions HttpTokens=required,
# HttpPutResponseHopLimit=1 (a container is one hop further, so it cannot get an IMDSv2 token
# even without the AMI's firewall) and InstanceMetadataTags=enabled (the service reads `Name`).
#
# Everything this script does is idempotent: running it again rewrites the same file and
# restarts nothing that runs. Its output goes to /var/log/cloud-init-output.log.

set -euo pipefail

# Where the env file goes; host-setup/check.sh points these at a scratch directory.
WHIST_ETC=${WHIST_USERDATA_ETC:-/etc/whist}
UNIT=whist-host-service.service
IMDS=http://169.254.169.254
# The first mandelbox's image is read from the Docker image store: warm it, but never hold the
# host's registration back longer than this.
WARM_IMAGES_TIMEOUT_S=300

APP_ENV='{{APP_ENV}}'
HASURA_GRAPHQL_URL='{{HASURA_GRAPHQL_URL}}'
HASURA_ADMIN_SECRET_SSM_PARAMETER='{{HASURA_ADMIN_SECRET_SSM_PARAMETER}}'
HASURA_ADMIN_SECRET='{{HASURA_ADMIN_SECRET}}'
SENTRY_DSN='{{SENTRY_DSN}}'
WHIST_IMAGE_REGISTRY='{{WHIST_IMAGE_REGISTRY}}'
WHIST_LOG='{{WHIST_LOG}}'
WHIST_OPS_ADDR='{{WHIST_OPS_ADDR}}'
WHIST_OPS_ALLOW='{{WHIST_OPS_ALLOW}}'

log() { echo "whist-userdata: $*"; }
die() {
  echo "whist-userdata: error: $*" >&2
  exit 1
}

# Refuses a placeholder the scaling service did not substitute, and values that cannot be
# written safely into a systemd EnvironmentFile between single quotes.
check_value() {
  local name=$1 value=$2 brace='{'
  case $value in
    *"$brace$brace"*) die "$name was not substituted (still holds a template placeholder)" ;;
    *"'"* | *$'\n'*) die "$name contains a single quote or a newline" ;;
  esac
}

imds_get() {
  local token
  token=$(curl -sf -X PUT "$IMDS/latest/api/token" -H 'X-aws-ec2-metadata-token-ttl-seconds: 60')
  curl -sf -H "X-aws-ec2-metadata-token: $token" "$IMDS/latest/meta-data/$1"
}

admin_secret() {
  if [[ -n $HASURA_ADMIN_SECRET_SSM_PARAMETER ]]; then
    local region
    region=$(imds_get placement/region) || die "cannot read the region from IMDS"
    aws ssm get-parameter --region "$region" --with-decryption \
      --name "$HASURA_ADMIN_SECRET_SSM_PARAMETER" --query Parameter.Value --output text ||
      die "cannot read SSM parameter $HASURA_ADMIN_SECRET_SSM_PARAMETER (instance profile permissions?)"
  else
    printf '%s' "$HASURA_ADMIN_SECRET"
  fi
}

write_env_file() {
  local secret tmp private_ip
  for name in APP_ENV HASURA_GRAPHQL_URL HASURA_ADMIN_SECRET_SSM_PARAMETER HASURA_ADMIN_SECRET \
    SENTRY_DSN WHIST_IMAGE_REGISTRY WHIST_LOG WHIST_OPS_ADDR WHIST_OPS_ALLOW; do
    check_value "$name" "${!name}"
  done
  case $APP_ENV in
    dev | staging | prod) ;;
    *) die "APP_ENV must be dev, staging or prod, not '$APP_ENV'" ;;
  esac
  [[ $HASURA_GRAPHQL_URL == https://* ]] || die "HASURA_GRAPHQL_URL must be an https:// URL"
  secret=$(admin_secret)
  [[ -n $secret ]] || die "no Hasura admin secret: set the SSM parameter or the secret"
  check_value HASURA_ADMIN_SECRET "$secret"
  if [[ $WHIST_OPS_ADDR == PRIVATE_IP:* ]]; then
    private_ip=$(imds_get local-ipv4) || die "cannot read the private IPv4 from IMDS"
    WHIST_OPS_ADDR=$private_ip:${WHIST_OPS_ADDR#PRIVATE_IP:}
  fi

  install -d -m 0755 "$WHIST_ETC"
  tmp=$(mktemp "$WHIST_ETC/.host-service.env.XXXXXX")
  chmod 0600 "$tmp"
  {
    echo "# Written by the EC2 user data at $(date -u +%FT%TZ); see docs/operations.md."
    echo "APP_ENV='$APP_ENV'"
    echo "HASURA_GRAPHQL_URL='$HASURA_GRAPHQL_URL'"
    echo "HASURA_ADMIN_SECRET='$secret'"
    # A drained host powers off; the scaling service launches it with shutdown behaviour
    # "terminate", so the instance goes away with its row.
    echo "WHIST_POWEROFF=true"
    echo "WHIST_LOG_FORMAT=json"
    if [[ -n $SENTRY_DSN ]]; then echo "SENTRY_DSN='$SENTRY_DSN'"; fi
    if [[ -n $WHIST_IMAGE_REGISTRY ]]; then echo "WHIST_IMAGE_REGISTRY='$WHIST_IMAGE_REGISTRY'"; fi
    if [[ -n $WHIST_LOG ]]; then echo "WHIST_LOG='$WHIST_LOG'"; fi
    if [[ -n $WHIST_OPS_ADDR ]]; then echo "WHIST_OPS_ADDR='$WHIST_OPS_ADDR'"; fi
    if [[ -n $WHIST_OPS_ALLOW ]]; then echo "WHIST_OPS_ALLOW='$WHIST_OPS_ALLOW'"; fi
  } >"$tmp"
  mv -f "$tmp" "$WHIST_ETC/host-service.env"
  log "wrote $WHIST_ETC/host-service.env"
}

# A volume restored from a snapshot fetches each block from S3 on its first read
# (https://docs.aws.amazon.com/ebs/latest/userguide/ebs-initialize.html). The original read the
# whole disk with fio before starting the service, holding registration back for minutes.
warm_volume() {
  local docker_root=/var/lib/docker root_source disk
  if [[ -d $docker_root/image ]]; then
    log "warming $docker_root (at most ${WARM_IMAGES_TIMEOUT_S}s)"
    timeout "$WARM_IMAGES_TIMEOUT_S" \
      find "$docker_root" -xdev -type f -exec cat {} + >/dev/null 2>&1 ||
      log "image store warm-up stopped early; continuing"
  fi
  command -v fio >/dev/null || {
    log "fio is missing: the rest of the volume warms on first read"
    return 0
  }
  root_source=$(findmnt -no SOURCE /) || return 0
  disk=$(lsblk -no PKNAME "$root_source" 2>/dev/null | head -n1)
  [[ -n $disk ]] || disk=${root_source#/dev/}
  if systemctl is-active --quiet whist-ebs-warm.service; then return 0; fi
  systemctl reset-failed whist-ebs-warm.service 2>/dev/null || true
  # A warm-up that cannot start must not keep the host service from starting.
  if systemd-run --unit=whist-ebs-warm --collect --nice=19 -p IOSchedulingClass=idle \
    fio --filename="/dev/$disk" --rw=read --bs=1M --iodepth=32 --ioengine=libaio --direct=1 \
    --name=volume-initialize >/dev/null; then
    log "warming /dev/$disk in the background (unit whist-ebs-warm)"
  else
    log "cannot start the background warm-up; continuing (blocks warm on first read)"
  fi
}

main() {
  log "started"
  [[ $(id -u) == 0 ]] || die "must run as root"
  write_env_file
  warm_volume
  systemctl daemon-reload
  systemctl enable --now "$UNIT"
  log "$UNIT enabled and started"
}

main "$@"
