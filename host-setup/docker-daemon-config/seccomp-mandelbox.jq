# Docker's default seccomp profile (the input) made stricter for mandelboxes by
# seccomp-patch.json (`--slurpfile patch`): every name in remove_names is taken out of every
# rule, whatever capability the rule is gated on; clone stays only in rules with an argument
# filter (Docker's mask of the namespace flags); rules left without a name go; then the patch's
# own rules are added.
$patch[0] as $p
| .syscalls |= (
    map(.names -= $p.remove_names)
    | map(if (.names | index("clone")) != null and ((.args // []) | length) == 0
          then .names -= ["clone"] else . end)
    | map(select(.names | length > 0))
  )
| .syscalls += $p.syscalls
