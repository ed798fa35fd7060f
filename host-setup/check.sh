#!/bin/bash
# Checks the operational artefacts: host-setup/ (systemd units, scripts, AppArmor profile, Docker
# configuration, udev and sysctl files, the Packer template, the EC2 user data),
# scaling-service/deploy/ (Dockerfile, Procfile, heroku.yml, release and deploy scripts) and
# docs/observability/ (Grafana dashboard, Prometheus alerts) against each other and against the
# services' code; and docs/parity.md's rows against the workspace (every name a row gives exists).
# Run by `make check-artifacts` (part of `make test`).
#
# A check whose tool is missing is reported as "skip" with the reason, never as passed; the
# Makefile's setup-system installs every tool on Debian. The last line reads "N passed, M failed"
# and the exit status is 1 when anything failed.

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# apparmor_parser, iptables and ip live in /usr/sbin, which a user's PATH may lack.
export PATH=$PATH:/usr/sbin:/sbin
cd "$ROOT" || exit 1
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=python3
HELPER=(env PYTHONDONTWRITEBYTECODE=1 "$PYTHON" "$ROOT/host-setup/check_artifacts.py")

passed=0
failed=0
skipped=0
SCRATCH=$(mktemp -d)
cleanup() {
  local ns
  for ns in "${NETNS[@]}"; do ip netns del "$ns" 2>/dev/null; done
  if [[ -n ${HASURA_STUB_PID:-} ]]; then kill "$HASURA_STUB_PID" 2>/dev/null; fi
  rm -rf "$SCRATCH"
}
NETNS=()
trap cleanup EXIT

# check NAME COMMAND...: runs the command; passes on exit 0, shows its output on failure.
check() {
  local name=$1 out=$SCRATCH/out
  shift
  if "$@" >"$out" 2>&1; then
    passed=$((passed + 1))
    echo "ok    $name"
  else
    failed=$((failed + 1))
    echo "FAIL  $name"
    sed 's/^/      /' "$out"
  fi
}

skip() {
  skipped=$((skipped + 1))
  echo "skip  $1: $2"
}

have() { command -v "$1" >/dev/null 2>&1; }

# --- shell scripts ------------------------------------------------------------------------------

SHELL_SCRIPTS=(
  host-setup/setup_host.sh
  host-setup/ec2_userdata.sh
  host-setup/whist-imds-firewall.sh
  host-setup/check.sh
  scaling-service/deploy/release.sh
  scaling-service/deploy/deploy.sh
)

every_script_is_listed() {
  local file missing=0
  while IFS= read -r file; do
    if [[ " ${SHELL_SCRIPTS[*]} " != *" $file "* ]]; then
      echo "$file is a shell script that check.sh does not lint: add it to SHELL_SCRIPTS"
      missing=1
    fi
  done < <(grep -rlE '^#!(/usr)?/bin/(env )?(ba)?sh' host-setup scaling-service/deploy | sort)
  return "$missing"
}
check "every shell script is linted" every_script_is_listed

if have shellcheck; then
  for script in "${SHELL_SCRIPTS[@]}"; do
    check "shellcheck $script" shellcheck -x -S style "$script"
  done
else
  skip shellcheck "shellcheck is not installed (make setup-system)"
fi

check "setup_host.sh: --help" host-setup/setup_host.sh --help
expect_status() {
  local want=$1 got
  shift
  "$@" >/dev/null 2>&1
  got=$?
  [[ $got == "$want" ]] || {
    echo "$* exited $got, expected $want"
    return 1
  }
}
check "setup_host.sh: refuses unknown arguments (exit 2)" \
  expect_status 2 host-setup/setup_host.sh --bogus
check "setup_host.sh: refuses --env-file in an AMI build (exit 2)" \
  expect_status 2 host-setup/setup_host.sh --deployment --env-file host-setup/host-service.env.example
check "setup_host.sh: refuses a malformed --pull (exit 2)" \
  expect_status 2 host-setup/setup_host.sh --deployment --pull not-an-image

