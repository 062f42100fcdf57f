//! Pinning on bpffs (`--pin DIR`): links and maps outlive the proxy, so that containers fail
//! closed while it is down, and a restarted proxy adopts them without detaching in between. One
//! helper, [`attach_or_adopt`], for every link of both modes.
use std::{os::fd::BorrowedFd, path::Path};

use aya::programs::links::{FdLink, PinnedLink};

use super::error::Error;

/// `statfs` magic numbers.
pub(crate) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub(crate) fn statfs_type(path: &Path) -> std::io::Result<i64> {
    let stat = nix::sys::statfs::statfs(path)?;
    Ok(stat.filesystem_type().0 as i64)
}

/// What an attach closure of [`attach_or_adopt`] made.
pub(crate) enum Fresh {
    /// Not pinning: the link stays owned by its program (detached with it).
    Unpinned,
    /// Pinning: this link, to be pinned at the path.
    Link(FdLink),
    /// Pinning: the closure pinned the link at the path itself (aya cannot pin a sock_ops link).
    PinnedAt,
}

/// Attach one program to one target, or adopt the link a previous run pinned at `pin_path`
/// (then `adopted` counts it, and nothing is attached or detached in between). An adopted link
/// is switched to `program`, this build's, with `BPF_LINK_UPDATE`: atomically, so the target is
/// never without a program, and a previous build's programs (an upgrade, a downgrade, anything
/// else pinned there) never keep running. `attach` gets the path when pinning. Returns the
/// pinned link, if pinning; it must be kept (dropping a `PinnedLink` closes the descriptor, the
/// pin holds the link).
pub(crate) fn attach_or_adopt(
    pin_path: Option<&Path>,
    adopted: &mut usize,
    program: BorrowedFd<'_>,
    attach: impl FnOnce(Option<&Path>) -> Result<Fresh, Error>,
) -> Result<Option<PinnedLink>, Error> {
    let adopt = |path: &Path| {
        PinnedLink::from_pin(path).map_err(|source| Error::Adopt {
            path: path.to_owned(),
            source,
        })
    };
    if let Some(path) = pin_path.filter(|p| p.exists()) {
        // A previous run's link, still attached: keep it, running this build's program.
        let link = adopt(path)?;
        raw::link_update_at(path, program).map_err(|source| Error::Update {
            path: path.to_owned(),
            source,
        })?;
        *adopted += 1;
        return Ok(Some(link));
    }
    match (attach(pin_path)?, pin_path) {
        (Fresh::Unpinned, _) => Ok(None),
        (Fresh::Link(link), Some(path)) => link.pin(path).map(Some).map_err(|source| Error::Pin {
            path: path.to_owned(),
            source,
        }),
        (Fresh::PinnedAt, Some(path)) => adopt(path).map(Some),
        (_, None) => unreachable!("a link to pin only when pinning"),
    }
}

/// The pin name of program `program`'s link on a target (`cg<id>` for a cgroup, `if<index>` for
/// an interface).
pub(crate) fn link_pin_name(program: &str, target: &str) -> String {
    format!("link_{program}_{target}")
}

/// Pinned interface links (`link_<program>_if<index>`) whose interface is gone (`present` says
/// no for its index): removed. An interface that went while no proxy ran (a pod deleted during a
/// restart) took its links with it; their pins would stay on bpffs for good, and one would be
/// "adopted" by whatever interface is given that index later. The names removed.
pub(crate) fn remove_gone_interface_links(
    dir: &Path,
    present: impl Fn(u32) -> bool,
) -> std::io::Result<Vec<String>> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let index = name
            .strip_prefix("link_")
            .and_then(|rest| rest.rsplit_once("_if"))
            .and_then(|(_, index)| index.parse::<u32>().ok());
        if let Some(index) = index
            && !present(index)
        {
            std::fs::remove_file(entry.path())?;
            removed.push(name);
        }
    }
    Ok(removed)
}

