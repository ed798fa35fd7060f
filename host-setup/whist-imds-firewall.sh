#!/bin/bash
# Stops containers from reaching the EC2 instance metadata service (169.254.169.254, and
# fd00:ec2::254 over IPv6) and the ECS credentials endpoint (169.254.170.2): a mandelbox that
# reached IMDS could read the instance profile's credentials and the user data (which may hold
# Hasura's admin secret). The host service itself is unaffected: its traffic does not cross the
# FORWARD chain, where DOCKER-USER sits.
#
# Run at every boot by whist-imds-firewall.service (before docker.service) and by
# setup_host.sh. Idempotent: each rule is checked before it is inserted. Docker keeps the
# DOCKER-USER chain and its rules across its restarts and only adds a final RETURN.
# `whist-imds-firewall.sh --check` exits 1 when a rule is missing (docs/operations.md).

set -euo pipefail

CHAIN=DOCKER-USER
IPV4_BLOCKED=(169.254.169.254/32 169.254.170.2/32)
IPV6_BLOCKED=(fd00:ec2::254/128 fd00:ec2::23/128)

# ensure_rules TOOL ADDRESS...: the chain exists and drops traffic to each address.
ensure_rules() {
  local tool=$1 address
  shift
  "$tool" -w -n -L "$CHAIN" >/dev/null 2>&1 || "$tool" -w -N "$CHAIN"
  for address in "$@"; do
    if ! "$tool" -w -C "$CHAIN" -d "$address" -j DROP 2>/dev/null; then
      "$tool" -w -I "$CHAIN" 1 -d "$address" -j DROP
      echo "whist-imds-firewall: $tool: dropping forwarded traffic to $address"
    fi
  done
}

# check_rules TOOL ADDRESS...: 1 when a rule is missing.
check_rules() {
  local tool=$1 address missing=0
  shift
  for address in "$@"; do
    if ! "$tool" -w -C "$CHAIN" -d "$address" -j DROP 2>/dev/null; then
      echo "whist-imds-firewall: $tool: no rule dropping traffic to $address" >&2
      missing=1
    fi
  done
  return "$missing"
}

main() {
  local action=ensure_rules
  case ${1:-} in
    "") ;;
    --check) action=check_rules ;;
    *)
      echo "usage: $0 [--check]" >&2
      exit 2
      ;;
  esac
  local status=0
  "$action" iptables "${IPV4_BLOCKED[@]}" || status=1
  # A kernel without IPv6 has no ip6tables tables; Docker does not route IPv6 there either.
  if command -v ip6tables >/dev/null && ip6tables -w -n -L >/dev/null 2>&1; then
    "$action" ip6tables "${IPV6_BLOCKED[@]}" || status=1
  fi
  return "$status"
}

main "$@"