# setup_host.sh for real, in local mode, twice, inside a sandbox: a private mount namespace whose
# root is an overlay of / (every write lands in a scratch layer), with stand-ins for the commands
# that would reach past it (the kernel: modprobe, sysctl, apparmor_parser, udevadm; systemd) and
# AppArmor and the NVIDIA runtime hidden, so the run is the same on every machine.
SANDBOX_STUBS=$SCRATCH/sandbox-stubs
make_sandbox_stubs() {
  local cmd
  mkdir -p "$SANDBOX_STUBS"
  for cmd in systemctl modprobe sysctl udevadm apparmor_parser; do
    # shellcheck disable=SC2016 # the stand-in expands $* when it runs
    printf '#!/bin/bash\necho "%s $*" >>/whist-check-calls\n' "$cmd" >"$SANDBOX_STUBS/$cmd"
  done
  chmod +x "$SANDBOX_STUBS"/*
}

# in_sandbox LAYER COMMAND...: runs COMMAND as root in the sandbox whose writable layer is LAYER.
in_sandbox() {
  local layer=$1
  shift
  mkdir -p "$layer/upper" "$layer/work" "$layer/merged"
  # shellcheck disable=SC2016 # the inner script expands its own variables
  unshare -m --propagation private bash -c '
    set -e
    layer=$1 stubs=$2
    shift 2
    mount -t overlay overlay -o "lowerdir=/,upperdir=$layer/upper,workdir=$layer/work" "$layer/merged"
    for d in proc sys dev; do mount --rbind "/$d" "$layer/merged/$d"; done
    mount -t tmpfs none "$layer/merged/sys/kernel/security" 2>/dev/null || true
    rm -f "$layer/merged/usr/bin/nvidia-container-runtime" "$layer/merged/usr/local/bin/nvidia-container-runtime"
    exec chroot "$layer/merged" /usr/bin/env \
      PATH="$stubs:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" "$@"
  ' _ "$layer" "$SANDBOX_STUBS" "$@"
}

sandbox_works() {
  make_sandbox_stubs
  in_sandbox "$SCRATCH/sandbox-probe" /bin/true 2>/dev/null
}

setup_host_local_mode_is_idempotent() {
  local layer=$SCRATCH/sandbox upper=$SCRATCH/sandbox/upper
  printf '#!/bin/sh\necho "whist-host-service 0.0.0-check"\n' >"$SCRATCH/fake-host-service"
  chmod +x "$SCRATCH/fake-host-service"
  printf "APP_ENV='localdevwithdb'\n" >"$SCRATCH/test.env"
  local args=(--binary "$SCRATCH/fake-host-service" --env-file "$SCRATCH/test.env")
  in_sandbox "$layer" "$ROOT/host-setup/setup_host.sh" "${args[@]}" >"$SCRATCH/setup1.out" 2>&1 || {
    echo "first run failed:"
    cat "$SCRATCH/setup1.out"
    return 1
  }
  local ok=1 pair file mode
  for pair in \
    whist-host-service.service:etc/systemd/system/whist-host-service.service:644 \
    mandelbox-apparmor-profile:etc/apparmor.d/mandelbox-apparmor-profile:644 \
    90-whist-input.rules:etc/udev/rules.d/90-whist-input.rules:644 \
    whist-modules.conf:etc/modules-load.d/whist.conf:644 \
    90-whist-sysctl.conf:etc/sysctl.d/90-whist.conf:644; do
    IFS=: read -r source file mode <<<"$pair"
    if ! cmp -s "host-setup/$source" "$upper/$file"; then
      echo "/$file is not host-setup/$source"
      ok=0
    elif [[ $(stat -c %a "$upper/$file") != "$mode" ]]; then
      echo "/$file has mode $(stat -c %a "$upper/$file"), expected $mode"
      ok=0
    fi
  done
  if ! cmp -s "$SCRATCH/fake-host-service" "$upper/usr/local/bin/whist-host-service" ||
    [[ $(stat -c %a "$upper/usr/local/bin/whist-host-service") != 755 ]]; then
    echo "the binary was not installed 0755 at /usr/local/bin/whist-host-service"
    ok=0
  fi
  if ! cmp -s "$SCRATCH/test.env" "$upper/etc/whist/host-service.env" ||
    [[ $(stat -c %a "$upper/etc/whist/host-service.env") != 600 ]]; then
    echo "the env file was not installed 0600"
    ok=0
  fi
  if [[ -e $upper/etc/whist/host-service.env.example ]]; then
    echo "the example was installed beside a real env file"
    ok=0
  fi
  [[ -d $upper/whist ]] || { echo "/whist was not created"; ok=0; }
  [[ ! -e $upper/etc/docker/daemon.json ]] ||
    { echo "Docker's configuration was changed on a machine without the NVIDIA runtime"; ok=0; }
  if ! grep -qx "sysctl -q -p /etc/sysctl.d/90-whist.conf" "$upper/whist-check-calls" ||
    ! grep -qx "systemctl daemon-reload" "$upper/whist-check-calls"; then
    echo "sysctl or daemon-reload not run:"
    cat "$upper/whist-check-calls"
    ok=0
  fi
  rm -f "$upper/whist-check-calls"
  in_sandbox "$layer" "$ROOT/host-setup/setup_host.sh" "${args[@]}" >"$SCRATCH/setup2.out" 2>&1 || {
    echo "second run failed:"
    cat "$SCRATCH/setup2.out"
    return 1
  }
  if grep "^setup_host: installed " "$SCRATCH/setup2.out"; then
    echo "the second run installed files again"
    ok=0
  fi
  if grep -E "^(sysctl|systemctl daemon-reload|udevadm)" "$upper/whist-check-calls"; then
    echo "the second run reloaded what had not changed"
    ok=0
  fi
  ((ok))
}

if [[ $(id -u) == 0 ]] && have unshare && sandbox_works; then
  check "setup_host.sh (local mode, sandboxed): installs every file with its mode; a second run changes nothing" \
    setup_host_local_mode_is_idempotent
else
  skip "setup_host.sh sandbox" "needs root, unshare and an overlay mount of / in a mount namespace"
fi

# --- EC2 user data ------------------------------------------------------------------------------

check "user data: placeholders are exactly the documented ones" "${HELPER[@]}" userdata-contract
check "env example and user data: every variable is one the host service reads" "${HELPER[@]}" env-vars

# render NAME=VALUE...: the user data with every placeholder substituted (absent ones empty),
# as the scaling service does.
render_userdata() {
  "$PYTHON" - "$@" <<'PY'
import re, sys
values = dict(a.split("=", 1) for a in sys.argv[1:])
text = open("host-setup/ec2_userdata.sh").read()
sys.stdout.write(re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values.get(m.group(1), ""), text))
PY
}

# Stand-ins for what the user data calls on an instance; each records its arguments.
make_userdata_stubs() {
  local bin=$1 cmd
  mkdir -p "$bin"
  cat >"$bin/curl" <<'SH'
#!/bin/bash
echo "curl $*" >>"$STUB_LOG"
case "$*" in
  *api/token*) echo token ;;
  *placement/region*) echo us-east-1 ;;
  *local-ipv4*) echo 10.1.2.3 ;;
  *) exit 22 ;;
esac
SH
  cat >"$bin/aws" <<'SH'
#!/bin/bash
echo "aws $*" >>"$STUB_LOG"
echo "s3cret-from-ssm"
SH
  cat >"$bin/id" <<'SH'
#!/bin/bash
echo 0
SH
  cat >"$bin/findmnt" <<'SH'
#!/bin/bash
echo /dev/nvme0n1p1
SH
  cat >"$bin/lsblk" <<'SH'
#!/bin/bash
echo nvme0n1
SH
  # Each records its call; `is-active` answers "no"; a command named in STUB_FAIL fails.
  for cmd in systemctl systemd-run timeout fio; do
    # shellcheck disable=SC2016 # the stub expands $* when it runs
    printf '#!/bin/bash\necho "%s $*" >>"$STUB_LOG"\n[[ "$1" != is-active && " ${STUB_FAIL:-} " != *" %s "* ]]\n' \
      "$cmd" "$cmd" >"$bin/$cmd"
  done
  chmod +x "$bin"/*
}

# run_userdata DIR NAME=VALUE...: renders and runs the user data against the stubs, with
# /etc/whist in DIR/etc.
run_userdata() {
  local dir=$1
  shift
  mkdir -p "$dir"
  render_userdata "$@" >"$dir/userdata.sh"
  STUB_LOG=$dir/calls PATH=$SCRATCH/stubs:$PATH WHIST_USERDATA_ETC=$dir/etc \
    bash "$dir/userdata.sh" >"$dir/output" 2>&1
}

userdata_writes_env_and_starts_the_unit() {
  # shellcheck disable=SC2016 # a literal secret with shell metacharacters
  local dir=$SCRATCH/ud1 secret='p@ss$word"with\back`slash' mode
  run_userdata "$dir" APP_ENV=prod HASURA_GRAPHQL_URL=https://hasura.example.com/v1/graphql \
    "HASURA_ADMIN_SECRET=$secret" SENTRY_DSN=https://k@sentry.example.com/1 \
    WHIST_OPS_ADDR=PRIVATE_IP:4679 WHIST_OPS_ALLOW=10.20.0.0/16 || {
    cat "$dir/output"
    return 1
  }
  mode=$(stat -c %a "$dir/etc/host-service.env")
  [[ $mode == 600 ]] || {
    echo "env file mode $mode, expected 600"
    return 1
  }
  "${HELPER[@]}" env-file "$dir/etc/host-service.env" APP_ENV=prod \
    HASURA_GRAPHQL_URL=https://hasura.example.com/v1/graphql "HASURA_ADMIN_SECRET=$secret" \
    WHIST_POWEROFF=true WHIST_LOG_FORMAT=json SENTRY_DSN=https://k@sentry.example.com/1 \
    WHIST_OPS_ADDR=10.1.2.3:4679 WHIST_OPS_ALLOW=10.20.0.0/16 || return 1
  grep -qx "systemctl enable --now whist-host-service.service" "$dir/calls" || {
    echo "the unit was not enabled and started:"
    cat "$dir/calls"
    return 1
  }
  grep -q "systemd-run --unit=whist-ebs-warm .*--filename=/dev/nvme0n1 " "$dir/calls" || {
    echo "the root volume was not warmed in the background:"
    cat "$dir/calls"
    return 1
  }
  ! grep -q '^aws ' "$dir/calls" || {
    echo "called aws without an SSM parameter"
    return 1
  }
}

userdata_reads_the_secret_from_ssm() {
  local dir=$SCRATCH/ud2
  run_userdata "$dir" APP_ENV=dev HASURA_GRAPHQL_URL=https://h.example.com/v1/graphql \
    HASURA_ADMIN_SECRET_SSM_PARAMETER=/whist/dev/hasura-admin-secret || {
    cat "$dir/output"
    return 1
  }
  grep -q -- "aws ssm get-parameter --region us-east-1 --with-decryption --name /whist/dev/hasura-admin-secret" \
    "$dir/calls" || {
    cat "$dir/calls"
    return 1
  }
  grep -qx "HASURA_ADMIN_SECRET='s3cret-from-ssm'" "$dir/etc/host-service.env" || {
    cat "$dir/etc/host-service.env"
    return 1
  }
}

# userdata_refuses WHY NAME=VALUE...: the user data exits non-zero, writes no env file and
# starts nothing.
userdata_refuses() {
  local dir=$SCRATCH/ud-$RANDOM
  shift
  if run_userdata "$dir" "$@"; then
    echo "the user data accepted: $*"
    return 1
  fi
  [[ ! -e $dir/etc/host-service.env ]] || {
    echo "an env file was written"
    return 1
  }
  ! grep -q "enable" "$dir/calls" 2>/dev/null || {
    echo "the unit was enabled"
    return 1
  }
}

userdata_starts_the_unit_when_warming_fails() {
  local dir=$SCRATCH/ud3
  STUB_FAIL="systemd-run timeout" run_userdata "$dir" APP_ENV=prod \
    HASURA_GRAPHQL_URL=https://h.example.com/v1/graphql HASURA_ADMIN_SECRET=x || {
    cat "$dir/output"
    return 1
  }
  grep -qx "systemctl enable --now whist-host-service.service" "$dir/calls"
}

make_userdata_stubs "$SCRATCH/stubs"
check "user data: writes the env file (0600, literal values) and starts the unit" \
  userdata_writes_env_and_starts_the_unit
check "user data: reads the admin secret from SSM with the instance's region" \
  userdata_reads_the_secret_from_ssm
check "user data: a failed volume warm-up does not keep the unit from starting" \
  userdata_starts_the_unit_when_warming_fails
check "user data: refuses an unsubstituted placeholder" userdata_refuses placeholder \
  APP_ENV=prod 'HASURA_GRAPHQL_URL={{HASURA_GRAPHQL_URL}}' HASURA_ADMIN_SECRET=x
check "user data: refuses a value with a single quote" userdata_refuses quote \
  APP_ENV=prod HASURA_GRAPHQL_URL=https://h/v1/graphql "HASURA_ADMIN_SECRET=it's"
check "user data: refuses plain http and an unknown APP_ENV" userdata_refuses http \
  APP_ENV=prod HASURA_GRAPHQL_URL=http://h/v1/graphql HASURA_ADMIN_SECRET=x
check "user data: refuses an unknown APP_ENV" userdata_refuses env \
  APP_ENV=production HASURA_GRAPHQL_URL=https://h/v1/graphql HASURA_ADMIN_SECRET=x
check "user data: refuses a missing admin secret" userdata_refuses secret \
  APP_ENV=prod HASURA_GRAPHQL_URL=https://h/v1/graphql

# --- systemd units ------------------------------------------------------------------------------

# A root for systemd-analyze: the system's unit directory, our units, and stand-ins for the
# binaries they name (verify checks that each ExecStart= names an executable).
systemd_root() {
  local root=$SCRATCH/systemd-root
  if [[ ! -d $root ]]; then
    mkdir -p "$root/etc/systemd/system" "$root/usr/lib/systemd" "$root/usr/local/bin" \
      "$root/usr/local/sbin" "$root/usr/bin"
    cp -r /usr/lib/systemd/system "$root/usr/lib/systemd/"
    cp host-setup/whist-host-service.service host-setup/whist-imds-firewall.service \
      "$root/etc/systemd/system/"
    printf '#!/bin/sh\n' >"$root/usr/local/bin/whist-host-service"
    cp host-setup/whist-imds-firewall.sh "$root/usr/local/sbin/"
    cp "$(command -v mkdir)" "$root/usr/bin/mkdir"
    chmod +x "$root/usr/local/bin/whist-host-service"
  fi
  echo "$root"
}

# systemd-analyze verify exits 0 on unknown keys and bad values (it only logs them): any output
# is a failure.
verify_unit() {
  local root out
  root=$(systemd_root)
  out=$(systemd-analyze verify --root="$root" "$1" 2>&1)
  local status=$?
  [[ -n $out ]] && echo "$out"
  [[ $status == 0 && -z $out ]]
}

# The hardening must not regress: systemd's exposure score (0–100, lower is better).
unit_exposure_at_most() {
  local root
  root=$(systemd_root)
  systemd-analyze security --offline=yes --root="$root" --threshold="$2" "$1" | tail -n 1
}

if have systemd-analyze && [[ -d /usr/lib/systemd/system ]]; then
  check "systemd-analyze verify whist-host-service.service" verify_unit whist-host-service.service
  check "systemd-analyze verify whist-imds-firewall.service" verify_unit whist-imds-firewall.service
  check "whist-host-service.service: exposure score at most 4.0" \
    unit_exposure_at_most whist-host-service.service 40
else
  skip "systemd-analyze" "systemd-analyze or /usr/lib/systemd/system is missing"
fi
check "whist-host-service.service: agrees with the service's defaults and setup_host.sh" \
  "${HELPER[@]}" unit

# --- AppArmor, Docker, udev, sysctl ---------------------------------------------------------------

apparmor_compiles() {
  local features=/usr/share/apparmor-features/features
  if [[ -f $features ]]; then
    # Compiles the profile for a real feature set (mount rules included), loads nothing.
    apparmor_parser -Q -K --kernel-features "$features" -o "$SCRATCH/apparmor.bin" \
      host-setup/mandelbox-apparmor-profile
  else
    apparmor_parser -Q -K host-setup/mandelbox-apparmor-profile
  fi
}
if have apparmor_parser; then
  check "apparmor_parser: the mandelbox profile compiles" apparmor_compiles
else
  skip apparmor_parser "apparmor is not installed (make setup-system)"
fi

check "daemon.json and seccomp-patch.json: valid JSON, NVIDIA default runtime, live-restore" \
  "${HELPER[@]}" daemon-json
merge_seccomp() {
  # What setup_host.sh runs, on a stand-in for Docker's default profile with its clone, clone3
  # and CAP_SYS_ADMIN rules.
  local dir=host-setup/docker-daemon-config
  if ! grep -q 'seccomp-mandelbox.jq' host-setup/setup_host.sh ||
    ! grep -q 'seccomp-verify.jq' host-setup/setup_host.sh; then
    echo "setup_host.sh does not run seccomp-mandelbox.jq and seccomp-verify.jq"
    return 1
  fi
  cat >"$SCRATCH/default.json" <<'JSON'
{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
 {"names":["read","write"],"action":"SCMP_ACT_ALLOW"},
 {"names":["clone"],"action":"SCMP_ACT_ALLOW","excludes":{"caps":["CAP_SYS_ADMIN"]},
  "args":[{"index":0,"value":2114060288,"op":"SCMP_CMP_MASKED_EQ"}]},
 {"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38,"excludes":{"caps":["CAP_SYS_ADMIN"]}},
 {"names":["bpf","clone","clone3","mount","setns","umount2","unshare"],"action":"SCMP_ACT_ALLOW",
  "includes":{"caps":["CAP_SYS_ADMIN"]}}]}
JSON
  if jq -e -f "$dir/seccomp-verify.jq" "$SCRATCH/default.json" >/dev/null; then
    echo "seccomp-verify.jq accepts Docker's profile, which lets CAP_SYS_ADMIN unshare"
    return 1
  fi
  jq --slurpfile patch "$dir/seccomp-patch.json" -f "$dir/seccomp-mandelbox.jq" \
    "$SCRATCH/default.json" >"$SCRATCH/seccomp.json" &&
    jq -e -f "$dir/seccomp-verify.jq" "$SCRATCH/seccomp.json" &&
    jq -e '[.syscalls[].names[]] | index("read") != null and index("bpf") != null' \
      "$SCRATCH/seccomp.json" &&
    jq -e '[.syscalls[] | select(.names == ["clone"]) | .args[0].value] == [2114060288]' \
      "$SCRATCH/seccomp.json"
}
if have jq; then
  check "seccomp: setup_host.sh's profile keeps Docker's rules, denies user namespaces and mounts" \
    merge_seccomp
else
  skip seccomp "jq is not installed"
fi
check "udev rules: every rule matches and assigns; device name as in the host service" \
  "${HELPER[@]}" udev
check "sysctl file: every key is a kernel setting" "${HELPER[@]}" sysctl

# --- the IMDS firewall, in network namespaces ---------------------------------------------------

firewall_in_namespaces() {
  local c=whist-chk-c-$$ r=whist-chk-r-$$ m=whist-chk-m-$$ script=$ROOT/host-setup/whist-imds-firewall.sh
  NETNS+=("$c" "$r" "$m")
  ip netns add "$c" && ip netns add "$r" && ip netns add "$m" || return 1
  # container (10.231.0.2) -- router -- "metadata" network holding 169.254.169.254, .170.2
  # and a control address .169.253 that must stay reachable.
  ip link add vc netns "$c" type veth peer name vrc netns "$r" &&
    ip link add vm netns "$m" type veth peer name vrm netns "$r" || return 1
  ip -n "$c" addr add 10.231.0.2/24 dev vc && ip -n "$c" link set vc up && ip -n "$c" link set lo up &&
    ip -n "$c" route add default via 10.231.0.1 &&
    ip -n "$r" addr add 10.231.0.1/24 dev vrc && ip -n "$r" link set vrc up &&
    ip -n "$r" addr add 169.254.0.1/16 dev vrm && ip -n "$r" link set vrm up &&
    ip netns exec "$r" sysctl -q -w net.ipv4.ip_forward=1 &&
    ip -n "$m" addr add 169.254.169.254/16 dev vm && ip -n "$m" addr add 169.254.169.253/16 dev vm &&
    ip -n "$m" addr add 169.254.170.2/16 dev vm && ip -n "$m" link set vm up &&
    ip -n "$m" link set lo up && ip -n "$m" route add default via 169.254.0.1 || return 1
  ip netns exec "$m" "$PYTHON" -m http.server --bind 0.0.0.0 8080 >/dev/null 2>&1 &
  local server=$!
  local ok=1
  # The script twice (idempotent), then Docker's jump from FORWARD into DOCKER-USER.
  ip netns exec "$r" "$script" >/dev/null && ip netns exec "$r" "$script" >/dev/null || ok=0
  ip netns exec "$r" iptables -w -I FORWARD -j DOCKER-USER || ok=0
  local rules
  rules=$(ip netns exec "$r" iptables -w -S DOCKER-USER | grep -c -- '-j DROP')
  [[ $rules == 2 ]] || {
    echo "expected 2 DROP rules after two runs, found $rules"
    ok=0
  }
  ip netns exec "$r" "$script" --check || ok=0
  for _ in $(seq 50); do
    ip netns exec "$c" curl -s -o /dev/null --max-time 1 http://169.254.169.253:8080/ && break
    sleep 0.1
  done
  ip netns exec "$c" curl -s -o /dev/null --max-time 2 http://169.254.169.253:8080/ || {
    echo "the control address is unreachable: the test network does not work"
    ok=0
  }
  local blocked
  for blocked in 169.254.169.254 169.254.170.2; do
    if ip netns exec "$c" curl -s -o /dev/null --max-time 2 "http://$blocked:8080/"; then
      echo "a container reached $blocked"
      ok=0
    fi
  done
  # A missing rule is reported.
  ip netns exec "$r" iptables -w -D DOCKER-USER -d 169.254.170.2/32 -j DROP
  if ip netns exec "$r" "$script" --check 2>/dev/null; then
    echo "--check passed with a rule missing"
    ok=0
  fi
  kill "$server" 2>/dev/null
  ((ok))
}
if [[ $(id -u) == 0 ]] && have ip && have iptables && have curl && ip netns add whist-chk-probe-$$ 2>/dev/null; then
  ip netns del whist-chk-probe-$$
  check "IMDS firewall: containers cannot reach 169.254.169.254 or 169.254.170.2; idempotent" \
    firewall_in_namespaces
else
  skip "IMDS firewall" "needs root, iproute2, iptables, curl and network namespaces"
fi

# --- Packer -------------------------------------------------------------------------------------

packer_validates() {
  local binary=$SCRATCH/whist-host-service
  printf '#!/bin/sh\n' >"$binary"
  (cd host-setup && packer validate -var app_env=prod -var commit=0123456789abcdef \
    -var host_service_binary="$binary" \
    -var 'mandelbox_images=["ghcr.io/whisthq/prod/browsers/chrome:0123456"]' ami.pkr.hcl)
}
packer_refuses_bad_env() {
  local binary=$SCRATCH/whist-host-service
  printf '#!/bin/sh\n' >"$binary"
  ! (cd host-setup && packer validate -var app_env=production -var commit=0123456789abcdef \
    -var host_service_binary="$binary" ami.pkr.hcl >/dev/null 2>&1)
}
if have packer; then
  check "packer validate ami.pkr.hcl" packer_validates
  check "packer: app_env outside dev/staging/prod is refused" packer_refuses_bad_env
  check "packer fmt -check ami.pkr.hcl" packer fmt -check host-setup/ami.pkr.hcl
else
  skip packer "packer is not installed (Debian's packer; make setup-system installs it where available)"
fi

# --- scaling service deployment -----------------------------------------------------------------

check "Dockerfile, Procfile, heroku.yml: sources exist, workspace complete, non-root, commands agree" \
  "${HELPER[@]}" deploy

# deploy.sh against a local repository standing in for Heroku's, from a throwaway commit of the
# working tree (what is not committed yet is deployed as it would be once committed).
deploy_pushes_a_buildable_tree() {
  local work=$SCRATCH/deploy-src bare=$SCRATCH/heroku.git out=$SCRATCH/deploy-out
  mkdir -p "$work"
  git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$work" || return 1
  git -C "$work" init -q && git -C "$work" add -A &&
    git -C "$work" -c user.name=check -c user.email=check@whist.invalid commit -q -m check || return 1
  git init -q --bare "$bare" || return 1
  (cd "$work" && HEROKU_API_KEY=not-used WHIST_DEPLOY_REMOTE=$bare scaling-service/deploy/deploy.sh whist-check-app) ||
    return 1
  git clone -q -b main "$bare" "$out" || return 1
  "${HELPER[@]}" pushed-tree "$out"
}
if have git && git rev-parse --git-dir >/dev/null 2>&1; then
  check "deploy.sh: pushes a tree with the Dockerfile and heroku.yml at its root, every COPY source in it" \
    deploy_pushes_a_buildable_tree
else
  skip "deploy.sh" "not a git checkout"
fi
if have cargo; then
  # The image builds with --locked: a Cargo.lock out of step with the manifests breaks deploys
  # while `cargo test` (which updates the lock silently) still passes.
  lock_is_current() { cargo metadata --locked --format-version 1 >/dev/null; }
  check "Cargo.lock is current (the image builds with cargo build --locked)" lock_is_current
else
  skip "Cargo.lock" "cargo is not installed"
fi

# A stand-in Hasura metadata API: records each request, answers 200 (or 400 for
# replace_metadata when FAIL_REPLACE is set).
start_hasura_stub() {
  cat >"$SCRATCH/hasura_stub.py" <<'PY'
import http.server, json, os, sys
log = open(sys.argv[2], "a")
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        log.write(json.dumps({"path": self.path, "secret": self.headers.get("x-hasura-admin-secret"),
                              "type": self.headers.get("content-type"), "body": json.loads(body)}) + "\n")
        log.flush()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"message":"success"}')
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
open(sys.argv[1], "w").write(str(s.server_port))
s.serve_forever()
PY
  "$PYTHON" "$SCRATCH/hasura_stub.py" "$SCRATCH/hasura.port" "$SCRATCH/hasura.log" &
  HASURA_STUB_PID=$!
  for _ in $(seq 50); do
    [[ -s $SCRATCH/hasura.port ]] && return 0
    sleep 0.1
  done
  return 1
}

release_applies_migrations_then_metadata() {
  start_hasura_stub || {
    echo "the stand-in Hasura did not start"
    return 1
  }
  local port
  port=$(cat "$SCRATCH/hasura.port")
  # shellcheck disable=SC2016 # the stand-in expands them when it runs
  printf '#!/bin/bash\necho "migrate url=$DATABASE_URL ca=${PGSSLROOTCERT:-}" >>"%s"\n' \
    "$SCRATCH/migrate.log" >"$SCRATCH/whist-migrate"
  chmod +x "$SCRATCH/whist-migrate"
  DATABASE_URL=postgres://db/whist DATABASE_CA_PEM="-----BEGIN CERTIFICATE-----" \
    HASURA_GRAPHQL_URL="http://127.0.0.1:$port/v1/graphql" HASURA_ADMIN_SECRET='se cr"et' \
    WHIST_MIGRATE=$SCRATCH/whist-migrate HASURA_METADATA_FILE=database/hasura/metadata.json \
    scaling-service/deploy/release.sh || return 1
  grep -q "migrate url=postgres://db/whist ca=/" "$SCRATCH/migrate.log" || {
    echo "whist-migrate was not run with DATABASE_URL and the CA file"
    return 1
  }
  "$PYTHON" - "$SCRATCH/hasura.log" <<'PY'
import json, sys
calls = [json.loads(l) for l in open(sys.argv[1])]
meta = json.load(open("database/hasura/metadata.json"))
assert [c["path"] for c in calls] == ["/v1/metadata"] * 2, calls
assert all(c["secret"] == 'se cr"et' for c in calls), "admin secret header"
assert all(c["type"] == "application/json" for c in calls), "content type"
assert calls[0]["body"] == {"type": "replace_metadata", "args": meta}, "replace_metadata body"
assert calls[1]["body"]["type"] == "reload_metadata", "reload_metadata"
PY
}

release_stops_when_migrations_fail() {
  printf '#!/bin/bash\nexit 1\n' >"$SCRATCH/whist-migrate-fails"
  chmod +x "$SCRATCH/whist-migrate-fails"
  local before
  before=$(wc -l <"$SCRATCH/hasura.log" 2>/dev/null || echo 0)
  if DATABASE_URL=postgres://db/whist HASURA_GRAPHQL_URL=http://127.0.0.1:9/v1/graphql \
    HASURA_ADMIN_SECRET=x WHIST_MIGRATE=$SCRATCH/whist-migrate-fails \
    HASURA_METADATA_FILE=database/hasura/metadata.json scaling-service/deploy/release.sh; then
    echo "release.sh succeeded although whist-migrate failed"
    return 1
  fi
  [[ $(wc -l <"$SCRATCH/hasura.log" 2>/dev/null || echo 0) == "$before" ]]
}

if have curl; then
  check "release phase: whist-migrate, then replace_metadata and reload_metadata with the secret" \
    release_applies_migrations_then_metadata
  check "release phase: a failed migration aborts before the metadata" \
    release_stops_when_migrations_fail
else
  skip "release phase" "curl is not installed"
fi

# --- observability ------------------------------------------------------------------------------

check "Grafana dashboard: valid JSON, unique ids, no overlap, every panel queries" \
  "${HELPER[@]}" dashboard "$SCRATCH/dashboard-rules.json"
if have promtool; then
  check "Grafana dashboard: every query is valid PromQL (promtool)" \
    promtool check rules "$SCRATCH/dashboard-rules.json"
  check "alerts.yml: promtool check rules" promtool check rules docs/observability/alerts.yml
  check "alerts.yml: promtool test rules alerts.test.yml" \
    bash -c 'cd docs/observability && promtool test rules alerts.test.yml'
else
  skip promtool "promtool is not installed (Debian's prometheus package)"
fi
check "alerts.yml: YAML, severities, runbook anchors, every required alert, each shown firing" \
  "${HELPER[@]}" alerts
check "metrics: every metric in the dashboard and alerts is documented; host metrics match ops.rs" \
  "${HELPER[@]}" metrics
check "docs/operations.md: every operation has its section; links resolve" \
  "${HELPER[@]}" operations-doc

# --- docs ---------------------------------------------------------------------------------------

check "docs/parity.md: every file, function, target, flag, variable and metric a row names exists" \
  "${HELPER[@]}" parity

echo
if ((skipped)); then echo "($skipped skipped: their tool is missing)"; fi
echo "$passed passed, $failed failed"
((failed == 0))