pub(crate) fn prepare_pin_dir(dir: &Path) -> Result<(), Error> {
    let err = |reason: String| Error::PinDir {
        path: dir.to_owned(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    if statfs_type(dir).map_err(|e| err(e.to_string()))? != BPF_FS_MAGIC {
        return Err(err(
            "not on a bpffs (mount one: mount -t bpf bpf /sys/fs/bpf)".into(),
        ));
    }
    Ok(())
}

/// Before the object is loaded with maps pinned in `dir`: a pinned map whose layout (key size,
/// value size, capacity) is not this build's (pinned by an older or newer build) is unpinned, so
/// that a new one is made; this build's programs could not use it (the verifier refuses them, and
/// the proxy would crash-loop). Its entries are lost: the configuration is written again, the
/// cgroup classification walked again, and connections in flight at that moment are refused
/// (closed, never open). The names of the maps replaced.
pub(crate) fn replace_incompatible_maps(
    dir: &Path,
    maps: &[&str],
    object: &[u8],
) -> Result<Vec<String>, Error> {
    let object = aya_obj::Object::parse(object)
        .map_err(|err| Error::Io(std::io::Error::other(format!("parsing the object: {err}"))))?;
    let mut replaced = Vec::new();
    for name in maps {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let Some(wanted) = object.maps.get(*name) else {
            continue;
        };
        let want = (wanted.key_size(), wanted.value_size(), wanted.max_entries());
        let have = aya::maps::MapInfo::from_pin(&path)
            .map(|info| (info.key_size(), info.value_size(), info.max_entries()))
            .ok();
        if have == Some(want) {
            continue;
        }
        std::fs::remove_file(&path)?;
        tracing::warn!(
            map = name,
            pinned = ?have,
            this_build = ?want,
            "a pinned map has another layout (key, value size, capacity) than this build's: \
             replaced by a new one (its entries are rebuilt)"
        );
        replaced.push((*name).to_owned());
    }
    Ok(replaced)
}

/// Remove everything `--pin DIR` left: pinned links (which detaches them), programs and maps.
/// Returns the names of what was removed.
pub fn unpin(dir: &Path) -> Result<Vec<String>, Error> {
    let mut removed = Vec::new();
    if !dir.exists() {
        return Ok(removed);
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        std::fs::remove_file(entry.path())?;
        removed.push(entry.file_name().to_string_lossy().into_owned());
    }
    std::fs::remove_dir(dir)?;
    removed.sort();
    Ok(removed)
}

/// The bpf(2) commands aya 0.14 does not offer: a sock_ops link, pinning it, and replacing the
/// program behind a pinned link.
pub mod raw {
    use std::{
        ffi::CString,
        os::{
            fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
            unix::ffi::OsStrExt as _,
        },
        path::Path,
    };

    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_LINK_UPDATE: libc::c_long = 29;

    /// The `link_update` member of `union bpf_attr`.
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    /// `enum bpf_attach_type`: BPF_CGROUP_SOCK_OPS.
    pub const BPF_CGROUP_SOCK_OPS: u32 = 3;

    /// The `link_create` member of `union bpf_attr` (the fields used here, then zeroes).
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        rest: [u64; 4],
    }

    /// The `obj_pin` member of `union bpf_attr`.
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        pad: u32,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
        // SAFETY: attr is a live, correctly laid out prefix of union bpf_attr; the kernel reads
        // size_of::<T>() bytes of it and zero-extends the rest.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut T,
                std::mem::size_of::<T>() as libc::c_uint,
            )
        };
        if ret < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    /// BPF_LINK_CREATE of program `prog` on cgroup `target` (single attachment).
    pub fn link_create(
        prog: BorrowedFd<'_>,
        target: BorrowedFd<'_>,
        attach_type: u32,
    ) -> std::io::Result<OwnedFd> {
        let mut attr = LinkCreate {
            prog_fd: prog.as_raw_fd() as u32,
            target_fd: target.as_raw_fd() as u32,
            attach_type,
            flags: 0,
            rest: [0; 4],
        };
        let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
        // SAFETY: the kernel returned a new file descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// BPF_OBJ_GET: a descriptor of the object pinned at `path`.
    pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::other("pin path contains a NUL byte"))?;
        let mut attr = ObjPin {
            pathname: c_path.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
            path_fd: 0,
            pad: 0,
        };
        let fd = bpf(BPF_OBJ_GET, &mut attr)?;
        // SAFETY: the kernel returned a new file descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// BPF_LINK_UPDATE of the link pinned at `path`: it runs `program` from now on, atomically.
    pub fn link_update_at(path: &Path, program: BorrowedFd<'_>) -> std::io::Result<()> {
        let link = obj_get(path)?;
        let mut attr = LinkUpdate {
            link_fd: link.as_raw_fd() as u32,
            new_prog_fd: program.as_raw_fd() as u32,
            flags: 0,
            old_prog_fd: 0,
        };
        bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
    }

    /// BPF_OBJ_PIN of `fd` at `path` on a bpffs.
    pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::other("pin path contains a NUL byte"))?;
        let mut attr = ObjPin {
            pathname: c_path.as_ptr() as u64,
            bpf_fd: fd.as_raw_fd() as u32,
            file_flags: 0,
            path_fd: 0,
            pad: 0,
        };
        bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
    }
}
