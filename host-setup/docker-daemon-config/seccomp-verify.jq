# True when a seccomp profile confines a mandelbox as docs/host-service.md says: deny by
# default; nothing allows unshare, setns, mount, umount2 or clone3; every rule allowing clone
# filters its flags; clone3 answers ENOSYS (38).
def allowed: [.syscalls[] | select(.action == "SCMP_ACT_ALLOW")];
.defaultAction == "SCMP_ACT_ERRNO"
and ([allowed[].names[]] | (index("unshare") // index("setns") // index("mount")
      // index("umount2") // index("clone3")) == null)
and all(allowed[] | select(.names | index("clone") != null); (.args // []) | length > 0)
and any(.syscalls[]; .action == "SCMP_ACT_ERRNO" and .errnoRet == 38
        and (.names | index("clone3") != null))
